"""The run store: one directory per run, JSON manifest plus safetensors tensors.

Layout::

    RUN/
      manifest.json                 # schema, library version, model, config, sites, per-task status
      stats/TASK.safetensors        # accumulator states, keys "SITE/ACC/STATE" (finished tasks)
      partial/TASK.rankR.safetensors  # checkpoints of an unfinished task (removed when it finishes)

Only JSON and safetensors are ever read back (never pickle). Every write goes to a temporary file in the same
directory and is moved into place with :func:`os.replace`, so an interrupted run leaves either the old or the new
file, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurospec.errors import RunStoreError
from neurospec.models.sites import Site, Sites

SCHEMA = 1
MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Atomic safetensors write (tensors made contiguous and moved to CPU)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=dict(metadata or {})))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.exists():
        raise RunStoreError(f"missing run file {path}")
    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


def prepare_run_dir(path: Path) -> Path:
    """Create (or reuse) a run directory, with a clear error when it cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunStoreError(f"run path {path} exists and is not a directory: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise RunStoreError(
            f"{path} is a non-empty directory that is not a neurospec run (no {MANIFEST}); choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunStoreError(f"cannot write to run directory {path}: {e.strerror or e}; choose another --out") from None
    return path


def read_manifest(path: Path) -> dict:
    mf = Path(path) / MANIFEST
    if not mf.exists():
        raise RunStoreError(f"{path} is not a neurospec run: it has no {MANIFEST}")
    try:
        data = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise RunStoreError(f"{mf} is not valid JSON ({e}); the run is damaged") from None
    if data.get("schema") != SCHEMA:
        raise RunStoreError(f"{mf} has schema {data.get('schema')!r}; this neurospec reads schema {SCHEMA}")
    return data


@dataclass
class Run:
    """A finished (or partly finished) recording, opened read-only. Statistics come back as float64 tensors."""

    path: Path
    manifest: dict

    @property
    def sites(self) -> Sites:
        m = self.manifest
        return Sites(m["model"]["family"], tuple(Site.from_dict(s) for s in m["sites"]), m["model"]["hidden_size"])

    @property
    def tasks(self) -> list[str]:
        return [t for t, v in self.manifest["tasks"].items() if v.get("status") == "done"]

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    def _task_file(self, task: str) -> Path:
        info = self.manifest["tasks"].get(task)
        if info is None:
            raise RunStoreError(f"run {self.path} has no task {task!r}; it has {sorted(self.manifest['tasks'])}")
        if info.get("status") != "done":
            raise RunStoreError(
                f"task {task!r} of run {self.path} is unfinished; re-run the same `neurospec record` to resume it"
            )
        return self.path / "stats" / f"{task}.safetensors"

    def accumulators(self, task: str) -> dict[str, dict[str, Any]]:
        """``{site: {"stats": NeuronStats, "reservoir": Reservoir, "comoments": CoMoments}}`` (those recorded)."""
        from neurospec.record.recorder import accumulators_from_tensors

        tensors, meta = load_tensors(self._task_file(task))
        return accumulators_from_tensors(tensors, json.loads(meta.get("accumulators", "{}")))

    def stats(self, task: str, site: str | None = None) -> dict:
        """Computed per-neuron statistics: ``{site: {"mean": Tensor[width], ...}}`` or one site's dict."""
        accs = self.accumulators(task)
        if site is not None:
            if site not in accs:
                raise RunStoreError(f"run {self.path} recorded no site {site!r}")
            return accs[site]["stats"].compute()
        return {s: a["stats"].compute() for s, a in accs.items()}

    def reservoir(self, task: str) -> dict[str, torch.Tensor]:
        """``{site: Tensor[k, width]}`` activation samples; an error that says how to record them if absent."""
        accs = self.accumulators(task)
        out = {s: a["reservoir"].compute()["samples"] for s, a in accs.items() if "reservoir" in a}
        if not out:
            raise RunStoreError(
                f"run {self.path} has no activation samples for task {task!r}; record them with "
                "`neurospec record ... --reservoir 2048`"
            )
        return out

    def comoments(self, task: str) -> dict[str, dict[str, torch.Tensor]]:
        accs = self.accumulators(task)
        out = {s: a["comoments"].compute() for s, a in accs.items() if "comoments" in a}
        if not out:
            raise RunStoreError(
                f"run {self.path} has no co-moments for task {task!r}; record them with "
                "`neurospec record ... --comoments mlp`"
            )
        return out

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise RunStoreError(
                f"run {self.path} was recorded on another model (fingerprint {self.model_fingerprint}, "
                f"{self.manifest['model'].get('name')}); this model's fingerprint is {fingerprint}. "
                "Record a reference run on this model first."
            )


def open_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by :func:`neurospec.record.recorder.record`."""
    p = Path(path)
    return Run(p, read_manifest(p))
