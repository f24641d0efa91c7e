"""A clustering on disk: labels in safetensors, everything else in one JSON manifest.

Layout of a cluster directory::

    DIR/
      labels.safetensors    # {site name: int64 labels [width]}; -1 = excluded (dead or isolated neuron)
      clusters.json         # format, schema version, model, method, graph, parameters, n-cut, sizes, baseline
      specialization.json   # written by `neurospec specialization` (importance and coherence)
      alignment.json        # written by `neurospec align` (task neurons vs clusters)

``scope``: ``"per_layer"`` when cluster ids are local to each site (MoE experts, per-layer correlation graphs: cluster
3 of layer 0 and cluster 3 of layer 1 are unrelated) and ``"global"`` when one partition spans all chosen layers
(the weight graph: cluster 3 is the same cluster in every layer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurospec.errors import RunStoreError
from neurospec.models.sites import parse_site_name
from neurospec.record import layout
from neurospec.record.store import atomic_write_json, load_tensors, save_tensors

LABELS_FILE = layout.CLUSTER_LABELS
MANIFEST_FILE = layout.CLUSTERS
FORMAT = "neurospec-clusters"
SCHEMA_VERSION = 1
SCOPES = ("per_layer", "global")


def _site_order(name: str) -> tuple[int, str]:
    layer, kind = parse_site_name(name)
    return layer, kind


@dataclass
class Clustering:
    """Labels of the clustered sites and what produced them.

    ``labels``: ``{site: int64 [width]}`` in layer order; ``model``: the model's description (its ``fingerprint``
    identifies it); ``model_spec``: what to pass to reload it; ``params``: the method's settings; ``ncut``: the
    partition's normalised cut (``None`` for MoEfication by parameters, which clusters points, not a graph);
    ``extra``: anything else the pipeline reports (per-site n-cut, clusterability baseline, timings).
    """

    labels: dict[str, np.ndarray]
    method: str
    graph: str
    scope: str
    model: dict
    model_spec: str
    params: dict = field(default_factory=dict)
    ncut: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        self.labels = {s: np.asarray(self.labels[s], dtype=np.int64) for s in sorted(self.labels, key=_site_order)}

    @property
    def fingerprint(self) -> str:
        return str(self.model.get("fingerprint"))

    @property
    def sites(self) -> list[str]:
        return list(self.labels)

    @property
    def n_clusters(self) -> int:
        """Clusters per site (per-layer scope: the largest count of any site) or in the whole partition (global)."""
        if self.scope == "global":
            ids = np.unique(np.concatenate([v[v >= 0] for v in self.labels.values()]))
            return int(ids.size)
        return max((int(np.unique(v[v >= 0]).size) for v in self.labels.values()), default=0)

    def sizes(self) -> dict[str, list[int]]:
        """``{site: [size of cluster 0, 1, ...]}`` (ids without neurons in that site count 0)."""
        k = 1 + max((int(v.max()) for v in self.labels.values() if v.size), default=-1)
        return {s: np.bincount(v[v >= 0], minlength=k).tolist() for s, v in self.labels.items()}

    def cluster_sizes(self) -> list[int]:
        """Total size of each cluster id over all sites (for a global partition: the clusters' sizes)."""
        total = None
        for v in self.sizes().values():
            total = np.asarray(v) if total is None else total + np.asarray(v)
        return [] if total is None else total.tolist()

    def excluded(self) -> dict[str, int]:
        return {s: int((v < 0).sum()) for s, v in self.labels.items()}

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "graph": self.graph,
            "scope": self.scope,
            "model": self.model,
            "model_spec": self.model_spec,
            "fingerprint": self.fingerprint,
            "params": self.params,
            "n_clusters": self.n_clusters,
            "ncut": self.ncut,
            "sites": {s: int(v.size) for s, v in self.labels.items()},
            "sizes": self.sizes(),
            "cluster_sizes": self.cluster_sizes(),
            "excluded": self.excluded(),
            "extra": self.extra,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``labels.safetensors`` and ``clusters.json`` atomically; returns the labels file."""
        out = prepare_cluster_dir(directory)
        labels_path = out / LABELS_FILE
        save_tensors(labels_path, {s: torch.from_numpy(v.copy()) for s, v in self.labels.items()},
                            {"format": FORMAT, "fingerprint": self.fingerprint})
        atomic_write_json(out / MANIFEST_FILE, self.manifest())
        return labels_path


def prepare_cluster_dir(directory: str | Path) -> Path:
    """Create (or reuse) a cluster directory, with a clear error when it cannot be one."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise RunStoreError(f"{out} exists and is not a directory: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunStoreError(f"cannot create {out}: {e.strerror or e}; choose another --out") from None
    return out


def load_clustering(directory: str | Path) -> Clustering:
    """Open a cluster directory written by :meth:`Clustering.save` (only JSON and safetensors are read)."""
    d = Path(directory)
    mf = d / MANIFEST_FILE
    if not mf.is_file():
        raise RunStoreError(
            f"{d} is not a cluster directory: it has no {MANIFEST_FILE} (make one with `neurospec cluster ... --out "
            f"{d}`)"
        )
    try:
        meta: dict[str, Any] = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise RunStoreError(f"{mf} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise RunStoreError(f"{mf} is not a neurospec clusters manifest (format {meta.get('format')!r})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise RunStoreError(f"{mf} has schema version {meta.get('schema_version')}; this neurospec reads "
                            f"{SCHEMA_VERSION}")
    tensors, _ = load_tensors(d / LABELS_FILE)
    labels = {s: t.numpy().astype(np.int64) for s, t in tensors.items()}
    if set(labels) != set(meta["sites"]):
        raise RunStoreError(f"{d}: {LABELS_FILE} and {MANIFEST_FILE} list different sites; the directory is damaged")
    return Clustering(labels, meta["method"], meta["graph"], meta["scope"], meta["model"], meta["model_spec"],
                      meta.get("params", {}), meta.get("ncut"), meta.get("extra", {}))
