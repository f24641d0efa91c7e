"""Perturbing skill neurons against random same-per-layer-count controls, and task similarity by overlap.

Perturbation (a forward pre-hook on each site's reading module, removed on exit; the model's weights never
change): ``noise`` adds Gaussian noise (std 0.1 by default) to the chosen neurons, one noise vector per example
broadcast over all its positions (as the published code does); ``noise:STD`` the same with that std (a sweep:
``noise:0.3``, ``noise:1``, ...; each method's draws are seeded by its name, so ``noise`` and ``noise:0.1`` draw
differently); ``zero`` sets them to 0 at every position.

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
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.models.sites import Site
from neurospec.skills.predictivity import random_same_counts, seed_of, select_top_p
from neurospec.skills.prompting import Prompt, PromptedModel

METHODS = ("noise", "zero")
MIN_RANDOM = 20


def parse_method(text: str, std: float = 0.1) -> tuple[str, float]:
    """``(method, noise std)`` of a perturbation written ``zero``, ``noise`` (std ``std``) or ``noise:STD`` (a point
    of a noise sweep: ``noise:0.5``); a clear error for anything else."""
    name, sep, value = str(text).strip().partition(":")
    if name not in METHODS or (sep and name != "noise"):
        raise NeurospecError(f"perturbation method must be one of {METHODS} or noise:STD (e.g. noise:0.5), got "
                             f"{text!r}")
    if not sep:
        return name, std
    try:
        sd = float(value)
    except ValueError:
        sd = float("nan")
    if not (sd > 0 and np.isfinite(sd)):
        raise NeurospecError(f"the noise std of {text!r} must be a positive number (noise:0.5)")
    return name, sd


@contextlib.contextmanager
def perturbed(model: torch.nn.Module, sites: Mapping[str, Site], neurons: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
              method: str, *, std: float = 0.1, seed: int = 0) -> Iterator[None]:
    """While open, the ``neurons`` (``{site: indices}``) are perturbed by ``method`` in every forward pass.

    ``neurons`` may also be a list of ``S`` sets with equal counts per site: every batch is then read as ``S``
    stacked copies of the same examples (set-major, ``[S * b, ...]``) and copy ``s`` gets set ``s``. The noise of a
    batch is drawn once per site (``[b, k]``) and applied to every copy, so stacked sets see exactly the draws they
    would see one at a time with the same ``seed``."""
    if method not in METHODS:
        raise NeurospecError(f"perturbation method must be one of {METHODS}, got {method!r}")
    sets = [neurons] if isinstance(neurons, Mapping) else list(neurons)
    if not sets:
        raise NeurospecError("no neuron set to perturb")
    names = [n for n in sets[0] if sets[0][n].numel()]
    for other in sets[1:]:
        if any(int(other.get(n, torch.empty(0)).numel()) != int(sets[0][n].numel()) for n in names):
            raise NeurospecError("stacked neuron sets must have the same number of neurons in every site")
    gens: dict[str, torch.Generator] = {}
    handles = []
    n_sets = len(sets)

    def make(name: str, idx: Tensor):
        def hook(_module, args):
            x = args[0]
            if x.shape[0] % n_sets:
                raise NeurospecError(f"a batch of {x.shape[0]} rows cannot hold {n_sets} stacked copies")
            b, k = x.shape[0] // n_sets, idx.shape[1]
            i = idx.to(x.device)
            x = x.clone()
            view = x.view(n_sets, b, -1, x.shape[-1])  # [S, b, positions, width]
            if method == "zero":
                view.scatter_(-1, i[:, None, None, :].expand(n_sets, b, view.shape[2], k), 0.0)
            else:
                g = gens.setdefault(name, torch.Generator(device=x.device).manual_seed(seed_of(seed, name)))
                eps = torch.randn(b, k, generator=g, device=x.device, dtype=x.dtype) * std
                delta = torch.zeros(n_sets, b, x.shape[-1], device=x.device, dtype=x.dtype)
                delta.scatter_(-1, i[:, None, :].expand(n_sets, b, k), eps.expand(n_sets, b, k))
                view += delta[:, :, None, :]
            return (x, *args[1:])

        return hook

    try:
        for name in names:
            idx = torch.stack([s[name].long().flatten() for s in sets])  # [S, k]
            handles.append(model.get_submodule(sites[name].module).register_forward_pre_hook(make(name, idx)))
        yield
    finally:
        for h in handles:
            h.remove()


def pvalue(skill_acc: float, random_accs: Sequence[float]) -> float:
    """``(r + 1) / (n + 1)``, ``r`` = random sets with accuracy <= the skill set's."""
    r = sum(1 for a in random_accs if a <= skill_acc)
    return (r + 1) / (len(random_accs) + 1)


def balanced_subset(labels, per_class: int | None, *, key: str = "") -> np.ndarray:
    """Indices (sorted) of at most ``per_class`` examples of each class, drawn with a seed from ``key``; all
    indices when ``per_class`` is None or 0."""
    labels = np.asarray(labels)
    if not per_class:
        return np.arange(len(labels))
    if per_class < 0:
        raise NeurospecError(f"examples per class must be positive (0 = all), got {per_class}")
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > per_class:
            g = torch.Generator().manual_seed(seed_of("perturb-examples", key, int(c)))
            idx = np.sort(idx[torch.randperm(len(idx), generator=g)[:per_class].numpy()])
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def _take(items, idx: np.ndarray):
    if isinstance(items, Tensor):
        return items[torch.as_tensor(idx, dtype=torch.long)]
    return [items[int(i)] for i in idx]


def by_length(pm: PromptedModel, items) -> np.ndarray:
    """An order of ``items`` by token count (texts; stable), so that batches hold texts of similar length and
    carry little padding; images keep their order."""
    if isinstance(items, Tensor):
        return np.arange(len(items))
    lengths = [len(ids) for ids in pm.loaded.tokenizer(list(items), add_special_tokens=True, truncation=True,
                                                        max_length=pm.max_tokens)["input_ids"]]
    return np.argsort(np.asarray(lengths), kind="stable")


@torch.no_grad()
def stacked_accuracy(pm: PromptedModel, items, labels, prompt: Prompt | None, n_sets: int,
                     batch_size: int = 16) -> list[float]:
    """Accuracy of each of ``n_sets`` stacked copies (under :func:`perturbed` with ``n_sets`` sets): every batch
    of ``batch_size`` examples runs as one forward of ``n_sets * batch_size`` rows."""
    labels = torch.as_tensor(np.asarray(labels))
    correct = torch.zeros(n_sets, dtype=torch.long)
    for i in range(0, len(labels), batch_size):
        batch = items[i : i + batch_size]
        if isinstance(batch, Tensor):
            rows = batch.repeat(n_sets, *([1] * (batch.ndim - 1)))
        else:
            rows = list(batch) * n_sets
        pred = pm.logits(rows, prompt).argmax(-1).cpu().view(n_sets, -1)
        correct += (pred == labels[i : i + batch_size]).sum(1)
    return (correct.double() / max(1, len(labels))).tolist()


def perturbation_cost(n_examples: int, ps: Sequence[float], methods: Sequence[str], n_random: int) -> int:
    """Example forwards of :func:`perturbation_study`: one unperturbed pass plus ``1 + n_random`` sets per fraction
    and method."""
    return n_examples * (1 + sum(1 for p in ps if p > 0) * len(methods) * (1 + n_random))


def perturbation_study(pm: PromptedModel, items, labels, prompt: Prompt | None, scores: Mapping[str, Tensor],
                       ps: Sequence[float], *, methods: Sequence[str] = METHODS, n_random: int = MIN_RANDOM,
                       std: float = 0.1, key: str = "", batch_size: int = 16, per_class: int | None = None,
                       sets_per_forward: int = 1,
                       progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Rows ``{p, method, n_neurons, n_examples, skill_acc, random_acc_mean, random_acc_std, pvalue, base_acc}``.

    ``per_class``: evaluate on a balanced seeded subset of at most that many examples per class (None or 0: all).
    Examples run in order of length (less padding); ``sets_per_forward`` sets (the skill set and random sets) are
    stacked in one forward pass (same accuracies, fewer and larger forwards). ``progress(label, done, total)`` is
    called after every group of sets."""
    if n_random < MIN_RANDOM:
        raise NeurospecError(f"n_random must be at least {MIN_RANDOM} for a meaningful p-value, got {n_random}")
    if sets_per_forward < 1:
        raise NeurospecError(f"sets_per_forward must be at least 1, got {sets_per_forward}")
    sites = pm.loaded.sites.by_name
    model = pm.loaded.model
    keep = balanced_subset(labels, per_class, key=key)
    items, labels = _take(items, keep), np.asarray(labels)[keep]
    order = by_length(pm, items)
    items, labels = _take(items, order), labels[order]
    base = pm.accuracy(items, labels, prompt, batch_size)
    for method in methods:
        parse_method(method, std)  # every method checked before any forward pass
    todo = [p for p in ps if p > 0]
    total, done = len(todo) * len(methods) * (1 + n_random), 0
    rows = []
    if progress is not None and todo and methods:
        progress(f"perturb {key} p={todo[0]:g} {methods[0]}", 0, total)  # the timer of the study starts here
    for p in todo:
        skill = select_top_p(scores, p, key=key)
        counts = {s: (int(v.numel()), int(scores[s].numel())) for s, v in skill.items()}
        sets = [skill] + [random_same_counts(counts, key=f"{key}|{p}|{r}") for r in range(n_random)]
        for method in methods:
            kind, sd = parse_method(method, std)
            seed = seed_of("perturb", key, p, method)
            accs: list[float] = []
            for g in range(0, len(sets), sets_per_forward):
                group = sets[g : g + sets_per_forward]
                with perturbed(model, sites, group, kind, std=sd, seed=seed):
                    accs += stacked_accuracy(pm, items, labels, prompt, len(group), batch_size)
                done += len(group)
                if progress is not None:
                    progress(f"perturb {key} p={p:g} {method}", done, total)
            acc, rand = accs[0], accs[1:]
            t = torch.tensor(rand, dtype=torch.float64)
            rows.append({"p": float(p), "method": method, **({"std": sd} if kind == "noise" else {}), "n_neurons": sum(c[0] for c in counts.values()),
                         "n_examples": len(labels), "base_acc": base, "skill_acc": acc,
                         "random_acc_mean": float(t.mean()), "random_acc_std": float(t.std()) if len(rand) > 1 else 0.0,
                         "pvalue": pvalue(acc, rand)})
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
