"""Overlap of two tasks' neuron sets, with chance baselines (METHODS.md section 1).

Sets are given as masks ``{site: BoolTensor[width]}`` over the same sites. The overlap of A with B is
``|A ∩ B| / |A|`` (asymmetric: the share of A's neurons that B also selected), per site and over all sites.

Two chance baselines, both exact expectations (no sampling):

- ``chance_global``: A and B drawn uniformly at random with their overall sizes from all N neurons:
  ``E|A∩B|/|A| = |B| / N``.
- ``chance_matched``: A and B drawn uniformly at random *within each site* with their per-site sizes:
  ``sum_s |A_s||B_s|/N_s / |A|``; per site it is ``|B_s| / N_s``. This is the fair baseline when both tasks
  concentrate their neurons in the same layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Masks = Mapping[str, torch.Tensor]


def _check(a: Masks, b: Masks) -> None:
    if set(a) != set(b):
        raise ValueError(f"the two neuron sets cover different sites: {sorted(set(a) ^ set(b))[:4]}")
    for s in a:
        if a[s].shape != b[s].shape:
            raise ValueError(f"site {s}: masks of different widths {tuple(a[s].shape)} and {tuple(b[s].shape)}")


def overlap(a: Masks, b: Masks) -> dict:
    """``{"overall", "per_site": {site: value}, "chance_global", "chance_matched", "per_site_chance", "size_a",
    "size_b"}``. Sites where A is empty have overlap NaN."""
    _check(a, b)
    inter = {s: int((a[s] & b[s]).sum()) for s in a}
    na = {s: int(a[s].sum()) for s in a}
    nb = {s: int(b[s].sum()) for s in a}
    width = {s: int(a[s].numel()) for s in a}
    total_a, total_b, total = sum(na.values()), sum(nb.values()), sum(width.values())
    per_site = {s: (inter[s] / na[s] if na[s] else float("nan")) for s in a}
    per_site_chance = {s: nb[s] / width[s] for s in a}
    matched = sum(na[s] * nb[s] / width[s] for s in a)
    return {
        "overall": sum(inter.values()) / total_a if total_a else float("nan"),
        "per_site": per_site,
        "chance_global": total_b / total if total else float("nan"),
        "chance_matched": matched / total_a if total_a else float("nan"),
        "per_site_chance": per_site_chance,
        "size_a": total_a,
        "size_b": total_b,
    }


def overlap_matrix(sets: Sequence[Masks]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(overlap, chance_global, chance_matched)`` matrices with entry ``[i, j] = |S_i ∩ S_j| / |S_i|``."""
    n = len(sets)
    ov, cg, cm = (np.full((n, n), np.nan) for _ in range(3))
    for i in range(n):
        for j in range(n):
            r = overlap(sets[i], sets[j])
            ov[i, j], cg[i, j], cm[i, j] = r["overall"], r["chance_global"], r["chance_matched"]
    return ov, cg, cm


def per_layer_counts(mask: Masks) -> dict[str, int]:
    """Number of selected neurons per site (for the per-layer distribution figure)."""
    return {s: int(m.sum()) for s, m in mask.items()}
