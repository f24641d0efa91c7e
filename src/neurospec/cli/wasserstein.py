"""`neurospec wasserstein`: W1 entanglement scores of every output neuron of chosen linear layers, and optionally
the experiment sparsifying the top-W1 neurons against neurons chosen by mean, variance, weight norm and at random."""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import (
    Steps,
    check_choice,
    check_fraction,
    check_int,
    check_model_options,
    claim_out,
    emit,
    estimate_forward,
    handle_errors,
    load_model_cli,
)

out = Console()


def _finite(value):
    """NaN / inf as None, recursively, so that ``--json`` is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@command("wasserstein")
@handle_errors
def wasserstein_cmd(
    model: str = opt.model(),
    task: str = typer.Option(..., "--task", help="task whose collection split is recorded (and calibrates)"),
    tokens: int = opt.tokens("and the calibration of SparseGPT in --experiment"),
    layers: list[str] = typer.Option(None, "--layers", help="block indices (their MLP input projections, or every "
                                                           "linear with --all-linear) or module names, comma-"
                                                           "separated or repeated; default: every block"),
    all_linear: bool = typer.Option(False, "--all-linear", help="score every linear module, not only the MLP input "
                                                                "projections"),
    top: float = typer.Option(0.03, "--top", help="fraction of each layer's neurons called Wasserstein neurons"),
    normalise: str = typer.Option("zscore", "--normalise", help="zscore (mean, population std) or none"),
    pairs: int = typer.Option(64, "--pairs", help="random token pairs per batch for the mapping difficulty"),
    hist_every: int = typer.Option(1, "--hist-every", help="bin every k-th token into the histograms W1 reads "
                                                           "(about k times cheaper binning; the moments see every "
                                                           "token); k coprime to --seq-len (3, 5) spreads the "
                                                           "sample over positions"),
    experiment: bool = typer.Option(False, "--experiment", help="also sparsify the top neurons against other "
                                                                "selections (SparseGPT, 50%% and 2:4)"),
    patterns: str = typer.Option("50%,2:4", "--patterns", help="patterns of the experiment, comma-separated"),
    draws: int = typer.Option(10, "--draws", help="random selections of the experiment"),
    eval_tokens: int = opt.eval_tokens("held-out loss of --experiment"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    seed: int = opt.seed("seed of the task splits, the pairs and the random selections"),
    out_dir: Path = opt.out("write the results and the figures here", default=None),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    force: bool = opt.force(),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """Score each output neuron by the W1 distance of its z-scored outputs to N(0,1) (JSON: ``scores``: module ->
    {mean, max, top, ...}; with --experiment, ``experiment``: selection -> {delta_loss, pvalue} at the first
    pattern, every pattern under ``experiment_patterns``, and ``metric``: ``loss``, or ``cosine_distance`` of the
    final hidden states to the dense model's for an encoder without a language-model head; delta_loss is its
    change)."""
    from neurospec.data.tasks import build_task_data
    from neurospec.experiments.wasserstein import (
        SELECTIONS,
        error_correlation,
        experiment_tokens,
        method_ordering,
        parse_pattern,
        row_experiment,
        wasserstein_scores,
    )
    from neurospec.record.layout import (
        WASSERSTEIN,
        WASSERSTEIN_ERROR_FIGURE,
        WASSERSTEIN_W1_FIGURE,
        write_result_json,
    )

    check_model_options(device, dtype)
    check_int("--tokens", tokens)
    check_int("--pairs", pairs)
    check_int("--hist-every", hist_every)
    check_int("--draws", draws)
    check_fraction("--top", top)
    check_choice("--normalise", normalise, ("zscore", "none"))
    pats = [parse_pattern(p) for p in patterns.split(",") if p.strip()]  # bad input fails before the model loads
    if out_dir is not None:
        claim_out(out_dir, "wasserstein", force)
    t0 = time.perf_counter()
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    data = build_task_data(task, loaded.tokenizer, seq_len=seq_len, collect_tokens=tokens,
                           eval_tokens=eval_tokens if experiment else 0, seed=seed)
    chosen = [item.strip() for text in layers or [] for item in text.split(",") if item.strip()] or None
    if experiment:
        t, e = int(data.collect.numel()), int(data.eval.numel())
        runs = len(pats) * (draws + len(SELECTIONS))  # sparsified models of the row experiment
        estimate_forward("wasserstein", loaded, seq_len, experiment_tokens(t, e, seq_len, len(pats), draws),
                         f"{runs} sparsified models of the row experiment and {2 * len(pats)} of the method "
                         "ordering, each calibrated and evaluated; the SparseGPT solves come on top")
    scores = wasserstein_scores(loaded, data.collect, layers=chosen, scope="all" if all_linear else "mlp_in",
                                batch_size=batch_size, pairs=pairs, seed=seed, normalise=normalise,
                                hist_every=hist_every)
    result: dict = {
        "model": model,
        "task": data.name,
        "tokens": int(data.collect.numel()),
        "top": top,
        "normalise": normalise,
        "hist_every": hist_every,
        "scores": {name: s.summary(top) for name, s in scores.items()},
    }
    corr = None
    if experiment:
        with Steps() as steps:
            rows = row_experiment(loaded, scores, data.collect, data.eval, patterns=pats, fraction=top,
                                  draws=draws, seed=seed, batch_size=batch_size, progress=steps)
        first = next(iter(rows["patterns"]))
        result["experiment"] = {sel: {"delta_loss": r["delta_loss"], "pvalue": r["pvalue"]}
                                for sel, r in rows["patterns"][first].items()}
        result["experiment_pattern"] = first
        result["metric"] = rows["metric"]
        result["experiment_patterns"] = rows["patterns"]
        result["experiment_counts"] = rows["counts"]
        result["dense_loss"] = rows["dense_loss"]
        corr = error_correlation(loaded, scores, data.collect, data.eval, pattern=pats[0], batch_size=batch_size)
        result["error_correlation"] = {"pattern": corr["pattern"], "pooled": corr["pooled"],
                                       "per_module": corr["spearman"]}
        with Steps() as steps:
            result["methods"] = method_ordering(loaded, data.collect, data.eval, patterns=pats,
                                                batch_size=batch_size, progress=steps)
    if out_dir is not None:
        from neurospec.report.wasserstein_figures import error_vs_w1, w1_distributions

        out_dir.mkdir(parents=True, exist_ok=True)
        w1 = {n: s.w1.numpy() for n, s in scores.items()}
        figs = [str(w1_distributions(w1, out_dir / WASSERSTEIN_W1_FIGURE, fraction=top))]
        if corr is not None:
            err = {n: e.cpu().numpy() for n, e in corr["error"].items()}
            figs.append(str(error_vs_w1(w1, err, out_dir / WASSERSTEIN_ERROR_FIGURE, title=f"SparseGPT {corr['pattern']}")))
        result["figures"] = figs
    result["total_seconds"] = time.perf_counter() - t0
    result = _finite(result)
    if out_dir is not None:
        write_result_json(out_dir / WASSERSTEIN, result)

    def human():
        t = Table(title=f"W1 to N(0,1) of each neuron's outputs ({result['tokens']:,} tokens of {data.name})")
        for c in ("module", "neurons", "mean W1", "max W1", "top neurons", "rho(W1, difficulty)"):
            t.add_column(c, justify="right")
        for name, s in result["scores"].items():
            rho = s["spearman_w1_difficulty"]
            t.add_row(name, str(s["neurons"]), f"{s['mean']:.4f}", f"{s['max']:.4f}",
                      ", ".join(map(str, s["top"][:5])) + (" ..." if len(s["top"]) > 5 else ""),
                      "-" if rho is None else f"{rho:.3f}")
        out.print(t)
        if "experiment" in result:
            what = "loss" if result["metric"] == "loss" else "cosine distance to the dense model"
            e = Table(title=f"SparseGPT {result['experiment_pattern']} on the selected rows: change of the {what}")
            for c in ("selection", f"delta {what}", "p (vs random)"):
                e.add_column(c, justify="right")
            for sel, r in result["experiment"].items():
                e.add_row(sel, f"{r['delta_loss']:+.5f}", "-" if r["pvalue"] is None else f"{r['pvalue']:.3f}")
            out.print(e)
        for f in result.get("figures", []):
            out.print(f"figure: {f}")

    emit(result, json_, human)
