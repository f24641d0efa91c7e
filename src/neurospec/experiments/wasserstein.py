"""Wasserstein neurons: score every output neuron of chosen linear layers, then test whether sparsifying the
top-W1 neurons hurts more than sparsifying as many neurons chosen otherwise.

Steps (each a function, the CLI ``neurospec wasserstein`` runs them in order):

1. :func:`wasserstein_scores`: one forward pass over the calibration tokens recording every output neuron of the
   chosen linear modules (:mod:`neurospec.sparsity.outputs`), scored by W1, mean, variance, kurtosis, bimodality
   and mapping difficulty (:mod:`neurospec.sparsity.wasserstein`).
2. :func:`make_selections`: per module the same count ``top_count(out, fraction)`` of neurons (rows) chosen by
   ``wasserstein`` (highest W1), ``mean`` (highest ``|mean|``), ``variance`` (highest), ``weight_norm`` (highest
   L2 norm of the weight row) and ``random`` (``draws`` seeded uniform draws without replacement).
3. :func:`row_experiment`: for each selection and pattern (50% unstructured and 2:4 by default), SparseGPT prunes
   only the selected rows of the chosen modules (the sparsify driver's ``rows``), and the loss on held-out blocks is
   compared with the dense loss (for an encoder without a language-model head, MiniLM: the mean cosine distance of
   the final hidden states to the dense model's, :func:`~neurospec.evaluate.evaluate_representation`; the results
   name their ``metric``). A selection's p-value against the random draws is ``(r + 1) / (n + 1)`` with ``r``
   the number of the ``n`` draws whose loss increase is at least the selection's (one-sided: "hurts more").
4. :func:`error_correlation`: every row of the chosen modules pruned (SparseGPT), the per-neuron relative output
   error on held-out blocks (:func:`~neurospec.sparsity.error.neuron_output_error`) and its Spearman correlation
   with W1, per module and pooled.
5. :func:`method_ordering`: dense perplexity (head-less encoders: cosine distance to the dense model) beside magnitude, Wanda and SparseGPT over every linear module of the
   blocks at each pattern (the published ordering: SparseGPT and Wanda far below magnitude).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from neurospec.errors import NeurospecError
from neurospec.evaluate.metrics import evaluate_lm, evaluate_representation, has_lm_head, reference_states
from neurospec.models.linear import weight_out_in
from neurospec.models.loading import LoadedModel
from neurospec.sparsity.driver import LinearRef, sparsify
from neurospec.sparsity.error import neuron_output_error
from neurospec.sparsity.outputs import choose_linears, record_outputs
from neurospec.sparsity.patterns import SparsityPattern, make_pattern
from neurospec.sparsity.wasserstein import ModuleScores, score_outputs, spearman, top_count, top_neurons

SELECTIONS = ("wasserstein", "mean", "variance", "weight_norm")
DEFAULT_PATTERNS = ("50%", "2:4")


def parse_pattern(text: str | SparsityPattern) -> SparsityPattern:
    """``"2:4"`` (N:M), ``"50%"`` or ``"0.5"`` (unstructured) as a :class:`SparsityPattern`."""
    if isinstance(text, SparsityPattern):
        return text
    t = str(text).strip()
    if ":" in t:
        return make_pattern(None, t)
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise NeurospecError(f"pattern {text!r} is not N:M (2:4) or a sparsity (50% or 0.5)") from None
    return make_pattern(value, None)


def pattern_key(p: SparsityPattern) -> str:
    """``"2:4"`` or ``"50%"``: the key of a pattern in the results."""
    return p.label if p.structured else f"{100 * p.sparsity:g}%"


def _net(model):
    return model.model if isinstance(model, LoadedModel) else model


def wasserstein_scores(model, blocks: torch.Tensor, *, layers: Sequence[int | str] | None = None,
                       scope: str = "mlp_in", batch_size: int = 8, pairs: int = 64, seed: int = 0,
                       normalise: str = "zscore", hist_bins: int = 256, min_tokens: int = 16,
                       hist_every: int = 1) -> dict[str, ModuleScores]:
    """Per chosen module (``layers.L.<path>``), the per-neuron scores over the tokens of ``blocks``."""
    n_tokens = int(blocks.numel()) if not blocks.is_floating_point() else int(blocks.shape[0])
    if n_tokens < min_tokens:
        raise NeurospecError(f"scoring output distributions needs at least {min_tokens} tokens, got {n_tokens}: "
                             "give more tokens (--tokens)")
    outs = record_outputs(model, blocks, layers=layers, scope=scope, batch_size=batch_size, pairs=pairs,
                          seed=seed, hist_bins=hist_bins, hist_every=hist_every)
    return score_outputs(outs, normalise=normalise, min_tokens=min_tokens)


@dataclass
class Selections:
    """``fixed``: ``{selection: {module: LongTensor rows}}``; ``random``: one such mapping per draw."""

    fixed: dict[str, dict[str, torch.Tensor]]
    random: list[dict[str, torch.Tensor]]
    counts: dict[str, int]


def make_selections(model, scores: Mapping[str, ModuleScores], *, fraction: float = 0.03, draws: int = 10,
                    seed: int = 0) -> Selections:
    """The rows each selection prunes in each scored module (module docstring); every selection takes
    ``top_count(out, fraction)`` rows of each module."""
    net = _net(model)
    refs = choose_linears(net, list(scores), scope="all")
    g = torch.Generator().manual_seed(seed)
    fixed: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SELECTIONS}
    counts = {}
    for name, sc in scores.items():
        width = sc.w1.numel()
        k = top_count(width, fraction)
        counts[name] = k
        norms = weight_out_in(refs[name].module).detach().double().norm(dim=1).cpu()
        for sel, values in (("wasserstein", sc.w1), ("mean", sc.mean.abs()), ("variance", sc.var),
                            ("weight_norm", norms)):
            fixed[sel][name] = top_neurons(values, fraction)
    random = [{name: torch.randperm(scores[name].w1.numel(), generator=g)[: counts[name]] for name in scores}
              for _ in range(draws)]
    return Selections(fixed, random, counts)


def experiment_tokens(collect: int, eval_: int, seq_len: int, patterns: int, draws: int) -> int:
    """Forward-pass tokens of the scores plus the experiment (:func:`row_experiment`, :func:`error_correlation` and
    :func:`method_ordering` with its three methods) on ``collect`` calibration and ``eval_`` evaluation tokens in
    sequences of ``seq_len``: every sparsified model is calibrated (``collect + seq_len`` tokens; magnitude
    excepted) and evaluated once."""
    calib = collect + seq_len
    rows = eval_ + patterns * (draws + len(SELECTIONS)) * (calib + eval_)
    methods = eval_ + patterns * (2 * calib + 3 * eval_)
    return collect + rows + (calib + eval_) + methods


def random_pvalue(value: float, draws: Sequence[float]) -> float:
    """``(r + 1) / (n + 1)``: ``r`` of the ``n`` random draws have a loss increase at least ``value``."""
    if not draws:
        return math.nan
    r = sum(1 for d in draws if d >= value)
    return (r + 1) / (len(draws) + 1)


class _Judge:
    """The damage measure of a sparsified model on held-out ``blocks``: ``(loss, perplexity)`` of a language model,
    or, for an encoder without a language-model head, ``(d, d)`` with ``d`` the mean cosine distance of its final
    hidden states to the dense model's (taken once, here)."""

    def __init__(self, model, blocks: torch.Tensor, batch_size: int) -> None:
        self.blocks, self.batch_size = blocks, batch_size
        self.lm = has_lm_head(_net(model))
        self.metric = "loss" if self.lm else "cosine_distance"
        self.reference = None if self.lm else reference_states(_net(model), blocks, batch_size=batch_size)

    def __call__(self, model) -> tuple[float, float]:
        if self.lm:
            res = evaluate_lm(model, self.blocks, batch_size=self.batch_size)
            return float(res["loss"]), float(res["perplexity"])
        d = float(evaluate_representation(_net(model), self.blocks, self.reference,
                                          batch_size=self.batch_size)["cosine_distance"])
        return d, d


def _pruned_loss(loaded, refs: Mapping[str, LinearRef], rows: Mapping[str, torch.Tensor], pattern: SparsityPattern,
                 calibration: torch.Tensor, judge: _Judge, batch_size: int, method: str) -> float:
    res = sparsify(_net(loaded), method, pattern=pattern, calibration=calibration, layers=list(refs), rows=rows,
                   batch_size=batch_size)
    return judge(_with_model(loaded, res.model))[0]


def row_experiment(model, scores: Mapping[str, ModuleScores], calibration: torch.Tensor, eval_blocks: torch.Tensor, *,
                   patterns: Sequence[str | SparsityPattern] = DEFAULT_PATTERNS, fraction: float = 0.03,
                   draws: int = 10, seed: int = 0, batch_size: int = 8, method: str = "sparsegpt",
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Loss increase of pruning each selection's rows, per pattern, with p-values against the random draws.
    ``progress(label, done, total)`` hears every sparsified and evaluated model.

    Returns ``{"metric", "dense_loss", "counts": {module: k}, "patterns": {key: {selection: {"delta_loss", "pvalue"},
    "random": {"delta_loss" (mean), "draws": [...]}}}}``; ``pvalue`` is None for the random selection itself.
    ``metric`` is ``loss`` (language models) or ``cosine_distance`` (encoders without a language-model head; the
    dense model's is 0), see :class:`_Judge`."""
    if draws < 1:
        raise NeurospecError(f"the random baseline needs at least 1 draw (10 or more advised), got {draws}")
    refs = choose_linears(_net(model), list(scores), scope="all")
    sel = make_selections(model, scores, fraction=fraction, draws=draws, seed=seed)
    judge = _Judge(model, eval_blocks, batch_size)
    dense, _ = judge(model)
    out: dict = {"metric": judge.metric, "dense_loss": dense, "counts": sel.counts, "fraction": fraction,
                 "draws": draws, "patterns": {}}
    total = len(patterns) * (len(sel.random) + len(sel.fixed))
    done = 0

    def loss(rows, pat: SparsityPattern, what: str) -> float:
        nonlocal done
        value = _pruned_loss(model, refs, rows, pat, calibration, judge, batch_size, method) - dense
        done += 1
        if progress is not None:
            progress(f"rows {pattern_key(pat)} {what}", done, total)
        return value

    for p in patterns:
        pat = parse_pattern(p)
        rnd = [loss(rows, pat, "random") for rows in sel.random]
        res = {}
        for name, rows in sel.fixed.items():
            delta = loss(rows, pat, name)
            res[name] = {"delta_loss": delta, "pvalue": random_pvalue(delta, rnd)}
        res["random"] = {"delta_loss": sum(rnd) / len(rnd), "pvalue": None, "draws": rnd}
        out["patterns"][pattern_key(pat)] = res
    return out


def error_correlation(model, scores: Mapping[str, ModuleScores], calibration: torch.Tensor,
                      eval_blocks: torch.Tensor, *, pattern: str | SparsityPattern = "50%", batch_size: int = 8,
                      method: str = "sparsegpt") -> dict:
    """Per-neuron relative output error after pruning every row of the scored modules, and its Spearman correlation
    with W1: ``{"pattern", "spearman": {module: rho}, "pooled": rho, "error": {module: FloatTensor[out]}}``."""
    net = _net(model)
    pat = parse_pattern(pattern)
    res = sparsify(net, method, pattern=pat, calibration=calibration, layers=list(scores), batch_size=batch_size)
    err = neuron_output_error(net, res.model, eval_blocks, names=list(scores), batch_size=batch_size)
    per = {name: spearman(scores[name].w1, err[name]) for name in scores}
    pooled = spearman(torch.cat([scores[n].w1 for n in scores]), torch.cat([err[n].cpu() for n in scores]))
    return {"pattern": pattern_key(pat), "spearman": per, "pooled": pooled, "error": err}


def method_ordering(model, calibration: torch.Tensor, eval_blocks: torch.Tensor, *,
                    patterns: Sequence[str | SparsityPattern] = DEFAULT_PATTERNS,
                    methods: Sequence[str] = ("magnitude", "wanda", "sparsegpt"), batch_size: int = 8,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Perplexity of the dense model and of each method over every linear module of the blocks, per pattern:
    ``{"metric": "perplexity", "dense": ppl, "patterns": {key: {method: ppl}}}``; for an encoder without a
    language-model head the cosine distance to the dense model instead (``metric``: ``cosine_distance``)."""
    judge = _Judge(model, eval_blocks, batch_size)
    _, dense = judge(model)
    out: dict = {"metric": "perplexity" if judge.lm else "cosine_distance", "dense": dense, "patterns": {}}
    done, total = 0, len(patterns) * len(methods)
    for p in patterns:
        pat = parse_pattern(p)
        row = {}
        for m in methods:
            res = sparsify(_net(model), m, pattern=pat, calibration=calibration, batch_size=batch_size)
            row[m] = judge(_with_model(model, res.model))[1]
            done += 1
            if progress is not None:
                progress(f"methods {pattern_key(pat)} {m}", done, total)
        out["patterns"][pattern_key(pat)] = row
    return out


def _with_model(loaded, net):
    """``loaded`` with its network replaced by ``net`` (the tokenizer kept for masked-LM evaluation)."""
    if isinstance(loaded, LoadedModel):
        return dataclasses.replace(loaded, model=net)
    return net
