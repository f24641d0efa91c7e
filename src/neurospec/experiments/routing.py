"""MoE routing of a MoEfication clustering (METHODS.md section 6): every clustered MLP keeps each token's top-k experts
and zeroes the rest, for each k, and the model's metrics are measured (:func:`routing`). Its settings are a
:class:`RoutingConfig`, checked when it is made."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neurospec.cluster.moefication import ROUTING_SCORES, install_routing
from neurospec.cluster.result import load_clustering
from neurospec.data.build import build_tasks
from neurospec.errors import NeurospecError, RunStoreError
from neurospec.evaluate.site_ablation import ImageEvaluator, LMEvaluator
from neurospec.experiments._settings import UNSET, config_from
from neurospec.models.loading import LoadedModel, load_model
from neurospec.record import layout
from neurospec.record.recorder import RecordConfig
from neurospec.record.store import atomic_write_json
from neurospec.runtime import limited_threads

ROUTING_FILE = layout.ROUTING


DEFAULT_KS = (1, 4, 8, 16, 32, 48, 96)


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < minimum:
        raise NeurospecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


def _task_names(tasks: Sequence[Any]) -> list[str]:
    return [t if isinstance(t, str) else str(t.name) for t in tasks]


@dataclass(frozen=True)
class RoutingConfig:
    """Settings of :func:`routing`. ``tasks``: task specs, as strings or parsed (zoo models: ``all`` or ``digit-C``;
    none = all; :meth:`to_dict` records their names);
    ``ks``: experts kept per token (each at most the number of experts, checked against the clustering);
    ``threads``: torch/BLAS threads while it runs (``None``: unchanged)."""

    tasks: tuple[str, ...] = ()
    ks: tuple[int, ...] = DEFAULT_KS
    eval_tokens: int = 1024
    seq_len: int = 128
    batch_size: int = 8
    score: str = "sum"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not all((isinstance(t, str) and t) or hasattr(t, "name")
                                                  for t in self.tasks):
            raise NeurospecError(f"tasks must be a sequence of task names or specs (e.g. ('python',)), got "
                                 f"{self.tasks!r}")
        names = _task_names(self.tasks)
        if len(set(names)) != len(names):
            raise NeurospecError(f"tasks names a task twice: {names}")
        if isinstance(self.ks, (str, int)):
            raise NeurospecError(f"ks must be a sequence of integers >= 1 (experts kept per token), got {self.ks!r}")
        ks = tuple(sorted({_int("each k", k, 1) for k in self.ks}))
        if not ks:
            raise NeurospecError("ks is empty; give at least one number of experts to keep per token")
        for name in ("eval_tokens", "seq_len", "batch_size"):
            object.__setattr__(self, name, _int(name, getattr(self, name), 1))
        if self.score not in ROUTING_SCORES:
            raise NeurospecError(f"score must be one of {', '.join(ROUTING_SCORES)}, got {self.score!r}")
        if self.threads is not None:
            object.__setattr__(self, "threads", _int("threads (or None: leave them as they are)", self.threads, 1))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "ks", ks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"], d["ks"] = _task_names(self.tasks), list(self.ks)
        return {"type": "RoutingConfig", "version": 1, **d}


def routing(cluster_dir: str | Path, tasks: Sequence[str] = UNSET, ks: Sequence[int] = UNSET,
            cfg: RoutingConfig | None = None, *, target: LoadedModel | None = None, eval_tokens: int = UNSET,
            seq_len: int = UNSET, batch_size: int = UNSET, score: str = UNSET, threads: int | None = UNSET) -> dict:
    """MoE routing of a MoEfication clustering: every MLP keeps each token's top-k experts (by the summed
    activations of their neurons, :func:`neurospec.cluster.moefication.route_topk`) and zeroes the rest, for each k.

    ``cfg``: the settings (:class:`RoutingConfig`); or give them as arguments (``tasks``, ``ks``, ``eval_tokens``,
    ``seq_len``, ``batch_size``, ``score``, ``threads``), which make the config, not both.
    Metrics: next-token loss and top-1 on each task's evaluation blocks (language models), top-1 accuracy overall
    and per class (zoo models). With SiLU/GELU MLPs much more is lost than with ReLU ones (the known limit).
    Writes ``routing.json`` (:data:`neurospec.record.layout.ROUTING`, with the config) in ``cluster_dir`` and
    returns it.
    """
    cfg = config_from(RoutingConfig, cfg, {"tasks": tasks, "ks": ks, "eval_tokens": eval_tokens, "seq_len": seq_len,
                                           "batch_size": batch_size, "score": score, "threads": threads}, "routing")
    with limited_threads(cfg.threads):
        return _routing(Path(cluster_dir), cfg, target)


def _routing(cluster_dir: Path, cfg: RoutingConfig, target: LoadedModel | None) -> dict:
    tasks, ks, batch_size, score = list(cfg.tasks), list(cfg.ks), cfg.batch_size, cfg.score
    cl = load_clustering(cluster_dir)
    if cl.method != "moefication":
        raise NeurospecError(f"routing needs MoE experts (a moefication clustering); {cluster_dir} holds "
                             f"{cl.method} clusters")
    target = target or load_model(cl.model_spec)
    if target.fingerprint != cl.fingerprint:
        raise RunStoreError(f"{cluster_dir} was clustered on another model than {target.name}")
    n_experts = min(int(v.max()) + 1 for v in cl.labels.values())
    if any(not 1 <= int(k) <= n_experts for k in ks):
        raise NeurospecError(f"each k must be between 1 and the number of experts {n_experts}, got {list(ks)}")
    ev: Any
    if target.analysis_kind == "image":
        try:
            ev = ImageEvaluator(target, tasks or ["all"])
        except ValueError as e:
            raise NeurospecError(str(e)) from None
    else:
        if not tasks:
            raise NeurospecError("name at least one task (--task python); see `neurospec tasks`")
        if target.analysis_kind != "causal-lm":
            raise NeurospecError(f"routing is measured by next-token loss: {target.name} is not a causal LM")
        rcfg = RecordConfig(tokens=cfg.seq_len, eval_tokens=cfg.eval_tokens, seq_len=cfg.seq_len,
                            batch_size=batch_size)
        data = build_tasks(target, tasks, rcfg)
        ev = LMEvaluator(target, {t: d.eval for t, d in data.items()}, batch_size=batch_size,
                         prefix_cache=False)
    rows = []
    for k in sorted({int(k) for k in ks}):
        with ExitStack() as stack:
            for site, lab in cl.labels.items():
                stack.enter_context(install_routing(target, site, lab, k, score=score))
            rows.append({"k": k, "fraction": k / n_experts, "metrics": ev.measure()})
    result = {"cluster_dir": str(cluster_dir), "n_experts": n_experts, "score": score, "tasks": list(ev.tasks),
              "baseline": ev.baseline, "rows": rows, "config": cfg.to_dict()}
    atomic_write_json(cluster_dir / ROUTING_FILE, result)
    return result
