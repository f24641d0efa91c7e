"""Skill-neuron predictivity from streaming statistics against the bare forward passes over the same examples.

Pipeline arm: the two passes of :func:`neurospec.skills.collect.prompt_statistics` (training means, then dev
counts per class, every MLP neuron at every prompt position) and the predictivity of every neuron. Bare arm: the
model body over the same training and dev examples in the same batches. One process, arms interleaved, median of
repeats; ratio = pipeline / bare. Memory: two fresh subprocesses run the pipeline on ``--examples`` and
``4 x --examples`` examples and report their peak RSS (flat in examples: only sums are kept). Prompt tuning: one
epoch of :func:`neurospec.skills.soft.train_soft_prompt` against bare forward + backward passes over the same
batches (a trainable input, the same loss), median of repeats; the epoch includes its dev-set evaluation.

Examples are the bundled ``python-vs-c`` texts, each made distinct by a numbered suffix so that any count can be
asked for. The glibc allocator thresholds are tuned as the command line does (``tune_allocator``).

    python benchmarks/skills_speed.py --json                      # smollm2-135m (run alone: it takes minutes)
    python benchmarks/skills_speed.py --model DIR --examples 40 --repeats 1 --json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _setup(args, n_examples: int):
    from neurospec.data.labelled import load_labelled, make_labelled
    from neurospec.experiments.skills import _verbaliser
    from neurospec.models.loading import load_model
    from neurospec.skills.prompting import PromptedModel, hard_prompt

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    base = load_labelled("python-vs-c")
    texts, labels = [], []
    k = 0
    while len(texts) < n_examples:
        for item, y in zip(base.items, base.labels, strict=True):
            texts.append(f"{item}\n# {k}")
            labels.append(int(y))
            k += 1
    per_class = n_examples // 2
    task = make_labelled("bench", texts, labels, seed=0, per_class=per_class, classes=list(base.classes))
    pm = PromptedModel(loaded, task.n_classes, max_tokens=args.max_tokens,
                       verbaliser=_verbaliser(loaded, task, {}) if loaded.head in ("causal-lm", "masked-lm") else None)
    prompt = hard_prompt(loaded, "\nAnswer:" if pm.decoder else "Category:")
    return loaded, task, pm, prompt


def _pipeline(loaded, task, pm, prompt, batch):
    from neurospec.skills.collect import prompt_statistics
    from neurospec.skills.predictivity import predictivity

    sites = loaded.sites.of_kind("mlp")
    counts = prompt_statistics(pm, task, prompt, sites, batch_size=batch)
    return {s.name: predictivity(counts[s.name].compute()["accuracy"]) for s in sites}


def _bare(task, pm, prompt, batch):
    with torch.inference_mode():
        for split in ("train", "dev"):
            items, _ = task.split(split)
            for i in range(0, len(items), batch):
                pm.run_body(items[i : i + batch], prompt)


def memory_child(args) -> dict:
    loaded, task, pm, prompt = _setup(args, args.examples)
    _pipeline(loaded, task, pm, prompt, args.batch)
    return {"examples": args.examples, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _median_interleaved(arms: dict, repeats: int) -> dict:
    times = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--examples", type=int, default=400, help="examples of the task (60/20/20 split)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the two peak-RSS subprocesses")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from neurospec.cli.common import tune_allocator

    tuned = tune_allocator()
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    from neurospec.skills.soft import SoftPromptConfig, train_soft_prompt

    loaded, task, pm, prompt = _setup(args, args.examples)
    _bare(task, pm, prompt, args.batch)  # warm-up
    t = _median_interleaved({"bare": lambda: _bare(task, pm, prompt, args.batch),
                             "pipeline": lambda: _pipeline(loaded, task, pm, prompt, args.batch)}, args.repeats)
    result = {"model": loaded.name, "cpu": _cpu_model(), "threads": args.threads, "allocator_tuned": tuned,
              "examples": {s: len(task.split(s)[1]) for s in ("train", "dev")},
              "neurons": sum(s.width for s in loaded.sites.of_kind("mlp")), "prompt_positions": prompt.length,
              "predictivity": {"bare_s": t["bare"], "pipeline_s": t["pipeline"], "ratio": t["pipeline"] / t["bare"]}}

    emb = loaded.model.get_input_embeddings()
    d = emb.weight.shape[1]
    cfg = SoftPromptConfig(length=args.prompt_length, epochs=1, batch_size=args.batch)
    items, labels = task.split("train")

    def bare_train():
        vec = torch.nn.Parameter(torch.zeros(args.prompt_length, d, dtype=emb.weight.dtype))
        flags = [q.requires_grad for q in loaded.model.parameters()]
        for q in loaded.model.parameters():
            q.requires_grad_(False)
        try:
            from neurospec.skills.prompting import Prompt

            for i in range(0, len(labels), args.batch):
                logits = pm.logits(items[i : i + args.batch], Prompt(vec))
                y = torch.as_tensor(labels[i : i + args.batch])
                torch.nn.functional.cross_entropy(logits.float(), y).backward()
        finally:
            for q, f in zip(loaded.model.parameters(), flags, strict=True):
                q.requires_grad_(f)

    tt = _median_interleaved({"bare": bare_train, "prompt_tuning": lambda: train_soft_prompt(pm, task, config=cfg)},
                             args.repeats)
    result["prompt_tuning_epoch"] = {"bare_forward_backward_s": tt["bare"], "train_soft_prompt_s": tt["prompt_tuning"],
                                     "ratio": tt["prompt_tuning"] / tt["bare"]}
    if not args.no_memory:
        mem = []
        for n in (args.examples, 4 * args.examples):
            cmd = [sys.executable, __file__, "--memory-child", "--examples", str(n), "--model", args.model,
                   "--threads", str(args.threads), "--batch", str(args.batch), "--max-tokens", str(args.max_tokens)]
            mem.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        result["memory"] = {f"peak_rss_mib_{m['examples']}": m["peak_rss_mib"] for m in mem}
        result["memory"]["growth"] = mem[1]["peak_rss_mib"] / mem[0]["peak_rss_mib"] - 1
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
