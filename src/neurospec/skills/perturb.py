"""Perturbing skill neurons against random same-per-layer-count controls, and task similarity by overlap.

Perturbation (a forward pre-hook on each site's reading module, removed on exit; the model's weights never
change): ``noise`` adds Gaussian noise (std 0.1 by default) to the chosen neurons, one noise vector per example
broadcast over all its positions (as the published code does); ``zero`` sets them to 0 at every position.

:func:`perturbation_study` compares, for each fraction ``p``, the test accuracy with the skill neurons perturbed
against ``n_random`` (>= 20) random sets with the same number of neurons in every layer. The p-value of "the skill
set hurts more than random" is ``(r + 1) / (n + 1)`` with ``r`` the random sets whose accuracy is at most the
skill set's (ties count against the skill set).

Similarity (:func:`similarity`): the overlap of two tasks' skill sets, ``|A & B| / |A|`` (the sets have equal
per-layer sizes, so the overlap is symmetric), next to its layer-matched chance level
``sum_l k_l^2 / W_l / sum_l k_l`` (the expected overlap of two independent random sets with ``k_l`` of ``W_l``
neurons in layer ``l``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.models.sites import Site
from neurospec.skills.predictivity import random_same_counts, seed_of, select_top_p
from neurospec.skills.prompting import Prompt, PromptedModel

METHODS = ("noise", "zero")
MIN_RANDOM = 20


@contextlib.contextmanager
def perturbed(model: torch.nn.Module, sites: Mapping[str, Site], neurons: Mapping[str, Tensor], method: str,
              *, std: float = 0.1, seed: int = 0) -> Iterator[None]:
    """While open, the ``neurons`` (``{site: indices}``) are perturbed by ``method`` in every forward pass."""
    if method not in METHODS:
        raise NeurospecError(f"perturbation method must be one of {METHODS}, got {method!r}")
    gens: dict[str, torch.Generator] = {}
    handles = []

    def make(name: str, idx: Tensor):
        def hook(_module, args):
            x = args[0]
            i = idx.to(x.device)
            x = x.clone()
            if method == "zero":
                x[..., i] = 0
            else:
                g = gens.setdefault(name, torch.Generator(device=x.device).manual_seed(seed_of(seed, name)))
                eps = torch.randn(x.shape[0], i.numel(), generator=g, device=x.device, dtype=x.dtype) * std
                shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (i.numel(),)
                x[..., i] += eps.view(shape)
            return (x, *args[1:])

        return hook

    try:
        for name, idx in neurons.items():
            if idx.numel():
                handles.append(model.get_submodule(sites[name].module).register_forward_pre_hook(make(name, idx)))
        yield
    finally:
        for h in handles:
            h.remove()


def pvalue(skill_acc: float, random_accs: Sequence[float]) -> float:
    """``(r + 1) / (n + 1)``, ``r`` = random sets with accuracy <= the skill set's."""
    r = sum(1 for a in random_accs if a <= skill_acc)
    return (r + 1) / (len(random_accs) + 1)


def perturbation_study(pm: PromptedModel, items, labels, prompt: Prompt | None, scores: Mapping[str, Tensor],
                       ps: Sequence[float], *, methods: Sequence[str] = METHODS, n_random: int = MIN_RANDOM,
                       std: float = 0.1, key: str = "", batch_size: int = 16) -> list[dict]:
    """Rows ``{p, method, n_neurons, skill_acc, random_acc_mean, random_acc_std, pvalue, base_acc}``."""
    if n_random < MIN_RANDOM:
        raise NeurospecError(f"n_random must be at least {MIN_RANDOM} for a meaningful p-value, got {n_random}")
    sites = pm.loaded.sites.by_name
    model = pm.loaded.model
    base = pm.accuracy(items, labels, prompt, batch_size)
    rows = []
    for p in ps:
        if p <= 0:
            continue
        skill = select_top_p(scores, p, key=key)
        counts = {s: (int(v.numel()), int(scores[s].numel())) for s, v in skill.items()}
        for method in methods:
            seed = seed_of("perturb", key, p, method)
            with perturbed(model, sites, skill, method, std=std, seed=seed):
                acc = pm.accuracy(items, labels, prompt, batch_size)
            rand = []
            for r in range(n_random):
                rset = random_same_counts(counts, key=f"{key}|{p}|{r}")
                with perturbed(model, sites, rset, method, std=std, seed=seed):
                    rand.append(pm.accuracy(items, labels, prompt, batch_size))
            t = torch.tensor(rand, dtype=torch.float64)
            rows.append({"p": float(p), "method": method, "n_neurons": sum(c[0] for c in counts.values()),
                         "base_acc": base, "skill_acc": acc, "random_acc_mean": float(t.mean()),
                         "random_acc_std": float(t.std()) if len(rand) > 1 else 0.0, "pvalue": pvalue(acc, rand)})
    return rows


def similarity(sets: Mapping[str, Mapping[str, Tensor]], widths: Mapping[str, int]) -> dict:
    """Overlap matrix of tasks' skill sets (``{task: {site: indices}}``) with its layer-matched chance level."""
    order = list(sets)
    overlap = [[0.0] * len(order) for _ in order]
    for a, ta in enumerate(order):
        for b, tb in enumerate(order):
            inter = total = 0
            for site, idx in sets[ta].items():
                other = sets[tb].get(site, torch.empty(0, dtype=torch.long))
                inter += len(set(idx.tolist()) & set(other.tolist()))
                total += int(idx.numel())
            overlap[a][b] = inter / total if total else 0.0
    first = sets[order[0]] if order else {}
    k = {s: int(v.numel()) for s, v in first.items()}
    total_k = sum(k.values())
    chance = sum(k[s] ** 2 / widths[s] for s in k) / total_k if total_k else 0.0
    return {"tasks": order, "overlap": overlap, "chance": chance}
