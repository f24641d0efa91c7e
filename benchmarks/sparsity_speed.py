"""Speed of whole-model pruning on the bundled smollm2-135m: SparseGPT and Wanda at 50% against the calibration
forward passes they need.

Arms, interleaved in one process (bare, wanda, sparsegpt, then again), median of ``--repeats`` rounds, each on a
fresh copy of the model (the copy is not timed):

- ``bare``: the calibration forward passes of layer-sequential pruning and nothing else: the calibration blocks
  embedded once, then every transformer block run twice over all tokens (once to calibrate, once with its pruned
  weights to feed the next block);
- ``wanda``: ``sparsify(method="wanda")`` over every linear module of every block (the same forwards, plus input
  norms and per-row masks);
- ``sparsegpt``: ``sparsify(method="sparsegpt")`` (the same forwards, plus streamed Hessians and the OBS sweep).

Targets: SparseGPT's pruning itself (``sparsegpt - bare``) at most 2x the forwards (``sparsegpt_ratio <= 3``);
Wanda at most 1.1x the forwards (``wanda_ratio <= 1.1``). Defaults: 128 sequences of 256 tokens of the bundled
``prose`` corpus, batch 8, glibc's allocator thresholds raised as the command line does.

    python benchmarks/sparsity_speed.py --json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="prose")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)

    from neurospec.cli.common import tune_allocator
    from neurospec.data.tasks import build_task_data
    from neurospec.models.loading import load_model
    from neurospec.sparsity import sparsify
    from neurospec.sparsity.driver import BlockRunner

    allocator = tune_allocator()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    data = build_task_data(args.task, loaded.tokenizer, seq_len=args.seq_len,
                           collect_tokens=args.sequences * args.seq_len, eval_tokens=0)
    calib = data.collect

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare(model, blocks: torch.Tensor = calib) -> dict:
        with torch.no_grad():
            runner = BlockRunner(model, blocks, batch_size=args.batch)
            for b in range(len(runner.blocks)):
                runner.run(b, keep=False)
                runner.run(b)
        return {}

    def prune(method: str):
        def arm(model) -> dict:
            res = sparsify(model, method, sparsity=args.sparsity, calibration=calib, batch_size=args.batch,
                           inplace=True)
            return {**res.timings, "achieved": min(r.sparsity for r in res.layers.values())}
        return arm

    arms = {"bare": bare, "wanda": prune("wanda"), "sparsegpt": prune("sparsegpt")}
    times: dict[str, list[float]] = {k: [] for k in arms}
    systimes: dict[str, list[float]] = {k: [] for k in arms}
    details: dict[str, list[dict]] = {k: [] for k in arms}
    bare(loaded.model, calib[: args.batch])  # warm-up on one batch (the bare arm does not change the model)
    for r in range(args.repeats):
        order = list(arms)[r % len(arms):] + list(arms)[: r % len(arms)]
        for name in order:
            model = copy.deepcopy(loaded.model)
            sync()
            s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            t0 = time.perf_counter()
            details[name].append(arms[name](model))
            sync()
            times[name].append(time.perf_counter() - t0)
            systimes[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
            del model
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": args.model, "cpu": cpu_model(), "device": args.device, "threads": args.threads,
        "allocator_tuned": allocator, "calibration_tokens": int(calib.numel()), "sequences": int(calib.shape[0]),
        "seq_len": args.seq_len, "batch": args.batch, "sparsity": args.sparsity, "repeats": args.repeats,
        "bare_s": med["bare"], "wanda_s": med["wanda"], "sparsegpt_s": med["sparsegpt"],
        "wanda_ratio": med["wanda"] / med["bare"], "sparsegpt_ratio": med["sparsegpt"] / med["bare"],
        "sparsegpt_pruning_over_forwards": (med["sparsegpt"] - med["bare"]) / med["bare"],
        "sys_s": {k: statistics.median(v) for k, v in systimes.items()},
        "split": {k: {f: statistics.median(d[f] for d in v) for f in v[0]} for k, v in details.items() if v and v[0]},
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return out


if __name__ == "__main__":
    main()
