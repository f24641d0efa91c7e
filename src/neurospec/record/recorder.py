"""Stream tasks through a model and accumulate per-neuron statistics at every site.

Recording is a forward pre-hook on each site's linear module: the hook sees the module's input ``[batch, seq,
width]`` and feeds it, flattened to ``[tokens, width]``, to that site's accumulators. Blocks are packed with no
padding, so every position of every block counts once.

Interruption: the accumulator states of an unfinished task are checkpointed every ``checkpoint_every`` batches
(atomic writes); running the same recording again resumes after the last checkpoint and gives the same result as an
uninterrupted run. Scale-out: under ``torchrun`` batch ``b`` goes to rank ``b % world_size``; histogram ranges are
taken from global batch 0 and broadcast from rank 0, and the accumulators are all-reduced before rank 0 writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from neurospec import __version__
from neurospec.errors import NeurospecError, RunStoreError, TaskError
from neurospec.models.experts import observe_site
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import SITE_KINDS, Site
from neurospec.record import store
from neurospec.record.accumulators import CoMoments, NeuronStats, Reservoir
from neurospec.record.coactivation import ReluCoMoments
from neurospec.record.routing import ExpertRouting

ACCUMULATORS = {"stats": NeuronStats, "reservoir": Reservoir, "comoments": CoMoments,
                "relu_comoments": ReluCoMoments, "routing": ExpertRouting}
CONFIG_VERSION = 1


@dataclass(frozen=True)
class RecordConfig:
    """What to record. Serialised into every run manifest; two runs compare equal iff their configs do.

    ``tokens``: tokens recorded per task (collection split). ``eval_tokens``: size of each task's evaluation split
    (held out, never recorded). ``hist_sample_every``: the histogram sees every k-th token row of a batch (moments
    always see every token). ``reservoir``: activation vectors kept per site (0 = none), for resample ablation.
    ``comoments``: site kinds whose full co-moment matrix is recorded (for correlation graphs; costly).
    ``relu_comoments``: site kinds whose co-moment matrix of ``relu(x)`` is recorded (the MoEfication co-activation
    graph; as costly as ``comoments``). Left out of ``to_dict()`` when empty, so older manifests still match.
    """

    tokens: int = 20_000
    eval_tokens: int = 8_192
    seq_len: int = 256
    batch_size: int = 8
    kinds: tuple[str, ...] = ("mlp", "attn")
    hist_bins: int = 256
    hist_sample_every: int = 1
    reservoir: int = 1024
    comoments: tuple[str, ...] = ()
    relu_comoments: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "eval_tokens", "seq_len", "batch_size", "hist_bins", "hist_sample_every"):
            if int(getattr(self, name)) < 1:
                raise NeurospecError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.reservoir < 0:
            raise NeurospecError(f"reservoir must be >= 0, got {self.reservoir}")
        for k in (*self.kinds, *self.comoments, *self.relu_comoments):
            if k not in SITE_KINDS:
                raise NeurospecError(f"site kind must be one of {SITE_KINDS}, got {k!r}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "comoments", tuple(self.comoments))
        object.__setattr__(self, "relu_comoments", tuple(self.relu_comoments))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kinds"], d["comoments"] = list(self.kinds), list(self.comoments)
        d["relu_comoments"] = list(self.relu_comoments)
        if not self.relu_comoments:
            del d["relu_comoments"]
        return {"type": "RecordConfig", "version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> RecordConfig:
        d = dict(d)
        if d.pop("type", "RecordConfig") != "RecordConfig" or d.pop("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise NeurospecError("not a RecordConfig of this version")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NeurospecError(f"unknown RecordConfig keys {unknown}")
        for k in ("kinds", "comoments", "relu_comoments"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# ----------------------------------------------------------------------------------------------- accumulators


def make_accumulators(site: Site, cfg: RecordConfig, range_sync=None, rank: int = 0) -> dict[str, Any]:
    """Fresh accumulators of one site. The reservoir's seed depends on the site and the rank, so the parts recorded
    by different ranks are independent samples (their merge is a uniform sample of all tokens, though not the same
    sample a single process would draw)."""
    accs: dict[str, Any] = {
        "stats": NeuronStats(
            site.width, hist_bins=cfg.hist_bins, hist_sample_every=cfg.hist_sample_every, range_sync=range_sync
        )
    }
    if cfg.reservoir:
        seed = cfg.seed * 1_000_003 + rank * 10_007 + site.layer * 2 + (site.kind == "attn")
        if site.expert is not None:  # the routed experts of a layer draw different keys
            seed += 7_919 * (1 + site.expert)
        accs["reservoir"] = Reservoir(site.width, cfg.reservoir, seed=seed)
    if site.kind in cfg.comoments:
        accs["comoments"] = CoMoments(site.width)
    if site.kind in cfg.relu_comoments:
        accs["relu_comoments"] = ReluCoMoments(site.width)
    if site.expert is not None:  # a routed expert: its router statistics (record/routing.py)
        accs["routing"] = ExpertRouting(site.expert)
    return accs


def pack_accumulators(accs: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``{site: {acc_name: accumulator}}`` into safetensors tensors plus JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for site, group in accs.items():
        for name, acc in group.items():
            for k, v in acc.state_dict().items():
                tensors[f"{site}/{name}/{k}"] = v
            meta[f"{site}/{name}"] = acc.meta() if hasattr(acc, "meta") else {}
    return tensors, meta


def accumulators_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        site, name, k = key.split("/", 2)
        grouped.setdefault((site, name), {})[k] = v
    out: dict[str, dict[str, Any]] = {}
    for (site, name), state in grouped.items():
        cls = ACCUMULATORS.get(name)
        if cls is None:
            raise RunStoreError(f"unknown accumulator {name!r} in run file")
        out.setdefault(site, {})[name] = cls.from_state_dict(state, **meta.get(f"{site}/{name}", {}))
    return out


# ----------------------------------------------------------------------------------------------- distributed


def dist_context() -> tuple[int, int]:
    """``(rank, world_size)``: from an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.distributed as dist

    both = torch.stack([lo, hi]).to(torch.float64).contiguous()
    dist.broadcast(both, src=0)
    return both[0].to(lo.dtype), both[1].to(hi.dtype)


# ----------------------------------------------------------------------------------------------- recording


ProgressFn = Callable[[str, int, int], None]


def _batches_for_rank(n_batches: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n_batches, world))


def _forward_body(model: torch.nn.Module) -> torch.nn.Module:
    """The part of the model that holds every site: the body without the LM/classification head."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, torch.nn.Module) else model


def record_task(
    loaded: LoadedModel,
    blocks: torch.Tensor,
    sites: Sequence[Site],
    cfg: RecordConfig,
    *,
    resume_state: tuple[dict, int] | None = None,
    checkpoint: Callable[[dict, int], None] | None = None,
    checkpoint_every: int = 16,
    progress: ProgressFn | None = None,
    task_name: str = "",
) -> dict[str, dict[str, Any]]:
    """Record ``blocks [n_blocks, seq_len]`` (token ids) at ``sites``; returns ``{site: {acc_name: acc}}``.

    ``resume_state = (accumulators, batches_done)`` continues an interrupted recording; ``checkpoint(accs,
    batches_done)`` is called every ``checkpoint_every`` batches of this rank.
    """
    rank, world = dist_context()
    sync = _broadcast_range if world > 1 else None
    n_batches = -(-blocks.shape[0] // cfg.batch_size)
    if world > n_batches:
        raise NeurospecError(f"{n_batches} batches cannot be split across {world} ranks: record more tokens")
    mine = _batches_for_rank(n_batches, rank, world)
    if resume_state is not None:
        accs, done = resume_state
        if world > 1:
            for group in accs.values():
                group["stats"].range_sync = sync
    else:
        accs, done = {s.name: make_accumulators(s, cfg, sync, rank) for s in sites}, 0
    model = loaded.model
    body = _forward_body(model)
    device = loaded.device
    handles = []

    def make_hook(site: Site, group: dict[str, Any]):
        width = site.width
        feed = [acc for name, acc in group.items() if name != "routing"]

        def hook(x):
            x = x.detach().reshape(-1, width)
            for acc in feed:
                acc.update(x)

        return hook

    for s in sites:  # a pre-hook on the reading module, or an expert hook for a routed expert (models/experts.py)
        routing = accs[s.name].get("routing")
        handles.extend(observe_site(model, s, make_hook(s, accs[s.name]), routing.update if routing else None))
    per_item = 1 if blocks.is_floating_point() else blocks.shape[1]  # progress counts tokens, or images
    tokens_total = len(mine) * cfg.batch_size * per_item
    if progress is not None:
        progress(task_name, done * cfg.batch_size * per_item, tokens_total)
    try:
        with torch.inference_mode():
            for i, b in enumerate(mine[done:], start=done):
                batch = blocks[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(device)
                if batch.is_floating_point():  # images: [batch, channels, height, width] pixel values
                    body(pixel_values=batch.to(loaded.dtype))
                else:
                    body(input_ids=batch)
                if checkpoint is not None and (i + 1) % checkpoint_every == 0 and i + 1 < len(mine):
                    checkpoint(accs, i + 1)
                if progress is not None:
                    progress(task_name, (i + 1) * cfg.batch_size * per_item, tokens_total)
    finally:
        for h in handles:
            h.remove()
    if world > 1:
        from neurospec.record.distributed import all_reduce_

        for group in accs.values():
            for acc in group.values():
                all_reduce_(acc)
    return accs


def record(
    loaded: LoadedModel,
    tasks: Sequence[Any],
    out: str | Path,
    config: RecordConfig | None = None,
    *,
    force: bool = False,
    progress: ProgressFn | None = None,
    checkpoint_every: int = 16,
) -> dict:
    """Record every task into the run directory ``out``; returns the JSON summary (``run``, ``tasks``, ``sites``).

    ``tasks``: task specs (``"python"``, ``"name=path"``), :class:`~neurospec.data.tasks.TaskSpec` or already built
    :class:`~neurospec.data.tasks.TaskData`. Finished tasks of an existing run with the same model and config are
    not recorded again; an unfinished one resumes from its last checkpoint. A run with a different model or config
    is refused unless ``force`` (which discards it).
    """
    from neurospec.data.images import ImageTaskData, image_task
    from neurospec.data.tasks import TaskData, build_task_data, parse_task_spec

    cfg = config or RecordConfig()
    rank, world = dist_context()
    out = Path(out)
    sites = loaded.sites.select(kinds=cfg.kinds)
    if not sites:
        raise NeurospecError(f"the model has no sites of kinds {cfg.kinds}")
    tasks = [image_task(t) or t if isinstance(t, str) else t for t in tasks]
    names = [t.name if hasattr(t, "name") else parse_task_spec(str(t)).name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskError(f"task(s) named more than once: {', '.join(dupes)}")
    if not tasks:
        raise TaskError("no task given: name at least one (see `neurospec tasks`)")

    manifest = _open_or_create(out, loaded, cfg, sites, force=force, write=rank == 0)
    summary_tasks: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    for t in tasks:
        if isinstance(t, TaskData | ImageTaskData):
            data = t
        else:
            spec = t if not isinstance(t, str) else parse_task_spec(t)
            data = build_task_data(
                spec, loaded.tokenizer, seq_len=cfg.seq_len, collect_tokens=cfg.tokens,
                eval_tokens=cfg.eval_tokens, seed=cfg.seed,
            )
        want_blocks = -(-cfg.tokens // cfg.seq_len)
        if isinstance(data, ImageTaskData):  # an image task records all of its collection images
            want_blocks = data.collect.shape[0]
        if data.collect.shape[0] < want_blocks:
            have = data.collect.shape[0] * cfg.seq_len
            raise TaskError(
                f"task {data.name!r} has only {have} tokens in its collection split (blocks of {cfg.seq_len}); "
                f"{cfg.tokens} were asked for. Lower --tokens (or --seq-len), or give the task more data."
            )
        blocks = data.collect[:want_blocks]
        n_tokens = int(blocks.numel()) if not blocks.is_floating_point() else None
        info = manifest["tasks"].get(data.name)
        if info is not None and info.get("fingerprint") != data.fingerprint and not force:
            raise RunStoreError(
                f"run {out} already has a task {data.name!r} with different data (fingerprint "
                f"{info.get('fingerprint')} vs {data.fingerprint}); use another --out or --force"
            )
        if info is not None and info.get("status") == "done" and info.get("fingerprint") == data.fingerprint:
            summary_tasks[data.name] = info["tokens"]
            nonfinite[data.name] = info.get("nonfinite", 0)
            continue
        partial = out / "partial" / f"{data.name}.rank{rank}.safetensors"
        resume = None
        if partial.exists():
            tensors, meta = store.load_tensors(partial)
            if meta.get("fingerprint") == data.fingerprint and int(meta.get("world", 1)) == world:
                resume = (accumulators_from_tensors(tensors, json.loads(meta["accumulators"])), int(meta["batches_done"]))
        if rank == 0:
            manifest["tasks"][data.name] = {
                "spec": _spec_dict(data), "fingerprint": data.fingerprint, "status": "running",
                "tokens": n_tokens, "blocks": int(blocks.shape[0]), "licence": getattr(data, "licence", None),
            }
            store.atomic_write_json(out / store.MANIFEST, manifest)

        def checkpoint(accs, done, _partial=partial, _fp=data.fingerprint):
            tensors, meta = pack_accumulators(accs)
            store.save_tensors(_partial, tensors, {
                "fingerprint": _fp, "batches_done": str(done), "world": str(world), "accumulators": json.dumps(meta),
            })

        t0 = time.perf_counter()
        accs = record_task(
            loaded, blocks, sites, cfg, resume_state=resume, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, progress=progress, task_name=data.name,
        )
        seconds = time.perf_counter() - t0
        n_bad = int(sum(int(g["stats"].state_dict()["nonfinite"].sum()) for g in accs.values()))
        if n_tokens is None:  # images: every position (patch) of every image counts once
            n_tokens = int(next(iter(accs.values()))["stats"].state_dict()["count"].max())
        if rank == 0:
            tensors, meta = pack_accumulators(accs)
            store.save_tensors(out / "stats" / f"{data.name}.safetensors", tensors,
                               {"accumulators": json.dumps(meta), "fingerprint": data.fingerprint})
            manifest["tasks"][data.name].update(status="done", nonfinite=n_bad, seconds=round(seconds, 3),
                                                tokens=n_tokens)
            store.atomic_write_json(out / store.MANIFEST, manifest)
        partial.unlink(missing_ok=True)
        summary_tasks[data.name] = n_tokens
        nonfinite[data.name] = n_bad
    return {
        "run": str(out),
        "tasks": summary_tasks,
        "sites": [{"name": s.name, "kind": s.kind, "layer": s.layer, "width": s.width} for s in sites],
        "nonfinite": nonfinite,
        "model": manifest["model"]["name"],
    }


def _spec_dict(data) -> dict:
    spec = getattr(data, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        return spec.to_dict()
    return {"name": data.name}


def _open_or_create(out: Path, loaded: LoadedModel, cfg: RecordConfig, sites, *, force: bool, write: bool) -> dict:
    fresh = {
        "schema": store.SCHEMA,
        "neurospec": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": loaded.describe(),
        "config": cfg.to_dict(),
        "sites": [s.to_dict() for s in sites],
        "tasks": {},
    }
    if write:
        store.prepare_run_dir(out)
    if (out / store.MANIFEST).exists():
        old = store.read_manifest(out)
        same = old["model"]["fingerprint"] == loaded.fingerprint and old["config"] == cfg.to_dict()
        if same:
            return old
        if not force:
            what = "model" if old["model"]["fingerprint"] != loaded.fingerprint else "configuration"
            diff = {
                k: (old["config"].get(k), v) for k, v in cfg.to_dict().items() if old["config"].get(k) != v
            }
            raise RunStoreError(
                f"run {out} was recorded with a different {what}"
                + (f" ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())})" if diff else "")
                + "; choose another --out, or pass --force to discard it"
            )
        if write:
            import shutil

            for sub in ("stats", "partial"):
                shutil.rmtree(out / sub, ignore_errors=True)
    if write:
        store.atomic_write_json(out / store.MANIFEST, fresh)
    return fresh
