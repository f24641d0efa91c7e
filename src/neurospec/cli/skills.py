"""The ``skills`` command: skill neurons of labelled tasks (METHODS.md section 4)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import Steps, emit, handle_errors

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
    methods: str = typer.Option("noise,zero", help="perturbations: noise (std --noise-std), zero"),
    n_random: int = typer.Option(20, "--n-random", help="random same-per-layer-count sets per fraction (>= 20)"),
    noise_std: float = typer.Option(0.1, "--noise-std"),
    epochs: int = typer.Option(4, help="soft prompt training epochs"),
    prompt_length: int = typer.Option(16, "--prompt-length", help="soft prompt vectors"),
    batch_size: int = opt.batch_size(16),
    max_tokens: int = typer.Option(64, "--max-tokens", help="tokens kept of each text"),
    seed: int = opt.seed("seed of the task splits"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    json_: bool = opt.json_(),
) -> None:
    """Skill neurons: neurons whose activation at the prompt positions predicts each task's label."""
    from neurospec.experiments.skills import SkillsConfig, run_skills
    from neurospec.models.loading import load_model
    from neurospec.record.layout import SKILLS_RESULT
    from neurospec.skills.soft import SoftPromptConfig

    cfg = SkillsConfig(prompt=prompt, template=template, verbaliser=_pairs(list(verbaliser)), seeds=seeds,
                       aggregate=aggregate, p=p, ps=_floats(ps, "--ps"),
                       methods=tuple(m.strip() for m in methods.split(",") if m.strip()), n_random=n_random,
                       noise_std=noise_std, batch_size=batch_size, max_tokens=max_tokens, task_seed=seed,
                       soft=SoftPromptConfig(length=prompt_length, epochs=epochs, batch_size=batch_size))
    loaded = load_model(model, device=device, dtype=dtype)
    with Steps() as steps:
        res = run_skills(loaded, list(task), out_dir, cfg, progress=steps)
    payload = {k: res[k] for k in ("tasks", "readout", "accuracy", "predictivity", "skill_neurons", "perturbation",
                                   "similarity", "notes")}
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
        out.print(f"written to {out_dir / SKILLS_RESULT}")

    emit(payload, json_, human)
