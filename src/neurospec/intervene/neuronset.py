"""``NeuronSet``: an immutable value "these neurons of these sites".

A set holds, per site name, a sorted unique ``LongTensor`` of neuron indices, and the width of every site it knows
(so that masks and validation need no model). Sites are always ordered by layer, then MLP before attention, and
neurons within a site by index: iteration, ``to_ids()``, files and tie-breaking all follow that order.

Constructors
    ``from_ids``, ``from_masks``, ``random``, ``random_nested``, ``top_k``, ``heads``, ``top_heads``, ``load``.
Counting rule
    A fraction ``frac`` of ``width`` neurons means ``floor(frac * width)`` neurons (with a 1e-9 tolerance, so that
    ``0.1 * 3`` steps of a width-10 site give exactly 3).
Random draws
    Each site gets its own generator, seeded from ``(seed, site name)``: the draw for one site does not depend on
    which other sites are drawn with it, and ``random(frac=f)`` equals the first set of ``random_nested([f, ...])``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from neurospec.errors import NeuronSetError
from neurospec.models.sites import SITE_KINDS, NeuronId, Site, Sites, parse_site_name, site_order_key
from neurospec.record.store import atomic_write_bytes

SCOPES = ("global", "per_site")
HEAD_REDUCTIONS = ("mean", "median")
_FORMAT = "neurospec.neuronset"
_VERSION = 1
_EPS = 1e-9


def _site_key(name: str) -> tuple[int, int, int]:
    return site_order_key(name)


def _count(frac: float, width: int) -> int:
    if not 0.0 <= frac <= 1.0:
        raise NeuronSetError(f"a fraction of neurons must lie in [0, 1], got {frac}")
    return min(width, math.floor(frac * width + _EPS))


def _site_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"neurospec:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _site_list(sites: Sites | Iterable[Site]) -> list[Site]:
    out = sorted(sites, key=lambda s: _site_key(s.name))
    if not out:
        raise NeuronSetError("no sites given: pass a Sites object or a non-empty list of Site")
    return out


def _one_of(frac: float | None, n: int | None, what: str = "n") -> None:
    if (frac is None) == (n is None):
        raise NeuronSetError(f"give exactly one of frac= and {what}=")
    if n is not None and n < 0:
        raise NeuronSetError(f"{what} must be >= 0, got {n}")


class NeuronSet:
    """An immutable set of neurons over named sites; see the module docstring."""

    __slots__ = ("_idx", "_widths")

    _idx: dict[str, torch.Tensor]
    _widths: dict[str, int]

    def __init__(self, indices: Mapping[str, torch.Tensor | Sequence[int]], widths: Mapping[str, int]):
        """``indices``: site name -> neuron indices (any order, duplicates allowed); ``widths``: site name -> width
        for every site of ``indices`` and optionally more (sites the set knows but holds no neuron of)."""
        w: dict[str, int] = {}
        for name in sorted(widths, key=_site_key):
            if int(widths[name]) < 0:
                raise NeuronSetError(f"site {name} has a negative width {widths[name]}")
            w[name] = int(widths[name])
        idx: dict[str, torch.Tensor] = {}
        for name in sorted(indices, key=_site_key):
            if name not in w:
                raise NeuronSetError(f"site {name} has neurons but no width: add it to `widths`")
            t = torch.as_tensor(indices[name])
            if t.numel() == 0:
                continue
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise NeuronSetError(
                    f"indices of site {name} must be integers, got {t.dtype} (for a boolean mask use from_masks)"
                )
            t = t.to("cpu", torch.long).reshape(-1)
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= w[name]:
                bad = lo if lo < 0 else hi
                raise NeuronSetError(
                    f"neuron {name}:{bad} does not exist: site {name} has width {w[name]} (indices 0..{w[name] - 1})"
                )
            idx[name] = torch.unique(t)  # sorted
        object.__setattr__(self, "_idx", idx)
        object.__setattr__(self, "_widths", w)

    def __setattr__(self, name, value):
        raise AttributeError("NeuronSet is immutable; set operations return new sets")

    def __reduce__(self):
        return NeuronSet, (self._idx, self._widths)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def empty(cls, sites: Sites | Iterable[Site]) -> NeuronSet:
        return cls({}, {s.name: s.width for s in _site_list(sites)})

    @classmethod
    def from_ids(cls, ids: Iterable[str | NeuronId], sites: Sites) -> NeuronSet:
        """Neurons by id (``"layers.3.mlp:12"`` or :class:`NeuronId`), checked against ``sites``."""
        groups: dict[str, list[int]] = {}
        for i in ids:
            nid = NeuronId.parse(i) if isinstance(i, str) else i
            if not isinstance(nid, NeuronId):
                raise NeuronSetError(f"not a neuron id: {i!r} (expected a string like 'layers.3.mlp:12' or NeuronId)")
            sites.check_neuron(nid)
            groups.setdefault(nid.site, []).append(nid.index)
        return cls(groups, {s.name: s.width for s in sites})

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], sites: Sites | None = None) -> NeuronSet:
        """Neurons where ``masks[site]`` (a ``BoolTensor[width]``) is true; validated against ``sites`` if given."""
        idx, widths = {}, {}
        for name, m in masks.items():
            m = torch.as_tensor(m)
            if m.dtype != torch.bool or m.dim() != 1:
                raise NeuronSetError(f"mask of site {name} must be a 1-D bool tensor, got {m.dtype} {tuple(m.shape)}")
            parse_site_name(name)
            widths[name] = m.numel()
            idx[name] = m.cpu().nonzero().reshape(-1)
        out = cls(idx, widths)
        if sites is not None:
            out.validate(sites)
        return out

    @classmethod
    def random(
        cls,
        sites: Sites | Iterable[Site],
        *,
        frac: float | None = None,
        n: int | None = None,
        per_site: bool = True,
        seed: int = 0,
    ) -> NeuronSet:
        """A reproducible random draw. ``per_site=True``: ``n`` (or ``floor(frac * width)``) neurons of every given
        site; ``per_site=False``: ``n`` (or ``floor(frac * total)``) neurons drawn uniformly from all given sites."""
        _one_of(frac, n)
        site_list = _site_list(sites)
        if per_site:
            counts = {s.name: (n if n is not None else _count(frac, s.width)) for s in site_list}
            for s in site_list:
                if counts[s.name] > s.width:
                    raise NeuronSetError(f"cannot draw {counts[s.name]} neurons from site {s.name} of width {s.width}")
            return cls._prefixes(site_list, [counts], seed)[0]
        total = sum(s.width for s in site_list)
        k = n if n is not None else _count(frac, total)
        if k > total:
            raise NeuronSetError(f"cannot draw {k} neurons from {total} neurons in {len(site_list)} sites")
        return cls._global_prefixes(site_list, [k], seed)[0]

    @classmethod
    def random_nested(
        cls,
        sites: Sites | Iterable[Site],
        fracs: Sequence[float],
        *,
        per_site: bool = True,
        seed: int = 0,
    ) -> list[NeuronSet]:
        """Cumulative random draws for an ablation study: one permutation per site (or one over all sites when
        ``per_site=False``), and set ``i`` is its prefix of ``floor(fracs[i] * width)`` neurons, so every set contains
        the previous one. ``fracs`` must be non-decreasing."""
        fracs = [float(f) for f in fracs]
        if any(b < a for a, b in zip(fracs, fracs[1:], strict=False)):
            raise NeuronSetError(f"fractions of a nested draw must be non-decreasing, got {fracs}")
        site_list = _site_list(sites)
        if per_site:
            return cls._prefixes(site_list, [{s.name: _count(f, s.width) for s in site_list} for f in fracs], seed)
        total = sum(s.width for s in site_list)
        return cls._global_prefixes(site_list, [_count(f, total) for f in fracs], seed)

    @classmethod
    def _prefixes(cls, site_list: list[Site], counts: list[dict[str, int]], seed: int) -> list[NeuronSet]:
        widths = {s.name: s.width for s in site_list}
        perms = {
            s.name: torch.randperm(s.width, generator=torch.Generator().manual_seed(_site_seed(seed, s.name)))
            for s in site_list
        }
        return [cls({name: perms[name][: c[name]] for name in perms}, widths) for c in counts]

    @classmethod
    def _global_prefixes(cls, site_list: list[Site], counts: list[int], seed: int) -> list[NeuronSet]:
        widths = {s.name: s.width for s in site_list}
        names = [s.name for s in site_list]
        offsets = torch.tensor([0] + [s.width for s in site_list]).cumsum(0)
        g = torch.Generator().manual_seed(_site_seed(seed, "|".join(names)))
        perm = torch.randperm(int(offsets[-1]), generator=g)
        out = []
        for k in counts:
            flat = perm[:k]
            which = torch.searchsorted(offsets, flat, right=True) - 1
            out.append(cls({nm: flat[which == j] - offsets[j] for j, nm in enumerate(names)}, widths))
        return out

    @classmethod
    def top_k(
        cls,
        scores: Mapping[str, torch.Tensor],
        *,
        frac: float | None = None,
        k: int | None = None,
        scope: str = "global",
        sites: Sites | None = None,
    ) -> NeuronSet:
        """The highest-scoring neurons. ``scores``: site name -> ``Tensor[width]``.

        ``scope="global"`` ranks all given sites *of one kind* together (MLP and attention neurons are ranked
        separately, each kind getting ``k`` or ``floor(frac * neurons of that kind)``); ``"per_site"`` takes ``k``
        (or ``floor(frac * width)``) per site. Ties go to the earlier site (layer order), then the lower index.
        NaN scores are an error.
        """
        _one_of(frac, k, "k")
        units = {name: torch.as_tensor(s).detach().reshape(-1) for name, s in scores.items()}
        idx = _top_units(units, frac, k, scope)
        out = cls(idx, {name: u.numel() for name, u in units.items()})
        if sites is not None:
            out.validate(sites)
        return out

    @classmethod
    def heads(cls, site: Site, head_indices: Iterable[int]) -> NeuronSet:
        """Whole attention heads of one site: head ``h`` is neurons ``[h*d_head, (h+1)*d_head)``."""
        if site.n_heads is None or site.d_head is None:
            raise NeuronSetError(f"site {site.name} has no attention heads (kind {site.kind})")
        hs = torch.as_tensor(list(head_indices), dtype=torch.long).reshape(-1)
        bad = hs[(hs < 0) | (hs >= site.n_heads)]
        if bad.numel():
            raise NeuronSetError(f"site {site.name} has {site.n_heads} heads (0..{site.n_heads - 1}); no head {int(bad[0])}")
        idx = (hs[:, None] * site.d_head + torch.arange(site.d_head)).reshape(-1)
        return cls({site.name: idx}, {site.name: site.width})

    @classmethod
    def top_heads(
        cls,
        scores: Mapping[str, torch.Tensor],
        sites: Sites,
        *,
        k: int | None = None,
        frac: float | None = None,
        reduce: str = "mean",
        scope: str = "global",
    ) -> NeuronSet:
        """Whole heads with the highest head score (the ``mean`` or ``median`` of its neurons' scores, the median
        being the midpoint of the two middle values for an even ``d_head``). ``scope`` and ties as in :meth:`top_k`,
        with heads as the units; ``frac`` counts heads."""
        _one_of(frac, k, "k")
        if reduce not in HEAD_REDUCTIONS:
            raise NeuronSetError(f"reduce must be one of {HEAD_REDUCTIONS}, got {reduce!r}")
        head_scores, by_site = {}, {}
        for name, s in scores.items():
            site = sites[name]
            if site.n_heads is None or site.d_head is None:
                raise NeuronSetError(f"site {name} has no attention heads: top_heads needs attention sites")
            s = torch.as_tensor(s).detach().reshape(-1).double()
            if s.numel() != site.width:
                raise NeuronSetError(f"scores of site {name} have {s.numel()} values, the site has width {site.width}")
            per_head = s.view(site.n_heads, site.d_head)
            head_scores[name] = per_head.mean(1) if reduce == "mean" else per_head.quantile(0.5, dim=1)
            by_site[name] = site
        chosen = _top_units(head_scores, frac, k, scope)
        out = cls.empty(by_site.values())
        for name, hs in chosen.items():
            out = out | cls.heads(by_site[name], hs.tolist())
        return out

    @classmethod
    def load(cls, path: str | Path, sites: Sites | None) -> NeuronSet:
        """Read a set written by :meth:`save`: a ``.json`` file, or text with one id per line (``#`` comments).
        Text files need ``sites``; JSON files are validated against ``sites`` when given."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise NeuronSetError(f"cannot read neuron set {path}: {e}") from None
        if path.suffix == ".json":
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise NeuronSetError(f"{path} is not valid JSON: {e}") from None
            out = cls.from_dict(d)
            if sites is not None:
                out.validate(sites)
            return out
        if sites is None:
            raise NeuronSetError(f"reading the text neuron set {path} needs the model's sites (pass `sites`)")
        lines = [ln.strip() for ln in text.splitlines()]
        return cls.from_ids((ln for ln in lines if ln and not ln.startswith("#")), sites)

    @classmethod
    def from_dict(cls, d: Mapping) -> NeuronSet:
        if d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise NeuronSetError(
                f"not a neuron set (format {d.get('format')!r}, version {d.get('version')!r}; "
                f"expected {_FORMAT!r} version {_VERSION})"
            )
        unknown = set(d) - {"format", "version", "widths", "neurons"}
        if unknown:
            raise NeuronSetError(f"unknown keys in a neuron set: {sorted(unknown)}")
        return cls(d["neurons"], d["widths"])

    # ---------------------------------------------------------------- views

    @property
    def widths(self) -> dict[str, int]:
        """Width of every site the set knows (also those holding no neuron of the set)."""
        return dict(self._widths)

    @property
    def site_names(self) -> tuple[str, ...]:
        """Sites holding at least one neuron of the set, in site order."""
        return tuple(self._idx)

    def indices(self, site: str) -> torch.Tensor:
        """Sorted ``LongTensor`` of this set's neurons in ``site`` (empty if none)."""
        if site not in self._widths:
            raise NeuronSetError(f"the neuron set knows no site {site!r} (it knows {list(self._widths)})")
        t = self._idx.get(site)
        return t.clone() if t is not None else torch.zeros(0, dtype=torch.long)

    def mask(self, site: str) -> torch.Tensor:
        """``BoolTensor[width]``: true for this set's neurons of ``site``."""
        idx = self.indices(site)
        m = torch.zeros(self._widths[site], dtype=torch.bool)
        m[idx] = True
        return m

    def count_by_site(self) -> dict[str, int]:
        """Number of neurons per known site (0 for sites holding none), in site order."""
        return {name: (int(self._idx[name].numel()) if name in self._idx else 0) for name in self._widths}

    def of_kind(self, kind: str) -> NeuronSet:
        """The part of the set in sites of one kind (``"mlp"`` or ``"attn"``)."""
        if kind not in SITE_KINDS:
            raise NeuronSetError(f"site kind must be one of {SITE_KINDS}, got {kind!r}")
        keep = [n for n in self._widths if parse_site_name(n)[1] == kind]
        return NeuronSet({n: self._idx[n] for n in keep if n in self._idx}, {n: self._widths[n] for n in keep})

    def to_ids(self) -> list[str]:
        return [str(nid) for nid in self]

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "widths": dict(self._widths),
            "neurons": {n: t.tolist() for n, t in self._idx.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the set: JSON (with site widths) if ``path`` ends in ``.json``, else text with one id per line."""
        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=1) + "\n"
        else:
            header = f"# neurospec neuron set: {len(self)} neurons in {len(self._idx)} sites\n"
            text = header + "".join(i + "\n" for i in self.to_ids())
        atomic_write_bytes(path, text.encode("utf-8"))  # temporary file + os.replace: never half a file
        return path

    def validate(self, sites: Sites) -> NeuronSet:
        """Raise :class:`NeuronSetError` unless every known site exists in ``sites`` with the same width."""
        for name, w in self._widths.items():
            site = sites[name]
            if site.width != w:
                extra = f" (largest index {int(self._idx[name][-1])})" if name in self._idx else ""
                raise NeuronSetError(
                    f"the neuron set was made for site {name} of width {w}{extra}, but the model's site {name} has "
                    f"width {site.width}: it belongs to another model"
                )
        return self

    # ---------------------------------------------------------------- set protocol

    def __len__(self) -> int:
        return sum(int(t.numel()) for t in self._idx.values())

    def __bool__(self) -> bool:
        return bool(self._idx)

    def __iter__(self) -> Iterator[NeuronId]:
        for name, t in self._idx.items():
            for i in t.tolist():
                yield NeuronId(name, i)

    def __contains__(self, item: object) -> bool:
        nid = NeuronId.parse(item) if isinstance(item, str) else item
        if not isinstance(nid, NeuronId) or nid.site not in self._idx:
            return False
        t = self._idx[nid.site]
        pos = int(torch.searchsorted(t, nid.index))
        return pos < t.numel() and int(t[pos]) == nid.index

    def _combine(self, other: NeuronSet, op) -> NeuronSet:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        widths = dict(self._widths)
        for name, w in other._widths.items():
            if widths.setdefault(name, w) != w:
                raise NeuronSetError(f"site {name} has width {widths[name]} in one set and {w} in the other")
        masks = {}
        for name, w in widths.items():
            a = self.mask(name) if name in self._widths else torch.zeros(w, dtype=torch.bool)
            b = other.mask(name) if name in other._widths else torch.zeros(w, dtype=torch.bool)
            masks[name] = op(a, b).nonzero().reshape(-1)
        return NeuronSet(masks, widths)

    def __or__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, torch.logical_or)

    def __and__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, torch.logical_and)

    def __sub__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, lambda a, b: a & ~b)

    def __xor__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, torch.logical_xor)

    def __eq__(self, other: object) -> bool:
        """Equal when they hold the same neurons (the sites known without neurons do not matter)."""
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return self._idx.keys() == other._idx.keys() and all(torch.equal(t, other._idx[n]) for n, t in self._idx.items())

    def __hash__(self) -> int:
        return hash(tuple((n, tuple(t.tolist())) for n, t in self._idx.items()))

    def __repr__(self) -> str:
        per = ", ".join(f"{n}: {c}" for n, c in list(self.count_by_site().items())[:4])
        more = ", ..." if len(self._widths) > 4 else ""
        return f"NeuronSet({len(self)} neurons; {per}{more})"


def _top_units(scores: Mapping[str, torch.Tensor], frac: float | None, k: int | None, scope: str) -> dict[str, torch.Tensor]:
    """Indices of the top units per site, ranked globally per site kind or per site (see ``NeuronSet.top_k``)."""
    if scope not in SCOPES:
        raise NeuronSetError(f"scope must be one of {SCOPES}, got {scope!r}")
    names = sorted(scores, key=_site_key)
    for n in names:
        if torch.isnan(scores[n]).any():
            raise NeuronSetError(f"scores of site {n} contain NaN; replace them before selecting")
    groups = [[n] for n in names] if scope == "per_site" else [
        [n for n in names if parse_site_name(n)[1] == kind] for kind in SITE_KINDS
    ]
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        if not group:
            continue
        flat = torch.cat([scores[n].double().cpu() for n in group])
        count = k if k is not None else _count(frac, flat.numel())
        if count > flat.numel():
            raise NeuronSetError(f"cannot select {count} of {flat.numel()} units in {group[0]}{', ...' * (len(group) > 1)}")
        order = torch.sort(flat, descending=True, stable=True).indices[:count]
        offsets = torch.tensor([0] + [scores[n].numel() for n in group]).cumsum(0)
        which = torch.searchsorted(offsets, order, right=True) - 1
        for j, n in enumerate(group):
            out[n] = order[which == j] - offsets[j]
    return out
