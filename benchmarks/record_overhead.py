"""Recording overhead: time to record all default statistics at all sites / time of the bare forward pass.

Both arms run the same model body (`model.base_model`) on the same batches in one process, interleaved, and the
median over repeats is reported (and each round's own full / bare, ``ratio_per_round``, whose arms run close
together). Peak memory: two fresh subprocesses record 10k and 100k tokens; their peak RSS
must agree within 5% (memory must not grow with the number of tokens).

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/record_overhead.py --json

(the allocator settings keep glibc from page-faulting the same memory in and out, which otherwise swings ratios on
small machines; both arms run under the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_env import environment, peak_rss_mib


def _blocks(loaded, tokens: int, seq_len: int) -> torch.Tensor:
    from neurospec.data.tasks import build_task_data, parse_task_spec

    data = build_task_data(parse_task_spec("python"), loaded.tokenizer, seq_len=seq_len, collect_tokens=tokens,
                           eval_tokens=seq_len, seed=0)
    return data.collect[: -(-tokens // seq_len)]


def _cpu_times() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def main_overhead(args) -> dict:
    from neurospec.models.loading import load_model
    from neurospec.record.recorder import RecordConfig, _forward_body, record_task

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    blocks = _blocks(loaded, args.tokens, args.seq_len)
    body = _forward_body(loaded.model)
    sites = loaded.sites.select()
    from neurospec.record import kernels

    arms = {
        "full": RecordConfig(batch_size=args.batch, seq_len=args.seq_len, reservoir=0),
        # the same on one kernel thread (NEUROSPEC_KERNEL_THREADS=1): inside the forward pass, torch's own threads
        # may still hold the second core when the statistics run
        "full_kernel_threads_1": RecordConfig(batch_size=args.batch, seq_len=args.seq_len, reservoir=0),
        "hist_every_4": RecordConfig(batch_size=args.batch, seq_len=args.seq_len, reservoir=0, hist_sample_every=4),
        "with_reservoir": RecordConfig(batch_size=args.batch, seq_len=args.seq_len, reservoir=1024),
    }

    def bare():
        with torch.inference_mode():
            for i in range(0, blocks.shape[0], args.batch):
                body(input_ids=blocks[i : i + args.batch])

    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in arms}}
    sys_times: dict[str, list[float]] = {k: [] for k in times}
    rss_after: dict[str, float] = {}  # peak RSS after each arm's first run (the arms run in this order)
    bare()  # warm-up
    record_task(loaded, blocks[:1], sites, arms["full"])  # warm-up: loads (or compiles) the CPU kernels
    for _ in range(args.repeats):
        for arm in times:
            u0, s0 = _cpu_times()
            t0 = time.perf_counter()
            if arm == "bare":
                bare()
            else:
                kernels.THREADS = 1 if arm == "full_kernel_threads_1" else None
                try:
                    record_task(loaded, blocks, sites, arms[arm])
                finally:
                    kernels.THREADS = None
            times[arm].append(time.perf_counter() - t0)
            sys_times[arm].append(_cpu_times()[1] - s0)
            rss_after.setdefault(arm, peak_rss_mib())
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = int(blocks.numel())
    return {
        **environment(),
        "peak_rss_mib": peak_rss_mib(),
        "model": args.model,
        "tokens": n_tokens,
        "batch": [args.batch, args.seq_len],
        "sites": len(sites),
        "threads": args.threads,
        "repeats": args.repeats,
        "bare_tokens_per_s": n_tokens / med["bare"],
        "record_tokens_per_s": n_tokens / med["full"],
        "ratio": med["full"] / med["bare"],
        "ratio_kernel_threads_1": med["full_kernel_threads_1"] / med["bare"],
        "ratio_hist_every_4": med["hist_every_4"] / med["bare"],
        "ratio_with_reservoir": med["with_reservoir"] / med["bare"],
        # each round's full / bare (arms of one round run close together): less sensitive to the host's speed
        # drifting during the run than the ratio of the medians
        "ratio_per_round": [f / b for f, b in zip(times["full"], times["bare"], strict=True)],
        "ratio_median_of_rounds": statistics.median(f / b for f, b in zip(times["full"], times["bare"], strict=True)),
        "seconds": times,
        "peak_rss_mib_after_arm": rss_after,
        "seconds_median": med,
        "sys_seconds_median": {k: statistics.median(v) for k, v in sys_times.items()},
    }


def main_memory_child(args) -> dict:
    from neurospec.models.loading import load_model
    from neurospec.record.recorder import RecordConfig, record_task

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    blocks = _blocks(loaded, args.tokens, args.seq_len)
    record_task(loaded, blocks, loaded.sites.select(), RecordConfig(batch_size=args.batch, seq_len=args.seq_len))
    return {"tokens": int(blocks.numel()), "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=16_384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also measure peak RSS at 10k and 100k tokens")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-kernels", action="store_true", help="record with the torch path (NEUROSPEC_NO_KERNELS=1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.no_kernels:
        os.environ["NEUROSPEC_NO_KERNELS"] = "1"  # before neurospec is imported; inherited by the memory runs
    if args.memory_child:
        print(json.dumps(main_memory_child(args)))
        return
    result = main_overhead(args)
    if args.memory:
        mem = []
        for n in (10_000, 100_000):
            cmd = [sys.executable, __file__, "--memory-child", "--tokens", str(n), "--model", args.model,
                   "--threads", str(args.threads)]
            mem.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        result["memory"] = {
            "peak_rss_mib_10k": mem[0]["peak_rss_mib"],
            "peak_rss_mib_100k": mem[1]["peak_rss_mib"],
            "growth": mem[1]["peak_rss_mib"] / mem[0]["peak_rss_mib"] - 1,
        }
    print(json.dumps(result, indent=2 if not args.json else None))


if __name__ == "__main__":
    main()
