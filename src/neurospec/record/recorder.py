"""Stream tasks through a model and accumulate per-neuron statistics at every site.

Recording is a forward pre-hook on each site's linear module: the hook sees the module's input ``[batch, seq,
width]`` and feeds it, flattened to ``[tokens, width]``, to that site's accumulators. Blocks are packed with no
padding, so every position of every block counts once.

Interruption: the accumulator states of an unfinished task are checkpointed every ``checkpoint_every`` batches
(atomic writes); running the same recording again resumes after the last checkpoint and gives the same result as an
uninterrupted run. Scale-out: under ``torchrun`` batch ``b`` goes to rank ``b % world_size``; histogram ranges are
taken from global batch 0 and broadcast from rank 0, and the accumulators are all-reduced before rank 0 writes.
Checks that can fail on one rank only are agreed on before any collective that could wait on it
(:func:`neurospec.record.distributed.together`), so all ranks stop with the same message.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from neurospec import __version__
from neurospec.data.build import task_data
from neurospec.data.images import ImageTaskData, image_task
from neurospec.data.tasks import check_task_names, parse_task_spec
from neurospec.errors import NeurospecError, RunStoreError, TaskError
from neurospec.models.experts import observe_site
from neurospec.models.loading import FINGERPRINT_VERSION, LoadedModel
from neurospec.models.sites import SITE_KINDS, Site
from neurospec.record import store
from neurospec.record.accumulators import CoMoments, NeuronStats, Reservoir
from neurospec.record.coactivation import ReluCoMoments
from neurospec.record.distributed import all_reduce_, broadcast_object, check_same, gather_objects, together
from neurospec.record.histogram import check_bins
from neurospec.record.routing import ExpertRouting
from neurospec.record.states import accumulators_from_tensors

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
        check_bins(self.hist_bins)
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


@dataclass(frozen=True)
class Intervention:
    """An intervention active on the model while a run is recorded (e.g. the neurons pruned so far by iterative
    pruning). It is part of the run's identity, like the model fingerprint and the config: the model's weights
    fingerprint is taken when it is loaded, so without this two recordings under different pruned sets would look
    like the same run. ``digest`` covers the neuron ids and, where given, the values they are set to."""

    method: str
    neurons: int
    digest: str

    @classmethod
    def ablation(cls, neurons: Any, method: str, values: Mapping[str, torch.Tensor] | None = None) -> Intervention:
        """``neurons`` (a :class:`~neurospec.intervene.neuronset.NeuronSet`) ablated by ``method``; ``values``:
        per-site replacement values (e.g. retain means), of which the pruned neurons' entries are hashed."""
        h = hashlib.sha256(method.encode() + b"\0")
        ids = neurons.to_ids()
        h.update("\n".join(ids).encode() + b"\0")
        for site in neurons.site_names:
            idx = neurons.indices(site)
            if values is not None and site in values and len(idx):
                h.update(site.encode())
                h.update(values[site].detach().reshape(-1)[idx].to("cpu", torch.float64).contiguous().numpy().tobytes())
        return cls(method, len(ids), h.hexdigest()[:16])

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.method} ablation of {self.neurons} neurons (digest {self.digest})"


def _describe_intervention(d: Mapping | None) -> str:
    if not d:
        return "none"
    return f"{d.get('method')} ablation of {d.get('neurons')} neurons (digest {d.get('digest')})"


# ----------------------------------------------------------------------------------------------- accumulators


def make_accumulators(site: Site, cfg: RecordConfig, rank: int = 0) -> dict[str, Any]:
    """Fresh accumulators of one site. The reservoir's seed depends on the site and the rank, so the parts recorded
    by different ranks are independent samples (their merge is a uniform sample of all tokens, though not the same
    sample a single process would draw)."""
    accs: dict[str, Any] = {
        "stats": NeuronStats(
            site.width, hist_bins=cfg.hist_bins, hist_sample_every=cfg.hist_sample_every
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
    """Flatten ``{site: {acc_name: accumulator}}`` into safetensors tensors plus JSON metadata.

    The tensors are the accumulators' live states (:meth:`~neurospec.record.base.Accumulator.state_view`), not
    copies: write them before the accumulators change again (a copy would double the memory of the state, which
    with the default reservoir is several times the model's activations)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for site, group in accs.items():
        for name, acc in group.items():
            for k, v in acc.state_view().items():
                tensors[f"{site}/{name}/{k}"] = v
            meta[f"{site}/{name}"] = acc.meta() if hasattr(acc, "meta") else {}
    return tensors, meta


# ----------------------------------------------------------------------------------------------- distributed


def dist_context() -> tuple[int, int]:
    """``(rank, world_size)``: from an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _checkpoints_beyond(out: Path, name: str, world: int) -> list[Path]:
    """Checkpoint files of task ``name`` written by ranks ``>= world``."""
    pattern = re.compile(rf"{re.escape(name)}\.rank(\d+)\.safetensors")
    found = [(pattern.fullmatch(p.name), p) for p in (out / "partial").glob(f"{glob.escape(name)}.rank*")]
    return [p for m, p in found if m is not None and int(m.group(1)) >= world]


def _resume_plan(
    name: str, out: Path, mine: dict | None, fingerprint: str, rank: int, world: int, force: bool
) -> bool:
    """Whether every rank resumes task ``name`` from its checkpoint (the same answer on every rank).

    ``mine``: this rank's checkpoint (``fingerprint``, ``world``, ``rank``, ``batches_done``) or None. Ranks resume
    together or not at all: checkpoints of other task data are ignored; if some ranks lack one (an interruption
    between two ranks' checkpoints), the task is recorded again from its start. Checkpoints written under another
    number of ranks cover other batches: refused, unless ``force`` (then recorded again).
    """
    infos = gather_objects(mine)
    valid = [i if i is not None and i.get("fingerprint") == fingerprint else None for i in infos]
    other = sorted({i["world"] for i in valid if i is not None and i["world"] != world})
    if other and not force:
        was = " or ".join(map(str, other))
        raise RunStoreError(
            f"task {name!r} of run {out} was interrupted while recorded by {was} process(es), and its checkpoints "
            f"cover other batches than {world} process(es) record: run again with {was} process(es) "
            "(torchrun --nproc_per_node N), or pass --force to record the task again from its start"
        )
    usable = [i is not None and i["world"] == world and i.get("rank", r) == r for r, i in enumerate(valid)]
    if any(usable) and not all(usable) and rank == 0:
        warnings.warn(
            f"task {name!r}: some ranks have no checkpoint of the interrupted recording; recording it again from "
            "its start", stacklevel=3,
        )
    return all(usable)


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
    n_batches = -(-blocks.shape[0] // cfg.batch_size)
    if world > n_batches:
        raise NeurospecError(f"{n_batches} batches cannot be split across {world} ranks: record more tokens")
    mine = _batches_for_rank(n_batches, rank, world)
    if resume_state is not None:
        accs, done = resume_state
    else:
        accs, done = {s.name: make_accumulators(s, cfg, rank) for s in sites}, 0
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
    intervention: Intervention | None = None,
) -> dict:
    """Record every task into the run directory ``out``; returns the JSON summary (``run``, ``tasks``, ``sites``).

    ``tasks``: task specs (``"python"``, ``"name=path"``), :class:`~neurospec.data.tasks.TaskSpec` or already built
    :class:`~neurospec.data.tasks.TaskData`. Finished tasks of an existing run with the same model, config and
    intervention are not recorded again; an unfinished one resumes from its last checkpoint (a damaged checkpoint
    is discarded with a warning and the task recorded from its start). A run with a different model, config or
    intervention is refused unless ``force``, which discards it; ``force`` also starts over a run whose manifest is
    damaged and records again a finished task whose statistics file is damaged.

    ``intervention``: what is done to the model while recording (:class:`Intervention`), stored in the manifest.

    The run directory is locked for the whole call: a second process recording into it gets a
    :class:`~neurospec.errors.RunStoreError` at once (see :func:`neurospec.record.store.run_lock`).
    """
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
    check_task_names(names)

    # Under torchrun, checks that can fail on one rank only run under together(): then every rank stops alike.
    check_same("models", loaded.fingerprint, "every rank must load the same model")
    check_same("record configurations", cfg.to_dict(), "every rank must be given the same configuration", width=0)
    check_same("interventions", intervention.to_dict() if intervention is not None else None,
               "every rank must record under the same intervention", width=0)
    with ExitStack() as stack:
        with together():  # only rank 0 writes and locks the run (a bad --out or a held lock fails there)
            if rank == 0:
                store.prepare_run_dir(out, force=force)
                stack.enter_context(store.run_lock(out))
        return _record_tasks(loaded, tasks, names, out, cfg, sites, force, progress, checkpoint_every,
                             intervention)


def _record_tasks(loaded, tasks, names, out, cfg, sites, force, progress, checkpoint_every, intervention) -> dict:
    rank, world = dist_context()
    with together():
        manifest = _open_or_create(out, loaded, cfg, sites, force=force, write=True,
                                   intervention=intervention) if rank == 0 else None
    manifest = broadcast_object(manifest)  # every rank decides from rank 0's view of the run
    summary_tasks: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    for t, task_name in zip(tasks, names, strict=True):
        with together():
            data = task_data(t, loaded.tokenizer, seq_len=cfg.seq_len, collect_tokens=cfg.tokens,
                             eval_tokens=cfg.eval_tokens, seed=cfg.seed)
            want_blocks = -(-cfg.tokens // cfg.seq_len)
            if isinstance(data, ImageTaskData):  # an image task records all of its collection images
                want_blocks = data.collect.shape[0]
            if data.collect.shape[0] < want_blocks:
                have = data.collect.shape[0] * cfg.seq_len
                raise TaskError(
                    f"task {data.name!r} has only {have} tokens in its collection split (blocks of {cfg.seq_len}); "
                    f"{cfg.tokens} were asked for. Lower --tokens (or --seq-len), or give the task more data."
                )
        check_same(f"data for task {task_name!r} (fingerprints)", data.fingerprint,
                   "every rank must read the same task data")
        blocks = data.collect[:want_blocks]
        n_tokens = int(blocks.numel()) if not blocks.is_floating_point() else None
        info = manifest["tasks"].get(data.name)
        if info is not None and info.get("fingerprint") != data.fingerprint and not force:
            raise RunStoreError(
                f"run {out} already has a task {data.name!r} with different data (fingerprint "
                f"{info.get('fingerprint')} vs {data.fingerprint}); use another --out or --force"
            )
        if info is not None and info.get("status") == "done" and info.get("fingerprint") == data.fingerprint:
            stats_file = out / "stats" / f"{data.name}.safetensors"
            with together():  # rank 0 checks the finished task's file; every rank follows its answer
                problem = store.check_tensors(stats_file) if rank == 0 else None
                if problem is not None and not force:
                    raise RunStoreError(
                        f"run file {stats_file} of the finished task {data.name!r} is damaged ({problem}); run the "
                        "same command with --force to record that task again"
                    )
            problem = broadcast_object(problem)
            if problem is None:
                summary_tasks[data.name] = info["tokens"]
                nonfinite[data.name] = info.get("nonfinite", 0)
                continue
            if rank == 0:
                warnings.warn(f"recording task {data.name!r} again: its run file {stats_file} is damaged "
                              f"({problem})", stacklevel=3)
        partial = out / "partial" / f"{data.name}.rank{rank}.safetensors"
        with together():
            mine, tensors, meta = _read_checkpoint(partial, rank)
            if rank == 0:
                manifest["tasks"][data.name] = {
                    "spec": _spec_dict(data), "fingerprint": data.fingerprint, "status": "running",
                    "tokens": n_tokens, "blocks": int(blocks.shape[0]), "licence": getattr(data, "licence", None),
                    "environment": _environment(loaded, world),
                }
                store.atomic_write_json(out / store.MANIFEST, manifest)
        resume = None
        if _resume_plan(data.name, out, mine, data.fingerprint, rank, world, force):
            resume = (accumulators_from_tensors(tensors, json.loads(meta["accumulators"])), mine["batches_done"])
        elif mine is not None:
            partial.unlink(missing_ok=True)

        def checkpoint(accs, done, _partial=partial, _fp=data.fingerprint):
            tensors, meta = pack_accumulators(accs)
            store.save_tensors(_partial, tensors, {
                "fingerprint": _fp, "batches_done": str(done), "world": str(world), "rank": str(rank),
                "accumulators": json.dumps(meta),
            })

        t0 = time.perf_counter()
        accs = record_task(
            loaded, blocks, sites, cfg, resume_state=resume, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, progress=progress, task_name=data.name,
        )
        seconds = time.perf_counter() - t0
        n_bad = int(sum(int(g["stats"].state_view()["nonfinite"].sum()) for g in accs.values()))
        if n_tokens is None:  # images: every position (patch) of every image counts once
            n_tokens = int(next(iter(accs.values()))["stats"].state_view()["count"].max())
        with together():  # every rank keeps its checkpoint until rank 0 has written the task's result
            if rank == 0:
                tensors, meta = pack_accumulators(accs)
                store.save_tensors(out / "stats" / f"{data.name}.safetensors", tensors,
                                   {"accumulators": json.dumps(meta), "fingerprint": data.fingerprint})
                manifest["tasks"][data.name].update(status="done", nonfinite=n_bad, seconds=round(seconds, 3),
                                                    tokens=n_tokens)
                store.atomic_write_json(out / store.MANIFEST, manifest)
                for old in _checkpoints_beyond(out, data.name, world):  # left by a run with more ranks
                    old.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        summary_tasks[data.name] = n_tokens
        nonfinite[data.name] = n_bad
        # The task's accumulators (with the default reservoir, several times the model's activations) and data are
        # written: let them go before the next task builds its own.
        del accs, resume, data, blocks
        tensors = meta = None
    return {
        "run": str(out),
        "tasks": summary_tasks,
        "sites": [{"name": s.name, "kind": s.kind, "layer": s.layer, "width": s.width} for s in sites],
        "nonfinite": nonfinite,
        "model": manifest["model"]["name"],
    }


def _read_checkpoint(partial: Path, rank: int) -> tuple[dict | None, dict | None, dict | None]:
    """This rank's checkpoint of an interrupted task: ``(info, tensors, meta)`` with ``info`` = fingerprint, world,
    rank and batches done, or ``(None, None, None)`` when there is none. A damaged checkpoint is deleted with a
    warning: the task is then recorded from its start, which gives the same result."""
    if not partial.exists():
        return None, None, None
    try:
        tensors, meta = store.load_tensors(partial)
        info = {"fingerprint": meta.get("fingerprint"), "world": int(meta.get("world", 1)),
                "rank": int(meta.get("rank", rank)), "batches_done": int(meta["batches_done"])}
        json.loads(meta["accumulators"])
        return info, tensors, meta
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # RunStoreError is a ValueError
        warnings.warn(f"discarding the damaged checkpoint {partial} ({e}); its task is recorded from the start",
                      stacklevel=4)
        partial.unlink(missing_ok=True)
        return None, None, None


def _environment(loaded: LoadedModel, world: int) -> dict:
    """Where a recording ran: it does not enter the run's identity (a run may be resumed elsewhere), but explains
    small numerical differences between runs."""
    import platform

    import transformers

    devices = sorted({str(p.device) for p in loaded.model.parameters()})
    return {
        "world_size": world,
        "device": ",".join(devices),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _spec_dict(data) -> dict:
    spec = getattr(data, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        return spec.to_dict()
    return {"name": data.name}


def _open_or_create(out: Path, loaded: LoadedModel, cfg: RecordConfig, sites, *, force: bool, write: bool,
                    intervention: Intervention | None = None) -> dict:
    iv = intervention.to_dict() if intervention is not None else None
    fresh = {
        "schema": store.SCHEMA,
        "neurospec": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": loaded.describe(),
        "config": cfg.to_dict(),
        "intervention": iv,
        "environment": _environment(loaded, dist_context()[1]),
        "sites": [s.to_dict() for s in sites],
        "tasks": {},
    }
    if (out / store.MANIFEST).exists():
        try:
            old = store.read_manifest(out)
        except RunStoreError:
            if not force:
                raise
            warnings.warn(f"discarding the damaged run in {out} (--force)", stacklevel=4)
            old = None
        if old is not None:
            same_model = old["model"]["fingerprint"] == loaded.fingerprint
            same_iv = old.get("intervention") == iv
            if same_model and old["config"] == cfg.to_dict() and same_iv:
                return old
            if not force:
                what = "model" if not same_model else "intervention" if not same_iv else "configuration"
                if not same_model and old["model"].get("fingerprint_version", 1) != FINGERPRINT_VERSION:
                    what = "model fingerprint (an older neurospec computed it from a sample of the weights)"
                diff = {
                    k: (old["config"].get(k), v) for k, v in cfg.to_dict().items() if old["config"].get(k) != v
                }
                if not same_iv:
                    diff["intervention"] = (_describe_intervention(old.get("intervention")),
                                            _describe_intervention(iv))
                raise RunStoreError(
                    f"run {out} was recorded with a different {what}"
                    + (f" ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())})" if diff else "")
                    + "; choose another --out, or pass --force to discard it"
                )
    if write:  # a fresh run: nothing recorded under another (or an unknown) identity may be reused
        import shutil

        for sub in ("stats", "partial"):
            shutil.rmtree(out / sub, ignore_errors=True)
        store.atomic_write_json(out / store.MANIFEST, fresh)
    return fresh
