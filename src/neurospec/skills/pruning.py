"""Skill-based pruning (METHODS.md section 4, "uses"): keep the skill neurons, replace every other neuron of the MLP
site by its training mean.

With ``m`` the keep mask of a site (1 = skill neuron) and ``mu`` the neurons' training means, the reading linear
module computes ``W (m * a + (1 - m) * mu) + b == (W diag(m)) a + (b + W ((1 - m) * mu))``: the pruned columns of
``W`` are zeroed and only the *pruned* neurons' mean contribution goes into the bias. The published script adds
``W mu`` over all neurons, counting the kept neurons twice (once live, once as a constant); we do not.

The fold is :func:`neurospec.intervene.ablate.fold_ablation` (offsets = means) on a deep copy
(:func:`prune_model`), so the caller's model is untouched and the copy saves as a plain Hugging Face model
(:func:`save_pruned`; a module without a bias gets one through the family's config flag, e.g. Llama's
``mlp_bias``). The kept-fraction sweep (:func:`pruning_study`) folds temporarily with
:func:`~neurospec.intervene.ablate.ablated` (copies of the changed weights only, put back on exit).

Means (:func:`token_means`): over every non-padding position of the prompted training examples (sentence and
prompt tokens), because a pruned neuron is replaced at every position, not only at the prompt. Streaming float64
sums; memory ``width`` per site.

Control: for each kept fraction, ``n_random`` (>= 20) random kept sets with the same count per layer; the p-value
of "the skill set keeps more accuracy than random" is ``(r + 1) / (n + 1)`` with ``r`` the random sets whose
accuracy is at least the skill set's (ties count against the skill set).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.intervene.ablate import ablated, fold_ablation
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import LoadedModel, model_fingerprint
from neurospec.models.sites import Site, find_sites
from neurospec.skills.perturb import MIN_RANDOM
from neurospec.skills.predictivity import random_same_counts, select_top_p
from neurospec.skills.prompting import Prompt, PromptedModel
from neurospec.sparsity.save import save_sparse


@torch.no_grad()
def token_means(pm: PromptedModel, items, prompt: Prompt | None, sites: Sequence[Site], *,
                batch_size: int = 16) -> dict[str, Tensor]:
    """``{site: float64 [width]}``: each neuron's mean over all non-padding positions of the prompted ``items``."""
    sums = {s.name: torch.zeros(s.width, dtype=torch.float64) for s in sites}
    count = {s.name: 0 for s in sites}
    state: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def make(name: str):
        def hook(_module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None:
                flat = flat[mask.reshape(-1).to(x.device).bool()]
            sums[name].add_(flat.to(torch.float64).sum(0).cpu())
            count[name] += flat.shape[0]

        return hook

    model = pm.loaded.model
    try:
        for s in sites:
            handles.append(model.get_submodule(s.module).register_forward_pre_hook(make(s.name)))
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            kw, _, _ = pm.inputs(batch, prompt)
            mask = kw.get("attention_mask")
            state["mask"] = mask
            pm.run_body(batch, prompt)
    finally:
        for h in handles:
            h.remove()
    if any(n == 0 for n in count.values()):
        raise NeurospecError("no training position was seen: the means of the pruned neurons are undefined")
    return {name: v / count[name] for name, v in sums.items()}


def _pruned_set(loaded: LoadedModel, keep: Mapping[str, Tensor]) -> NeuronSet:
    sites = loaded.sites.by_name
    widths = {name: sites[name].width for name in keep}
    drop = {}
    for name, idx in keep.items():
        mask = torch.ones(widths[name], dtype=torch.bool)
        mask[torch.as_tensor(idx, dtype=torch.long)] = False
        drop[name] = mask.nonzero().flatten()
    return NeuronSet(drop, widths)


def _check(loaded: LoadedModel, keep: Mapping[str, Tensor], means: Mapping[str, Tensor]) -> None:
    sites = loaded.sites.by_name
    for name in keep:
        if name not in sites:
            raise NeurospecError(f"kept neurons name site {name!r}, which this model does not have")
        if name not in means:
            raise NeurospecError(f"no training means for site {name}: compute them with token_means first")


def prune_model(loaded: LoadedModel, keep: Mapping[str, Tensor], means: Mapping[str, Tensor]) -> LoadedModel:
    """A pruned copy: in every site of ``keep`` (``{site: kept indices}``) the other neurons are replaced by their
    ``means``, folded into the reading module's bias (module docstring). ``loaded.model`` is not changed."""
    _check(loaded, keep, means)
    model = copy.deepcopy(loaded.model)
    info = fold_ablation(model, loaded.sites, _pruned_set(loaded, keep), {s: means[s] for s in keep}, method="mean")
    kept = sum(int(torch.as_tensor(v).numel()) for v in keep.values())
    return dataclasses.replace(
        loaded, model=model, name=f"{loaded.name} (skill-pruned)", sites=find_sites(model),
        fingerprint=model_fingerprint(model),
        preprocessing=[*loaded.preprocessing, f"skill pruning: kept {kept} MLP neurons, {info.n_ablated} set to "
                       "their training means"])


def save_pruned(pruned: LoadedModel, directory: str | Path) -> Path:
    """Write the pruned copy as a plain Hugging Face model (safetensors) with its tokenizer."""
    return save_sparse(pruned.model, directory, pruned.tokenizer)


def pvalue_higher(skill_acc: float, random_accs: Sequence[float]) -> float:
    """``(r + 1) / (n + 1)``, ``r`` = random sets with accuracy >= the skill set's."""
    r = sum(1 for a in random_accs if a >= skill_acc)
    return (r + 1) / (len(random_accs) + 1)


def pruning_study(pm: PromptedModel, items, labels, prompt: Prompt | None, scores: Mapping[str, Tensor],
                  means: Mapping[str, Tensor], keeps: Sequence[float], *, n_random: int = MIN_RANDOM,
                  key: str = "", batch_size: int = 16) -> list[dict]:
    """Rows ``{keep, n_kept, base_acc, skill_acc, random_acc_mean, random_acc_std, pvalue}`` per kept fraction."""
    if n_random < MIN_RANDOM:
        raise NeurospecError(f"n_random must be at least {MIN_RANDOM} for a meaningful p-value, got {n_random}")
    bad = [q for q in keeps if not 0.0 <= q <= 1.0]
    if bad:
        raise NeurospecError(f"kept fractions must lie in [0, 1], got {bad}")
    loaded = pm.loaded
    _check(loaded, scores, means)
    base = pm.accuracy(items, labels, prompt, batch_size)

    def acc_with(keep: Mapping[str, Tensor]) -> float:
        ns = _pruned_set(loaded, keep)
        if len(ns) == 0:
            return base
        with ablated(loaded.model, loaded.sites, ns, "mean", offsets={s: means[s] for s in keep}):
            return pm.accuracy(items, labels, prompt, batch_size)

    rows = []
    for q in keeps:
        skill = select_top_p(scores, q, key=key)
        counts = {s: (int(v.numel()), int(scores[s].numel())) for s, v in skill.items()}
        acc = acc_with(skill)
        rand = [acc_with(random_same_counts(counts, key=f"prune|{key}|{q}|{r}")) for r in range(n_random)]
        t = torch.tensor(rand, dtype=torch.float64)
        rows.append({"keep": float(q), "n_kept": sum(c[0] for c in counts.values()), "base_acc": base,
                     "skill_acc": acc, "random_acc_mean": float(t.mean()), "random_acc_std": float(t.std()),
                     "pvalue": pvalue_higher(acc, rand)})
    return rows
