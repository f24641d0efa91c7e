"""Sparsify a whole model: every linear module inside the transformer blocks (or chosen ones), block by block.

Linear modules are named ``layers.L.<path inside block L>`` (``layers.3.mlp.down_proj``, GPT-2:
``layers.3.attn.c_attn``), whatever the family calls its block list; embeddings and the LM head are never pruned.

Layer-sequential calibration (as SparseGPT and Wanda do it): the calibration blocks are embedded once; then for
each transformer block in order, (1) the block runs over all calibration tokens with pre-hooks on its chosen linear
modules that stream their inputs into statistics (one accumulator per distinct input tensor: q/k/v share one),
(2) each chosen module is pruned with its statistics, (3) the pruned block runs again and its outputs are the next
block's inputs, so every block is calibrated on what the already-pruned blocks before it produce. Blocks with
nothing chosen run once; blocks after the last chosen one do not run. Magnitude needs no calibration and runs no
forward pass. The keyword arguments each block receives (attention mask, rotary embeddings, ...) are captured from
one forward pass of the first calibration sequence and broadcast to each batch.

Memory: the statistics are flat in tokens; the hidden states at the current block boundary are held for all
calibration tokens (``tokens x hidden`` floats, 75 MB for 128 x 256 tokens of SmolLM2).

Later analyses can pass ``rows`` (prune only some neurons of a layer) and can prune a copy of a layer on one
cluster's tokens by feeding that cluster's inputs to an :class:`~neurospec.sparsity.stats.InputHessian` and calling
:func:`~neurospec.sparsity.layer.prune_weight` with it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neurospec.models.linear import is_linear, linear_dims, weight_out_in
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import find_sites
from neurospec.sparsity.layer import as_rows, prune_weight
from neurospec.sparsity.patterns import SparsityError, SparsityPattern, make_pattern
from neurospec.sparsity.registry import PruningMethod, get_method
from neurospec.sparsity.stats import InputHessian, InputNorms

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LinearRef:
    """A linear module inside block ``block``: ``name`` is ``layers.L.<rel>``, ``path`` its dotted model path."""

    name: str
    block: int
    path: str
    module: nn.Module = field(repr=False, compare=False)

    @property
    def in_features(self) -> int:
        return linear_dims(self.module)[0]


def block_paths(model: nn.Module) -> list[str]:
    """Dotted paths of the transformer blocks, in order (found through the model's neuron sites)."""
    sites = find_sites(model)
    paths: dict[int, str] = {}
    for site in sites:
        parts = site.module.split(".")
        for k in range(len(parts) - 1, 0, -1):
            if parts[k] == str(site.layer) and isinstance(model.get_submodule(".".join(parts[:k])), nn.ModuleList):
                paths.setdefault(site.layer, ".".join(parts[: k + 1]))
                break
    return [paths[i] for i in sorted(paths)]


def list_linears(model: nn.Module) -> dict[str, LinearRef]:
    """Every linear module (``nn.Linear`` or GPT-2's ``Conv1D``) inside the blocks, by name, in block order."""
    out: dict[str, LinearRef] = {}
    for i, path in enumerate(block_paths(model)):
        for rel, mod in model.get_submodule(path).named_modules():
            if rel and is_linear(mod):
                out[f"layers.{i}.{rel}"] = LinearRef(f"layers.{i}.{rel}", i, f"{path}.{rel}", mod)
    return out


def select_linears(model: nn.Module, layers: Sequence[int | str] | None = None) -> dict[str, LinearRef]:
    """The linear modules chosen by ``layers``: block indices (``3`` or ``"3"``), blocks (``"layers.3"``) or module
    names (``"layers.3.mlp.down_proj"``); ``None``: all of them."""
    every = list_linears(model)
    if layers is None:
        return every
    n_blocks = len(block_paths(model))
    chosen: set[str] = set()
    for item in layers:
        text = str(item).strip()
        if text.isdigit() or (text.startswith("layers.") and text[7:].isdigit()):
            b = int(text.removeprefix("layers."))
            if b >= n_blocks:
                raise SparsityError(f"block {b} does not exist: the model has {n_blocks} blocks (0-{n_blocks - 1})")
            chosen |= {n for n, ref in every.items() if ref.block == b}
        elif text in every:
            chosen.add(text)
        else:
            raise SparsityError(_unknown_layer_message(model, text, every))
    return {n: ref for n, ref in every.items() if n in chosen}


def _unknown_layer_message(model: nn.Module, text: str, every: Mapping[str, LinearRef]) -> str:
    parts = text.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        paths = block_paths(model)
        b = int(parts[1])
        if b < len(paths):
            try:
                mod = model.get_submodule(f"{paths[b]}.{'.'.join(parts[2:])}")
            except AttributeError:
                mod = None
            if mod is not None:
                names = [n for n, r in every.items() if r.block == b and n.startswith(text + ".")]
                hint = f" such as {', '.join(names[:3])}" if names else ""
                return f"{text} is a {type(mod).__name__}, not a linear module: name a linear module{hint}"
    examples = ", ".join(list(every)[:4])
    return (f"the model has no linear module {text!r}; give block indices (0, 1, ...) or module names like "
            f"{examples}, ...")


# ------------------------------------------------------------------------------------------- block-by-block runs


class _Stop(Exception):
    pass


def _expand(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_expand(v, batch) for v in value)
    if isinstance(value, list):
        return [_expand(v, batch) for v in value]
    return value


class BlockRunner:
    """Runs the model block by block over calibration batches (module docstring).

    ``hidden``: one tensor per batch, the inputs of the next block to run.
    """

    def __init__(self, model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8, upto: int | None = None):
        self.model = model
        self.blocks = [model.get_submodule(p) for p in block_paths(model)]
        self.upto = len(self.blocks) - 1 if upto is None else upto
        self.key = "pixel_values" if calibration.is_floating_point() else "input_ids"
        import inspect

        params = inspect.signature(model.forward).parameters
        self.call_kw = {"use_cache": False} if "use_cache" in params else {}
        device = next(model.parameters()).device
        self.kwargs = self._capture_kwargs(calibration[:1].to(device))
        self.hidden = [self._embed(calibration[i : i + batch_size].to(device))
                       for i in range(0, calibration.shape[0], batch_size)]

    def _capture_kwargs(self, first: torch.Tensor) -> dict[int, tuple[tuple, dict, bool]]:
        captured: dict[int, tuple[tuple, dict, bool]] = {}

        def grab(i: int):
            def hook(mod, args, kwargs):
                kw = dict(kwargs)
                as_kw = not args
                if as_kw:
                    kw.pop("hidden_states")
                captured[i] = (tuple(args[1:]), kw, as_kw)
                if i == self.upto:
                    raise _Stop
            return hook

        handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(self.blocks[: self.upto + 1])]
        try:
            self.model(**{self.key: first}, **self.call_kw)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [i for i in range(self.upto + 1) if i not in captured]
        if missing:
            raise SparsityError(f"blocks {missing} were not called by the model's forward pass; cannot calibrate them")
        return captured

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor] = []

        def hook(mod, args, kwargs):
            out.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**{self.key: batch}, **self.call_kw)
        except _Stop:
            pass
        finally:
            handle.remove()
        return out[0]

    def run(self, i: int, *, keep: bool = True, before_batch: Callable[[], None] | None = None) -> None:
        """Run block ``i`` over every batch; with ``keep`` its outputs become ``hidden``."""
        args, kw, as_kw = self.kwargs[i]
        outs = []
        for h in self.hidden:
            if before_batch is not None:
                before_batch()
            b = h.shape[0]
            a, k = _expand(args, b), _expand(kw, b)
            out = self.blocks[i](*a, hidden_states=h, **k) if as_kw else self.blocks[i](h, *a, **k)
            if keep:
                outs.append(out[0] if isinstance(out, tuple) else out)
        if keep:
            self.hidden = outs


# ------------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class LayerReport:
    """What happened to one linear module: ``sparsity`` over the pruned rows, ``matrix_sparsity`` over all rows."""

    name: str
    shape: tuple[int, int]
    rows: int
    sparsity: float
    matrix_sparsity: float
    tokens: int

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rows": self.rows, "sparsity": self.sparsity,
                "matrix_sparsity": self.matrix_sparsity, "tokens": self.tokens}


@dataclass
class SparsifyResult:
    """``model``: the sparsified model (a copy unless ``inplace``); ``layers``: a report per pruned module;
    ``timings``: seconds in the calibration forward passes (``forward_s``), in streaming statistics (``stats_s``)
    and in pruning (``prune_s``)."""

    model: nn.Module
    method: str
    pattern: SparsityPattern
    layers: dict[str, LayerReport]
    calibration_tokens: int
    seconds: float
    timings: dict[str, float]

    def to_dict(self) -> dict:
        return {"method": self.method, "sparsity": float(self.pattern.sparsity), "pattern": self.pattern.label,
                "layers": {n: r.sparsity for n, r in self.layers.items()},
                "layer_details": {n: r.to_dict() for n, r in self.layers.items()},
                "calibration_tokens": self.calibration_tokens, "seconds": self.seconds, "timings": dict(self.timings)}


# ------------------------------------------------------------------------------------------------------- driver


def _stats_class(method: PruningMethod):
    return {"norms": InputNorms, "hessian": InputHessian}[method.stats]


def _calibration_tokens(calibration: torch.Tensor | None) -> int:
    """Token ids: every position; pixel inputs: the number of images."""
    if calibration is None:
        return 0
    if calibration.is_floating_point():
        return int(calibration.shape[0])
    return int(calibration.numel())


@torch.no_grad()
def sparsify(
    model: nn.Module | LoadedModel,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: str | SparsityPattern | None = None,
    calibration: torch.Tensor | None = None,
    layers: Sequence[int | str] | None = None,
    rows: Mapping[str, Sequence[int] | torch.Tensor] | None = None,
    batch_size: int = 8,
    inplace: bool = False,
    progress: ProgressFn | None = None,
    **options,
) -> SparsifyResult:
    """Prune the linear modules of ``model``'s blocks with ``method`` (``magnitude``, ``wanda``, ``sparsegpt``).

    The caller's model is not changed: a ``copy.deepcopy`` is pruned and returned as ``result.model``; with
    ``inplace=True`` the given model's weights are overwritten instead (and ``result.model`` is that model).

    ``sparsity`` / ``pattern``: see :func:`~neurospec.sparsity.patterns.make_pattern` (default 50% unstructured).
    ``calibration``: ``LongTensor[blocks, seq]`` token ids (e.g. a task's collection split); needed by every method
    but magnitude. ``layers``: block indices or module names (:func:`select_linears`); ``None`` = all blocks.
    ``rows``: ``{module name: output rows}`` to prune only those neurons of that module. ``options`` go to the
    method (SparseGPT: ``blocksize``, ``damp``, ``dtype``).
    """
    t_start = time.perf_counter()
    m = get_method(method)
    pat = pattern if isinstance(pattern, SparsityPattern) else make_pattern(sparsity, pattern)
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise SparsityError(f"method {m.name!r} takes no option {unknown}; its options are {list(m.options) or 'none'}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SparsityError(f"batch_size must be a positive integer, got {batch_size!r}")
    net = model.model if isinstance(model, LoadedModel) else model
    chosen = select_linears(net, layers)
    if not chosen:
        raise SparsityError("no linear module was chosen: check the layers given")
    rows = dict(rows or {})
    for name, r in rows.items():
        if name not in chosen:
            raise SparsityError(f"rows were given for {name!r}, which is not among the modules being pruned")
        as_rows(r, linear_dims(chosen[name].module)[1], name)
    for ref in chosen.values():
        pat.check_width(ref.in_features, ref.name)
    n_tokens = _calibration_tokens(calibration)
    if m.stats != "none":
        if calibration is None:
            raise SparsityError(f"method {m.name!r} needs calibration token blocks (LongTensor[blocks, seq])")
        if not calibration.is_floating_point() and (calibration.dim() != 2 or calibration.dtype != torch.long):
            raise SparsityError(f"calibration must be a LongTensor[blocks, seq], got {calibration.dtype} "
                                f"{tuple(calibration.shape)}")
        need = max(m.min_tokens(ref.in_features) for ref in chosen.values())
        if n_tokens < need and not calibration.is_floating_point():  # images: checked per module after calibrating
            widest = max(chosen.values(), key=lambda r: r.in_features)
            raise SparsityError(
                f"{m.name} needs at least {need} calibration tokens, got {n_tokens}: the Hessian of {widest.name} "
                f"({widest.in_features} inputs) has rank at most the number of tokens, so fewer tokens leave it "
                f"ill-conditioned. Pass at least {need} tokens (the published recipe uses 128 sequences)"
            )

    if not inplace:
        net = copy.deepcopy(net)
        chosen = {n: LinearRef(r.name, r.block, r.path, net.get_submodule(r.path)) for n, r in chosen.items()}
    reports: dict[str, LayerReport] = {}
    timings = {"forward_s": 0.0, "stats_s": 0.0, "prune_s": 0.0}

    def prune(ref: LinearRef, stat: torch.Tensor | None, tokens: int) -> None:
        t0 = time.perf_counter()
        w = weight_out_in(ref.module)
        res = prune_weight(m, w, stat, pat, rows=rows.get(ref.name), name=ref.name, **options)
        w.copy_(res.weight)
        idx = as_rows(rows.get(ref.name), w.shape[0], ref.name)
        part = res.pruned if idx is None else res.pruned[idx]
        reports[ref.name] = LayerReport(ref.name, (int(w.shape[0]), int(w.shape[1])), int(part.shape[0]),
                                        float(part.float().mean()) if part.numel() else 0.0, res.sparsity, tokens)
        timings["prune_s"] += time.perf_counter() - t0

    by_block: dict[int, list[LinearRef]] = {}
    for ref in chosen.values():
        by_block.setdefault(ref.block, []).append(ref)
    last = max(by_block)
    if m.stats == "none":
        for i, ref in enumerate(chosen.values()):
            prune(ref, None, 0)
            if progress:
                progress("pruning", i + 1, len(chosen))
    else:
        t0 = time.perf_counter()
        runner = BlockRunner(net, calibration, batch_size=batch_size, upto=last)
        timings["forward_s"] += time.perf_counter() - t0
        for b in range(last + 1):
            refs = by_block.get(b, [])
            if refs:
                accs = _collect(runner, b, refs, _stats_class(m), timings)
                for ref in refs:
                    seen_tokens, need = accs[ref.name].count, m.min_tokens(ref.in_features)
                    if seen_tokens < need:
                        raise SparsityError(f"{m.name} needs at least {need} calibration tokens for {ref.name}, but "
                                            f"it saw {seen_tokens}: give more calibration inputs")
                    prune(ref, accs[ref.name].compute(), seen_tokens)
                del accs
            if b < last:
                t0 = time.perf_counter()
                runner.run(b)
                timings["forward_s"] += time.perf_counter() - t0
            if progress:
                progress("blocks", b + 1, last + 1)
        del runner
    return SparsifyResult(net, m.name, pat, {n: reports[n] for n in chosen}, n_tokens,
                          time.perf_counter() - t_start, timings)


def _collect(runner: BlockRunner, b: int, refs: Sequence[LinearRef], cls, timings: dict[str, float]) -> dict:
    """Run block ``b`` with pre-hooks streaming each chosen module's inputs into ``cls`` accumulators; modules fed
    the same tensor (q, k, v) share one accumulator."""
    accs: dict[str, Any] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def hook_for(name: str):
        def hook(mod, args):
            t0 = time.perf_counter()
            x = args[0]
            for t, owner in seen:
                if t is x:
                    accs.setdefault(name, accs[owner])
                    break
            else:
                seen.append((x, name))
                accs.setdefault(name, cls()).update(x)
            timings["stats_s"] += time.perf_counter() - t0
        return hook

    handles = [ref.module.register_forward_pre_hook(hook_for(ref.name)) for ref in refs]
    t0 = time.perf_counter()
    stats_before = timings["stats_s"]
    try:
        runner.run(b, keep=False, before_batch=seen.clear)
        seen.clear()
    finally:
        for hd in handles:
            hd.remove()
    timings["forward_s"] += time.perf_counter() - t0 - (timings["stats_s"] - stats_before)
    missing = [ref.name for ref in refs if ref.name not in accs]
    if missing:
        raise SparsityError(f"modules {missing} were not called when block {b} ran; they cannot be calibrated")
    return accs
