"""What the cluster analyses run on: a loaded transformer, or a model of the zoo (digits MLP or ViT).

A :class:`Target` gives every analysis the same handles whatever the model: ``model`` (the ``nn.Module``), ``sites``
(named neuron sites), ``fingerprint``, ``kind`` (``"causal-lm"``, ``"masked-lm"``, ``"image"`` for the zoo models,
whose tasks are the image classes, or ``"none"``) and ``spec`` (what reloads it). A plain MLP stack has no transformers
config, so its sites are built here: hidden layer ``h`` is ``layers.h.mlp``, the input of linear layer ``h + 1`` (the
ReLU output of linear layer ``h``), with linear layer ``h`` as its input projection. Ablation, recording hooks and
MoEfication then work on it as on a transformer.

Image activations (:func:`image_activations`) are per token: for the ViT every position (CLS and 16 patches) of every
image counts once, for the MLP every image.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurospec.errors import ArchitectureError, NeurospecError
from neurospec.models.sites import Site, Sites, site_name

KINDS = ("causal-lm", "masked-lm", "image", "none")


@dataclass
class Target:
    """A model to cluster and analyse (see the module docstring). ``loaded``/``zoo``: what it was built from."""

    model: nn.Module
    sites: Sites
    name: str
    spec: str
    kind: str
    fingerprint: str
    loaded: Any = None
    zoo: Any = None

    @property
    def is_plain(self) -> bool:
        """A plain MLP stack (no transformers config): weight graphs join its linear layers directly."""
        return getattr(self.model, "config", None) is None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.loaded, "tokenizer", None)

    @property
    def head(self) -> str:
        return self.kind

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
        if self.loaded is not None and self.zoo is None:
            d = dict(self.loaded.describe())
        else:
            cfg = getattr(self.model, "config", None)
            d = {
                "name": self.name,
                "source": self.spec,
                "model_type": getattr(cfg, "model_type", None) if cfg is not None else "plain-mlp",
                "family": self.sites.family,
                "head": "image-classification",
                "fingerprint": self.fingerprint,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "n_layers": self.sites.n_layers,
                "hidden_size": self.sites.hidden_size,
                "preprocessing": [],
            }
        if self.zoo is not None:
            d["zoo"] = {"kind": self.zoo.kind, "seed": self.zoo.seed, "test_accuracy": self.zoo.test_accuracy,
                        "train_accuracy": self.zoo.train_accuracy}
        d["analysis_kind"] = self.kind
        return d


def plain_mlp_sites(model: nn.Module) -> Sites:
    """Sites of a plain stack of linear layers: hidden layer ``h`` = the input of linear layer ``h + 1``."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ArchitectureError(
            f"{type(model).__name__} has {len(linears)} linear layer(s); a plain MLP needs at least one hidden layer"
        )
    sites = []
    for h, ((name_in, lin), (name_out, nxt)) in enumerate(zip(linears, linears[1:], strict=False)):
        if lin.out_features != nxt.in_features:
            raise ArchitectureError(f"linear layers {name_in} and {name_out} do not chain: not a plain MLP stack")
        sites.append(Site(site_name(h, "mlp"), "mlp", h, lin.out_features, name_out, inputs=(name_in,)))
    return Sites("plain-mlp", tuple(sites), int(linears[0][1].in_features))


def from_zoo(zoo_model: Any, spec: str = "zoo") -> Target:
    """A :class:`Target` of a :class:`~neurospec.experiments.zoo.ZooModel` (trained or loaded)."""
    from neurospec.models.loading import model_fingerprint
    from neurospec.models.sites import find_sites

    model = zoo_model.model.eval()
    sites = plain_mlp_sites(model) if getattr(model, "config", None) is None else find_sites(model)
    return Target(model, sites, f"{zoo_model.kind} (seed {zoo_model.seed})", spec, "image",
                  model_fingerprint(model), zoo=zoo_model)


def from_loaded(loaded: Any, spec: str | None = None) -> Target:
    """A :class:`Target` of a :class:`~neurospec.models.loading.LoadedModel`."""
    kind = loaded.head if loaded.head in ("causal-lm", "masked-lm") else "none"
    return Target(loaded.model, loaded.sites, loaded.name, spec or loaded.name, kind, loaded.fingerprint,
                  loaded=loaded)


def load_target(spec: str, *, device: str | None = None, dtype: str | None = None,
                allow_pickle: bool = False) -> Target:
    """Load a zoo directory (it has ``zoo.json``) or anything :func:`~neurospec.models.loading.load_model` reads.

    A local directory is recorded by its absolute path, so a cluster directory can reload its model from anywhere.
    ``allow_pickle``: see :func:`~neurospec.models.loading.load_model`.
    """
    from neurospec.experiments import zoo
    from neurospec.models.loading import _quiet_transformers, load_model

    _quiet_transformers()
    path = Path(spec).expanduser()
    if path.is_dir():
        spec = str(path.resolve())
    if path.is_dir() and (path / zoo.ZOO_FILE).is_file():
        try:
            z = zoo.load(path)
        except (ValueError, FileNotFoundError) as e:
            raise NeurospecError(str(e)) from None
        if device not in (None, "cpu"):
            z.model.to(device)
        return from_zoo(z, spec)
    return from_loaded(load_model(spec, device=device, dtype=dtype, allow_pickle=allow_pickle), spec)


@contextmanager
def limited_threads(threads: int | None = 1) -> Iterator[None]:
    """Run the block with ``threads`` torch, BLAS and OpenMP threads (restored afterwards); ``None`` changes nothing.

    The analyses here are many small products. On a busy 2-core machine, two threads that wait for each other made
    them 7x (a smollm2 forward pass) to 80x (a dense 655-node eigendecomposition) slower than one thread, and
    scikit-learn's k-means (OpenMP) 15x slower.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise NeurospecError(f"threads must be >= 1 or None, got {threads}")
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):  # BLAS and OpenMP (scikit-learn k-means)
            yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ image activations


@torch.no_grad()
def image_activations(target: Target, images: torch.Tensor, sites: Any = None, *,
                      batch_size: int = 512) -> dict[str, torch.Tensor]:
    """``{site: float32 [tokens, width]}`` activations of images ``[n, 1, 8, 8]`` at the MLP sites (default all)."""
    from neurospec.experiments.zoo import logits

    chosen = target.mlp_sites() if sites is None else tuple(target.sites[s] if isinstance(s, str) else s
                                                            for s in sites)
    parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in chosen}
    handles = []

    def make_hook(site: Site):
        def hook(_m, args):
            parts[site.name].append(args[0].detach().reshape(-1, site.width).float().cpu())

        return hook

    for s in chosen:
        handles.append(target.model.get_submodule(s.module).register_forward_pre_hook(make_hook(s)))
    device = next(target.model.parameters()).device
    try:
        for i in range(0, images.shape[0], batch_size):
            logits(target.model, images[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v) for s, v in parts.items()}


def accumulate(acts: Mapping[str, torch.Tensor], accumulator: type) -> dict[str, dict[str, torch.Tensor]]:
    """``accumulator(width)`` fed with each site's ``[tokens, width]`` activations, computed: ``{site: result}``."""
    out = {}
    for s, x in acts.items():
        acc = accumulator(x.shape[1])
        acc.update(x)
        out[s] = acc.compute()
    return out


def activation_stats(acts: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-neuron statistics (as a run stores them) of ``{site: [tokens, width]}`` activations."""
    from neurospec.record.accumulators import NeuronStats

    return accumulate(acts, NeuronStats)


def dead_mask(acts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{site: bool [width]}``: True for neurons that are constant on these activations (dead)."""
    return {s: (x.double().std(dim=0) == 0) for s, x in acts.items()}
