"""Ablations: replace chosen neurons by constants (folded into weights) or by values from other inputs (a hook).

Every site is the input ``a`` of one linear module ``y = W a + b``. Ablating the neurons under mask ``m`` (1 = keep)
with constants ``c`` is ``W (m*a + (1-m)*c) + b == (W diag(m)) a + (b + W((1-m)*c))``: zero the weight's columns of
the ablated neurons and add their constant contribution to the bias. Folded ablations cost nothing at inference and a
permanently folded model can be saved with ``save_pretrained``. Per-input ablations (resample) need a forward
pre-hook on the module that overwrites the ablated columns of its input.

Methods: the registry :func:`ablation_methods` (see :func:`register_ablation`). Each :class:`AblationMethod` says
what it needs (nothing, per-neuron ``offsets`` folded into the weights, or per-input ``samples`` applied by a hook),
what it replaces an ablated neuron's activation by (its ``description``), and whether the values come from a
reference run (``from_reference``; ``value`` takes any constants the caller gives). The command line's choices, the
README's table and the tests read this registry.

Values come in as tensors, so this module does not depend on the run store: ``offsets: {site: Tensor[width]}`` and
``samples: {site: Tensor[n, width]}`` (token rows) or ``{site: Tensor[n_seq, seq, width]}`` (position-aligned).

Resample draws one random reference row per token and uses it for every ablated neuron of that token, so the
ablated neurons of a token keep the joint pattern of one real input (their correlations survive); with
``per_neuron=True`` each ablated neuron of each token draws its own row. With 3-D samples the draw is
position-aligned: the token at position ``p`` takes position ``p`` of a random reference sequence. Draws come from a
generator on the module's device seeded from ``(seed, site name)``.

Routed experts of a mixture-of-experts layer (sites ``layers.L.mlp.E``) are read by the slice ``down_proj[E]`` of a
fused parameter that has no bias: zero ablation folds into that slice (columns zeroed in a copy of the fused
parameter); constants and resampling go through an expert hook (:mod:`neurospec.models.experts`) that rewrites the
expert's activations before its down projection, for the tokens routed to it only.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neurospec.errors import NeurospecError
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.experts import add_expert_hook, expert_down_weight
from neurospec.models.linear import is_linear, linear_dims, weight_out_in
from neurospec.models.placement import execution_device, is_offloaded
from neurospec.models.sites import Site, Sites, get_module

NEEDS = (None, "offsets", "samples")
MISSING_BIAS = ("config", "memory", "error")


@dataclass(frozen=True)
class AblationMethod:
    """One ablation method. ``needs``: ``None`` (constant zero), ``"offsets"`` (per-neuron constants, folded) or
    ``"samples"`` (per-input values from reference activations, applied by a hook)."""

    name: str
    needs: str | None
    description: str
    from_reference: bool = True

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"an ablation method needs one of {NEEDS}, got {self.needs!r}")

    @property
    def per_input(self) -> bool:
        return self.needs == "samples"


_METHODS: dict[str, AblationMethod] = {}


def register_ablation(method: AblationMethod, *, replace: bool = False) -> AblationMethod:
    """Add an ablation method to the registry; a taken name is an error unless ``replace=True``."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"ablation method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def ablation_methods() -> dict[str, AblationMethod]:
    return dict(_METHODS)


def study_methods() -> tuple[str, ...]:
    """The methods whose values come from a reference run (every method but ``value``, whose constants a caller
    gives): the default methods of an ablation study."""
    return tuple(n for n, m in _METHODS.items() if m.from_reference)


def get_ablation(name: str) -> AblationMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise NeurospecError(f"unknown ablation method {name!r}; known: {', '.join(_METHODS)}") from None


register_ablation(AblationMethod("zero", None, "set the neurons to 0"))
register_ablation(AblationMethod("mean", "offsets", "set each neuron to its mean on reference data"))
register_ablation(AblationMethod("peak", "offsets", "set each neuron to the mode of its activation distribution on "
                                                    "reference data (histogram or kernel density)"))
register_ablation(AblationMethod("value", "offsets", "set each neuron to a constant given by the caller",
                                 from_reference=False))
register_ablation(AblationMethod("resample", "samples", "set each neuron to its value in a random token row of "
                                                        "reference data (a hook)"))


@dataclass(frozen=True)
class AblationInfo:
    """What :func:`ablated` or :func:`fold_ablation` did.

    ``folded``/``hooked``: module paths changed by folding or given a pre-hook; ``created_biases``: modules that got
    a bias they did not have; ``config_changes``: config flags set so a saved model keeps those biases.
    """

    method: str
    n_ablated: int
    count_by_site: dict[str, int]
    folded: tuple[str, ...] = ()
    hooked: tuple[str, ...] = ()
    created_biases: tuple[str, ...] = ()
    config_changes: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "n_ablated": self.n_ablated,
            "count_by_site": dict(self.count_by_site),
            "folded": list(self.folded),
            "hooked": list(self.hooked),
            "created_biases": list(self.created_biases),
            "config_changes": dict(self.config_changes),
        }


@dataclass(frozen=True)
class _SitePlan:
    site: Site
    module: nn.Module  # the reading linear module, or the fused experts module of a routed expert
    weight: torch.Tensor  # [out, width] view of the weight that reads the site (a routed expert's down_proj slice)
    idx: torch.Tensor  # LongTensor[k] on the CPU
    values: torch.Tensor | None  # float64[k] constants, None for zero and resample
    samples: torch.Tensor | None  # [n, k] or [n_seq, seq, k] reference values (resample)


def _plan(
    model: nn.Module,
    sites: Sites,
    neuron_set: NeuronSet,
    method: str,
    offsets: Mapping[str, torch.Tensor] | None,
    samples: Mapping[str, torch.Tensor] | None,
) -> tuple[AblationMethod, list[_SitePlan]]:
    """Check every input and resolve, per site, what to write. Nothing is changed yet."""
    m = get_ablation(method)
    if not isinstance(neuron_set, NeuronSet):
        raise NeurospecError(f"expected a NeuronSet, got {type(neuron_set).__name__}")
    neuron_set.validate(sites)
    if m.needs == "offsets" and offsets is None:
        raise NeurospecError(
            f"ablation {method!r} needs offsets={{site: Tensor[width]}} (per-neuron constants, e.g. means or peaks "
            "from a recorded run's statistics)"
        )
    if m.needs == "samples" and samples is None:
        raise NeurospecError(
            f"ablation {method!r} needs samples={{site: Tensor[n, width]}} (reference activations, e.g. a recorded "
            "run's reservoir samples)"
        )
    if offsets is not None and m.needs != "offsets":
        raise NeurospecError(f"ablation {method!r} takes no offsets (only {_names_needing('offsets')} do)")
    if samples is not None and m.needs != "samples":
        raise NeurospecError(f"ablation {method!r} takes no samples (only {_names_needing('samples')} do)")
    plans = []
    for name in neuron_set.site_names:
        site = sites[name]
        idx = neuron_set.indices(name)
        values = cols = None
        if offsets is not None:
            o = _site_tensor(offsets, name, method, "offsets")
            if o.shape != (site.width,):
                raise NeurospecError(f"offsets of site {name} have shape {tuple(o.shape)}, expected ({site.width},)")
            values = o.index_select(0, idx.to(o.device)).to("cpu", torch.float64)
            if not torch.isfinite(values).all():
                raise NeurospecError(f"offsets of site {name} are not finite for some ablated neurons")
        if samples is not None:
            s = _site_tensor(samples, name, method, "samples")
            if s.dim() not in (2, 3) or s.shape[-1] != site.width or s.shape[0] == 0:
                raise NeurospecError(
                    f"samples of site {name} have shape {tuple(s.shape)}; expected (n, {site.width}) token rows or "
                    f"(n_seq, seq, {site.width}) position-aligned rows, with n >= 1"
                )
            cols = s.index_select(-1, idx.to(s.device))
        module = get_module(model, site.module)
        weight = expert_down_weight(model, site) if site.expert is not None else weight_out_in(module)
        plans.append(_SitePlan(site, module, weight, idx, values, cols))
    return m, plans


def _names_needing(needs: str) -> str:
    return ", ".join(n for n, m in _METHODS.items() if m.needs == needs)


def _site_tensor(d: Mapping[str, torch.Tensor], name: str, method: str, what: str) -> torch.Tensor:
    if name not in d:
        raise NeurospecError(f"ablation {method!r}: {what} have no entry for site {name} (they cover {list(d)[:4]}...)")
    return torch.as_tensor(d[name]).detach()


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"neurospec-ablate:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _contribution(w: torch.Tensor, idx: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor | None:
    """``W[:, idx] @ values`` for an ``[out, in]`` weight (float64 where the device has it), or None when it is
    exactly zero."""
    if values is None:
        return None
    acc = torch.float32 if w.device.type == "mps" else torch.float64
    c = w.detach().index_select(1, idx.to(w.device)).to(acc) @ values.to(w.device, acc)
    return c if bool(c.any()) else None


# ------------------------------------------------------------------------------------------------ hooks


def _input_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    """A forward pre-hook (``with_kwargs=True``) that passes the module's input through ``fn``."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, {**kwargs, key: fn(kwargs[key])}

    return hook


class _ConstantWriter:
    """Overwrites the ablated columns of the input with constants (the hooked form of a folded ablation)."""

    def __init__(self, idx: torch.Tensor, values: torch.Tensor, like: torch.Tensor):
        self.idx = idx.to(like.device)
        self.values = values.to(like.device, like.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.idx.device != x.device:  # an activation that arrives before accelerate moves it (device maps)
            self.idx, self.values = self.idx.to(x.device), self.values.to(x.device)
        y = x.clone()
        y.index_copy_(-1, self.idx, self.values.to(x.dtype).expand(*x.shape[:-1], -1))
        return y


class _Resampler:
    """Overwrites the ablated columns of each token with a random row of reference values.

    Cost per call: one ``randint`` of ``tokens`` (or ``tokens x k``) rows, an ``index_select`` (or ``gather``) of
    ``tokens x k`` values and one clone of the input; no Python loop over tokens.
    """

    def __init__(self, idx: torch.Tensor, samples: torch.Tensor, like: torch.Tensor, seed: int, per_neuron: bool):
        self.idx = idx.to(like.device)
        self.aligned = samples.dim() == 3
        self.ref_seq = samples.shape[1] if self.aligned else 1
        self.n = samples.shape[0]
        self.table = samples.reshape(-1, samples.shape[-1]).to(like.device, like.dtype).contiguous()
        self.per_neuron = per_neuron
        self.gen = torch.Generator(device=like.device).manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.idx.numel()
        tokens = x.numel() // x.shape[-1]
        shape = (tokens, k) if self.per_neuron else (tokens,)
        if self.idx.device != x.device:  # an activation that arrives before accelerate moves it (device maps)
            self.idx, self.table = self.idx.to(x.device), self.table.to(x.device)
        rows = torch.randint(self.n, shape, generator=self.gen, device=self.gen.device).to(x.device)
        if self.aligned:
            seq = x.shape[-2] if x.dim() >= 2 else 1
            if seq > self.ref_seq:
                raise NeurospecError(
                    f"position-aligned resampling: the input has {seq} positions, the samples only {self.ref_seq}"
                )
            pos = torch.arange(tokens, device=x.device) % seq
            rows = rows * self.ref_seq + (pos[:, None] if self.per_neuron else pos)
        vals = self.table.gather(0, rows) if self.per_neuron else self.table.index_select(0, rows)
        y = x.clone()
        y.index_copy_(-1, self.idx, vals.view(*x.shape[:-1], k).to(x.dtype))
        return y


# ------------------------------------------------------------------------------------------------ folding


def _fold_in_place(module: nn.Module, idx: torch.Tensor, contrib: torch.Tensor | None) -> bool:
    """Zero the weight's columns ``idx`` and add ``contrib`` to the bias, creating the bias if the module has none.
    Returns whether a bias was created."""
    w = module.weight
    with torch.no_grad():
        weight_out_in(module)[:, idx.to(w.device)] = 0
        if contrib is None:
            return False
        if module.bias is None:
            module.bias = nn.Parameter(contrib.to(w.dtype), requires_grad=w.requires_grad)
            return True
        module.bias.copy_((module.bias.to(contrib.dtype) + contrib).to(module.bias.dtype))
    return False


def _swap_folded(p: _SitePlan, undo: list[Callable[[], None]]) -> bool:
    """Fold into the module's own weight (and bias) in place, registering how to put their exact values back: only
    the ablated columns of the weight (and the bias) are saved, not a copy of the whole weight. A weight that is an
    inference tensor cannot change in place outside inference mode: it is swapped for a folded copy instead.
    Returns whether a bias was created."""
    module = p.module
    orig_w, orig_b = module.weight, module.bias
    contrib = _contribution(p.weight, p.idx, p.values)
    if not (orig_w.is_inference() and not torch.is_inference_mode_enabled()):
        idx = p.idx.to(orig_w.device)
        cols = weight_out_in(module)[:, idx].clone()
        saved_b = orig_b.detach().clone() if contrib is not None and orig_b is not None else None

        def restore() -> None:
            with torch.no_grad():
                weight_out_in(module)[:, idx] = cols
                if saved_b is not None:
                    orig_b.copy_(saved_b)

        undo.append(restore)
        if contrib is not None and orig_b is None:
            undo.append(lambda: setattr(module, "bias", None))
        return _fold_in_place(module, p.idx, contrib)
    module.weight = nn.Parameter(orig_w.detach().clone(), requires_grad=orig_w.requires_grad)
    undo.append(lambda: setattr(module, "weight", orig_w))
    if contrib is not None:
        if orig_b is not None:
            module.bias = nn.Parameter(orig_b.detach().clone(), requires_grad=orig_b.requires_grad)
        undo.append(lambda: setattr(module, "bias", orig_b))
    return _fold_in_place(module, p.idx, contrib)


def _expert_param(model: nn.Module, site: Site) -> tuple[nn.Module, str]:
    owner, _, name = site.param.rpartition(".")
    return get_module(model, owner), name


def _zero_expert_columns(model: nn.Module, site: Site, idx: torch.Tensor) -> None:
    owner, name = _expert_param(model, site)
    param = getattr(owner, name)
    with torch.no_grad():
        param[site.expert][:, idx.to(param.device)] = 0


def _swap_expert_param(model: nn.Module, site: Site, undo: list[Callable[[], None]], swapped: set[str]) -> None:
    """Put a copy of a routed expert's fused down projection in place (once per parameter; the experts of one layer
    share it), registering how to put the original back."""
    if site.param in swapped:
        return
    owner, name = _expert_param(model, site)
    orig = getattr(owner, name)
    setattr(owner, name, nn.Parameter(orig.detach().clone(), requires_grad=orig.requires_grad))
    undo.append(lambda: setattr(owner, name, orig))
    swapped.add(site.param)


def _expert_label(site: Site) -> str:
    return f"{site.param}[{site.expert}]"


@contextmanager
def ablated(
    model: nn.Module,
    sites: Sites,
    neuron_set: NeuronSet,
    method: str = "zero",
    *,
    offsets: Mapping[str, torch.Tensor] | None = None,
    samples: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    fold: bool = True,
    per_neuron: bool = False,
) -> Iterator[AblationInfo]:
    """Temporarily ablate ``neuron_set`` inside a ``with`` block.

    Constant methods are folded into the weights (``fold=True``) or applied by pre-hooks that overwrite the input
    columns (``fold=False``: the reference the folding is tested against); ``resample`` always uses hooks. A routed
    expert of a mixture-of-experts layer folds zero ablation into its slice of the fused down projection; its other
    methods always use an expert hook (the fused projection has no bias to fold constants into).
    Folding changes the original parameters in place and puts their saved values back on exit, so every parameter is
    bit-identical afterwards, biases created for the fold are removed and hooks are taken off, also when the block
    raises. Memory: a copy of the ablated columns of each changed weight and of its bias (no copy of whole weights;
    for resample, the ablated columns of ``samples`` on the device).
    ``seed`` seeds the resample draws; ``per_neuron`` draws a row per neuron instead of per token (resample only).
    Models spread over devices (:mod:`neurospec.models.placement`): each site's values live on the device its module
    runs on, and a site whose weights are offloaded (loaded afresh by every forward) is ablated by a hook.
    """
    m, plans = _plan(model, sites, neuron_set, method, offsets, samples)
    if per_neuron and not m.per_input:
        raise NeurospecError(f"per_neuron applies to resampling only, not to {method!r}")
    undo: list[Callable[[], None]] = []
    folded, hooked, created = [], [], []
    swapped: set[str] = set()
    try:
        for p in plans:
            # the weight's dtype on the device the module runs on (an offloaded weight sits on the meta device)
            like = torch.empty(0, dtype=p.weight.dtype, device=execution_device(model, p.site.module))
            expert = p.site.expert is not None
            offloaded = is_offloaded(model, p.site.module)
            if expert and fold and not m.per_input and p.values is None:
                _swap_expert_param(model, p.site, undo, swapped)
                _zero_expert_columns(model, p.site, p.idx)
                folded.append(_expert_label(p.site))
                continue
            if m.per_input and expert and p.samples.dim() == 3:
                raise NeurospecError(
                    f"position-aligned resampling of {p.site.name}: a routed expert sees only the tokens routed to "
                    "it, not whole sequences; give token rows (n, width) instead"
                )
            if m.per_input:
                writer = _Resampler(p.idx, p.samples, like, _seed_for(seed, p.site.name), per_neuron)
            elif not fold or expert or offloaded:  # an offloaded weight is loaded afresh by each forward: hook
                writer = _ConstantWriter(p.idx, p.values if p.values is not None else torch.zeros(p.idx.numel()), like)
            else:
                if _swap_folded(p, undo):
                    created.append(p.site.module)
                folded.append(p.site.module)
                continue
            if expert:
                handle = add_expert_hook(p.module, p.site.expert, writer, edit=True)
            else:
                handle = p.module.register_forward_pre_hook(_input_hook(writer), with_kwargs=True)
            undo.append(handle.remove)
            hooked.append(_expert_label(p.site) if expert else p.site.module)
        yield AblationInfo(
            method, len(neuron_set), neuron_set.count_by_site(), tuple(folded), tuple(hooked), tuple(created)
        )
    finally:
        for u in reversed(undo):
            u()


# ------------------------------------------------------------------------------------------------ permanent

_BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias", "enable_bias", "add_bias_linear")


def _bias_flags(model: nn.Module, need: list[str]) -> tuple[dict[str, bool], list[str]]:
    """Config flags that give the modules in ``need`` a bias when the model is rebuilt from its config, and every
    module those flags give a bias (they all need one in the checkpoint). Found by building the model with the flag
    set on the meta device (no memory, no weights) and comparing its parameter names."""
    root = getattr(model, "config", None)
    cfg = getattr(root, "text_config", None) or root
    have = {n for n, _ in model.named_parameters()}
    remaining, flags, gained_all = set(need), {}, set()
    for flag in _BIAS_FLAGS:
        if not remaining or root is None:
            break
        if getattr(cfg, flag, None) is not False:
            continue
        trial_root = copy.deepcopy(root)
        setattr(getattr(trial_root, "text_config", None) or trial_root, flag, True)
        try:
            with torch.device("meta"):
                trial = type(model)._from_config(trial_root)
        except Exception:  # a flag this class does not accept: try the next one
            continue
        gained = {n for n, _ in trial.named_parameters()} - have
        if not gained or not all(_is_linear_bias(model, n) for n in gained):
            continue
        covered = {p for p in remaining if f"{p}.bias" in gained}
        if covered:
            flags[flag] = True
            gained_all |= gained
            remaining -= covered
    if remaining:
        first = sorted(remaining)[0]
        raise NeurospecError(
            f"cannot fold constant offsets into {first}: it has no bias, and no config flag of "
            f"{type(model).__name__} gives it one, so a saved model would lose the offsets on reload. Use method "
            "'zero' (needs no bias), keep the ablation temporary with ablated(...), or pass missing_bias='memory' "
            "to fold in memory only (the model then must not be saved)"
        )
    return flags, sorted(n.removesuffix(".bias") for n in gained_all)


def _is_linear_bias(model: nn.Module, param: str) -> bool:
    if not param.endswith(".bias"):
        return False
    try:
        mod = model.get_submodule(param.removesuffix(".bias"))
    except AttributeError:
        return False
    return is_linear(mod) and mod.bias is None


def fold_ablation(
    model: nn.Module,
    sites: Sites,
    neuron_set: NeuronSet,
    offsets: Mapping[str, torch.Tensor] | None = None,
    *,
    method: str | None = None,
    missing_bias: str = "config",
) -> AblationInfo:
    """Permanently ablate ``neuron_set`` by folding constants into the weights in place (``offsets=None``: zero).

    ``method`` only names what the offsets are (``"mean"``, ``"peak"``, ``"value"``; default ``"value"``, or
    ``"zero"`` without offsets); resampling cannot be folded.

    A non-zero offset contribution into a module without a bias needs a new bias. ``missing_bias``:
    ``"config"`` (default) sets the family's config flag that gives the module a bias (e.g. Llama's ``mlp_bias`` or
    ``attention_bias``, found by rebuilding the model from the changed config on the meta device), and gives every
    module that flag covers a zero bias, so ``save_pretrained`` + plain ``from_pretrained`` reproduce the folded
    model; it raises if the family has no such flag. ``"memory"`` adds the bias without touching the config (correct
    in memory, lost on reload). ``"error"`` refuses. Everything is checked before the first weight changes.
    """
    if missing_bias not in MISSING_BIAS:
        raise NeurospecError(f"missing_bias must be one of {MISSING_BIAS}, got {missing_bias!r}")
    method = method or ("zero" if offsets is None else "value")
    if get_ablation(method).per_input:
        raise NeurospecError(
            f"{method!r} ablation depends on the input and cannot be folded into weights: use "
            f"ablated(model, sites, neurons, {method!r}, samples=...) instead"
        )
    m, plans = _plan(model, sites, neuron_set, method, offsets, None)
    away = [p.site.module for p in plans if is_offloaded(model, p.site.module)]
    if away:
        raise NeurospecError(
            f"cannot fold an ablation into {away[0]}: its weights are offloaded (a device map placed them in CPU "
            "memory or on disk, and each forward loads them afresh). Ablate temporarily with ablated(...), which "
            "uses a hook there, or load the model without offloading"
        )
    contribs = [_contribution(p.weight, p.idx, p.values) for p in plans]
    fused = [p.site.name for p, c in zip(plans, contribs, strict=True) if c is not None and p.site.expert is not None]
    if fused:
        raise NeurospecError(
            f"cannot fold {m.name!r} offsets into the routed expert site {fused[0]}: its fused down projection has no "
            "bias (and the offsets reach only the tokens routed to it). Use method 'zero', or ablate it temporarily "
            "with ablated(...), which applies the offsets by an expert hook"
        )
    need = [p.site.module for p, c in zip(plans, contribs, strict=True) if c is not None and p.module.bias is None]
    flags: dict[str, bool] = {}
    extra: list[str] = []
    if need and missing_bias == "error":
        raise NeurospecError(
            f"folding these offsets needs a bias in {need[0]}, which has none (missing_bias='error'); use method "
            "'zero', or missing_bias='config'"
        )
    if need and missing_bias == "config":
        flags, extra = _bias_flags(model, need)
    created = sorted(set(need) | set(extra))
    with torch.no_grad():
        for path in extra:
            mod = model.get_submodule(path)
            if mod.bias is None:
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(linear_dims(mod)[1], dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)
        for p, c in zip(plans, contribs, strict=True):
            if p.site.expert is not None:
                _zero_expert_columns(model, p.site, p.idx)
            else:
                _fold_in_place(p.module, p.idx, c)
    if flags:
        cfg = getattr(model.config, "text_config", None) or model.config
        for flag, value in flags.items():
            setattr(cfg, flag, value)
    return AblationInfo(
        m.name, len(neuron_set), neuron_set.count_by_site(),
        folded=tuple(_expert_label(p.site) if p.site.expert is not None else p.site.module for p in plans),
        created_biases=tuple(created), config_changes=flags,
    )


def folded_copy(
    model: nn.Module,
    sites: Sites,
    neuron_set: NeuronSet,
    offsets: Mapping[str, torch.Tensor] | None = None,
    *,
    method: str | None = None,
    missing_bias: str = "config",
) -> tuple[nn.Module, AblationInfo]:
    """``(copy, info)``: a deep copy of ``model`` with ``neuron_set`` folded in as :func:`fold_ablation` does; the
    given model (its weights, biases and config) is not changed. Memory: one full copy of the model."""
    out = copy.deepcopy(model)
    return out, fold_ablation(out, sites, neuron_set, offsets, method=method, missing_bias=missing_bias)


def save_folded(
    model: nn.Module,
    sites: Sites,
    neuron_set: NeuronSet,
    directory: str | os.PathLike,
    offsets: Mapping[str, torch.Tensor] | None = None,
    *,
    tokenizer: Any = None,
    method: str | None = None,
) -> AblationInfo:
    """Fold ``neuron_set`` into a copy of ``model`` (:func:`folded_copy`) and write that copy, with ``tokenizer``
    when given, to ``directory`` as a plain Hugging Face model (``save_pretrained``: safetensors and config). The
    given model is not changed. Memory: one full copy of the model, freed on return."""
    pruned, info = folded_copy(model, sites, neuron_set, offsets, method=method)
    pruned.save_pretrained(directory)
    del pruned
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return info
