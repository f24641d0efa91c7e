"""What a result directory (the ``--out`` of a command) may hold, who claimed it, and atomic result writes.

Every command that writes results into ``--out`` first *claims* the directory: it writes ``command.json`` with its
name, its configuration and a digest of both, before any work starts. A directory claimed by another command, or
by the same command with another configuration, is refused when it holds anything besides the claim, unless the
caller forces it; forcing removes the result files listed here for the previous command (and this one), so a
report built afterwards never shows results of an earlier configuration (say, a task that is no longer run).
Recordings (the run directories the recorder writes, with their own ``manifest.json``) are never removed here:
the recorder reuses them when their model and configuration match, and refuses or replaces them otherwise.

A directory that holds only a recorder run (``neurospec record --out DIR``) may be claimed by any command: writing
an analysis next to the recording it reads is the ordinary flow.

Result files are written atomically (a temporary file in the same directory, then :func:`os.replace`), so an
interrupted command leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from neurospec.errors import RunStoreError
from neurospec.models.digits import ZOO_FILE
from neurospec.record.store import MANIFEST, atomic_write_bytes, atomic_write_json

CLAIM = "command.json"
CLAIM_FORMAT = "neurospec-out"
CLAIM_VERSION = 1

# files and folders of a recorder run (neurospec record; also the step0/, model/, reference/ folders of analyses)
RECORD_ENTRIES = (MANIFEST, "stats", "partial")

# result files, by the name they have inside a result directory
REPORT = "report.html"
FIGURES = "figures"
PRUNE_RESULT = "result.json"
PRUNED_NEURONS = "pruned_neurons.txt"
TASKMAP = "taskmap.json"
MAIN = "main.json"
ABLATION = "ablation.json"
ABLATION_FIGURE = "ablation_methods"  # .png and .svg
CLUSTERS = "clusters.json"
CLUSTER_LABELS = "labels.safetensors"
SPECIALIZATION = "specialization.json"
ALIGNMENT = "alignment.json"
ROUTING = "routing.json"
ZOO = ZOO_FILE  # a digits model directory's own file: the model format defines it (models/digits.py)
WASSERSTEIN = "wasserstein.json"
WASSERSTEIN_W1_FIGURE = "w1_distribution"  # .png and .svg, drawn by `neurospec wasserstein --out`
WASSERSTEIN_ERROR_FIGURE = "error_vs_w1"  # .png and .svg, with --experiment
SPARSIFY = "sparsify.json"
SKILLS_RESULT = "skills.json"  # neurospec skills (its --out is not claimed; it holds no other command's results)

# sub-directories of the main job
TASKMAP_DIR = "taskmap"
PRUNE_DIR = "prune"
ABLATION_DIR = "ablation"

_FIGURE_FILES = (f"{FIGURES}/*.png", f"{FIGURES}/*.svg")

# the two layouts a report reads: one command's results at the top of its --out, or the main job's sub-directories
SINGLE, MAIN_JOB = "single", "run"

# the result files each command writes into its --out (glob patterns relative to it); recordings are not listed
RESULT_FILES: dict[str, tuple[str, ...]] = {
    "prune": (PRUNE_RESULT, PRUNED_NEURONS, REPORT, *_FIGURE_FILES),
    "taskmap": (TASKMAP, REPORT, *_FIGURE_FILES),
    "ablate": (ABLATION, f"{ABLATION_FIGURE}.png", f"{ABLATION_FIGURE}.svg", REPORT, *_FIGURE_FILES),
    "run": (
        MAIN, REPORT, *_FIGURE_FILES, f"{TASKMAP_DIR}/{TASKMAP}", f"{PRUNE_DIR}/*/{PRUNE_RESULT}",
        f"{PRUNE_DIR}/*/{PRUNED_NEURONS}", f"{ABLATION_DIR}/{ABLATION}", f"{ABLATION_DIR}/{ABLATION_FIGURE}.png",
        f"{ABLATION_DIR}/{ABLATION_FIGURE}.svg",
    ),
    # the analyses of a cluster directory (specialization, align, route) derive from its labels: stale with them
    "cluster": (CLUSTERS, CLUSTER_LABELS, SPECIALIZATION, ALIGNMENT, ROUTING, REPORT, *_FIGURE_FILES),
    "zoo train": (ZOO, "model.safetensors", "config.json"),
    "wasserstein": (WASSERSTEIN, f"{WASSERSTEIN_W1_FIGURE}.png", f"{WASSERSTEIN_W1_FIGURE}.svg",
                    f"{WASSERSTEIN_ERROR_FIGURE}.png", f"{WASSERSTEIN_ERROR_FIGURE}.svg", REPORT, *_FIGURE_FILES),
    "sparsify": (SPARSIFY, REPORT, *_FIGURE_FILES),
}


def config_digest(command: str, config: Mapping[str, Any]) -> str:
    """A sha256 over the command name and its JSON configuration (keys sorted)."""
    text = json.dumps({"command": command, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_claim(path: str | os.PathLike) -> dict | None:
    """The claim of a result directory, or None when it has none (or an unreadable one)."""
    f = Path(path) / CLAIM
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CLAIM_FORMAT:
        return None
    return data


def _entries(path: Path) -> list[str]:
    """Names in ``path`` other than the claim and hidden files (temporary files of interrupted atomic writes)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name != CLAIM and not p.name.startswith("."))


def result_paths(path: str | os.PathLike, commands: Iterable[str]) -> list[Path]:
    """The existing result files that ``commands`` write, inside the result directory ``path``."""
    root = Path(path)
    found: set[Path] = set()
    for command in commands:
        for pattern in RESULT_FILES.get(command, ()):
            found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def clear_results(path: str | os.PathLike, commands: Iterable[str]) -> list[Path]:
    """Remove the result files of ``commands`` from ``path`` (recordings stay); returns what was removed."""
    removed = result_paths(path, commands)
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k} {json.dumps(old.get(k), default=str)} there, {json.dumps(new.get(k), default=str)} now"
             for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


def claim_out_dir(path: str | os.PathLike, command: str, config: Mapping[str, Any], *, force: bool = False) -> Path:
    """Claim ``path`` as the result directory of ``command`` run with ``config`` (a JSON-ready mapping).

    Refused with :class:`RunStoreError` (unless ``force``) when the directory holds results of another command or
    of another configuration, or files that no neurospec command claimed (other than a recorder run). With
    ``force``, the result files of the previous command and of this one are removed first. The claim is written
    atomically; the same command with the same configuration finds its own claim and continues (resume).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RunStoreError(f"--out {out} exists and is not a directory: choose another --out")
    config = json.loads(json.dumps(dict(config), default=str))
    digest = config_digest(command, config)
    claim = read_claim(out)
    entries = _entries(out)
    same = claim is not None and claim.get("command") == command and claim.get("digest") == digest
    previous: list[str] = [command]
    if claim is not None and not same and entries:
        prev_command = str(claim.get("command"))
        if prev_command == command:
            what = f"results of `neurospec {command}` with another configuration ({_differences(claim.get('config') or {}, config)})"
        else:
            what = f"results of `neurospec {prev_command}`"
        if not force:
            raise RunStoreError(f"{out} already holds {what}; use --force to replace them, or another --out")
        previous.append(prev_command)
    elif claim is None:
        foreign = [e for e in entries if e not in RECORD_ENTRIES]
        if foreign and not force:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise RunStoreError(
                f"{out} is not empty ({shown}) and no neurospec command claimed it (it has no {CLAIM}); "
                f"use --force to write `neurospec {command}` results there anyway, or another --out"
            )
        if foreign:
            previous = list(RESULT_FILES)  # results of an unknown command (an older neurospec): remove them all
    if force:
        clear_results(out, previous)
    if not same:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / CLAIM, {"format": CLAIM_FORMAT, "version": CLAIM_VERSION, "command": command,
                                            "digest": digest, "config": config})
        except OSError as e:
            raise RunStoreError(f"cannot write to {out}: {e.strerror or e}; choose another --out") from None
    return out


# ------------------------------------------------------------------------------------------------ atomic writes


def write_result_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write a JSON result atomically; returns its path."""
    p = Path(path)
    atomic_write_json(p, obj)
    return p


def write_result_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text result (a report, a list of neurons) atomically; returns its path."""
    p = Path(path)
    atomic_write_bytes(p, text.encode("utf-8"))
    return p


def write_result_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically in the format of ``path``'s suffix (``.png``, ``.svg``)."""
    p = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=p.suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write_bytes(p, buf.getvalue())
    return p



# ------------------------------------------------------------------------------------------------ reading a layout


def layout_of(path: str | os.PathLike) -> str:
    """:data:`MAIN_JOB` for a directory of the main job (claimed by ``run``, or unclaimed with a :data:`MAIN`
    summary: the library's :func:`~neurospec.experiments.main.main_job`), else :data:`SINGLE`."""
    root = Path(path)
    claim = read_claim(root)
    if claim is not None:
        return MAIN_JOB if claim.get("command") == "run" else SINGLE
    return MAIN_JOB if (root / MAIN).is_file() else SINGLE


def report_inputs(path: str | os.PathLike) -> dict[str, Any]:
    """The result files a report of ``path`` reads, in its one layout (:func:`layout_of`); entries may not exist.

    ``taskmap``, ``ablation``, ``main``: a path or ``None``; ``prune``: a list of prune result paths; ``clusters``:
    the cluster directories (``path`` itself when it holds :data:`CLUSTERS`, else its sub-directories that do).
    ``wasserstein``, ``sparsify``: the result of that command at the top of ``path``, or ``None``.
    A single command's directory is read for that command's results only (all of them when it has no claim)."""
    root = Path(path)
    if layout_of(root) == MAIN_JOB:
        return {"layout": MAIN_JOB, "taskmap": root / TASKMAP_DIR / TASKMAP,
                "prune": sorted(root.glob(f"{PRUNE_DIR}/*/{PRUNE_RESULT}")),
                "ablation": root / ABLATION_DIR / ABLATION, "main": root / MAIN, "clusters": [],
                "wasserstein": None, "sparsify": None}
    claim = read_claim(root)
    command = None if claim is None else claim.get("command")

    def mine(name: str) -> bool:
        return command is None or command == name

    if (root / CLUSTERS).is_file():
        clusters = [root] if mine("cluster") else []
    else:
        clusters = sorted(d for d in root.glob("*") if d.is_dir() and (d / CLUSTERS).is_file())
    return {"layout": SINGLE, "taskmap": root / TASKMAP if mine("taskmap") else None,
            "prune": [root / PRUNE_RESULT] if mine("prune") and (root / PRUNE_RESULT).is_file() else [],
            "ablation": root / ABLATION if mine("ablate") else None, "main": None, "clusters": clusters,
            "wasserstein": root / WASSERSTEIN if mine("wasserstein") else None,
            "sparsify": root / SPARSIFY if mine("sparsify") else None}
