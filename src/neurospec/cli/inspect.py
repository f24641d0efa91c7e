"""Inspect what there is: `neurospec models`, `tasks` and `sites`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import app
from neurospec.cli.common import emit, handle_errors, load_model_cli

out = Console()


@app.command("models")
@handle_errors
def models_cmd(json_: bool = opt.json_()) -> None:
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
def tasks_cmd(json_: bool = opt.json_()) -> None:
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
    model: str = typer.Argument(..., help=opt.MODEL_HELP),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
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
