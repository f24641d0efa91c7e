"""`neurospec record`: per-neuron statistics of every site on each task, into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import app
from neurospec.cli.common import (
    Progress,
    check_model_options,
    check_seed,
    check_tasks,
    emit,
    err,
    finish_distributed,
    handle_errors,
    init_distributed,
    load_model_cli,
)

out = Console()


@app.command("record")
@handle_errors
def record_cmd(
    model: str = opt.model(),
    task: list[str] = typer.Option(..., "--task", "-t", help="bundled task name, NAME=SOURCE or NAME=SOURCE,eval=EVAL_SOURCE (repeat)"),
    out_dir: Path = opt.out("run directory"),
    tokens: int = opt.tokens(),
    eval_tokens: int = opt.eval_tokens("held out: the evaluation split recorded in the run's manifest"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    kinds: str = typer.Option("mlp,attn", help="site kinds to record"),
    hist_bins: int = typer.Option(256, "--hist-bins"),
    hist_every: int = typer.Option(1, "--hist-every", help="histogram sees every k-th token (moments see all)"),
    reservoir: int = typer.Option(1024, help="activation vectors sampled per site (for resample ablation); 0 = none"),
    comoments: str = typer.Option("", help="site kinds whose co-moment matrix is recorded, e.g. mlp"),
    relu_comoments: str = typer.Option("", "--relu-comoments",
                                       help="site kinds whose co-moment matrix of relu(x) is recorded (the "
                                            "MoEfication co-activation graph), e.g. mlp"),
    seed: int = opt.seed(),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    force: bool = opt.force("discard an existing run with another model or config"),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """Record per-neuron statistics of every site on each task into a run directory (resumable)."""
    from neurospec.record.recorder import RecordConfig, record

    check_seed(seed)
    check_model_options(device, dtype)
    check_tasks(task)
    device = init_distributed(device)  # under torchrun: this rank's own GPU (cuda:LOCAL_RANK)
    cfg = RecordConfig(
        tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size,
        kinds=tuple(k for k in kinds.split(",") if k), hist_bins=hist_bins, hist_sample_every=hist_every,
        reservoir=reservoir, comoments=tuple(k for k in comoments.split(",") if k),
        relu_comoments=tuple(k for k in relu_comoments.split(",") if k), seed=seed,
    )
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    from neurospec.record.recorder import dist_context

    rank = dist_context()[0]
    try:
        with Progress(enabled=rank == 0) as progress:
            summary = record(loaded, task, out_dir, cfg, force=force, progress=progress)
    finally:
        finish_distributed()
    if rank != 0:  # every rank holds the same all-reduced result; rank 0 reports it
        return
    bad = {t: n for t, n in summary["nonfinite"].items() if n}
    if bad:
        err.print(f"[yellow]warning:[/] non-finite activations were seen and excluded from the statistics: {bad}")

    def human():
        t = Table(title=f"run {summary['run']}")
        t.add_column("task")
        t.add_column("tokens recorded", justify="right")
        for name, n in summary["tasks"].items():
            t.add_row(name, f"{n:,}")
        out.print(t)
        out.print(f"{len(summary['sites'])} sites recorded; open with neurospec.open_run({str(summary['run'])!r})")

    emit(summary, json_, human)
