"""Micro-benchmark of the per-batch cost of neurospec's accumulators on the CPU.

Prints JSON: seconds per update (median of the least disturbed of several rounds, and the minimum) of NeuronStats for float32 batches of [2048, 1536] and
[2048, 576] (the MLP and attention sites of a 135M-parameter model at batch 8 x 256), broken down into moments
only, histogram only and the whole update; plus Reservoir and CoMoments updates for reference.

``kernel_vs_torch``: the fused CPU kernels (neurospec.record.kernels) against the torch path
(``NEUROSPEC_NO_KERNELS=1``), timed interleaved (kernel, torch, kernel, torch, ...) so that both see the same
disturbance; ``ratio_median`` is the median of the per-pair ratios kernel / torch (robust on a shared machine,
where absolute times swing).

    PYTHONPATH=src python benchmarks/accumulator_micro.py [--threads 2] [--repeats 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from bench_env import environment

from neurospec.record import kernels
from neurospec.record.accumulators import CoMoments, NeuronStats, Reservoir, _fast_partials


def timed(fn: Callable[[], object], repeats: int, rounds: int) -> dict[str, object]:
    """Median seconds per call in each of ``rounds`` rounds; ``median_s`` is the least disturbed round's median.

    On a shared machine other processes inflate some rounds many times over; the best round's median is the
    cost of the code, the spread of the rounds shows the disturbance.
    """
    for _ in range(3):
        fn()
    medians, best = [], float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
        best = min(best, min(times))
    return {"median_s": min(medians), "min_s": best, "round_medians_s": medians}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, object]:
    """Median seconds of each function and the median of the per-repeat ratios ``first / second``, the two
    functions called alternately (each with the kernel switch it needs)."""
    (na, fa), (nb, fb) = fns.items()
    for _ in range(3):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - start)
        start = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(ta, tb, strict=True)]
    return {f"{na}_median_s": statistics.median(ta), f"{nb}_median_s": statistics.median(tb),
            "ratio_median": statistics.median(ratios), "ratio_quartiles": statistics.quantiles(ratios, n=4)}


def with_kernels(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        old, kernels.ENABLED = kernels.ENABLED, on
        try:
            return fn()
        finally:
            kernels.ENABLED = old

    return run


def kernel_vs_torch(tokens: int, width: int, repeats: int) -> dict[str, object]:
    """Per-update time of NeuronStats with the fused kernels and with the torch path, interleaved."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, width, generator=g) * torch.rand(width, generator=g) + torch.randn(width, generator=g)
    fast, slow = NeuronStats(width), NeuronStats(width)
    fast.update(x)
    slow.update(x)
    binner = fast._binner
    assert binner is not None
    hist = fast._state["hist"].view(-1)
    res_fast, res_slow = Reservoir(width, 1024, seed=0), Reservoir(width, 1024, seed=0)
    for _ in range(8):
        res_fast.update(x)
        res_slow.update(x)
    return {
        "shape": [tokens, width],
        "update": interleaved({"kernel": with_kernels(True, lambda: fast.update(x)),
                               "torch": with_kernels(False, lambda: slow.update(x))}, repeats),
        "moments": interleaved({"kernel": lambda: kernels.moments(x),
                                "torch": lambda: _fast_partials(x).to("cpu", torch.float64)}, repeats),
        "histogram": interleaved({"kernel": lambda: binner.add_to(hist, x),
                                  "torch": lambda: hist.add_(binner.counts_torch(x))}, repeats),
        # a full reservoir (k = 1024) after 8 batches: each update replaces the rows whose keys are beaten
        "reservoir_k1024": interleaved({"kernel": with_kernels(True, lambda: res_fast.update(x)),
                                        "torch": with_kernels(False, lambda: res_slow.update(x))}, repeats),
    }


def bench_shape(tokens: int, width: int, repeats: int, rounds: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g) * torch.rand(width, generator=g) + torch.randn(
        width, generator=g
    )
    stats = NeuronStats(width)
    stats.update(x)  # calibrates
    binner = stats._binner
    assert binner is not None
    hist = stats._state["hist"].view(-1)

    def moments_only() -> None:
        stats._add_fast(kernels.moments(x) if kernels.usable(x) else _fast_partials(x).to("cpu", torch.float64),
                        tokens)

    def histogram_only() -> None:
        binner.add_to(hist, x)

    out: dict[str, object] = {
        "shape": [tokens, width],
        "moments_only": timed(moments_only, repeats, rounds),
        "histogram_only": timed(histogram_only, repeats, rounds),
        "all": timed(lambda: stats.update(x), repeats, rounds),
    }
    sampled = NeuronStats(width, hist_sample_every=4)
    sampled.update(x)
    out["all_hist_sample_every_4"] = timed(lambda: sampled.update(x), repeats, rounds)
    bf16 = x.bfloat16()
    out["all_bfloat16_input"] = timed(lambda: stats.update(bf16), repeats, rounds)
    res = Reservoir(width, 1024, seed=0)
    out["reservoir_k1024"] = timed(lambda: res.update(x), repeats, rounds)
    co = CoMoments(width)
    out["comoments"] = timed(lambda: co.update(x), max(3, repeats // 5), rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-only", action="store_true", help="only the interleaved kernel/torch comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {
        **environment(),
        "kernel_vs_torch": [kernel_vs_torch(2048, w, args.repeats) for w in (1536, 576)],
    }
    if not args.compare_only:
        result["results"] = [bench_shape(2048, w, args.repeats, args.rounds) for w in (1536, 576)]
    result["load_average_1min_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
