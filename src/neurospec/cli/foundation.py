"""Commands of the foundation: models, tasks, sites, record."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import app
from neurospec.cli.common import (
    ALLOW_PICKLE_HELP,
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

MODEL_HELP = "bundled alias (see `neurospec models`), model directory, .gguf file or hub id"


@app.command("models")
@handle_errors
def models_cmd(json_: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Bundled model aliases and supported architecture families."""
    from neurospec.models.architectures import families
    from neurospec.models.loading import BUNDLED

    data = {
        "bundled": [
            {"alias": b.alias, "package": b.package, "description": b.description, "licence": b.licence}
            for b in BUNDLED.values()
        ],
        "families": [
            {"name": f.name, "model_types": list(f.model_types), "mlp_reader": f.mlp_reader,
             "attn_reader": f.attn_reader, "mlp_inputs": list(f.mlp_inputs)}
            for f in families().values()
        ],
    }

    def human():
        t = Table(title="bundled models")
        for c in ("alias", "package", "description", "licence"):
            t.add_column(c)
        for b in data["bundled"]:
            t.add_row(b["alias"], b["package"], b["description"], b["licence"])
        out.print(t)
        f = Table(title="architecture families (others: structural fallback)")
        for c in ("family", "model types", "MLP reader", "attention reader"):
            f.add_column(c)
        for fam in data["families"]:
            f.add_row(fam["name"], ", ".join(fam["model_types"]), fam["mlp_reader"], fam["attn_reader"])
        out.print(f)

    emit(data, json_, human)


@app.command("tasks")
@handle_errors
def tasks_cmd(json_: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Bundled tasks, with source, size and licence.

    Use a bundled name, or NAME=SOURCE for your own data (a .txt file or folder, a .jsonl/.csv/.parquet file, a
    saved dataset, hf:NAME; options after ?, e.g. ?split=train). NAME=SOURCE,eval=EVAL_SOURCE takes the whole
    collection split from SOURCE and the whole evaluation split from EVAL_SOURCE, e.g.
    "qa=data/qa?split=train,eval=data/qa?split=test". Names that differ only by case are refused.
    """
    from neurospec.data.corpora import corpus_rows

    rows = corpus_rows()

    def human():
        t = Table(title="bundled tasks (use a name, NAME=SOURCE for your own data, or NAME=SOURCE,eval=EVAL_SOURCE)")
        for c in ("task", "description", "documents", "characters", "licence"):
            t.add_column(c)
        for r in rows:
            chars = r.get("characters")
            chars = "?" if chars is None else (f"{chars:,}" if r.get("exact") else f"~{chars:,}")
            t.add_row(r["name"], r["description"], str(r.get("documents", r.get("error", "?"))), chars,
                      r.get("licence", ""))
        out.print(t)

    emit(rows, json_, human)


@app.command("sites")
@handle_errors
def sites_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    json_: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Table of neuron sites: name, kind, layer, width, heads."""
    loaded = load_model_cli(model, allow_pickle=allow_pickle)
    rows = [
        {"name": s.name, "kind": s.kind, "layer": s.layer, "width": s.width, "module": s.module,
         "n_heads": s.n_heads, "d_head": s.d_head,
         # a routed expert of a mixture-of-experts layer: read by the slice [expert] of a fused parameter
         **({"expert": s.expert, "param": s.param} if s.expert is not None else {})}
        for s in loaded.sites
    ]

    def human():
        t = Table(title=f"{model}: {len(rows)} sites, family {loaded.sites.family}")
        for c in ("name", "kind", "layer", "width", "heads", "module"):
            t.add_column(c)
        for r in rows:
            heads = f"{r['n_heads']} x {r['d_head']}" if r["n_heads"] else ""
            reader = f"{r['param']}[{r['expert']}]" if "expert" in r else r["module"]
            t.add_row(r["name"], r["kind"], str(r["layer"]), str(r["width"]), heads, reader)
        out.print(t)

    emit({"model": model, "family": loaded.sites.family, "sites": rows}, json_, human)


@app.command("record")
@handle_errors
def record_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    task: list[str] = typer.Option(..., "--task", "-t", help="bundled task name, NAME=SOURCE or NAME=SOURCE,eval=EVAL_SOURCE (repeat)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="run directory"),
    tokens: int = typer.Option(20_000, help="tokens recorded per task"),
    eval_tokens: int = typer.Option(8_192, "--eval-tokens", help="tokens held out per task for evaluation"),
    seq_len: int = typer.Option(256, "--seq-len"),
    batch_size: int = typer.Option(8, "--batch-size"),
    kinds: str = typer.Option("mlp,attn", help="site kinds to record"),
    hist_bins: int = typer.Option(256, "--hist-bins"),
    hist_every: int = typer.Option(1, "--hist-every", help="histogram sees every k-th token (moments see all)"),
    reservoir: int = typer.Option(1024, help="activation vectors sampled per site (for resample ablation); 0 = none"),
    comoments: str = typer.Option("", help="site kinds whose co-moment matrix is recorded, e.g. mlp"),
    relu_comoments: str = typer.Option("", "--relu-comoments",
                                       help="site kinds whose co-moment matrix of relu(x) is recorded (the "
                                            "MoEfication co-activation graph), e.g. mlp"),
    seed: int = typer.Option(0),
    device: str = typer.Option(None, help="cpu, cuda, cuda:N or auto (device_map=auto)"),
    dtype: str = typer.Option(None, help="float32 (default), bfloat16, float16"),
    force: bool = typer.Option(False, "--force", help="discard an existing run with another model or config"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    json_: bool = typer.Option(False, "--json", help="machine-readable output"),
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
