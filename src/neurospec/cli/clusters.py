"""Clusters of neurons: `neurospec cluster`, `specialization`, `align` and `route`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import (
    Progress,
    Steps,
    check_choice,
    check_int,
    check_model_options,
    check_scorer,
    check_seed,
    check_tasks,
    claim_out,
    emit,
    err,
    handle_errors,
    pickle_kwargs,
    print_estimate,
)

out = Console()

def _threads(n: int) -> int | None:
    return None if n == 0 else n


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


@command("cluster")
@handle_errors
def cluster_cmd(
    model: str = opt.model(opt.MODEL_HELP + "; or a directory of `neurospec zoo train`"),
    out_dir: Path = opt.out("cluster directory to write"),
    method: str = typer.Option("moefication", help="clustering method: {registry:clusterers}"),
    graph: str = typer.Option(None, help="graph the method reads (see --method)"),
    experts: int = typer.Option(96, help="moefication: experts per MLP layer"),
    projection: str = typer.Option(None, help="moefication: up, gate or both; weight graph: up, gate or max"),
    k: int = typer.Option(16, "--k", help="spectral: number of clusters"),
    layers: str = typer.Option(None, help="MLP layers to cluster, e.g. 0-29 or 0,5,10 (default all)"),
    top_k: int = typer.Option(None, "--top-k", help="weight graph: keep each neuron's N strongest edges per "
                                                    "neighbouring layer; 0 keeps every edge (default: every edge up "
                                                    "to 5M edges, e.g. one or two layer pairs of SmolLM2, else 32: "
                                                    "all of SmolLM2 in seconds instead of 1.5 minutes, with the "
                                                    "same n-cut on the dense graph within 1%)"),
    reference: str = typer.Option(None, help="reference run (`neurospec record ... --comoments mlp`) for the "
                                             "correlation/co-activation graphs; with the weight graph it marks dead "
                                             "neurons"),
    task: list[str] = typer.Option([], "--task", "-t", help="reference run task(s) to use (default all)"),
    shuffles: int = typer.Option(0, help="weight graph: clusterability baseline over N shuffled networks"),
    n_init: int = typer.Option(10, "--n-init", help="spectral: k-means restarts"),
    coactivation: str = typer.Option(None, help="moefication by coactivation: relu (default; edge weight "
                                                "E[relu(x_i) relu(x_j)], needs a run recorded with --relu-comoments "
                                                "mlp) or raw (E[x_i x_j] clipped at 0, needs --comoments mlp)"),
    threshold: float = typer.Option(None, help="moefication by coactivation: drop edges whose weight is below this "
                                               "value (default 0, none dropped; the JSON reports edges_kept)"),
    seed: int = opt.seed(),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    allow_pickle: bool = opt.allow_pickle(),
    threads: int = opt.threads(),
    force: bool = opt.force(),
    json_: bool = opt.json_(),
) -> None:
    """Cluster a model's MLP neurons: MoEfication experts or spectral clusters; labels saved in --out."""
    from neurospec.experiments.clusters import ClusterConfig, cluster_to_dir, parse_layers
    from neurospec.models.loading import load_model as load_target

    check_seed(seed)
    check_model_options(device, dtype)
    check_int("--threads", threads, minimum=0)
    cfg = ClusterConfig(method=method, graph=graph, experts=experts, projection=projection, k=k,
                        layers=parse_layers(layers), top_k=top_k, reference=reference, tasks=tuple(task),
                        shuffles=shuffles, n_init=n_init, seed=seed, coactivation=coactivation, threshold=threshold)
    claim_out(out_dir, "cluster", force)
    t0 = time.perf_counter()
    target = load_target(model, device=device, dtype=dtype, **pickle_kwargs(load_target, allow_pickle))
    with Steps() as steps:
        res = cluster_to_dir(target, cfg, out_dir, step=steps, threads=_threads(threads))
    res["seconds_total"] = round(time.perf_counter() - t0, 3)

    def human():
        t = Table(title=f"{res['method']} ({res['graph']}) of {res['model']}")
        for c in ("clusters", "n-cut", "sites", "neurons", "excluded", "seconds"):
            t.add_column(c, justify="right")
        t.add_row(str(res["n_clusters"]), _fmt(res["ncut"]), str(res["n_sites"]), str(res["n_neurons"]),
                  str(res["n_excluded"]), f"{res['seconds']:.1f}")
        out.print(t)
        cb = res["clusterability"]
        if cb:
            out.print(f"clusterability: n-cut {cb['ncut']:.4f} vs shuffled {cb['mean']:.4f} ± {cb['std']:.4f} "
                      f"(z {cb['z']:.2f}, p {cb['pvalue']:.3f})")
        out.print(f"labels: {res['labels_file']}")

    emit(res, json_, human)


@command("specialization")
@handle_errors
def specialization_cmd(
    cluster_dir: Path = typer.Argument(..., help="a directory written by `neurospec cluster`"),
    task: list[str] = typer.Option([], "--task", "-t", help="task (repeat); zoo models: digit-0 ... digit-9 or all "
                                                            "(default: all and every class)"),
    n_random: int = typer.Option(19, "--n-random", help="random same-size sets per cluster"),
    ablation: str = typer.Option("zero", help="how a cluster is ablated: {registry:specialization_ablations}"),
    per_layer: int = typer.Option(2, "--per-layer", help="test the N largest clusters of each layer"),
    all_clusters: bool = typer.Option(False, "--all", help="test every cluster of size >= 2 (slow on big models)"),
    layers: str = typer.Option(None, help="layers to test, e.g. 0,15,29, or all (default: 4 evenly spaced "
                                          "clustered layers, first and last included; each tested cluster costs "
                                          "1 + --n-random evaluations)"),
    tokens: int = opt.tokens("selectivity, mean offsets"),
    eval_tokens: int = opt.eval_tokens("and ablation"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    score: str = typer.Option("abs", help="selectivity score for task coherence: {registry:scorers}"),
    reference: str = typer.Option(None, help="run with MLP co-moments for correlation coherence (default: the "
                                             "cluster directory's reference, if any)"),
    n_random_coherence: int = typer.Option(999, "--n-random-coherence"),
    seed: int = opt.seed(),
    threads: int = opt.threads(),
    json_: bool = opt.json_(),
) -> None:
    """Importance (ablation vs random same-size sets) and coherence of each cluster, with p-values."""
    from neurospec.evaluate.site_ablation import ABLATIONS as SPECIALIZATION_ABLATIONS
    from neurospec.experiments.clusters import parse_layers
    from neurospec.experiments.specialization import (
        SPECIALIZATION_FILE,
        SpecializationConfig,
        specialization,
        spread_layers,
    )

    check_seed(seed)
    check_scorer(score)
    check_choice("--ablation", ablation, SPECIALIZATION_ABLATIONS)
    check_int("--threads", threads, minimum=0)
    check_tasks([t for t in task if t != "all"])
    if layers is None:
        chosen = spread_layers(cluster_dir)
    else:
        chosen = None if layers.strip() == "all" else parse_layers(layers)
    cfg = SpecializationConfig(tasks=tuple(task), n_random=n_random, ablation=ablation,
                               per_layer=None if all_clusters else per_layer, layers=chosen,
                               tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size,
                               score=score, n_random_coherence=n_random_coherence, reference=reference, seed=seed)
    def estimate(seconds: float, evaluations: int) -> None:
        print_estimate("specialization", seconds,
                       f"{evaluations:,} ablations of {eval_tokens:,} tokens per task, mostly forward passes from the "
                       f"ablated layer on; fewer with --layers, --per-layer or --eval-tokens")

    with Progress() as progress, Steps() as steps:
        res = specialization(cluster_dir, cfg, progress=progress, step=steps, estimate=estimate,
                             threads=_threads(threads))
    payload = {
        "tasks": res["tasks"],
        "metric": res["metric"],
        "n_units": len(res["rows"]),
        "importance": {t: {"fisher_p": v["fisher"]["pvalue"], "n_significant": v["n_significant"],
                           "n_units": v["n_units"]} for t, v in res["importance"].items()},
        "coherence_correlation": None if res["coherence_correlation"] is None else {
            "fisher_p": res["coherence_correlation"]["fisher"]["pvalue"],
            "n_significant": res["coherence_correlation"]["n_significant"]},
        "coherence_task": None if res["coherence_task"] is None else {
            "fisher_p": res["coherence_task"]["fisher"]["pvalue"],
            "n_significant": res["coherence_task"]["n_significant"]},
        "results_file": str(Path(cluster_dir) / SPECIALIZATION_FILE),
        "notes": res["notes"],
        "seconds": res["seconds"],
    }

    def human():
        t = Table(title=f"cluster importance ({res['metric']}) and coherence, {len(res['rows'])} units")
        t.add_column("site")
        t.add_column("cluster", justify="right")
        t.add_column("size", justify="right")
        for name in res["tasks"]:
            t.add_column(f"{name} effect / p", justify="right")
        t.add_column("corr coh. p", justify="right")
        t.add_column("task coh. p (top)", justify="right")
        for r in res["rows"]:
            imp = [f"{r['importance'][n]['effect']:+.4f} / {r['importance'][n]['pvalue']:.2f}" for n in res["tasks"]]
            cc = r["coherence_correlation"]
            ct = r["coherence_task"]
            t.add_row(r["site"], str(r["cluster"]), str(r["size"]), *imp, "-" if cc is None else f"{cc['pvalue']:.3f}",
                      "-" if ct is None else f"{ct['pvalue']:.3f} ({ct['top_task']})")
        out.print(t)
        for name, v in payload["importance"].items():
            out.print(f"{name}: Fisher p {v['fisher_p']:.3g}, {v['n_significant']}/{v['n_units']} units p <= 0.05")
        for note in res["notes"]:
            err.print(f"[yellow]note:[/] {note}")
        out.print(f"results: {payload['results_file']}")

    emit(payload, json_, human)


@command("align")
@handle_errors
def align_cmd(
    cluster_dir: Path = typer.Argument(..., help="a directory written by `neurospec cluster`"),
    taskmap_dir: Path = typer.Argument(..., help="a directory written by `neurospec taskmap` on the same model"),
    n_perm: int = typer.Option(1000, "--n-perm", help="random same-size sets per task and layer"),
    frac: float = typer.Option(None, help="fraction of neurons per task (default: the task map's --select-frac)"),
    seed: int = opt.seed(),
    json_: bool = opt.json_(),
) -> None:
    """Are each task's specific neurons concentrated in fewer clusters than chance? Per layer, with p-values."""
    from neurospec.experiments.clusters import ALIGNMENT_FILE, AlignConfig, align

    check_seed(seed)
    check_int("--n-perm", n_perm)
    res = align(cluster_dir, taskmap_dir, AlignConfig(n_perm=n_perm, frac=frac, seed=seed))
    keys = ("task", "site", "layer", "n_task", "n_clusters_hit", "null_clusters_hit_mean", "entropy",
            "null_entropy_mean", "entropy_deficit", "pvalue_clusters", "pvalue_entropy")
    payload = {
        "tasks": res["tasks"],
        "frac": res["frac"],
        "per_task": res["per_task"],
        "layers": [{k: r.get(k) for k in keys} for r in res["rows"]],
        "results_file": str(Path(cluster_dir) / ALIGNMENT_FILE),
    }

    def human():
        t = Table(title=f"task neurons vs {res['method']} clusters (entropy over clusters; lower = concentrated)")
        for c in ("task", "layer", "task neurons", "clusters hit (null)", "entropy deficit", "p"):
            t.add_column(c, justify="right")
        for r in res["rows"]:
            if "pvalue_entropy" not in r:
                continue
            t.add_row(r["task"], str(r["layer"]), str(r["n_task"]),
                      f"{r['n_clusters_hit']} ({r['null_clusters_hit_mean']:.1f})", f"{r['entropy_deficit']:+.3f}",
                      f"{r['pvalue_entropy']:.3f}")
        out.print(t)
        for task_name, v in res["per_task"].items():
            f = v["fisher"]
            out.print(f"{task_name}: layers with p <= {res['alpha']}: {v['layers_significant']}; Fisher p "
                      f"{_fmt(None if f is None else f['pvalue'], '.3g')}")

    emit(payload, json_, human)


@command("route")
@handle_errors
def route_cmd(
    cluster_dir: Path = typer.Argument(..., help="a MoEfication directory written by `neurospec cluster`"),
    task: list[str] = typer.Option([], "--task", "-t", help="task (repeat); zoo models: all or digit-C"),
    ks: str = typer.Option("1,4,8,16,32,48,96", "--k", help="experts kept per token, comma-separated"),
    eval_tokens: int = opt.eval_tokens("and k"),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    score: str = typer.Option("sum", help="expert score: sum (as published) or abs"),
    threads: int = opt.threads(),
    json_: bool = opt.json_(),
) -> None:
    """MoE routing: keep each token's top-k experts in every MLP; loss and top-1 against k."""
    from neurospec.errors import NeurospecError
    from neurospec.experiments.routing import ROUTING_FILE, RoutingConfig, routing

    try:
        k_list = [int(x) for x in ks.split(",") if x.strip()]
    except ValueError:
        raise NeurospecError(f"--k must be comma-separated integers, got {ks!r}") from None
    check_tasks([t for t in task if t != "all"])
    check_int("--threads", threads, minimum=0)
    cfg = RoutingConfig(tasks=tuple(task), ks=tuple(k_list), eval_tokens=eval_tokens, seq_len=seq_len,
                        batch_size=batch_size, score=score, threads=_threads(threads))
    res = routing(cluster_dir, cfg=cfg)
    payload = {"n_experts": res["n_experts"], "tasks": res["tasks"], "baseline": res["baseline"],
               "rows": res["rows"], "results_file": str(Path(cluster_dir) / ROUTING_FILE)}

    def human():
        t = Table(title=f"top-k routing over {res['n_experts']} experts per MLP")
        t.add_column("k", justify="right")
        for name in res["tasks"]:
            t.add_column(f"{name} top1", justify="right")
            if "loss" in res["baseline"][name]:
                t.add_column(f"{name} loss", justify="right")
        for r in [*res["rows"], {"k": "all (unrouted)", "metrics": res["baseline"]}]:
            cells = []
            for name in res["tasks"]:
                m = r["metrics"][name]
                cells.append(f"{m['top1']:.4f}")
                if "loss" in m:
                    cells.append(f"{m['loss']:.3f}")
            t.add_row(str(r["k"]), *cells)
        out.print(t)

    emit(payload, json_, human)
