"""The run store: one directory per run, JSON manifest plus safetensors tensors.

Layout::

    RUN/
      manifest.json                 # schema, library version, model, config, sites, per-task status
      stats/TASK.safetensors        # accumulator states, keys "SITE/ACC/STATE" (finished tasks)
      partial/TASK.rankR.safetensors  # checkpoints of an unfinished task (removed when it finishes)
      .lock                         # held (flock) by the process recording into the run

Only JSON and safetensors are ever read back (never pickle). Every write goes to a temporary file in the same
directory (created with the process umask, like any file ``open`` creates) and is moved into place with
:func:`os.replace`, after which the directory is fsynced, so an interrupted run or a power cut leaves either the
old or the new file, never half of one. A damaged or truncated file is reported as a :class:`RunStoreError` that
names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurospec.errors import RunStoreError
from neurospec.models.sites import Site, Sites
from neurospec.record.accumulators import merge_stats
from neurospec.record.states import accumulators_from_tensors

SCHEMA = 1
MANIFEST = "manifest.json"
LOCK = ".lock"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; skipped where directories cannot be opened or synced."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically. The file gets the mode a plain ``open(path, "wb")`` would give
    (0o666 less the umask), not the owner-only mode of :func:`tempfile.mkstemp`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create a fresh hidden file beside ``path``, let ``write(tmp)`` fill it (by its path), flush it to disk and
    rename it to ``path``; on any error the file is removed and ``path`` is left as it was. Mode as
    :func:`atomic_write_bytes`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
            break
        except FileExistsError:
            continue
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaced the file by its own may have given it another mode
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Atomic safetensors write (tensors made contiguous and moved to CPU).

    The file is written by safetensors straight from the tensors, without first building its bytes in memory
    (that would double the memory of large states such as a run's reservoirs)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(flat, str(tmp), metadata=dict(metadata or {}))

    _atomic_write(path, write)


def load_tensors(
    path: Path, what_to_do: str = "", keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; a missing, truncated or otherwise unreadable one raises :class:`RunStoreError`
    naming the file (followed by ``what_to_do``, the remedy the caller knows). ``keep``: read only the tensors whose
    name it accepts (the others are not read at all)."""
    from safetensors import safe_open

    hint = f"; {what_to_do}" if what_to_do else ""
    if not path.exists():
        raise RunStoreError(f"missing run file {path}{hint}")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                if keep is None or keep(k):
                    out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error type (and OSError) for damaged files
        raise RunStoreError(f"run file {path} is damaged or truncated ({e}){hint}") from None
    return out, meta


def check_tensors(path: Path) -> str | None:
    """``None`` if ``path`` is a complete safetensors file (header and sizes only, no tensor is read), else why
    not."""
    from safetensors import safe_open

    if not path.exists():
        return "the file is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
    except Exception as e:
        return str(e) or type(e).__name__
    return None


def _run_entry(p: Path) -> bool:
    """Whether ``p`` is something the run store itself writes into a run directory."""
    return p.name in ("stats", "partial", LOCK) or (p.name.startswith(".") and p.name.endswith(".tmp"))


def prepare_run_dir(path: Path, force: bool = False) -> Path:
    """Create (or reuse) a run directory, with a clear error when it cannot be written.

    A directory without a manifest is refused unless it is empty, or (with ``force``) holds nothing but what the
    run store writes (a run whose manifest was lost)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunStoreError(f"run path {path} exists and is not a directory: choose another --out")
    if path.is_dir() and not (path / MANIFEST).exists():
        entries = [p for p in path.iterdir() if p.name != LOCK]
        if entries and all(_run_entry(p) for p in entries):
            if not force:
                raise RunStoreError(
                    f"{path} looks like a neurospec run whose {MANIFEST} is missing; pass --force to record it "
                    "again from the start, or choose another --out"
                )
        elif entries:
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


REDO = "record it again (the same `neurospec record` command with --force starts the run over)"


def read_manifest(path: Path) -> dict:
    """The manifest of run ``path``; a missing, unreadable or incomplete one raises :class:`RunStoreError`."""
    mf = Path(path) / MANIFEST
    if not mf.exists():
        raise RunStoreError(f"{path} is not a neurospec run: it has no {MANIFEST}")
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStoreError(f"{mf} is damaged: not valid JSON ({e}); {REDO}") from None
    if not isinstance(data, dict):
        raise RunStoreError(f"{mf} is damaged: it holds a JSON {type(data).__name__}, not an object; {REDO}")
    if data.get("schema") != SCHEMA:
        raise RunStoreError(f"{mf} has schema {data.get('schema')!r}; this neurospec reads schema {SCHEMA}")
    shapes = {"model": dict, "config": dict, "sites": list, "tasks": dict}
    bad = [k for k, t in shapes.items() if not isinstance(data.get(k), t)]
    if not bad and not isinstance(data["model"].get("fingerprint"), str):
        bad = ["model.fingerprint"]
    if bad:
        raise RunStoreError(f"{mf} is damaged: {', '.join(bad)} missing or malformed; {REDO}")
    return data


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on run directory ``path`` (``flock`` on ``path/.lock``) for the ``with`` block.

    A second process that tries to record into the same run fails at once with a :class:`RunStoreError` instead
    of waiting: a recording can take hours, and a silent wait looks like a hang. The lock is advisory and local to
    the machine (and to file systems that support ``flock``); where ``fcntl`` does not exist it is skipped.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = Path(path) / LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise RunStoreError(
                f"another process{f' (pid {holder})' if holder.isdigit() else ''} is recording into {path}; "
                "wait for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


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

    def accumulators(self, task: str, names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """``{site: {"stats": NeuronStats, "reservoir": Reservoir, "comoments": CoMoments}}`` (those recorded).
        ``names``: read only these accumulators (e.g. ``("stats",)``: the reservoir's samples, often the largest part
        of the file, are then not read)."""
        path = self._task_file(task)
        redo = f"record task {task!r} again: the same `neurospec record` command with --force"
        keep = None if names is None else (lambda key: key.split("/", 2)[1] in names)
        tensors, meta = load_tensors(path, redo, keep)
        try:
            return accumulators_from_tensors(tensors, json.loads(meta.get("accumulators", "{}")))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise RunStoreError(f"run file {path} is damaged: its accumulator states do not load ({e}); {redo}") \
                from None

    def merged_stats(self, tasks: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Computed statistics of the union of several recorded tasks, ``{site: {"mean": Tensor[width], ...}}``, by
        exact merging of their accumulators (:func:`~neurospec.record.accumulators.merge_stats`)."""
        return merge_stats([{s: a["stats"] for s, a in self.accumulators(t, ("stats",)).items()} for t in tasks])

    def stats(self, task: str, site: str | None = None) -> dict:
        """Computed per-neuron statistics: ``{site: {"mean": Tensor[width], ...}}`` or one site's dict."""
        accs = self.accumulators(task, ("stats",))
        if site is not None:
            if site not in accs:
                raise RunStoreError(f"run {self.path} recorded no site {site!r}")
            return accs[site]["stats"].compute()
        return {s: a["stats"].compute() for s, a in accs.items()}

    def reservoir(self, task: str) -> dict[str, torch.Tensor]:
        """``{site: Tensor[k, width]}`` activation samples; an error that says how to record them if absent."""
        accs = self.accumulators(task, ("reservoir",))
        out = {s: a["reservoir"].compute()["samples"] for s, a in accs.items() if "reservoir" in a}
        if not out:
            raise RunStoreError(
                f"run {self.path} has no activation samples for task {task!r}; record them with "
                "`neurospec record ... --reservoir 2048`"
            )
        return out

    def comoments(self, task: str) -> dict[str, dict[str, torch.Tensor]]:
        accs = self.accumulators(task, ("comoments",))
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
