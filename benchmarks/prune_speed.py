"""End-to-end selective-pruning step against the bare forward passes over the same tokens, in one process.

Pipeline arm: record forget and retain tasks (N tokens each, all default statistics at every MLP site), compute
their statistics, score (abs), select the top 2% of MLP neurons globally, fold the pruning into the weights, and
evaluate both tasks (M tokens each: top-1, top-10, skip top-1, loss) on the pruned model.
Bare arm: the model body over the same 2N recording tokens plus the full model (with LM head) over the 2M
evaluation tokens. Arms are interleaved; medians of repeats; ratio = pipeline / bare (target <= 1.3).

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/prune_speed.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
from bench_env import environment, peak_rss_mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=8192, help="N: recording tokens per task")
    p.add_argument("--eval-tokens", type=int, default=2048, help="M: evaluation tokens per task")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-kernels", action="store_true", help="record with the torch path (NEUROSPEC_NO_KERNELS=1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.no_kernels:
        os.environ["NEUROSPEC_NO_KERNELS"] = "1"  # before neurospec is imported

    from neurospec.data.build import build_tasks
    from neurospec.evaluate import evaluate_lm, most_frequent_tokens
    from neurospec.intervene.ablate import ablated
    from neurospec.models.loading import load_model
    from neurospec.record.recorder import RecordConfig, _forward_body, record_task
    from neurospec.score import score_neurons
    from neurospec.score.selection import select

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    cfg = RecordConfig(tokens=args.tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                       batch_size=args.batch, kinds=("mlp",), reservoir=0)
    tasks = build_tasks(loaded, ["python", "prose"], cfg)
    coll = {n: d.collect[: -(-args.tokens // args.seq_len)] for n, d in tasks.items()}
    ev = {n: d.eval[: -(-args.eval_tokens // args.seq_len)] for n, d in tasks.items()}
    skip = {n: most_frequent_tokens(d.collect) for n, d in tasks.items()}
    sites = loaded.sites.select(kinds=("mlp",))
    body = _forward_body(loaded.model)

    def pipeline():
        stats = {}
        for n, blocks in coll.items():
            accs = record_task(loaded, blocks, sites, cfg)
            stats[n] = {s: a["stats"].compute() for s, a in accs.items()}
        scores = score_neurons("abs", stats["python"], stats["prose"])
        pruned = select(scores, 0.02, 0.0, "global", sites=loaded.sites)
        with ablated(loaded.model, loaded.sites, pruned, "zero"):
            return {n: evaluate_lm(loaded.model, b, batch_size=args.batch, skip_ids=skip[n]) for n, b in ev.items()}

    def bare():
        with torch.inference_mode():
            for blocks in coll.values():
                for i in range(0, blocks.shape[0], args.batch):
                    body(input_ids=blocks[i : i + args.batch])
            for blocks in ev.values():
                for i in range(0, blocks.shape[0], args.batch):
                    loaded.model(input_ids=blocks[i : i + args.batch])

    times = {"bare": [], "pipeline": []}
    systimes = {"bare": [], "pipeline": []}
    bare()
    record_task(loaded, coll["python"][:1], sites, cfg)  # warm-up: loads (or compiles) the CPU kernels
    for _ in range(args.repeats):
        for arm, fn in (("bare", bare), ("pipeline", pipeline)):
            s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            t0 = time.perf_counter()
            fn()
            times[arm].append(time.perf_counter() - t0)
            systimes[arm].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        **environment(),
        "peak_rss_mib": peak_rss_mib(),
        "model": args.model, "record_tokens": 2 * sum(int(b.numel()) for b in coll.values()) // 2,
        "eval_tokens": sum(int(b.numel()) for b in ev.values()), "threads": args.threads, "repeats": args.repeats,
        "bare_s": med["bare"], "pipeline_s": med["pipeline"], "ratio": med["pipeline"] / med["bare"],
        "sys_s": {k: statistics.median(v) for k, v in systimes.items()},
    }
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
