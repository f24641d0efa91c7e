"""Speed of the Wasserstein-neuron scores on the bundled smollm2-135m: every output neuron of every MLP input
projection (gate_proj and up_proj of all 30 blocks) recorded in one pass and scored by W1, against the bare
forward pass over the same tokens.

Arms, interleaved in one process (bare, record, then again in rotated order), median of ``--repeats`` rounds:

- ``bare``: the model's forward passes over the blocks, batch by batch, nothing else;
- ``record``: the same forwards with :func:`neurospec.sparsity.outputs.record_outputs` hooks (moments, histogram,
  central moments, mapping difficulty), then :func:`neurospec.sparsity.wasserstein.score_outputs` (W1, shape
  statistics, difficulty); the scoring time is reported separately as ``score_s``.

- ``record_kernel_threads_1``: the same with the kernels on one thread (``NEUROSPEC_KERNEL_THREADS=1``);
- ``record_hist_every_4``: the same with the histograms fed every 4th token (``--hist-every 4``).

Each round's own ``record / bare`` is printed too (``record_ratio_per_round`` and its median): the arms of a round
run within a few minutes of each other, so these move less with the host's speed drifting over the whole run.

Target: ``record_ratio = record / bare <= 1.15``. Defaults: 128 sequences of 256 tokens of the bundled ``prose``
corpus, batch 8. ``--tiny`` runs a tiny random Llama on random tokens instead (a check that the script runs).

    python benchmarks/wasserstein_speed.py --json
    python benchmarks/wasserstein_speed.py --tiny --sequences 8 --seq-len 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _tiny_model():
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on random tokens (smoke test)")
    ap.add_argument("--task", default="prose")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)

    from neurospec.cli.common import tune_allocator
    from neurospec.models.linear import linear_dims
    from neurospec.sparsity.outputs import choose_linears, record_outputs
    from neurospec.sparsity.wasserstein import score_outputs

    allocator = tune_allocator()
    torch.set_num_threads(args.threads)
    if args.tiny:
        model = _tiny_model().to(args.device)
        blocks = torch.randint(2, 128, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
        name = "tiny-llama"
    else:
        from neurospec.data.tasks import build_task_data
        from neurospec.models.loading import load_model

        loaded = load_model(args.model, device=args.device)
        model = loaded.model
        blocks = build_task_data(args.task, loaded.tokenizer, seq_len=args.seq_len,
                                 collect_tokens=args.sequences * args.seq_len, eval_tokens=0).collect
        name = args.model
    modules = choose_linears(model)
    device = next(model.parameters()).device

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare() -> dict:
        with torch.no_grad():
            for i in range(0, blocks.shape[0], args.batch):
                model(input_ids=blocks[i : i + args.batch].to(device))
        return {}

    from neurospec.record import kernels

    def record(kernel_threads: int | None = None, hist_every: int = 1):
        def arm() -> dict:
            kernels.THREADS = kernel_threads
            try:
                t0 = time.perf_counter()
                outs = record_outputs(model, blocks, modules=modules, batch_size=args.batch, pairs=args.pairs,
                                      hist_every=hist_every)
                sync()
                t1 = time.perf_counter()
                score_outputs(outs)
            finally:
                kernels.THREADS = None
            return {"pass_s": t1 - t0, "score_s": time.perf_counter() - t1}
        return arm

    # record_kernel_threads_1: the same on one kernel thread (NEUROSPEC_KERNEL_THREADS=1)
    # record_hist_every_4: the histograms (W1) from every 4th token, the moments from all (``--hist-every 4``)
    arms = {"bare": bare, "record": record(), "record_kernel_threads_1": record(1),
            "record_hist_every_4": record(hist_every=4)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    details: dict[str, list[dict]] = {k: [] for k in arms}
    with torch.no_grad():
        model(input_ids=blocks[:1].to(device))  # warm-up
        # warm-up: loads (or compiles) the CPU kernels outside the timed arms
        score_outputs(record_outputs(model, blocks[:1], modules=modules, batch_size=1, pairs=args.pairs))
    for r in range(args.repeats):
        order = list(arms)[r % len(arms):] + list(arms)[: r % len(arms)]
        for arm in order:
            sync()
            t0 = time.perf_counter()
            details[arm].append(arms[arm]())
            sync()
            times[arm].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": name, "cpu": cpu_model(), "device": args.device, "threads": args.threads,
        "allocator_tuned": allocator, "tokens": int(blocks.numel()), "batch": args.batch, "pairs": args.pairs,
        "modules": len(modules), "neurons": sum(linear_dims(r.module)[1] for r in modules.values()),
        "repeats": args.repeats, "bare_s": med["bare"], "record_s": med["record"],
        "record_ratio": med["record"] / med["bare"],
        "record_ratio_kernel_threads_1": med["record_kernel_threads_1"] / med["bare"],
        "record_ratio_hist_every_4": med["record_hist_every_4"] / med["bare"],
        # each round's record / bare (the arms of a round run within one round, a few minutes, rather than across
        # the whole run): less sensitive to the host's speed drifting during the run than the ratio of the medians
        "record_ratio_per_round": [r / b for r, b in zip(times["record"], times["bare"], strict=True)],
        "record_ratio_median_of_rounds": statistics.median(r / b for r, b in zip(times["record"], times["bare"],
                                                                                 strict=True)),
        "seconds": times,
        "split": {f: statistics.median(d[f] for d in details["record"]) for f in details["record"][0]},
        "split_kernel_threads_1": {f: statistics.median(d[f] for d in details["record_kernel_threads_1"])
                                   for f in details["record_kernel_threads_1"][0]},
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return out


if __name__ == "__main__":
    main()
