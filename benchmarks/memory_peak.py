"""Peak memory (RSS) of recording and of selective pruning against the bare forward passes over the same tokens.

Every arm runs in its own fresh subprocess (peak RSS is per process), on the same model, tasks (python, prose),
batch (``--batch`` x ``--seq-len``) and tokens. Every arm loads the model and builds the two tasks' data the same way
(so the model, the tokenizer and the data pipeline are in every arm), then:

- ``bare_record``: the model body (``model.base_model``, no LM head) over the recording tokens of both tasks, under
  ``torch.inference_mode`` (the bare arm of ``record_overhead.py``).
- ``record``: ``neurospec.record.recorder.record`` of both tasks into a temporary run with the defaults of
  ``RecordConfig`` (every statistic ``neurospec record`` keeps by default: moments and histograms at every MLP and
  attention site, and the activation reservoir) but the tokens and batch given here.
- ``prune``: ``neurospec.experiments.selective.selective_pruning`` (forget python, retain prose; ``--steps`` steps of
  the default 2%): records both tasks (MLP sites, record defaults otherwise), scores, selects, folds the ablation
  into the weights and evaluates both tasks' evaluation blocks at step 0 and at every step.
- ``bare_prune``: ``bare_record`` plus the model body over the evaluation tokens of both tasks (the forward the
  evaluation cannot avoid: no logits at all). The job's ratio is taken against this arm.
- ``bare_prune_logits``: ``bare_record`` plus a plain ``model(input_ids).logits`` forward over the evaluation tokens
  (what a user's evaluation loop does: it materialises ``[batch, seq, vocab]`` logits); reported for reference.

    python benchmarks/memory_peak.py --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch
from bench_env import environment, peak_rss_mib

ARMS = ("bare_record", "record", "bare_prune", "bare_prune_logits", "prune")
TASKS = ("python", "prose")


def _config(args):
    from neurospec.record.recorder import RecordConfig

    return RecordConfig(tokens=args.tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                        batch_size=args.batch)


def _setup(args):
    """Load the model and build both tasks' data (every arm does this first)."""
    from neurospec.data.build import build_tasks
    from neurospec.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    phases = {"after_load": peak_rss_mib()}
    tasks = build_tasks(loaded, list(TASKS), _config(args))
    phases["after_data"] = peak_rss_mib()
    return loaded, tasks, phases


def _body_forward(loaded, blocks_list, batch: int, logits: bool = False, body: bool = True) -> None:
    from neurospec.record.recorder import _forward_body

    model = loaded.model
    run = _forward_body(model) if body else model
    with torch.inference_mode():
        for blocks in blocks_list:
            for i in range(0, blocks.shape[0], batch):
                out = run(input_ids=blocks[i : i + batch], **({} if body else {"use_cache": False}))
                if logits:
                    out.logits  # noqa: B018 (the [batch, seq, vocab] tensor exists until the next batch)
                del out


def child(args) -> dict:
    loaded, tasks, phases = _setup(args)
    want = -(-args.tokens // args.seq_len)
    collect = [d.collect[:want] for d in tasks.values()]
    evals = [d.eval for d in tasks.values()]
    t0 = time.perf_counter()
    if args.arm in ("bare_record", "bare_prune", "bare_prune_logits"):
        _body_forward(loaded, collect, args.batch)
        phases["after_record_forward"] = peak_rss_mib()
        if args.arm == "bare_prune":
            _body_forward(loaded, evals, args.batch)
        elif args.arm == "bare_prune_logits":
            _body_forward(loaded, evals, args.batch, logits=True, body=False)
    elif args.arm == "record":
        from neurospec.record.recorder import record

        with tempfile.TemporaryDirectory() as out:
            record(loaded, list(tasks.values()), out, _config(args))
    elif args.arm == "prune":
        from neurospec.experiments import selective
        from neurospec.experiments.selective import PruneConfig, selective_pruning

        # peak RSS after each stage of the job (wrappers that only read the peak; the job runs unchanged)
        def after(fn, label):
            def wrapped(*a, **k):
                phases.setdefault(f"before_{label}", peak_rss_mib())
                r = fn(*a, **k)
                phases.setdefault(f"after_{label}", []).append(peak_rss_mib())
                return r
            return wrapped

        selective.record = after(selective.record, "record")
        selective.task_metrics = after(selective.task_metrics, "evaluation")  # step 0 unpruned, then folded
        with tempfile.TemporaryDirectory() as out:
            res = selective_pruning(loaded, tasks["python"], tasks["prose"], out, record_cfg=_config(args),
                                    prune_cfg=PruneConfig(steps=args.steps, batch_size=args.batch))
        phases["forget_top1_by_step"] = [r["forget"]["top1"] for r in res["steps"]]
    return {
        "arm": args.arm,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_mib_by_phase": phases,
        "seconds": time.perf_counter() - t0,
        "record_tokens": sum(int(b.numel()) for b in collect),
        "eval_tokens": sum(int(b.numel()) for b in evals),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=25_000, help="recording tokens per task")
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens per task (prune arms)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=1, help="pruning steps of the prune arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.arm:
        print(json.dumps(child(args)))
        return
    from neurospec.models.loading import load_model

    model = load_model(args.model).model
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())  # shared (tied) tensors once
    del model
    passed = ["--model", args.model, "--tokens", str(args.tokens), "--eval-tokens", str(args.eval_tokens),
              "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
              "--threads", str(args.threads)]
    arms = {}
    for arm in args.arms.split(","):
        if arm not in ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
        out = subprocess.run([sys.executable, __file__, "--arm", arm, *passed], check=True, capture_output=True,
                             text=True).stdout
        arms[arm] = json.loads(out.strip().splitlines()[-1])
    peak = {a: r["peak_rss_mib"] for a, r in arms.items()}

    def ratio(a: str, b: str) -> float | None:
        return peak[a] / peak[b] if a in peak and b in peak else None

    result = {
        **environment(),
        "model": args.model,
        "param_mib": param_bytes / 2**20,
        "batch": [args.batch, args.seq_len],
        "tasks": list(TASKS),
        "tokens_per_task": args.tokens,
        "eval_tokens_per_task": args.eval_tokens,
        "prune_steps": args.steps,
        "threads": args.threads,
        "bare_arms": {
            "bare_record": "model.base_model over the recording tokens (inference_mode); no LM head",
            "bare_prune": "bare_record + model.base_model over the evaluation tokens (no logits); ratio_prune uses it",
            "bare_prune_logits": "bare_record + model(input_ids).logits over the evaluation tokens ([batch, seq, "
                                 "vocab] logits per batch)",
        },
        "peak_rss_mib": peak,
        "ratio_record": ratio("record", "bare_record"),
        "ratio_prune": ratio("prune", "bare_prune"),
        "ratio_prune_vs_logits": ratio("prune", "bare_prune_logits"),
        "arms": arms,
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
