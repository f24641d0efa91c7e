"""GPU figures: recording and folded-ablation overhead, evaluation throughput and peak memory, as JSON.

For each model: ``record_ratio`` (recording all default statistics at every site / the bare forward of the model
body, the two arms interleaved on the same batches, median over repeats), ``fold_ratio`` (the full model's forward
with 10% of every site's neurons mean-ablated by folding / the bare full forward), ``eval_tokens_per_s``
(:func:`~neurospec.evaluate.metrics.evaluate_lm`), and the peak GPU memory (``torch.cuda.max_memory_allocated``)
of one bare forward and of one recorded batch. Models: the bundled SmolLM2-135M in bfloat16 at batch 32 x 512, and
a randomly initialised ~1.1B-parameter Llama built in-process from a config (no download) at batch 8 x 2048.

    python benchmarks/gpu_bench.py --json          # on a CUDA GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_bench.py --cpu-smoke     # the same code on a tiny model on the CPU (a test of the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from neurospec.evaluate.metrics import evaluate_lm
from neurospec.intervene.ablate import ablated
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import LoadedModel, head_of, load_model
from neurospec.models.sites import find_sites
from neurospec.record.recorder import RecordConfig, _forward_body, record_task

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak(fn, device) -> int | None:
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def random_llama(config: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A randomly initialised Llama of ``config`` on ``device`` (seeded), wrapped without a weight fingerprint."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(**config)
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, None, f"random llama ({n / 1e6:,.1f}M parameters)", "memory", head_of(model),
                       find_sites(model), "not-fingerprinted")


def measure(loaded: LoadedModel, batch: int, seq: int, batches: int, repeats: int) -> dict:
    device = loaded.device
    vocab = loaded.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, vocab, (batch * batches, seq), generator=g)
    on_dev = blocks.to(device)
    body = _forward_body(loaded.model)
    sites = loaded.sites.select()
    cfg = RecordConfig(batch_size=batch, seq_len=seq, tokens=blocks.numel(), reservoir=0)

    def bare():
        with torch.inference_mode():
            for i in range(batches):
                body(input_ids=on_dev[i * batch : (i + 1) * batch])

    def recorded():
        record_task(loaded, blocks, sites, cfg)

    def full():
        with torch.inference_mode():
            for i in range(batches):
                loaded.model(input_ids=on_dev[i * batch : (i + 1) * batch])

    neurons = NeuronSet.random(sites, frac=0.1, seed=0)
    offsets = {s.name: torch.randn(s.width, generator=g) * 0.1 for s in sites}

    def folded():
        with ablated(loaded.model, loaded.sites, neurons, "mean", offsets=offsets, fold=True):
            full()

    bare()  # warm-up (kernels, allocator)
    recorded()
    times: dict[str, list[float]] = {"bare": [], "record": [], "full": [], "folded": []}
    for _ in range(repeats):  # interleaved, so drifts of clock and temperature hit both arms alike
        times["bare"].append(_timed(bare, device))
        times["record"].append(_timed(recorded, device))
        times["full"].append(_timed(full, device))
        times["folded"].append(_timed(folded, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    one = blocks[:batch]
    peak_bare = _peak(lambda: bare_one(body, one.to(device)), device)
    peak_record = _peak(lambda: record_task(loaded, one, sites, dataclass_with(cfg, tokens=one.numel())), device)
    eval_seconds = _timed(lambda: evaluate_lm(loaded.model, blocks, batch_size=batch), device)
    return {
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "batch": [batch, seq],
        "batches_per_arm": batches,
        "repeats": repeats,
        "sites": len(sites),
        "record_ratio": round(med["record"] / med["bare"], 3),
        "fold_ratio": round(med["folded"] / med["full"], 3),
        "bare_tokens_per_s": round(blocks.numel() / med["bare"]),
        "eval_tokens_per_s": round(blocks.numel() / eval_seconds),
        "peak_bytes_bare": peak_bare,
        "peak_bytes_record": peak_record,
        "seconds": {k: round(v, 4) for k, v in med.items()},
    }


def bare_one(body, ids) -> None:
    with torch.inference_mode():
        body(input_ids=ids)


def dataclass_with(cfg: RecordConfig, **changes) -> RecordConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU (tests the script)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, dtype, repeats = torch.device("cpu"), torch.bfloat16, args.repeats or 2
        runs = [measure(random_llama(TINY, device, dtype), 2, 32, 2, repeats)]
        gpu = None
    else:
        if not torch.cuda.is_available():
            sys.stderr.write("gpu_bench: no CUDA GPU is visible to torch; run it on a GPU machine, or pass "
                             "--cpu-smoke to test the script on the CPU\n")
            raise SystemExit(2)
        device, repeats = torch.device("cuda"), args.repeats or 3
        gpu = torch.cuda.get_device_name(device)
        small = load_model("smollm2-135m", device="cuda", dtype="bfloat16")
        runs = [measure(small, 32, 512, 4, repeats)]
        del small
        torch.cuda.empty_cache()
        runs.append(measure(random_llama(LLAMA_1B, device, torch.bfloat16), 8, 2048, 3, repeats))
    out = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "runs": runs}
    sys.stdout.write(json.dumps(out, indent=2 if not args.json else None) + "\n")
    return out


if __name__ == "__main__":
    main()
