"""Fused mixture-of-experts layers: observing and editing one expert's neurons.

transformers stores the routed experts of Mixtral, Qwen2-MoE and OLMoE as one module holding two fused parameters,
``gate_up_proj [n_experts, 2*width, hidden]`` and ``down_proj [n_experts, hidden, width]``, and loops over the
experts with ``F.linear``. Expert ``e``'s neurons are the input of its down projection,
``act(gate_e(x)) * up_e(x)`` for the tokens routed to ``e``; no linear module reads them, so a forward pre-hook
cannot see them. Instead, :func:`add_expert_hook` sets a forward on the experts module *instance* (the class is
untouched) that runs the same loop and calls per-expert callbacks on that intermediate activation; removing the last
hook deletes the instance attribute again (or puts back one that was there), so the module is exactly as before.

Outputs: with observers only, the output is the module's own forward (whatever experts implementation the config
selects, e.g. ``grouped_mm``), so it is bit-identical, and the loop only computes the observed experts' activations
beside it. With an editor (an ablation), the loop also computes the output: the same operations in the same order as
transformers' eager implementation, so identity editors give a bit-identical output under ``eager`` and an output
equal up to float rounding under the fused implementations.

:func:`observe_site` is what the recorder asks: "call ``fn`` with the ``[tokens, width]`` activations of this site",
a forward pre-hook for an ordinary site and an expert hook for a routed expert.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurospec.errors import ArchitectureError
from neurospec.models.sites import Site, get_module

Observer = Callable[[torch.Tensor], None]  # [tokens routed to the expert, width] activations
Editor = Callable[[torch.Tensor], torch.Tensor]  # the same, returns the activations to use instead
RoutingObserver = Callable[[torch.Tensor, torch.Tensor], None]  # (top_k_index, top_k_weights), each [tokens, k]


def is_fused_experts(module: nn.Module) -> bool:
    """True for a module holding fused expert weights, i.e. a 3-D parameter of its own (``[experts, out, in]``),
    which no linear module reads."""
    params = dict(module.named_parameters(recurse=False))
    return any(p.dim() == 3 for p in params.values())


def check_fused_experts(module: nn.Module, path: str) -> tuple[int, int, int]:
    """``(n_experts, width, hidden)`` of a fused experts module in the layout neurospec supports, else an error."""
    down = getattr(module, "down_proj", None)
    gate_up = getattr(module, "gate_up_proj", None)
    if not isinstance(down, nn.Parameter) or not isinstance(gate_up, nn.Parameter) or down.dim() != 3 \
            or gate_up.dim() != 3:
        raise ArchitectureError(
            f"{path} ({type(module).__name__}) is not a fused experts module with 3-D parameters `gate_up_proj` "
            "[experts, 2*width, hidden] and `down_proj` [experts, hidden, width]"
        )
    unsupported = [
        flag for flag, bad in (("has_bias", True), ("is_transposed", True), ("is_concatenated", False),
                               ("has_gate", False), ("has_post_expert_norm", True))
        if getattr(module, flag, not bad) == bad
    ]
    n, hidden, width = down.shape
    if unsupported or gate_up.shape != (n, 2 * width, hidden) or not callable(getattr(module, "act_fn", None)):
        raise ArchitectureError(
            f"{path} ({type(module).__name__}) stores its experts in a layout neurospec does not read "
            f"(flags {unsupported}, gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}); supported: "
            "gate_up_proj [E, 2*width, hidden] (gate rows first), down_proj [E, hidden, width], no biases, act_fn"
        )
    return int(n), int(width), int(hidden)


def expert_down_weight(model: nn.Module, site: Site) -> torch.Tensor:
    """The ``[out, width]`` slice of the fused down projection that reads a routed expert's site (a view)."""
    if site.expert is None or site.param is None:
        raise ArchitectureError(f"site {site.name} is not a routed expert")
    owner, _, name = site.param.rpartition(".")
    return getattr(get_module(model, owner), name)[site.expert]


# ------------------------------------------------------------------------------------------------ hooks


class _Hooks:
    """The callbacks installed on one experts module and how to restore its instance ``forward``."""

    def __init__(self, module: nn.Module):
        self.had_forward = "forward" in module.__dict__
        self.saved = module.__dict__.get("forward")
        self.original = module.forward  # bound: the instance forward if any, else the class's (dispatching) one
        self.observers: dict[int, list[Observer]] = {}
        self.editors: dict[int, list[Editor]] = {}
        self.routing: list[RoutingObserver] = []

    def empty(self) -> bool:
        return not (any(self.observers.values()) or any(self.editors.values()) or self.routing)


_INSTALLED: weakref.WeakKeyDictionary[nn.Module, _Hooks] = weakref.WeakKeyDictionary()


class ExpertHookHandle:
    """Removes one callback; the experts module gets its forward back when its last callback is removed."""

    def __init__(self, module: nn.Module, bucket: list, fn: Any):
        self._module, self._bucket, self._fn = weakref.ref(module), bucket, fn

    def remove(self) -> None:
        module = self._module()
        if module is None or self._fn is None:
            return
        for i, f in enumerate(self._bucket):
            if f is self._fn:
                del self._bucket[i]
                break
        self._fn = None
        hooks = _INSTALLED.get(module)
        if hooks is not None and hooks.empty():
            del _INSTALLED[module]
            if hooks.had_forward:
                module.__dict__["forward"] = hooks.saved
            else:
                module.__dict__.pop("forward", None)


def _install(module: nn.Module) -> _Hooks:
    hooks = _INSTALLED.get(module)
    if hooks is None:
        check_fused_experts(module, type(module).__name__)
        hooks = _Hooks(module)
        _INSTALLED[module] = hooks

        def forward(hidden_states, top_k_index, top_k_weights):
            return _hooked_forward(module, hooks, hidden_states, top_k_index, top_k_weights)

        module.__dict__["forward"] = forward
    return hooks


def add_expert_hook(module: nn.Module, expert: int, fn: Observer | Editor, *, edit: bool = False) -> ExpertHookHandle:
    """Call ``fn`` on expert ``expert``'s activations ``[tokens routed to it, width]`` at every forward (also with 0
    rows when no token was routed to it, so that every batch reaches it). ``edit=True``: ``fn`` returns the
    activations that the down projection reads instead (editors run before observers)."""
    n = check_fused_experts(module, type(module).__name__)[0]
    if not 0 <= expert < n:
        raise ArchitectureError(f"{type(module).__name__} has {n} experts, no expert {expert}")
    hooks = _install(module)
    bucket = (hooks.editors if edit else hooks.observers).setdefault(expert, [])
    bucket.append(fn)
    return ExpertHookHandle(module, bucket, fn)


def add_routing_hook(module: nn.Module, fn: RoutingObserver) -> ExpertHookHandle:
    """Call ``fn(top_k_index, top_k_weights)`` (``[tokens, k]`` each: the experts chosen for each token and their
    weights) at every forward of the experts module."""
    hooks = _install(module)
    hooks.routing.append(fn)
    return ExpertHookHandle(module, hooks.routing, fn)


def _is_eager(module: nn.Module) -> bool:
    cfg = getattr(module, "config", None)
    return getattr(cfg, "_experts_implementation", None) in (None, "eager")


def _hooked_forward(module, hooks: _Hooks, hidden_states, top_k_index, top_k_weights):
    for fn in list(hooks.routing):
        fn(top_k_index, top_k_weights)
    editing = any(hooks.editors.values())
    if not editing and not _is_eager(module):
        out = hooks.original(hidden_states, top_k_index, top_k_weights)
        _expert_loop(module, hooks, hidden_states, top_k_index, top_k_weights, output=False)
        return out
    return _expert_loop(module, hooks, hidden_states, top_k_index, top_k_weights, output=True)


def _expert_loop(module, hooks: _Hooks, hidden_states, top_k_index, top_k_weights, *, output: bool):
    """transformers' eager expert loop (same operations, same order), calling the hooks on each expert's
    intermediate activation. ``output=False`` computes only the hooked experts' activations."""
    n = module.down_proj.shape[0]
    final = torch.zeros_like(hidden_states) if output else None
    with torch.no_grad():
        # index n is the "no expert" slot that expert parallelism uses for tokens routed elsewhere
        expert_mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).tolist()
    for e in range(n):
        editors, observers = hooks.editors.get(e) or (), hooks.observers.get(e) or ()
        if not (editors or observers or (output and hit[e])):
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        current_state = hidden_states[token_idx]
        gate, up = F.linear(current_state, module.gate_up_proj[e]).chunk(2, dim=-1)
        current = module.act_fn(gate) * up
        for fn in list(editors):
            current = fn(current)
        for fn in list(observers):
            fn(current)
        if output and hit[e]:
            current = F.linear(current, module.down_proj[e])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
    return final


# ------------------------------------------------------------------------------------------------ per site


def experts_module(model: nn.Module, site: Site) -> nn.Module:
    """The fused experts module that holds a routed expert's site."""
    if site.expert is None:
        raise ArchitectureError(f"site {site.name} is not a routed expert")
    return get_module(model, site.module)


def observe_site(model: nn.Module, site: Site, fn: Observer, routing: RoutingObserver | None = None) -> list:
    """Call ``fn(x)`` with the site's input activations at every forward and return the hook handles (each has
    ``remove()``): a forward pre-hook on the reading linear module, or an expert hook for a routed expert (whose
    ``x`` holds the tokens routed to that expert only). ``routing`` (routed experts only) is called with the layer's
    ``(top_k_index, top_k_weights)``."""
    if site.expert is None:
        return [get_module(model, site.module).register_forward_pre_hook(lambda _m, args: fn(args[0]))]
    module = experts_module(model, site)
    handles = [add_expert_hook(module, site.expert, fn)]
    if routing is not None:
        handles.append(add_routing_hook(module, routing))
    return handles
