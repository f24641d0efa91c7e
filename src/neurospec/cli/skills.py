"""The ``skills`` command: skill neurons of labelled tasks (METHODS.md section 4)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import (
    Steps,
    check_model_options,
    emit,
    estimate_forward,
    handle_errors,
    load_model_cli,
)

out = Console()


def _floats(text: str, what: str) -> tuple[float, ...]:
    from neurospec.errors import NeurospecError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise NeurospecError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _pairs(items: list[str]) -> dict[str, str]:
    from neurospec.errors import NeurospecError

    pairs = {}
    for item in items:
        cls, sep, word = item.partition("=")
        if not sep or not cls or not word:
            raise NeurospecError(f"--verbaliser takes CLASS=WORD, got {item!r}")
        pairs[cls] = word
    return pairs


@command("skills")
@handle_errors
def skills_cmd(
    model: str = opt.model(),
    task: list[str] = typer.Option(..., "--task", "-t", help="labelled task: language-id, python-vs-c, topic-ai, "
                                   "digits, or NAME=FILE(.csv/.jsonl/.parquet/dataset dir)?text=COL&label=COL"),
    out_dir: Path = opt.out(),
    prompt: str = typer.Option("hard", help="hard (a fixed text prompt, no training) or soft (prompt tuning)"),
    template: str = typer.Option(None, help="the hard prompt's text"),
    verbaliser: list[str] = typer.Option([], help="CLASS=WORD: the one-token word read for a class (repeat)"),
    seeds: int = typer.Option(1, help="soft prompt runs (seeds) whose predictivities are aggregated"),
    aggregate: str = typer.Option("mean", help="mean or min over prompt runs"),
    p: float = typer.Option(0.05, help="fraction of each layer's neurons reported as skill neurons"),
    ps: str = typer.Option("0.02,0.05,0.1,0.2", help="fractions of the perturbation study"),
    methods: str = typer.Option("noise,zero", help="perturbations: noise (std --noise-std), noise:STD (a noise sweep: noise:0.3,noise:1), zero"),
    n_random: int = typer.Option(20, "--n-random", help="random same-per-layer-count sets per fraction (>= 20)"),
    noise_std: float = typer.Option(0.1, "--noise-std"),
    perturb_examples: int = typer.Option(100, "--perturb-examples", help="test examples per class used by the "
                                         "perturbation study (balanced, seeded; 0 = the whole test split). It "
                                         "costs (1 + --n-random) x len(--ps) x len(--methods) + 1 evaluations of "
                                         "them per task: 169 with the defaults"),
    sets_per_forward: int = typer.Option(4, "--sets-per-forward", help="neuron sets perturbed together in one "
                                         "forward pass of the perturbation study (same results; more memory)"),
    random_baseline: bool = typer.Option(False, "--random-baseline", help="run the same prompts and predictivity "
                                         "on a randomly initialised copy of the model (soft prompts are trained "
                                         "on it too) and compare: JSON key random_baseline"),
    random_seed: int = typer.Option(0, "--random-seed", help="seed of the --random-baseline copy's weights"),
    epochs: int = typer.Option(4, help="soft prompt training epochs"),
    prompt_lr: float = typer.Option(1e-3, "--prompt-lr", help="soft prompt learning rate (Adam)"),
    prompt_length: int = typer.Option(16, "--prompt-length", help="soft prompt vectors"),
    batch_size: int = opt.batch_size(16),
    max_tokens: int = typer.Option(64, "--max-tokens", help="tokens kept of each text"),
    kinds: str = typer.Option("mlp", "--kinds", help="site kinds whose neurons are scored: mlp (the FFN "
                                                    "activations), attn (the attention outputs), or mlp,attn"),
    seed: int = opt.seed("seed of the task splits"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    prune: bool = typer.Option(False, "--prune", help="skill-based pruning: keep the top neurons of each layer, "
                               "set the others to their training means; accuracy per kept fraction vs random sets"),
    prune_keeps: str = typer.Option("0.01,0.02,0.05,0.1,0.2,0.5", "--prune-keeps",
                                    help="kept fractions of the --prune sweep"),
    save_pruned: Path = typer.Option(None, "--save-pruned", help="write the model pruned to the top --p of each "
                                     "layer (one task) as a plain Hugging Face model directory"),
    agreement: bool = typer.Option(False, "--agreement", help="overlap of the skill neurons with the task's "
                                   "selective-pruning neurons (same count per layer) against chance"),
    agreement_score: str = typer.Option("abs", "--agreement-score", help="selective-pruning score of --agreement"),
    beyond: str = typer.Option(None, "--beyond", help="lora or bias: learn the task with the neurons frozen, "
                               "then perturb the same skill neurons in that model"),
    beyond_epochs: int = typer.Option(4, "--beyond-epochs", help="training epochs of --beyond"),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """Skill neurons: neurons whose activation at the prompt positions predicts each task's label."""
    from neurospec.experiments.skills import SkillsConfig, run_skills
    from neurospec.record.layout import SKILLS_RESULT
    from neurospec.skills.soft import SoftPromptConfig
    from neurospec.skills.tuning import TuningConfig

    cfg = SkillsConfig(prompt=prompt, template=template, verbaliser=_pairs(list(verbaliser)), seeds=seeds,
                       aggregate=aggregate, p=p, ps=_floats(ps, "--ps"),
                       methods=tuple(m.strip() for m in methods.split(",") if m.strip()), n_random=n_random,
                       noise_std=noise_std, batch_size=batch_size, max_tokens=max_tokens, task_seed=seed,
                       kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                       perturb_examples=perturb_examples, sets_per_forward=sets_per_forward,
                       random_baseline=random_baseline, random_seed=random_seed,
                       soft=SoftPromptConfig(length=prompt_length, epochs=epochs, lr=prompt_lr, batch_size=batch_size),
                       prune_keeps=_floats(prune_keeps, "--prune-keeps") if prune else (),
                       save_pruned=None if save_pruned is None else str(save_pruned), agreement=agreement,
                       agreement_score=agreement_score, beyond=beyond,
                       tuning=TuningConfig(epochs=beyond_epochs, batch_size=batch_size))
    check_model_options(device, dtype)
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    from neurospec.data.labelled import load_labelled

    built = [load_labelled(t, seed=seed) for t in task]
    tokens = sum(skills_examples(cfg, t) * _mean_tokens(loaded, t, max_tokens) for t in built)
    estimate_forward("skills", loaded, max_tokens, int(tokens),
                     "mostly the perturbation study: test split x (1 + --ps x --methods x (1 + --n-random)); the "
                     "extra studies come on top")
    with Steps() as steps:
        res = run_skills(loaded, built, out_dir, cfg, progress=steps)
    payload = {k: res[k] for k in ("tasks", "readout", "accuracy", "predictivity", "skill_neurons", "perturbation",
                                   "similarity", "notes")}
    payload.update({k: res[k] for k in ("pruning", "pruned_model", "agreement", "beyond", "random_baseline")
                    if k in res})
    payload["run"] = str(out_dir)

    def human():
        for note in res["notes"]:
            out.print(f"[yellow]note:[/] {note}")
        t = Table(title=f"skill neurons (top {p:g} per layer): perturbation on the test split")
        for c in ("task", "p", "method", "unperturbed", "skill", "random mean", "p-value"):
            t.add_column(c, justify="right")
        for name, rows in res["perturbation"].items():
            for r in rows:
                t.add_row(name, f"{r['p']:g}", r["method"], f"{r['base_acc']:.3f}", f"{r['skill_acc']:.3f}",
                          f"{r['random_acc_mean']:.3f}", f"{r['pvalue']:.3f}")
        out.print(t)
        sim = res["similarity"]
        s = Table(title=f"skill-set overlap (chance {sim['chance']:.3f})")
        s.add_column("")
        for name in sim["tasks"]:
            s.add_column(name, justify="right")
        for name, row in zip(sim["tasks"], sim["overlap"], strict=True):
            s.add_row(name, *(f"{v:.3f}" for v in row))
        out.print(s)
        _extra_tables(res)
        out.print(f"written to {out_dir / SKILLS_RESULT}")

    emit(payload, json_, human)


def skills_examples(cfg, task) -> int:
    """Examples passed forward for one task (the basic pipeline, extra studies left out): the train and dev splits
    once (predictivity), the soft prompt's training (three passes' worth per example and epoch), and the test split
    unperturbed and for each perturbation (``ps`` x ``methods`` x (skill set + ``n_random`` random sets))."""
    n = {name: len(task.split(name)[1]) for name in ("train", "dev", "test")}
    soft = 3 * cfg.seeds * cfg.soft.epochs * n["train"] if cfg.prompt == "soft" else 0
    perturbations = sum(1 for q in cfg.ps if q > 0) * len(cfg.methods) * (1 + cfg.n_random)
    return n["train"] + n["dev"] + soft + n["test"] * (1 + perturbations)


def _mean_tokens(loaded, task, max_tokens: int) -> float:
    """Mean tokens of a task's texts (cut at ``max_tokens``); ``max_tokens`` for images or without a tokenizer."""
    if not isinstance(task.items, tuple) or getattr(loaded, "tokenizer", None) is None:
        return float(max_tokens)
    lengths = [min(len(loaded.tokenizer(text)["input_ids"]), max_tokens) for text in task.items]
    return sum(lengths) / max(1, len(lengths))


def _extra_tables(res: dict) -> None:
    """Tables of the optional studies (--prune, --agreement, --beyond), when present."""
    if res.get("pruning"):
        t = Table(title="skill-based pruning: test accuracy keeping the top fraction per layer")
        for c in ("task", "keep", "neurons kept", "skill", "random mean", "p-value"):
            t.add_column(c, justify="right")
        for r in res["pruning"]:
            t.add_row(r["task"], f"{r['keep']:g}", str(r["n_kept"]), f"{r['skill_acc']:.3f}",
                      f"{r['random_acc_mean']:.3f}", f"{r['pvalue']:.3f}")
        out.print(t)
    if res.get("random_baseline"):
        rb = res["random_baseline"]
        t = Table(title=f"predictivity against a randomly initialised copy (seed {rb['seed']}, top {rb['p']:g} "
                  "per layer; one-sided Mann-Whitney U)")
        for c in ("task", "site", "mean", "random mean", "top mean", "random top mean", "p-value"):
            t.add_column(c, justify="right")
        for name, tr in rb["tasks"].items():
            for site, r in [*tr["sites"].items(), ("all", tr["all"])]:
                t.add_row(name, site, *(f"{r[k]:.3f}" if r[k] is not None else "-" for k in
                                        ("mean", "random_mean", "top_mean", "random_top_mean")),
                          f"{r['pvalue']:.3g}" if r["pvalue"] is not None else "-")
        out.print(t)
    if res.get("pruned_model"):
        pm = res["pruned_model"]
        out.print(f"pruned model ({pm['n_kept']} neurons kept, test accuracy {pm['test_accuracy']:.3f}) "
                  f"written to {pm['path']}")
    if res.get("agreement"):
        t = Table(title="skill neurons among selective-pruning neurons")
        for c in ("task", "overlap", "chance", "p-value"):
            t.add_column(c, justify="right")
        for name, a in res["agreement"].items():
            t.add_row(name, f"{a['overlap']:.3f}", f"{a['chance']:.3f}", f"{a['pvalue']:.3g}")
        out.print(t)
    if res.get("beyond"):
        t = Table(title="skill neurons perturbed in a model tuned without prompts")
        for c in ("task", "tuning", "p", "method", "skill", "random mean", "p-value"):
            t.add_column(c, justify="right")
        for name, rows in res["beyond"].items():
            for r in rows:
                t.add_row(name, r["tuning"], f"{r['p']:g}", r["method"], f"{r['skill_acc']:.3f}",
                          f"{r['random_acc_mean']:.3f}", f"{r['pvalue']:.3f}")
        out.print(t)
