"""`neurospec sparsify`: magnitude, Wanda or SparseGPT pruning of a model, with perplexity before and after."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import Steps, claim_out, emit, err, handle_errors

out = Console()


def _check_method(value: str) -> str:
    """The choices come from the method registry, read only when the command runs (so that the command line starts
    without importing torch)."""
    from neurospec.sparsity import methods

    names = list(methods())
    if value not in names:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, names))}")
    return value


@command("sparsify")
@handle_errors
def sparsify_cmd(
    model: str = opt.model(),
    method: str = typer.Option(..., "--method", callback=_check_method,
                               help="pruning method: {registry:sparsity_methods}"),
    sparsity: float = typer.Option(None, help="fraction of weights pruned, in [0, 1) (default 0.5; N/M with "
                                              "--pattern)"),
    pattern: str = typer.Option("unstructured", help="unstructured, or N:M (N of every M inputs pruned): 2:4, 4:8"),
    calib_task: str = typer.Option("prose", "--calib-task", help="task whose collection split calibrates"),
    calib_tokens: int = typer.Option(128 * 256, "--calib-tokens", help="calibration tokens"),
    eval_task: list[str] = typer.Option(None, "--eval-task", help="task for perplexity before and after, on its "
                                                                 "evaluation split (repeat; default: the calib task)"),
    eval_tokens: int = opt.eval_tokens(),
    layers: list[str] = typer.Option(None, "--layers", help="block indices or module names (comma-separated or "
                                                           "repeated; e.g. 0,1 or layers.3.mlp.down_proj); "
                                                           "default: all blocks"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    save: Path = typer.Option(None, help="write the sparse model here (a plain Hugging Face directory)"),
    out_dir: Path = opt.out("write the result (sparsify.json) here, for `neurospec report`", default=None),
    force: bool = opt.force(),
    seed: int = opt.seed("seed of the task splits"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    json_: bool = opt.json_(),
) -> None:
    """Prune the linear layers of the transformer blocks and report the achieved sparsity and the perplexity."""
    from neurospec.data.tasks import build_task_data
    from neurospec.evaluate import evaluate_lm
    from neurospec.models.loading import load_model
    from neurospec.record.layout import SPARSIFY, write_result_json
    from neurospec.sparsity import make_pattern, save_sparse, sparsify

    pat = make_pattern(sparsity, pattern)  # bad input fails before the model loads
    if out_dir is not None:
        claim_out(out_dir, "sparsify", force)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=dtype)
    calib = build_task_data(calib_task, loaded.tokenizer, seq_len=seq_len, collect_tokens=calib_tokens,
                            eval_tokens=0, seed=seed)
    evals = {}
    for spec in eval_task or [calib_task]:
        data = build_task_data(spec, loaded.tokenizer, seq_len=seq_len, collect_tokens=0, eval_tokens=eval_tokens,
                               seed=seed)
        evals[data.name] = data.eval
    chosen = [item.strip() for text in layers or [] for item in text.split(",") if item.strip()] or None
    dense = {name: evaluate_lm(loaded, blocks, batch_size=batch_size)["perplexity"] for name, blocks in evals.items()}
    with Steps() as steps:
        res = sparsify(loaded, method, pattern=pat, calibration=calib.collect, layers=chosen, batch_size=batch_size,
                       inplace=True, progress=steps)
    sparse = {name: evaluate_lm(loaded, blocks, batch_size=batch_size)["perplexity"] for name, blocks in evals.items()}
    result = {
        "model": model,
        **res.to_dict(),
        "perplexity": {name: {"dense": dense[name], "sparse": sparse[name]} for name in evals},
        "calibration": {"task": calib.name, "tokens": res.calibration_tokens, "seq_len": seq_len},
        "eval_tokens": {name: int(blocks.numel()) for name, blocks in evals.items()},
    }
    result.pop("layer_details")
    if save is not None:
        result["saved"] = str(save_sparse(loaded.model, save, loaded.tokenizer))
    result["total_seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        write_result_json(out_dir / SPARSIFY, result)
    if not calib.collect_info.complete:
        err.print(f"[yellow]note[/]: task {calib.name!r} holds only {res.calibration_tokens} calibration tokens")

    def human():
        sp = list(result["layers"].values())
        out.print(f"{method} {pat.label} (sparsity {pat.sparsity:g}): {len(sp)} linear modules, achieved "
                  f"{min(sp):.4f}-{max(sp):.4f}, in {res.seconds:.1f} s on {res.calibration_tokens:,} calibration "
                  "tokens")
        t = Table(title="perplexity")
        for c in ("task", "dense", "sparse"):
            t.add_column(c, justify="right")
        for name, p in result["perplexity"].items():
            t.add_row(name, f"{p['dense']:.3f}", f"{p['sparse']:.3f}")
        out.print(t)
        if save is not None:
            out.print(f"saved to {result['saved']}")

    emit(result, json_, human)
