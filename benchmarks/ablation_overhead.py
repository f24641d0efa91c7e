"""What an ablation costs at inference: forward time of SmolLM2-135M bare, with a folded ablation, and with
resample hooks.

Three arms, interleaved in one process (bare, folded, resample, then rotated), each timed over the forward pass
only, with the median of ``--repeats`` rounds:

- ``bare``: the unmodified model;
- ``folded``: 10% of every site's neurons ablated to mean offsets folded into the weights (random stand-in offsets:
  the values do not change the cost), so the only extra work is a bias add in ``o_proj`` and ``down_proj``;
- ``resample``: the same neurons replaced per token by a random row of 256 reference rows, by forward pre-hooks.

Targets: ``folded_ratio <= 1.02`` and ``resample_ratio <= 1.15``. ``sys_time_s`` is the kernel time of the timed
loop: a large value means the allocator returns big activation buffers to the OS after each forward and faults them
back in the next one, which adds noise. Run with glibc's thresholds raised, on an otherwise quiet machine::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/ablation_overhead.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--frac", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)

    from neurospec.intervene import NeuronSet, ablated
    from neurospec.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    model, sites = loaded.model, loaded.sites
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    neurons = NeuronSet.random(sites, frac=args.frac, seed=0)
    offsets = {s.name: torch.randn(s.width, generator=g) for s in sites}
    samples = {s.name: torch.randn(256, s.width, generator=g) for s in sites}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        sync()
        return time.perf_counter() - t0

    arms = {
        "bare": contextlib.nullcontext,
        "folded": lambda: ablated(model, sites, neurons, "mean", offsets=offsets),
        "resample": lambda: ablated(model, sites, neurons, "resample", samples=samples),
    }
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    setup: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up, untimed
        with arms[name]():
            forward()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for rep in range(args.repeats):
        for j in range(len(names)):
            name = names[(rep + j) % len(names)]
            t0 = time.perf_counter()
            with arms[name]():
                setup[name].append(time.perf_counter() - t0)
                times[name].append(forward())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "bare_s": med["bare"],
        "folded_s": med["folded"],
        "resample_s": med["resample"],
        "folded_ratio": med["folded"] / med["bare"],
        "resample_ratio": med["resample"] / med["bare"],
        "sys_time_s": ru1.ru_stime - ru0.ru_stime,
        "user_time_s": ru1.ru_utime - ru0.ru_utime,
        "fold_setup_s": statistics.median(setup["folded"]),
        "resample_setup_s": statistics.median(setup["resample"]),
        "n_ablated": len(neurons),
        "n_neurons": sum(s.width for s in sites),
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
