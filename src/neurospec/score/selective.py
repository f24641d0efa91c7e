"""Selective-pruning scores (METHODS.md section 1): how much more a neuron responds to the forget task F than to
the retain task R. Higher = more specific to F.

Each scorer maps two per-neuron statistic dicts (as returned by :meth:`neurospec.record.store.Run.stats` for one
site: ``mean``, ``std``, ``rms``, ``mean_abs``, ``mean_sqrt_abs``, ``frac_pos``, ...) and an epsilon to a float64
tensor ``[width]``:

========  =========================================================
``abs``   mean|x|_F / (mean|x|_R + eps)
``sqrt``  mean sqrt|x|_F / (mean sqrt|x|_R + eps)
``freq``  P(x>0)_F / (P(x>0)_R + eps)
``std``   std_F / (std_R + eps)          (true standard deviation)
``rms``   rms_F / (rms_R + eps)          (rms = sqrt(var + mean^2))
``mean``  |mean_F - mean_R|
``rand``  uniform random (the control), seeded per site
========  =========================================================

eps defaults to 1e-3 for MLP sites and 1e-4 for attention sites.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

from neurospec.errors import NeurospecError

Stats = Mapping[str, torch.Tensor]
ScoreFn = Callable[[Stats, Stats, float, torch.Generator], torch.Tensor]

DEFAULT_EPS = {"mlp": 1e-3, "attn": 1e-4}
SCORERS: dict[str, ScoreFn] = {}


def register_scorer(name: str) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        SCORERS[name] = fn
        return fn

    return deco


def _ratio(key: str) -> ScoreFn:
    def fn(f: Stats, r: Stats, eps: float, _g: torch.Generator) -> torch.Tensor:
        return f[key].double() / (r[key].double() + eps)

    fn.__doc__ = f"{key}_F / ({key}_R + eps)"
    return fn


register_scorer("abs")(_ratio("mean_abs"))
register_scorer("sqrt")(_ratio("mean_sqrt_abs"))
register_scorer("freq")(_ratio("frac_pos"))
register_scorer("std")(_ratio("std"))
register_scorer("rms")(_ratio("rms"))


@register_scorer("mean")
def _mean(f: Stats, r: Stats, eps: float, g: torch.Generator) -> torch.Tensor:
    return (f["mean"].double() - r["mean"].double()).abs()


@register_scorer("rand")
def _rand(f: Stats, r: Stats, eps: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(f["mean"].shape[0], generator=g, dtype=torch.float64)


def _site_seed(seed: int, site: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{site}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def score_neurons(
    method: str,
    forget: Mapping[str, Stats],
    retain: Mapping[str, Stats],
    *,
    eps: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Scores of every neuron of every site present in both ``forget`` and ``retain`` (keyed by site name).

    ``eps`` maps site kind (``mlp``/``attn``) to epsilon; defaults to :data:`DEFAULT_EPS`.
    """
    if method not in SCORERS:
        raise NeurospecError(f"unknown score {method!r}; choose one of {', '.join(SCORERS)}")
    eps_by_kind = {**DEFAULT_EPS, **(eps or {})}
    missing = sorted(set(forget) ^ set(retain))
    if missing:
        raise NeurospecError(f"forget and retain statistics cover different sites: {missing[:4]}")
    out = {}
    for site in forget:
        kind = site.rsplit(".", 1)[-1]
        g = torch.Generator().manual_seed(_site_seed(seed, site))
        s = SCORERS[method](forget[site], retain[site], eps_by_kind[kind], g)
        out[site] = torch.nan_to_num(s, nan=0.0, posinf=torch.finfo(torch.float64).max)
    return out
