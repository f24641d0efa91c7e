"""Predictivity of the model against a randomly initialised copy (the control of METHODS.md section 4).

A neuron with no information about the label still scores above 0.5: predictivity is a maximum over prompt
positions and over ``max(Acc, 1 - Acc)`` on a finite dev split. The copy (same architecture, fresh seeded weights,
:func:`neurospec.models.loading.random_init_copy`) goes through the same prompt and predictivity pipeline, so its
scores show that floor. :func:`compare_with_random` reports, per site and over all sites, the mean predictivity
and the mean of the top ``p`` of each layer for both models, and a one-sided Mann-Whitney U test (scipy) that the
model's top-``p`` predictivities are larger than the copy's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from neurospec.skills.predictivity import select_top_p

TEST = "Mann-Whitney U, one-sided: the model's top-p predictivities larger than the random copy's"


def _u_test(real: Tensor, rand: Tensor) -> dict:
    from scipy.stats import mannwhitneyu

    if real.numel() == 0 or rand.numel() == 0:
        return {"u": None, "pvalue": None}
    res = mannwhitneyu(real.double().numpy(), rand.double().numpy(), alternative="greater")
    p = float(res.pvalue)
    return {"u": float(res.statistic), "pvalue": None if math.isnan(p) else p}


def _row(real: Tensor, rand: Tensor, top_real: Tensor, top_rand: Tensor) -> dict:
    def mean(v: Tensor) -> float | None:
        return float(v.double().mean()) if v.numel() else None

    return {"mean": mean(real), "random_mean": mean(rand), "top_mean": mean(top_real),
            "random_top_mean": mean(top_rand), "n_top": int(top_real.numel())} | _u_test(top_real, top_rand)


def compare_with_random(real: Mapping[str, Tensor], rand: Mapping[str, Tensor], p: float, *, key: str = "") -> dict:
    """``{"sites": {site: row}, "all": row}`` with row ``{mean, random_mean, top_mean, random_top_mean, n_top, u,
    pvalue}`` (``real``/``rand``: ``{site: predictivity [width]}`` of the model and of its random copy)."""
    top_real, top_rand = select_top_p(real, p, key=key), select_top_p(rand, p, key=key)
    sites = {s: _row(real[s], rand[s], real[s][top_real[s]], rand[s][top_rand[s]]) for s in real}
    cat = lambda d: torch.cat([v.flatten().double() for v in d.values()])  # noqa: E731
    pooled = _row(cat(real), cat(rand), cat({s: real[s][top_real[s]] for s in real}),
                  cat({s: rand[s][top_rand[s]] for s in rand}))
    return {"sites": sites, "all": pooled}
