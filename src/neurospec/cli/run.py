"""The main job and its report: `neurospec run` (task map, selective pruning, ablation methods, HTML report in one
run directory) and `neurospec report` (rebuild the report of any result directory)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import (
    Progress,
    check_int,
    check_model_options,
    check_tasks,
    claim_out,
    emit,
    err,
    estimate_forward,
    handle_errors,
    load_model_cli,
)

out = Console()


@command("run")
@handle_errors
def run_cmd(
    model: str = opt.model(default="smollm2-135m"),
    task: list[str] = typer.Option(None, "--task", "-t", help="tasks (default: the bundled python, c, prose, "
                                                              "dialog, dialog-spanish, dialog-italian)"),
    out_dir: Path = opt.out(default=Path("runs/main")),
    tokens: int = opt.tokens(),
    eval_tokens: int = opt.eval_tokens("and condition"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    random_init: bool = typer.Option(True, "--random-init/--no-random-init"),
    ablation_task: list[str] = typer.Option(None, "--ablation-task", help="tasks of the ablation-method study"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    force: bool = opt.force("replace results of another configuration in --out (those of tasks no longer run are "
                            "removed); re-record runs of another config"),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """The main job: task map, selective pruning, ablation methods and the HTML report, in one run directory."""
    from neurospec.experiments.main import DEFAULT_TASKS, RunConfig, main_job

    check_model_options(device, dtype)
    tasks = tuple(task) if task else DEFAULT_TASKS
    check_tasks(tasks)
    ab = tuple(ablation_task) if ablation_task else tuple(t for t in ("python", "prose") if t in tasks) or tasks[:2]
    check_tasks(ab, option="--ablation-task")
    for option, value in (("--tokens", tokens), ("--eval-tokens", eval_tokens), ("--seq-len", seq_len),
                          ("--batch-size", batch_size)):
        check_int(option, value)
    cfg = RunConfig(tasks=tasks, tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size,
                    random_init=random_init, ablation_tasks=ab)
    claim_out(out_dir, "run", force)
    b = cfg.budget()
    err.print(f"[bold]budget[/]: {b['tasks']} tasks x {tokens:,} tokens recorded ({b['record_tokens']:,} forward tokens "
              f"with the random-init control and the ablation reference), {b['eval_tokens']:,} evaluation tokens. "
              "Raise it with --tokens / --eval-tokens.")
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    estimate_forward("run", loaded, seq_len, b["record_tokens"] + b["eval_tokens"],
                     "recording adds its statistics on top")
    with Progress() as progress:
        res = main_job(loaded, out_dir, cfg, force=force, progress=progress, command=" ".join(["neurospec", *sys.argv[1:]]),
                       log=lambda m: err.print(f"[cyan]{m}[/]"))

    def human():
        out.print(f"done in {res['seconds']['total']:.0f} s; report: [bold]{res['report']}[/]")
        if res.get("prune_area"):
            t = Table(title="selective pruning area (1 = not selective, 2 = perfectly selective)")
            t.add_column("forget task")
            t.add_column("area", justify="right")
            for k, v in res["prune_area"].items():
                t.add_row(k, f"{v:.3f}")
            out.print(t)

    emit(res, json_, human)


@command("report")
@handle_errors
def report_cmd(run_dir: Path = typer.Argument(..., help="run directory"),
               json_: bool = opt.json_()) -> None:
    """(Re)build the self-contained HTML report of a run directory."""
    from neurospec.report.html import build_report

    path = build_report(run_dir)
    emit({"report": str(path)}, json_, lambda: out.print(f"report written: {path}"))
