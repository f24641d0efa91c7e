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
    save: Path = typer.Option(None, help="write the sparse model here (a plain Hugging Face directory; not with "
                                         "--expand)"),
    out_dir: Path = opt.out("write the result (sparsify.json) here, for `neurospec report`", default=None),
    force: bool = opt.force(),
    expand: bool = typer.Option(False, "--expand", help="sparse expansion (sparsegpt only): one SparseGPT copy of "
                                                        "each MLP linear per k-means cluster of its PCA-projected "
                                                        "inputs; reports plain SparseGPT beside it"),
    clusters: int = typer.Option(16, "--clusters", help="with --expand: k-means clusters (copies) per layer"),
    pca_div: int = typer.Option(32, "--pca-div", help="with --expand: PCA keeps input width // pca-div dimensions"),
    min_cluster_tokens: int = typer.Option(None, "--min-cluster-tokens",
                                           help="with --expand: clusters with fewer calibration tokens keep the plain "
                                                "SparseGPT weights (default: the layer's input width)"),
    seed: int = opt.seed("seed of the task splits (and of PCA and k-means with --expand)"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    json_: bool = opt.json_(),
) -> None:
    """Prune the linear layers of the transformer blocks and report the achieved sparsity and the perplexity."""
    from neurospec.data.tasks import build_task_data
    from neurospec.evaluate import evaluate_lm
    from neurospec.models.loading import load_model
    from neurospec.sparsity import make_pattern, save_sparse, sparsify

    pat = make_pattern(sparsity, pattern)  # bad input fails before the model loads
    if expand:
        _check_expand(method, clusters, pca_div, calib_tokens, save)
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
    if expand:
        _run_expand(loaded, model, pat, calib, evals, dense, chosen, clusters, pca_div, min_cluster_tokens, seed,
                    seq_len, batch_size, t0, json_, out_dir)
        return
    with Steps() as steps:
        res = sparsify(loaded, method, pattern=pat, calibration=calib.collect, layers=chosen, batch_size=batch_size,
                       inplace=True, progress=steps)
    sparse = {name: evaluate_lm(loaded, blocks, batch_size=batch_size)["perplexity"] for name, blocks in evals.items()}
    result = {
        "model": model,
        **res.to_dict(),
        "perplexity": {name: {"dense": dense[name], "sparse": sparse[name]} for name in evals},
    }
    if save is not None:
        result["saved"] = str(save_sparse(loaded.model, save, loaded.tokenizer))
    _finish(result, calib, res.calibration_tokens, evals, seq_len, t0, out_dir)

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


def _finish(result: dict, calib, calibration_tokens: int, evals: dict, seq_len: int, t0: float,
            out_dir: Path | None) -> None:
    """The keys every sparsify result ends with, the result file (--out) and the note on a short calibration task."""
    from neurospec.record.layout import SPARSIFY, write_result_json

    result.pop("layer_details", None)
    result["calibration"] = {"task": calib.name, "tokens": calibration_tokens, "seq_len": seq_len}
    result["eval_tokens"] = {name: int(blocks.numel()) for name, blocks in evals.items()}
    result["total_seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        write_result_json(out_dir / SPARSIFY, result)
    if not calib.collect_info.complete:
        err.print(f"[yellow]note[/]: task {calib.name!r} holds only {calibration_tokens} calibration tokens")


def _check_expand(method: str, clusters: int, pca_div: int, calib_tokens: int, save: Path | None) -> None:
    from neurospec.sparsity.expansion import check_expansion
    from neurospec.sparsity.patterns import SparsityError

    if method != "sparsegpt":
        raise SparsityError(f"--expand builds per-cluster SparseGPT copies; it does not work with --method {method}: "
                            "use --method sparsegpt")
    if save is not None:
        raise SparsityError("--save does not work with --expand: an expanded model holds one weight per input cluster "
                            "and a router, which no Hugging Face class loads; save the plain SparseGPT model (without "
                            "--expand) instead")
    check_expansion(None, clusters, pca_div)
    if calib_tokens < clusters:
        raise SparsityError(f"--clusters {clusters} needs at least as many calibration tokens, got --calib-tokens "
                            f"{calib_tokens}")


def _run_expand(loaded, model, pat, calib, evals, dense, chosen, clusters, pca_div, min_cluster_tokens, seed,
                seq_len, batch_size, t0, json_, out_dir=None) -> None:
    """Plain SparseGPT on the chosen blocks' MLP linears, then sparse expansion of the same modules, perplexity of
    both beside the dense model, and the per-neuron error and W1 comparison on the first evaluation task."""
    from neurospec.evaluate import evaluate_lm
    from neurospec.sparsity import sparsify
    from neurospec.sparsity.expansion import (
        check_expansion,
        expand,
        expansion_error,
        expansion_memory,
        mlp_linears,
        summarise_error,
    )

    refs = mlp_linears(loaded.model, chosen)
    for name, ref in refs.items():  # widths known now: a too large --pca-div fails before any pruning
        check_expansion(ref.in_features, clusters, pca_div, name)
    names = list(refs)
    memory = expansion_memory(loaded, names, clusters=clusters)
    err.print(f"sparse expansion: {memory['modules']} MLP linear modules x {clusters} copies: "
              f"+{memory['parameters'] / 1e6:,.1f} M parameters (+{memory['bytes'] / 1024**2:,.0f} MiB)")
    with Steps() as steps:
        plain = sparsify(loaded, "sparsegpt", pattern=pat, calibration=calib.collect, layers=names,
                         batch_size=batch_size, progress=steps)
    plain_ppl = {name: evaluate_lm(plain.model, blocks, batch_size=batch_size)["perplexity"]
                 for name, blocks in evals.items()}
    del plain
    with Steps() as steps:
        res = expand(loaded, calib.collect, pattern=pat, clusters=clusters, pca_div=pca_div, seed=seed, layers=names,
                     min_cluster_tokens=min_cluster_tokens, batch_size=batch_size, progress=steps)
    sparse = {name: evaluate_lm(res.model, blocks, batch_size=batch_size)["perplexity"]
              for name, blocks in evals.items()}
    held_name, held = next(iter(evals.items()))
    errors = summarise_error(expansion_error(loaded, res, held, batch_size=batch_size))
    result = {
        "model": model,
        **res.to_dict(),
        "perplexity": {name: {"dense": dense[name], "sparse": sparse[name], "plain_sparsegpt": plain_ppl[name]}
                       for name in evals},
        "expansion_error": {"task": held_name, "tokens": int(held.numel()), "modules": errors,
                            "plain": "each module's plain SparseGPT weights on the same inputs as its expansion "
                                     "(earlier blocks expanded), not the plain_sparsegpt model's"},
    }
    _finish(result, calib, res.calibration_tokens, evals, seq_len, t0, out_dir)

    def human():
        ex = result["expansion"]
        n_fb = sum(len(v) for v in ex["fallbacks"].values())
        out.print(f"sparse expansion {pat.label} (sparsity {pat.sparsity:g}): {len(result['layers'])} MLP linear "
                  f"modules x {clusters} clusters (PCA width // {pca_div}), {n_fb} clusters fell back to plain "
                  f"SparseGPT, in {res.seconds:.1f} s on {res.calibration_tokens:,} calibration tokens")
        t = Table(title="perplexity")
        for c in ("task", "dense", "plain sparsegpt", "expanded"):
            t.add_column(c, justify="right")
        for name, p in result["perplexity"].items():
            t.add_row(name, f"{p['dense']:.3f}", f"{p['plain_sparsegpt']:.3f}", f"{p['sparse']:.3f}")
        out.print(t)
        t = Table(title=f"per-neuron relative output error on {held_name} (top W1 = Wasserstein neurons)")
        for c in ("module", "plain", "expanded", "spearman(reduction, W1)", "reduction top W1", "reduction rest"):
            t.add_column(c, justify="right")
        for name, e in errors.items():
            t.add_row(name, f"{e['error_plain']:.4f}", f"{e['error_expanded']:.4f}", f"{e['spearman']:.3f}",
                      f"{e['reduction_top']:.4f}", f"{e['reduction_rest']:.4f}")
        out.print(t)

    emit(result, json_, human)
