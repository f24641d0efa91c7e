"""The ablation-method study (METHODS.md section 2): how loss and top-1 degrade as more random neurons are ablated,
compared across ablation methods.

For every seed, one nested random draw per site (:meth:`NeuronSet.random_nested`): step ``i`` ablates
``floor(i * frac_per_step * width)`` neurons of every selected site, each step's set containing the previous one, and
every method ablates the *same* sets, so methods differ only in the values they write. Step 0 is the unablated model,
evaluated once and shared by every method and seed.

Metrics: models with an LM head use :func:`~neurospec.evaluate.evaluate_lm` (``loss``, ``top1``). Head-less
encoders use :func:`~neurospec.evaluate.evaluate_representation`: ``loss`` is then the mean cosine distance of the
final hidden states to the unablated model's (0 at step 0) and ``top1`` is ``None`` (so do image classifiers: the
study's tasks carry no class labels). Every row names what its ``loss`` is in ``loss_metric``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neurospec.errors import NeurospecError
from neurospec.evaluate.metrics import (
    evaluate_lm,
    evaluate_representation,
    has_lm_head,
    reference_states,
    unwrap_model,
)
from neurospec.intervene.ablate import ablated, get_ablation, study_methods
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import head_of
from neurospec.models.sites import Sites

KINDS = ("attn", "mlp", "both")
METRICS = ("auto", "lm", "representation")


def _sites_of(sites: Sites, kind: str):
    if kind not in KINDS:
        raise NeurospecError(f"kind must be one of {KINDS}, got {kind!r}")
    return sites.sites if kind == "both" else sites.of_kind(kind)


def ablation_study(
    model: Any,
    sites: Sites,
    tasks: Mapping[str, torch.Tensor],
    *,
    kind: str = "attn",
    frac_per_step: float = 0.05,
    steps: int = 10,
    methods: Sequence[str] | None = None,
    offsets_by_method: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    samples: Mapping[str, torch.Tensor] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    skip_ids: torch.Tensor | None = None,
    metric: str = "auto",
    mask_token_id: int | None = None,
    per_neuron: bool = False,
) -> list[dict]:
    """Run the study; returns one row per ``(seed, step, method, task)``:
    ``{seed, step, fraction, method, task, loss, top1, loss_increase, top1_drop, n_ablated, loss_metric}``
    (``loss_metric`` names what ``loss`` measures).

    ``tasks``: task name -> evaluation blocks (``LongTensor[n, seq]``, tokens not used to compute the offsets).
    ``kind``: which sites to ablate (``"both"``: MLP and attention, each site ``fraction`` of its width).
    ``offsets_by_method``: per-neuron constants for each method that needs them (``mean``, ``peak``, ``value``).
    ``samples``: reference activations for ``resample``: ``{site: Tensor[n, width]}`` token rows, or
    ``{site: Tensor[n_seq, seq, width]}`` for position-aligned draws (see :func:`~neurospec.intervene.ablate.ablated`).
    ``methods``: default: every method whose values come from a reference run
    (:func:`~neurospec.intervene.ablate.study_methods`).
    ``per_neuron``: resample draws a row per ablated neuron instead of one per token.
    ``metric``: ``"lm"``, ``"representation"`` or ``"auto"`` (LM metrics when the model has an LM head).
    Cost: ``1 + len(seeds) * steps * len(methods)`` evaluations of every task.
    """
    model, tokenizer = unwrap_model(model)
    site_list = _sites_of(sites, kind)
    if not site_list:
        raise NeurospecError(f"the model has no {kind} sites")
    if steps < 1 or not 0.0 < frac_per_step or frac_per_step * steps > 1.0 + 1e-9:
        raise NeurospecError(
            f"need steps >= 1 and 0 < frac_per_step * steps <= 1, got {steps} steps of {frac_per_step}"
        )
    if not tasks:
        raise NeurospecError("no tasks given: pass {task name: evaluation blocks}")
    if not seeds:
        raise NeurospecError("no seeds given")
    methods = study_methods() if methods is None else tuple(methods)
    offsets_by_method = dict(offsets_by_method or {})
    for m in methods:
        needs = get_ablation(m).needs
        if needs == "offsets" and m not in offsets_by_method:
            raise NeurospecError(
                f"method {m!r} needs offsets_by_method[{m!r}] = {{site: Tensor[width]}} (e.g. from recorded statistics)"
            )
        if needs == "samples" and samples is None:
            raise NeurospecError(f"method {m!r} needs samples = {{site: Tensor[n, width]}} (reference activations)")
    extra = set(offsets_by_method) - set(methods)
    if extra:
        raise NeurospecError(f"offsets_by_method has entries for methods that are not run: {sorted(extra)}")
    if metric not in METRICS:
        raise NeurospecError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "auto":
        metric = "lm" if has_lm_head(model) else "representation"
    if mask_token_id is None and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)

    loss_metric = "cosine distance to the unablated model"
    if metric == "lm":
        loss_metric = ("next-token" if head_of(model) == "causal-lm" else "masked-token") + " cross-entropy"
    refs = {}
    if metric == "representation":
        refs = {t: reference_states(model, b, batch_size=batch_size) for t, b in tasks.items()}

    def evaluate(task: str) -> tuple[float, float | None]:
        if metric == "representation":
            r = evaluate_representation(model, tasks[task], refs[task], batch_size=batch_size)
            return r["cosine_distance"], None
        r = evaluate_lm(model, tasks[task], batch_size=batch_size, skip_ids=skip_ids, mask_token_id=mask_token_id)
        return r["loss"], r["top1"]

    baseline = {t: evaluate(t) for t in tasks}
    rows: list[dict] = []

    def add(seed: int, step: int, method: str, task: str, loss: float, top1: float | None, n: int) -> None:
        base_loss, base_top1 = baseline[task]
        rows.append({
            "seed": seed,
            "step": step,
            "fraction": round(step * frac_per_step, 10),
            "method": method,
            "task": task,
            "loss": loss,
            "top1": top1,
            "loss_increase": loss - base_loss,
            "top1_drop": None if top1 is None else base_top1 - top1,
            "n_ablated": n,
            "loss_metric": loss_metric,
        })

    fracs = [step * frac_per_step for step in range(1, steps + 1)]
    for seed in seeds:
        for method in methods:
            for task in tasks:
                add(seed, 0, method, task, *baseline[task], 0)
        nested = NeuronSet.random_nested(site_list, fracs, seed=seed)
        for step, neurons in enumerate(nested, start=1):
            for method in methods:
                with ablated(
                    model, sites, neurons, method,
                    offsets=offsets_by_method.get(method),
                    samples=samples if get_ablation(method).per_input else None,
                    seed=seed * 1_000_003 + step,
                    per_neuron=per_neuron and get_ablation(method).per_input,
                ):
                    for task in tasks:
                        add(seed, step, method, task, *evaluate(task), len(neurons))
    return rows
