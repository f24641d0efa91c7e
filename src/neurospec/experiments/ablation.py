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

The settings are an :class:`AblationStudyConfig` (checked when it is made); the data (model, sites, tasks, offsets,
samples, skip ids) are arguments.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
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
from neurospec.experiments._settings import UNSET, config_from
from neurospec.intervene.ablate import ablated, ablation_methods, get_ablation, study_methods
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import head_of
from neurospec.models.sites import Sites

KINDS = ("attn", "mlp", "both")
METRICS = ("auto", "lm", "representation")


def _sites_of(sites: Sites, kind: str):
    if kind not in KINDS:
        raise NeurospecError(f"kind must be one of {KINDS}, got {kind!r}")
    return sites.sites if kind == "both" else sites.of_kind(kind)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise NeurospecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise NeurospecError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise NeurospecError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


@dataclass(frozen=True)
class AblationStudyConfig:
    """Settings of :func:`ablation_study`. ``methods``: ``None`` means every method whose values come from a
    reference run (:func:`~neurospec.intervene.ablate.study_methods`), resolved when the config is made."""

    kind: str = "attn"
    frac_per_step: float = 0.05
    steps: int = 10
    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 8
    metric: str = "auto"
    per_neuron: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NeurospecError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        steps = _int("steps", self.steps, 1)
        try:
            frac = float(self.frac_per_step)
        except (TypeError, ValueError):
            raise NeurospecError(f"frac_per_step must be a number in (0, 1], got {self.frac_per_step!r}") from None
        if not 0.0 < frac <= 1.0:
            raise NeurospecError(f"frac_per_step must be in (0, 1], got {self.frac_per_step}")
        if frac * steps > 1.0 + 1e-9:
            raise NeurospecError(f"{steps} steps of {frac} ablate more than every neuron: need frac_per_step * "
                                 "steps <= 1; lower one of them")
        if isinstance(self.methods, str):
            raise NeurospecError(f"methods must be a sequence of method names, got the string {self.methods!r}")
        methods = study_methods() if self.methods is None else tuple(self.methods)
        if not methods:
            raise NeurospecError(f"methods is empty; give at least one of {', '.join(ablation_methods())}")
        for m in methods:
            get_ablation(m)  # unknown names fail with the list of known ones
        if len(set(methods)) != len(methods):
            raise NeurospecError(f"methods names a method twice: {list(methods)}")
        if isinstance(self.seeds, (str, int)):
            raise NeurospecError(f"seeds must be a sequence of integers >= 0, got {self.seeds!r}")
        seeds = tuple(_int("each seed", s, 0) for s in self.seeds)
        if not seeds:
            raise NeurospecError("seeds is empty; give at least one seed (an integer >= 0)")
        if len(set(seeds)) != len(seeds):
            raise NeurospecError(f"seeds names a seed twice: {list(seeds)}")
        batch_size = _int("batch_size", self.batch_size, 1)
        if self.metric not in METRICS:
            raise NeurospecError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not isinstance(self.per_neuron, bool):
            raise NeurospecError(f"per_neuron must be True or False, got {self.per_neuron!r}")
        if self.per_neuron and not any(get_ablation(m).per_input for m in methods):
            raise NeurospecError("per_neuron applies to methods that draw values per input (resample); add one "
                                 "to methods or leave per_neuron False")
        for name, value in (("steps", steps), ("frac_per_step", frac), ("methods", methods), ("seeds", seeds),
                            ("batch_size", batch_size)):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = list(self.methods or ())
        d["seeds"] = list(self.seeds)
        return {"type": "AblationStudyConfig", "version": 1, **d}


def ablation_study(
    model: Any,
    sites: Sites,
    tasks: Mapping[str, torch.Tensor],
    cfg: AblationStudyConfig | None = None,
    *,
    offsets_by_method: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    samples: Mapping[str, torch.Tensor] | None = None,
    skip_ids: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    kind: str = UNSET,
    frac_per_step: float = UNSET,
    steps: int = UNSET,
    methods: Sequence[str] | None = UNSET,
    seeds: Sequence[int] = UNSET,
    batch_size: int = UNSET,
    metric: str = UNSET,
    per_neuron: bool = UNSET,
) -> list[dict]:
    """Run the study; returns one row per ``(seed, step, method, task)``:
    ``{seed, step, fraction, method, task, loss, top1, loss_increase, top1_drop, n_ablated, loss_metric}``
    (``loss_metric`` names what ``loss`` measures).

    ``cfg``: the settings (:class:`AblationStudyConfig`); or give them as keywords (``kind``, ``frac_per_step``,
    ``steps``, ``methods``, ``seeds``, ``batch_size``, ``metric``, ``per_neuron``), which make the config, not both.
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
    cfg = config_from(AblationStudyConfig, cfg, {
        "kind": kind, "frac_per_step": frac_per_step, "steps": steps, "methods": methods, "seeds": seeds,
        "batch_size": batch_size, "metric": metric, "per_neuron": per_neuron,
    }, "ablation_study")
    kind, frac_per_step, steps, seeds, batch_size = cfg.kind, cfg.frac_per_step, cfg.steps, cfg.seeds, cfg.batch_size
    methods, metric, per_neuron = tuple(cfg.methods or ()), cfg.metric, cfg.per_neuron
    if not tasks:
        raise NeurospecError("no tasks given: pass {task name: evaluation blocks}")
    model, tokenizer = unwrap_model(model)
    site_list = _sites_of(sites, kind)
    if not site_list:
        raise NeurospecError(f"the model has no {kind} sites")
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
