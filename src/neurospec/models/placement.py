"""Where a model's modules run: devices, dtypes, and models spread over several devices.

A model loaded with ``device="auto"`` is placed by accelerate's ``device_map``: each top-level block lives on its own
device (a GPU, the CPU, or offloaded to CPU memory or disk, its weights then kept on the ``meta`` device and brought
in by an accelerate hook just before the block runs). Everything neurospec attaches to a site must then use the
device that site's module *runs* on, not the model's first parameter: the recorder's accumulators take each
activation where it is (they compute partial sums on the activation's device), the hooked ablations write constants
on the device of the activation they edit, and a folded ablation computes its offsets on the weight's device.
This module answers "where does this module run" (:func:`execution_device`, :func:`site_devices`,
:func:`input_device`), places a model by a hand-made map (:func:`dispatch`, which also serves tests on the CPU), and
holds the device and dtype rules of the command line (:func:`check_dtype_for_device`, :func:`auto_device_map`).

Decisions:

- ``float16`` is refused on the CPU (PyTorch's CPU kernels for it are slow and partly missing, and CPU users gain
  nothing from it): use ``bfloat16`` or ``float32`` there. ``bfloat16`` needs a GPU that supports it (Ampere or
  newer on CUDA). MPS takes both half dtypes.
- ``device="auto"`` needs at least one CUDA GPU. When the whole model fits on the GPU with the most free memory
  (with 25% headroom for activations), it is loaded there whole instead of being split: splitting a model that fits
  only adds transfers between GPUs, since the blocks run one after another. With several GPUs this is said by a
  warning (pass ``--device cuda:N`` to choose the GPU yourself).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from neurospec.errors import NeurospecError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_HEADROOM = 1.25  # free memory needed per byte of weights for a model to count as fitting on one GPU


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16`` (None stays None); a clear error for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NeurospecError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_dtype_for_device(dtype: str | torch.dtype | None, device: str | torch.device | None) -> None:
    """Refuse a dtype the device cannot run well (see the module docstring); ``None`` means float32 / the CPU."""
    dt = as_dtype(dtype)
    if dt is None or dt == torch.float32:
        return
    kind = "cuda" if device == "auto" else torch.device(device).type if device is not None else "cpu"
    name = str(dt).removeprefix("torch.")
    if kind == "cpu" and dt == torch.float16:
        raise NeurospecError(
            "--dtype float16 is not supported on the CPU (slow and partly missing kernels): use --dtype bfloat16 "
            "or float32 on the CPU, or --device cuda for float16"
        )
    if kind == "cuda" and dt == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise NeurospecError(
            f"--dtype {name}: this GPU ({torch.cuda.get_device_name()}) does not support bfloat16; use --dtype "
            "float16 or float32"
        )


def _free_gpu_memory() -> list[int]:
    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def auto_device_map(n_bytes: int, free: Sequence[int] | None = None) -> str | dict[str, int]:
    """The ``device_map`` for ``device="auto"``: ``{"": i}`` (the whole model on GPU ``i``) when a model of
    ``n_bytes`` fits on one GPU, else ``"auto"`` (accelerate spreads it over the GPUs, then CPU memory, then disk).

    ``free``: free bytes per GPU (default: measured). No GPU at all is an error.
    """
    free = list(_free_gpu_memory() if free is None else free)
    if not free:
        raise NeurospecError(
            "--device auto spreads a model over GPUs, and no CUDA GPU is visible: use --device cpu (or run on a "
            "machine with a GPU)"
        )
    best = max(range(len(free)), key=lambda i: free[i])
    if n_bytes * AUTO_HEADROOM <= free[best]:
        if len(free) > 1:
            warnings.warn(
                f"--device auto: the model ({n_bytes / 2**30:.2f} GiB) fits on cuda:{best}, so it is loaded there "
                f"whole instead of being split over {len(free)} GPUs (which only adds transfers); pass --device "
                f"cuda:{best} to choose the GPU yourself",
                stacklevel=3,
            )
        return {"": best}
    return "auto"


def config_model_bytes(model_class, config, dtype: torch.dtype | None) -> int:
    """Bytes of the weights of ``model_class`` built from ``config`` in ``dtype`` (the checkpoint's dtype, else
    float32, when None), counted on the meta device (no memory)."""
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # transformers' Auto classes
            skeleton = model_class.from_config(config)
        else:
            skeleton = model_class._from_config(config)
    if dtype is None:
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = as_dtype(stored) if isinstance(stored, str) and stored in DTYPES else stored
    size = torch.empty(0, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32).element_size()
    seen: set[int] = set()
    total = 0
    for p in skeleton.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * size
    return total


# ----------------------------------------------------------------------------------------------- where things run


def _as_device(d) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook on ``module`` (an AlignDevicesHook, or one inside a
    SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def _own_device(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
        if t.device.type != "meta":
            return t.device
    return None


def execution_device(model: nn.Module, path: str = "") -> torch.device:
    """The device the module ``path`` of ``model`` runs on.

    The nearest accelerate hook at the module or above it decides (an offloaded module's weights sit on ``meta``
    and are brought to the hook's execution device); without one, the device of the module's weights; a module
    with no weights anywhere falls back to the CPU.
    """
    parts = path.split(".") if path else []
    for n in range(len(parts), -1, -1):
        try:
            dev = _hook_device(model.get_submodule(".".join(parts[:n])))
        except AttributeError:
            raise NeurospecError(f"the model has no module {path!r}") from None
        if dev is not None:
            return dev
    own = _own_device(model.get_submodule(path))
    if own is not None:
        return own
    return _own_device(model) or torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device its input embedding runs on (its first weights' otherwise)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if isinstance(emb, nn.Module):
        name = next((n for n, m in model.named_modules() if m is emb), "")
        return execution_device(model, name)
    return execution_device(model, "")


def site_devices(model: nn.Module, sites) -> dict[str, torch.device]:
    """``{site name: device}``: where each site's reading module runs (its activations arrive there)."""
    return {s.name: execution_device(model, s.module) for s in sites}


def is_offloaded(model: nn.Module, path: str) -> bool:
    """Whether the module ``path``'s own weights are offloaded (kept on the meta device, loaded by a hook)."""
    mod = model.get_submodule(path)
    return any(p.device.type == "meta" for p in mod.parameters(recurse=False))


def placement(model: nn.Module) -> dict[str, str]:
    """``{module: device}`` as placed: accelerate's ``hf_device_map`` when the model was dispatched, else every
    parameter's module with its device (for a report)."""
    mapped = getattr(model, "hf_device_map", None)
    if mapped:
        return {k: str(v) for k, v in mapped.items()}
    return {name.rpartition(".")[0]: str(p.device) for name, p in model.named_parameters()}


_MAP_DEVICES = ("cpu", "disk", "meta")


def check_device_map(model: nn.Module, device_map: Mapping[str, int | str | torch.device]) -> None:
    """A hand-made device map must name modules of the model, place every parameter exactly once, and use devices
    that exist (``cpu``, ``disk``, ``cuda:N`` or a GPU index)."""
    names = {n for n, _ in model.named_modules()}
    for key, dev in device_map.items():
        if key not in names:
            raise NeurospecError(f"device map: the model has no module {key!r}")
        if isinstance(dev, str) and dev in _MAP_DEVICES:
            continue
        try:
            d = _as_device(dev)
        except (RuntimeError, ValueError, TypeError):
            raise NeurospecError(f"device map: {key!r} -> {dev!r} is not a device (use cpu, disk, cuda:N or N)") from None
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise NeurospecError(f"device map: {key!r} -> {dev!r}, but this machine has no such GPU")
        if d.type not in ("cuda", "cpu", "mps"):
            raise NeurospecError(f"device map: {key!r} -> {dev!r} is not supported (use cpu, disk, cuda:N or N)")
    for pname, _ in model.named_parameters():
        owners = [k for k in device_map if k == "" or pname == k or pname.startswith(k + ".")]
        if not owners:
            raise NeurospecError(f"device map: the parameter {pname!r} is placed by no entry")
        if len(owners) > 1:
            raise NeurospecError(f"device map: the parameter {pname!r} is placed by several entries {owners}")


def dispatch(model: nn.Module, device_map: Mapping[str, int | str | torch.device], *,
             offload_dir: str | None = None) -> nn.Module:
    """Place ``model`` (in place) by ``device_map`` with accelerate's hooks, as ``device_map="auto"`` loading does:
    ``disk`` entries are offloaded to ``offload_dir``; with GPUs in the map, ``cpu`` entries are offloaded to CPU
    memory and run on the first GPU. Returns the model."""
    from accelerate import dispatch_model

    check_device_map(model, device_map)
    if "disk" in set(map(str, device_map.values())) and offload_dir is None:
        raise NeurospecError("device map: 'disk' entries need an offload_dir")
    return dispatch_model(model, device_map=dict(device_map), offload_dir=offload_dir)


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor | None:
    """The value of the offloaded parameter or buffer ``name`` (whose tensor in the model sits on the meta device),
    read from the accelerate hook that loads it; None when no hook holds it."""
    owner, _, local = name.rpartition(".")
    try:
        hook = getattr(model.get_submodule(owner), "_hf_hook", None)
    except AttributeError:
        return None
    for h in [hook, *getattr(hook, "hooks", ())]:
        weights = getattr(h, "weights_map", None)
        if weights is not None and getattr(h, "offload", False):
            try:
                return weights[local]
            except KeyError:
                continue
    return None
