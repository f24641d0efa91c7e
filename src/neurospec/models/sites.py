"""Neuron sites: the input vector of one linear module per layer and kind.

A *site* is named like ``layers.3.mlp`` or ``layers.3.attn``; a *neuron* is one coordinate of a site and has the id
``layers.3.mlp:1234``. Names are the same in the API, the CLI, run files and plots. In a mixture-of-experts layer
each routed expert is its own MLP site, ``layers.3.mlp.5`` (expert 5), and a shared expert is ``layers.3.mlp.shared``.

Glossary of dimensions used in docstrings: ``batch`` sequences, ``seq`` positions, ``tokens`` = batch*seq flattened,
``width`` neurons of one site, ``heads`` x ``d_head`` = width for attention sites.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from neurospec.errors import ArchitectureError, NeuronSetError

SITE_KINDS = ("mlp", "attn")
_SITE_RE = re.compile(r"^layers\.(\d+)\.(?:(attn)|(mlp)(?:\.(\d+|shared))?)$")
SHARED = "shared"


@dataclass(frozen=True)
class Site:
    """One neuron site.

    ``module`` is the dotted path (from the model root) of the linear module whose *input* is this site's vector.
    For attention sites, ``n_heads * d_head == width`` and head ``h`` is neurons ``[h*d_head, (h+1)*d_head)``.
    For MLP sites, ``inputs`` are the dotted paths of the MLP input projections (gate and up for gated MLPs).

    Mixture-of-experts: a routed expert's site has ``expert`` = its index; its experts are fused, so ``module`` is
    the experts module (which takes no linear input of its own) and ``param`` the dotted path of the fused down
    projection ``[n_experts, out, width]`` whose slice ``[expert]`` reads this site. A shared expert is a plain MLP
    site with ``shared_expert=True``.
    """

    name: str
    kind: str
    layer: int
    width: int
    module: str
    n_heads: int | None = None
    d_head: int | None = None
    inputs: tuple[str, ...] = ()
    expert: int | None = None
    shared_expert: bool = False
    param: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if (self.expert is not None or self.shared_expert) and self.kind != "mlp":
            raise ValueError(f"only MLP sites can be experts, not {self.kind!r} sites")
        if self.expert is not None and self.shared_expert:
            raise ValueError("a site is a routed expert or the shared expert, not both")
        if (self.param is None) != (self.expert is None):
            raise ValueError("a routed expert's site needs `param` (its fused down projection), and only it")
        part = SHARED if self.shared_expert else self.expert
        if self.name != site_name(self.layer, self.kind, part):
            raise ValueError(f"site name {self.name!r} does not match layer {self.layer}, kind {self.kind}, {part}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "width": self.width,
            "module": self.module,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "inputs": list(self.inputs),
            # expert fields only where set, so the sites of dense models serialise as before
            **({"expert": self.expert, "param": self.param} if self.expert is not None else {}),
            **({"shared_expert": True} if self.shared_expert else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Site:
        return cls(
            name=d["name"],
            kind=d["kind"],
            layer=int(d["layer"]),
            width=int(d["width"]),
            module=d["module"],
            n_heads=d.get("n_heads"),
            d_head=d.get("d_head"),
            inputs=tuple(d.get("inputs", ())),
            expert=None if d.get("expert") is None else int(d["expert"]),
            shared_expert=bool(d.get("shared_expert", False)),
            param=d.get("param"),
        )


def site_name(layer: int, kind: str, expert: int | str | None = None) -> str:
    """``site_name(3, "mlp")`` -> ``"layers.3.mlp"``; ``site_name(3, "mlp", 5)`` -> ``"layers.3.mlp.5"`` (expert 5
    of a mixture-of-experts layer); ``site_name(3, "mlp", "shared")`` -> ``"layers.3.mlp.shared"``."""
    return f"layers.{layer}.{kind}" if expert is None else f"layers.{layer}.{kind}.{expert}"


def _match(name: str) -> re.Match:
    m = _SITE_RE.match(name)
    if m is None:
        raise NeuronSetError(
            f"not a site name: {name!r} (expected like 'layers.3.mlp', 'layers.3.attn', or 'layers.3.mlp.5' and "
            "'layers.3.mlp.shared' for the experts of a mixture-of-experts layer)"
        )
    return m


def parse_site_name(name: str) -> tuple[int, str]:
    """``"layers.3.mlp"`` -> ``(3, "mlp")``; an expert's site ``"layers.3.mlp.5"`` -> ``(3, "mlp")`` too."""
    m = _match(name)
    return int(m.group(1)), m.group(2) or m.group(3)


def parse_site_expert(name: str) -> int | str | None:
    """The expert part of a site name: ``"layers.3.mlp.5"`` -> ``5``, ``"layers.3.mlp.shared"`` -> ``"shared"``,
    ``"layers.3.mlp"`` -> ``None``."""
    part = _match(name).group(4)
    return None if part is None else part if part == SHARED else int(part)


def site_order_key(name: str) -> tuple[int, int, int]:
    """Sort key that puts sites in model order: by layer; in a layer the MLP (routed experts by index, then the
    shared expert), then attention."""
    layer, kind = parse_site_name(name)
    part = parse_site_expert(name)
    sub = -1 if part is None else (1 << 30) if part == SHARED else int(part)
    return layer, SITE_KINDS.index(kind), sub


@dataclass(frozen=True, order=True)
class NeuronId:
    """One neuron: ``(site, index)``; ``str(NeuronId("layers.3.mlp", 7)) == "layers.3.mlp:7"``."""

    site: str
    index: int

    def __str__(self) -> str:
        return f"{self.site}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> NeuronId:
        site, sep, idx = text.strip().rpartition(":")
        if not sep or not idx.isdigit():
            raise NeuronSetError(f"not a neuron id: {text!r} (expected like 'layers.3.mlp:1234')")
        parse_site_name(site)
        return cls(site, int(idx))


@dataclass(frozen=True)
class Sites:
    """All sites of a model, in layer order (for each layer: mlp, then attn; a mixture-of-experts layer lists its
    routed experts in index order, then its shared expert, then attn)."""

    family: str
    sites: tuple[Site, ...]
    hidden_size: int
    by_name: dict[str, Site] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {s.name: s for s in self.sites})

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name: str) -> Site:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(s.name for s in self.sites[:4])
            raise NeuronSetError(
                f"the model has no site {name!r}; it has {len(self.sites)} sites like {known}, ... "
                "(list them with `neurospec sites MODEL`)"
            ) from None

    @property
    def n_layers(self) -> int:
        return 1 + max(s.layer for s in self.sites)

    def of_kind(self, kind: str) -> tuple[Site, ...]:
        if kind not in SITE_KINDS:
            raise NeuronSetError(f"site kind must be one of {SITE_KINDS}, got {kind!r}")
        return tuple(s for s in self.sites if s.kind == kind)

    def select(self, names: Sequence[str] | None = None, kinds: Sequence[str] | None = None) -> tuple[Site, ...]:
        """Sites by name and/or kind (``None`` means all)."""
        out = self.sites if names is None else tuple(self[n] for n in names)
        if kinds is not None:
            for k in kinds:
                if k not in SITE_KINDS:
                    raise NeuronSetError(f"site kind must be one of {SITE_KINDS}, got {k!r}")
            out = tuple(s for s in out if s.kind in kinds)
        return out

    def check_neuron(self, nid: NeuronId) -> None:
        site = self[nid.site]
        if not 0 <= nid.index < site.width:
            raise NeuronSetError(f"neuron {nid} does not exist: site {site.name} has width {site.width}")

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.sites]


_RESOLVER: list[Callable[[nn.Module], Sites]] = []


def set_site_resolver(resolve: Callable[[nn.Module], Sites]) -> None:
    """Install the function that finds a model's sites: :mod:`neurospec.models.architectures` installs its family
    registry when it is imported (``neurospec.models`` imports it), so this module needs no import of it."""
    _RESOLVER[:] = [resolve]


def find_sites(model: nn.Module) -> Sites:
    """Describe every neuron site of ``model`` (see :mod:`neurospec.models.architectures`)."""
    if not _RESOLVER:
        raise ArchitectureError("no site resolver installed: import neurospec.models (it installs the family registry)")
    return _RESOLVER[0](model)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path, with an error that names the path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ArchitectureError(f"the model has no module {path!r}") from None
