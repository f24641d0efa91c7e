"""Selective-pruning scores (METHODS.md section 1): how much more a neuron responds to the forget task F than to
the retain task R. Higher = more specific to F.

Each scorer maps two per-neuron statistic dicts (as returned by :meth:`neurospec.record.store.Run.stats` for one
site: ``mean``, ``std``, ``rms``, ``mean_abs``, ``mean_sqrt_abs``, ``frac_pos``, ...) and an epsilon to a float64
tensor ``[width]``. The scorers and their formulas are the registry :data:`SCORERS` (``neurospec prune --help`` lists them).

eps defaults to 1e-3 for MLP sites and 1e-4 for attention sites.

Seeds: :func:`derive_seed` turns a base seed and labelled parts (model fingerprint, task name, site) into a
63-bit seed by SHA-256, the same in every process. The ``rand`` control is seeded per model, task and site, so
two tasks (or a model and its random-init copy) get independent random scores and their sets overlap at chance.

Ties: top-k selection keeps the earlier site and the lower index among equal scores, which picks the same tied
neurons for every task (``freq`` on ReLU models, scores of 0 from NaN) and inflates overlaps.
:func:`tie_break_keys` turns scores into selection keys with the same strict order and tied neurons in a random
order seeded per task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from neurospec.errors import NeurospecError
from neurospec.models.sites import parse_site_name

Stats = Mapping[str, torch.Tensor]
ScoreFn = Callable[[Stats, Stats, float, torch.Generator], torch.Tensor]

DEFAULT_EPS = {"mlp": 1e-3, "attn": 1e-4}
@dataclass(frozen=True)
class Scorer:
    """A registered selectivity score: its name, the function and a one-line formula (shown by the command line's
    help and the README's table). Calling it calls the function."""

    name: str
    fn: ScoreFn
    formula: str

    def __call__(self, f: Stats, r: Stats, eps: float, g: torch.Generator) -> torch.Tensor:
        return self.fn(f, r, eps, g)


SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, formula: str | None = None) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``fn(forget_stats, retain_stats, eps, generator) -> scores`` under ``name``; ``formula`` (default:
    the function's docstring) says what it computes."""

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        doc = (fn.__doc__ or "").strip()
        text = formula or (doc.splitlines()[0] if doc else "")
        if not text:
            raise ValueError(f"scorer {name!r} needs a formula (or a docstring)")
        SCORERS[name] = Scorer(name, fn, text)
        return fn

    return deco


def check_score(name: str, what: str = "score") -> None:
    """A :class:`~neurospec.errors.NeurospecError` naming the registered scorers unless ``name`` is one of them
    (the configs check their score with it before any work starts)."""
    if name not in SCORERS:
        raise NeurospecError(f"unknown {what} {name!r}; choose one of {', '.join(SCORERS)}")


def _ratio(key: str) -> ScoreFn:
    def fn(f: Stats, r: Stats, eps: float, _g: torch.Generator) -> torch.Tensor:
        return f[key].double() / (r[key].double() + eps)

    return fn


register_scorer("abs", "mean|x|_F / (mean|x|_R + eps)")(_ratio("mean_abs"))
register_scorer("sqrt", "mean sqrt|x|_F / (mean sqrt|x|_R + eps)")(_ratio("mean_sqrt_abs"))
register_scorer("freq", "P(x>0)_F / (P(x>0)_R + eps)")(_ratio("frac_pos"))
register_scorer("std", "std_F / (std_R + eps)")(_ratio("std"))
register_scorer("rms", "rms_F / (rms_R + eps), rms = sqrt(var + mean^2)")(_ratio("rms"))


@register_scorer("mean", "|mean_F - mean_R|")
def _mean(f: Stats, r: Stats, eps: float, g: torch.Generator) -> torch.Tensor:
    return (f["mean"].double() - r["mean"].double()).abs()


@register_scorer("rand", "uniform random (the control), seeded per model, task and site")
def _rand(f: Stats, r: Stats, eps: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(f["mean"].shape[0], generator=g, dtype=torch.float64)


def derive_seed(seed: int, *, model: str = "", task: str = "", site: str = "") -> int:
    """A 63-bit seed from ``seed`` and the labelled non-empty parts, by SHA-256 (stable across processes and
    Python versions, unlike ``hash()``). With only ``site`` given it is the seed earlier versions used per site."""
    parts = [str(int(seed))]
    parts += [f"{label}={v}" for label, v in (("model", model), ("task", task)) if v]
    if site:
        parts.append(site)
    return int.from_bytes(hashlib.sha256(":".join(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def tie_break_keys(
    scores: Mapping[str, torch.Tensor], seed: int, *, model: str = "", task: str = ""
) -> dict[str, torch.Tensor]:
    """Selection keys ``{site: float64 [width]}`` for top-k: a neuron with a strictly higher score always has a
    strictly higher key; neurons with equal scores (within a site or across sites) are ordered at random, seeded
    by ``seed``, ``model`` and ``task`` (and the site, so a site's order does not depend on which other sites are
    given). NaN scores stay NaN (top-k rejects them).

    The key is the dense rank of the score among all given scores plus a uniform draw in ``[0, 1)``.
    """
    names = list(scores)
    flat = [torch.as_tensor(scores[s]).detach().reshape(-1).double() for s in names]
    if not flat:
        return {}
    allv = torch.cat(flat)
    nan = allv.isnan()
    ranks = torch.zeros_like(allv)
    if (~nan).any():
        _, inverse = torch.unique(allv[~nan], sorted=True, return_inverse=True)
        ranks[~nan] = inverse.double()
    ranks[nan] = torch.nan
    out, start = {}, 0
    for s, v in zip(names, flat, strict=True):
        g = torch.Generator().manual_seed(derive_seed(seed, model=model, task=task, site=s))
        jitter = torch.rand(v.numel(), generator=g, dtype=torch.float64)
        out[s] = (ranks[start:start + v.numel()] + jitter).reshape(torch.as_tensor(scores[s]).shape)
        start += v.numel()
    return out


def score_neurons(
    method: str,
    forget: Mapping[str, Stats],
    retain: Mapping[str, Stats],
    *,
    eps: Mapping[str, float] | None = None,
    seed: int = 0,
    model: str = "",
    task: str = "",
) -> dict[str, torch.Tensor]:
    """Scores of every neuron of every site present in both ``forget`` and ``retain`` (keyed by site name).

    ``eps`` maps site kind (``mlp``/``attn``) to epsilon; defaults to :data:`DEFAULT_EPS`. ``seed``, ``model`` (a
    model fingerprint) and ``task`` (the forget task's name) seed the ``rand`` control (see :func:`derive_seed`):
    pass the task's name whenever several tasks are scored, or the control picks the same neurons for each.
    """
    check_score(method)
    eps_by_kind = {**DEFAULT_EPS, **(eps or {})}
    missing = sorted(set(forget) ^ set(retain))
    if missing:
        raise NeurospecError(f"forget and retain statistics cover different sites: {missing[:4]}")
    out = {}
    for site in forget:
        kind = parse_site_name(site)[1]  # an expert's site "layers.3.mlp.5" is an MLP site
        g = torch.Generator().manual_seed(derive_seed(seed, model=model, task=task, site=site))
        s = SCORERS[method](forget[site], retain[site], eps_by_kind[kind], g)
        out[site] = torch.nan_to_num(s, nan=0.0, posinf=torch.finfo(torch.float64).max)
    return out
