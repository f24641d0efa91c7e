"""MoE routing of a MoEfication clustering (METHODS.md section 6): every clustered MLP keeps each token's top-k experts
and zeroes the rest, for each k, and the model's metrics are measured (:func:`routing`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from neurospec.cluster.moefication import install_routing
from neurospec.cluster.result import load_clustering
from neurospec.data.build import build_tasks
from neurospec.errors import NeurospecError, RunStoreError
from neurospec.evaluate.site_ablation import ImageEvaluator, LMEvaluator
from neurospec.models.loading import LoadedModel, load_model
from neurospec.record import layout
from neurospec.record.recorder import RecordConfig
from neurospec.record.store import atomic_write_json
from neurospec.runtime import limited_threads

ROUTING_FILE = layout.ROUTING


def routing(cluster_dir: str | Path, tasks: Sequence[str], ks: Sequence[int], *, target: LoadedModel | None = None,
            eval_tokens: int = 1024, seq_len: int = 128, batch_size: int = 8, score: str = "sum",
            threads: int | None = 1) -> dict:
    """MoE routing of a MoEfication clustering: every MLP keeps each token's top-k experts (by the summed
    activations of their neurons, :func:`neurospec.cluster.moefication.route_topk`) and zeroes the rest, for each k.

    Metrics: next-token loss and top-1 on each task's evaluation blocks (language models), top-1 accuracy overall
    and per class (zoo models). With SiLU/GELU MLPs much more is lost than with ReLU ones (the known limit).
    Writes ``routing.json`` (:data:`neurospec.record.layout.ROUTING`) in ``cluster_dir`` and returns it.
    """

    with limited_threads(threads):
        return _routing(Path(cluster_dir), list(tasks), list(ks), target, eval_tokens, seq_len, batch_size, score)


def _routing(cluster_dir: Path, tasks: list[str], ks: list[int], target: LoadedModel | None, eval_tokens: int,
             seq_len: int, batch_size: int, score: str) -> dict:
    cl = load_clustering(cluster_dir)
    if cl.method != "moefication":
        raise NeurospecError(f"routing needs MoE experts (a moefication clustering); {cluster_dir} holds "
                             f"{cl.method} clusters")
    target = target or load_model(cl.model_spec)
    if target.fingerprint != cl.fingerprint:
        raise RunStoreError(f"{cluster_dir} was clustered on another model than {target.name}")
    n_experts = min(int(v.max()) + 1 for v in cl.labels.values())
    if not ks or any(not 1 <= int(k) <= n_experts for k in ks):
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
        rcfg = RecordConfig(tokens=seq_len, eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size)
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
              "baseline": ev.baseline, "rows": rows}
    atomic_write_json(cluster_dir / ROUTING_FILE, result)
    return result
