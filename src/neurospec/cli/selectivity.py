"""Task-specific neurons by selectivity scores: `neurospec prune` (selective pruning) and `taskmap`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import (
    Progress,
    check_model_options,
    check_save_dir,
    check_scorer,
    check_tasks,
    claim_out,
    emit,
    err,
    handle_errors,
    load_model_cli,
)

out = Console()


def _fractions(text: str) -> tuple[float, ...]:
    from neurospec.errors import NeurospecError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise NeurospecError(f"--fractions must be comma-separated numbers, got {text!r}") from None


@command("prune")
@handle_errors
def prune_cmd(
    model: str = opt.model(),
    forget: str = typer.Option(..., help="task whose neurons are pruned (name or NAME=SOURCE)"),
    retain: list[str] = typer.Option(..., help="task(s) to keep (repeat; several are merged)"),
    out_dir: Path = opt.out(),
    score: str = typer.Option("abs", help="selectivity score: {registry:scorers}"),
    frac: float = typer.Option(0.02, help="fraction of MLP neurons pruned per step"),
    attn_frac: float = typer.Option(0.0, "--attn-frac", help="fraction of attention neurons pruned per step"),
    steps: int = typer.Option(5),
    mode: str = typer.Option("cumulative", help="cumulative (one set of statistics) or iterative (re-record)"),
    scope: str = typer.Option("global", help="global (all layers ranked together) or per_site"),
    ablation: str = typer.Option("zero", help="how pruned neurons are set: {registry:prune_ablations}"),
    heads: str = typer.Option(None, help="prune attention as whole heads scored by their neurons' mean or median"),
    tokens: int = opt.tokens(),
    eval_tokens: int = opt.eval_tokens("and step"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    save: Path = typer.Option(None, "--save", help="write the final pruned model here (save_pretrained); a new or "
                                                   "empty directory unless --force"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    force: bool = opt.force("replace results of another command or configuration in --out, re-record a run of "
                            "another config, write --save into a non-empty directory"),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """Selective pruning: remove the neurons most specific to the forget task, step by step."""
    import json

    check_scorer(score)  # before the pipeline's imports: a bad option fails fast
    check_model_options(device, dtype)
    check_tasks([forget, *retain], option="--forget/--retain")
    check_save_dir(save, model=model, force=force, out_dir=out_dir)
    from neurospec.experiments.selective import PruneConfig, selective_pruning
    from neurospec.record.layout import PRUNE_RESULT, write_result_json
    from neurospec.record.recorder import RecordConfig

    pcfg = PruneConfig(score=score, frac=frac, attn_frac=attn_frac, steps=steps, mode=mode, scope=scope,
                       ablation=ablation, heads=heads, batch_size=batch_size)
    rcfg = RecordConfig(tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size, reservoir=0)
    claim_out(out_dir, "prune", force)
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    with Progress() as progress:
        res = selective_pruning(loaded, forget, list(retain), out_dir, record_cfg=rcfg, prune_cfg=pcfg,
                                force=force, progress=progress, save_dir=save)
    write_result_json(Path(out_dir) / PRUNE_RESULT, res)
    payload = {"steps": [{"fraction": r["fraction"], "attn_fraction": r["attn_fraction"], "n_pruned": r["n_pruned"],
                          "forget": r["forget"], "retain": r["retain"]} for r in res["steps"]],
               "area": res["area"], "forget": res["forget"], "retain": res["retain"], "run": str(out_dir)}

    def human():
        t = Table(title=f"selective pruning: forget {res['forget']}, retain {'+'.join(res['retain'])} "
                        f"(area {res['area']:.3f}; top1 = {res['metric']})")
        for c in ("fraction", "pruned", "forget top1", "forget loss", "retain top1", "retain loss"):
            t.add_column(c, justify="right")
        for r in res["steps"]:
            t.add_row(f"{r['fraction']:.3f}", str(r["n_pruned"]), f"{r['forget']['top1']:.4f}",
                      f"{r['forget']['loss']:.3f}", f"{r['retain']['top1']:.4f}", f"{r['retain']['loss']:.3f}")
        out.print(t)

    emit(json.loads(json.dumps(payload, default=float)), json_, human)


@command("taskmap")
@handle_errors
def taskmap_cmd(
    model: str = opt.model(),
    task: list[str] = typer.Option(..., "--task", "-t", help="task (repeat, at least two)"),
    out_dir: Path = opt.out(),
    score: str = typer.Option("abs", help="selectivity score: {registry:scorers}"),
    fractions: str = typer.Option("0.01,0.02,0.05,0.1,0.2", help="fractions at which overlaps are computed"),
    select_frac: float = typer.Option(0.02, "--select-frac", help="fraction pruned for the selectivity matrix"),
    kind: str = typer.Option("mlp", help="mlp or attn"),
    retain: str = typer.Option(None, help="a named retain task (default: the union of the other tasks)"),
    random_init: bool = typer.Option(True, "--random-init/--no-random-init"),
    tokens: int = opt.tokens(),
    eval_tokens: int = opt.eval_tokens("for the selectivity matrix"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    force: bool = opt.force("replace results of another command or configuration in --out; re-record runs of "
                            "another config"),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """The task map: overlap of task-specific neurons, selectivity matrix, random-init comparison; HTML report."""
    from neurospec.experiments.taskmap import TaskMapConfig, task_map
    from neurospec.record.recorder import RecordConfig
    from neurospec.report.html import build_report

    check_scorer(score)
    check_model_options(device, dtype)
    check_tasks(task)
    cfg = TaskMapConfig(score=score, fractions=_fractions(fractions), select_frac=select_frac, kind=kind,
                        retain=retain, random_init=random_init, batch_size=batch_size)
    rcfg = RecordConfig(tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size, reservoir=0)
    claim_out(out_dir, "taskmap", force)
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    with Progress() as progress:
        res = task_map(loaded, list(task), out_dir, record_cfg=rcfg, cfg=cfg, force=force, progress=progress)
    report = build_report(out_dir)
    err.print(f"report: {report}")
    payload = {"tasks": res["tasks"], "overlap": res["overlap"], "selectivity": res["selectivity"],
               "random_init": res.get("random_init"), "overlap_chance": res["overlap_chance"],
               "baseline": res.get("baseline"), "report": str(report)}

    def human():
        names = res["tasks"]
        key = f"{cfg.select_frac:g}" if f"{cfg.select_frac:g}" in res["overlap"] else next(iter(res["overlap"]))
        t = Table(title=f"overlap |A∩B|/|A| at {key} (rows A)")
        t.add_column("")
        for n in names:
            t.add_column(n, justify="right")
        for n, row in zip(names, res["overlap"][key], strict=True):
            t.add_row(n, *(f"{v:.2f}" for v in row))
        out.print(t)
        if res["selectivity"] is not None:
            s = Table(title=f"selectivity: {res['metric']} drop of column task when row task's top "
                            f"{cfg.select_frac:.0%} are pruned")
            s.add_column("")
            for n in names:
                s.add_column(n, justify="right")
            for n, row in zip(names, res["selectivity"], strict=True):
                s.add_row(n, *(f"{v:+.3f}" for v in row))
            out.print(s)
        out.print(f"report: {report}")

    emit(payload, json_, human)
