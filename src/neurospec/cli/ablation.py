"""Evaluate a model and ablate its neurons: `neurospec evaluate` and `ablate`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from neurospec.cli import options as opt
from neurospec.cli.app import command
from neurospec.cli.common import (
    check_ablation_methods,
    check_choice,
    check_fraction,
    check_int,
    check_model_options,
    check_save_dir,
    check_tasks,
    claim_out,
    emit,
    estimate_forward,
    handle_errors,
    load_model_cli,
    parse_seeds,
    set_config,
)

out = Console()


def _task_data(loaded, specs, tokens: int, seq_len: int, seed: int = 0, collect: int | None = None):
    from neurospec.data.build import build_tasks
    from neurospec.record.recorder import RecordConfig

    cfg = RecordConfig(tokens=collect or tokens, eval_tokens=tokens, seq_len=seq_len, seed=seed)
    return build_tasks(loaded, list(specs), cfg)


@command("evaluate")
@handle_errors
def evaluate_cmd(
    model: str = opt.model(),
    task: list[str] = typer.Option(..., "--task", "-t", help="task (repeat)"),
    eval_tokens: int = opt.eval_tokens("its evaluation split"),
    tokens: int = opt.deprecated_tokens(),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """Next-token top-1, top-10, skip top-1, loss and perplexity of each task's evaluation split (masked LMs: on
    masked positions; image classifiers: class accuracy; head-less encoders: representation similarity)."""
    from neurospec.evaluate import task_metrics, task_references
    from neurospec.evaluate.tasks import skip_ids_for

    eval_tokens = opt.eval_budget(eval_tokens, tokens)
    check_model_options(device, dtype)
    check_tasks(task)
    for option, value in (("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        check_int(option, value)
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    tasks = _task_data(loaded, task, eval_tokens, seq_len, collect=seq_len * 16)
    refs = task_references(loaded, {n: d.eval for n, d in tasks.items()}, batch_size=batch_size)
    keys = ("metric", "top1", "top10", "skip_top1", "loss", "perplexity", "tokens", "nonfinite")
    res = {}
    for name, data in tasks.items():
        m = task_metrics(loaded, data.eval, skip_ids=skip_ids_for(data.collect), batch_size=batch_size,
                         label=getattr(data, "label", None), reference=refs.get(name))
        res[name] = {k: m.get(k) for k in keys}
        if m["objective"] == "representation":
            res[name].update(cosine_distance=m["cosine_distance"], rel_l2=m["rel_l2"])
    metrics = sorted({m["metric"] for m in res.values()})

    def num(v, f: str) -> str:
        return "-" if v is None else format(v, f)

    def human():
        t = Table(title=f"{model}: evaluation splits, {' / '.join(metrics)}")
        rep = [n for n, m in res.items() if m["metric"] == "representation similarity"]
        cols = ("task", "top1", "top10", "skip top1", "loss", "perplexity", "tokens", "non-finite")
        if rep:
            cols = ("task", "similarity", "cosine distance", "rel. L2 change", "tokens", "non-finite")
        for c in cols:
            t.add_column(c, justify="right")
        for name, m in res.items():
            if rep:
                t.add_row(name, num(m["top1"], ".4f"), num(m.get("cosine_distance"), ".4f"),
                          num(m.get("rel_l2"), ".4f"), f"{m['tokens']:,}", str(m["nonfinite"]))
            else:
                t.add_row(name, num(m["top1"], ".4f"), num(m["top10"], ".4f"), num(m["skip_top1"], ".4f"),
                          num(m["loss"], ".4f"), num(m["perplexity"], ".2f"), f"{m['tokens']:,}",
                          str(m["nonfinite"]))
        out.print(t)
        if rep:
            out.print("The model has no language-model or class head, so its metric is the representation "
                      "similarity: the mean cosine of the final hidden states to the unablated model's (1 here by "
                      "construction; pruning and ablation move it, see `neurospec prune`, `taskmap`, `ablate`).")

    emit(res, json_, human)


@command("ablate")
@handle_errors
def ablate_cmd(
    model: str = opt.model(),
    reference: Path = typer.Option(..., help="reference run (recorded on this model) that the ablation methods take their values from"),
    reference_task: str = typer.Option(None, "--reference-task",
                                       help="task of the reference run to take values from (default: the evaluated "
                                            "task when the run has it, else the run's first task)"),
    task: list[str] = typer.Option(None, "--task", "-t", help="tasks to evaluate (study mode)"),
    kind: str = typer.Option("attn", help="attn, mlp or both (study mode)"),
    random_frac: float = typer.Option(0.05, "--random-frac", help="fraction of each layer added per step"),
    steps: int = typer.Option(10),
    methods: str = typer.Option(None, help="comma-separated ablation methods of the study (default: all of "
                                           "them): {registry:study_ablations}"),
    seeds: str = typer.Option("0,1,2", help="seeds of the random draws (spread over seeds is reported)"),
    neurons: Path = typer.Option(None, help="file of neuron ids (one per line) to ablate (fold mode)"),
    method: str = typer.Option("mean", help="method for --neurons: {registry:fold_ablations}"),
    save: Path = typer.Option(None, help="with --neurons: fold the ablation into the weights and save the model here"),
    eval_tokens: int = opt.eval_tokens("and step"),
    tokens: int = opt.deprecated_tokens(),
    seq_len: int = opt.seq_len(),
    batch_size: int = opt.batch_size(),
    peak_bins: int = typer.Option(100, "--peak-bins"),
    peak_smooth: float = typer.Option(0.0, "--peak-smooth", help="Gaussian smoothing of the histogram, in bins"),
    peak_method: str = typer.Option("histogram", "--peak-method",
                                    help="peak: histogram (the fullest of --peak-bins bins) or kde (the maximum of a "
                                         "Gaussian kernel density estimate)"),
    peak_bandwidth: float = typer.Option(0.1, "--peak-bandwidth",
                                         help="peak with --peak-method kde: kernel width in units of each neuron's "
                                              "standard deviation"),
    resample_align: str = typer.Option("random", "--resample-align",
                                       help="resample: random (a random token row of the reference run's reservoir) "
                                            "or position (the same position of a random sequence of the evaluated "
                                            "task's collection split, run through the unablated model)"),
    resample_per_neuron: bool = typer.Option(False, "--resample-per-neuron",
                                             help="resample: each ablated neuron draws its own row (default: one row "
                                                  "per token, shared by its ablated neurons)"),
    out_dir: Path = opt.out("directory for the study's table, figure and report", default=None),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    force: bool = opt.force("replace results of another command or configuration in --out; write --save into a "
                            "non-empty directory"),
    allow_pickle: bool = opt.allow_pickle(),
    json_: bool = opt.json_(),
) -> None:
    """Ablation-method study on random neurons (--task), or fold an ablation of given neurons into the weights."""
    from neurospec.errors import NeurospecError
    from neurospec.experiments.ablation import KINDS, AblationStudyConfig
    from neurospec.intervene.references import reference_values
    from neurospec.record.histogram import PEAK_METHODS
    from neurospec.record.layout import ABLATION, ABLATION_FIGURE, write_result_json
    from neurospec.record.store import open_run

    eval_tokens = opt.eval_budget(eval_tokens, tokens)
    if methods is None:
        methods = ",".join(opt.study_ablations())
    set_config(eval_tokens=eval_tokens, tokens=None, methods=methods)  # the claim records the resolved options
    check_model_options(device, dtype)
    for option, value in (("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size),
                          ("--steps", steps), ("--peak-bins", peak_bins)):
        check_int(option, value)
    if peak_smooth < 0:
        raise NeurospecError(f"--peak-smooth must be >= 0, got {peak_smooth}")
    check_choice("--peak-method", peak_method, PEAK_METHODS)
    if not peak_bandwidth > 0:
        raise NeurospecError(f"--peak-bandwidth must be > 0, got {peak_bandwidth}")
    peak_opts = {"peak_bins": peak_bins, "peak_smooth": peak_smooth, "peak_method": peak_method,
                 "peak_bandwidth": peak_bandwidth}
    usable = opt.study_ablations()
    if neurons is not None:
        if save is None:
            raise NeurospecError("--neurons needs --save DIR (the folded model is written there)")
        if method in opt.study_ablations() and method not in opt.fold_ablations():
            raise NeurospecError(f"{method} ablation needs a hook and cannot be folded into weights; use one of "
                                 f"{', '.join(opt.fold_ablations())}")
        check_ablation_methods([method], "--method", opt.fold_ablations())
        check_save_dir(save, model=model, force=force)
        if resample_align != "random" or resample_per_neuron:
            raise NeurospecError("--resample-align and --resample-per-neuron apply to the ablation study (--task), "
                                 "not to folding given neurons")
    else:
        if not task:
            raise NeurospecError("give --task (an ablation study) or --neurons with --save (fold given neurons)")
        check_tasks(task)
        check_choice("--kind", kind, KINDS)
        check_fraction("--random-frac", random_frac)
        check_ablation_methods([m for m in methods.split(",") if m], "--methods", usable)
        seed_list = parse_seeds(seeds)
        resample = _resample_options([m for m in methods.split(",") if m], resample_align, resample_per_neuron)
        study_cfg = AblationStudyConfig(kind=kind, frac_per_step=random_frac, steps=steps,
                                        methods=tuple(m for m in methods.split(",") if m), seeds=tuple(seed_list),
                                        batch_size=batch_size, per_neuron=resample_per_neuron)
        if out_dir is not None:
            claim_out(out_dir, "ablate", force, exclude=("neurons", "method"))
    loaded = load_model_cli(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    ref = open_run(reference)
    ref.check_model(loaded.fingerprint)
    if not ref.tasks:
        raise NeurospecError(f"reference run {reference} has no finished task")

    def ref_task_for(name: str | None) -> str:
        if reference_task:
            if reference_task not in ref.tasks:
                raise NeurospecError(f"reference run {reference} has no task {reference_task!r}; it has {ref.tasks}")
            return reference_task
        return name if name in ref.tasks else ref.tasks[0]

    if neurons is not None:
        from neurospec.intervene.ablate import save_folded
        from neurospec.intervene.neuronset import NeuronSet

        ns = NeuronSet.load(neurons, loaded.sites)
        offsets = None
        if method != "zero":
            offs, _ = reference_values(ref, ref_task_for(None), [method], sites=ns.site_names, **peak_opts)
            offsets = offs[method]
        info = save_folded(loaded.model, loaded.sites, ns, save, offsets, tokenizer=loaded.tokenizer, method=method)
        res = {"saved": str(save), "method": method, "n_ablated": len(ns), "ablation": info.to_dict()}
        emit(res, json_, lambda: out.print(f"ablated {len(ns)} neurons ({method}); model saved to {save}"))
        return

    from neurospec.evaluate.tasks import skip_ids_for
    from neurospec.experiments.ablation import ablation_study
    from neurospec.intervene.ablate import get_ablation
    from neurospec.report.ablation import plot_ablation, summarise

    method_list = [m for m in methods.split(",") if m]
    tasks = _task_data(loaded, task, eval_tokens, seq_len, collect=seq_len * 16)
    evaluations = 1 + steps * len(method_list) * len(seed_list)  # per task: the baseline, then every ablated model
    estimate_forward("ablate", loaded, seq_len, evaluations * sum(int(d.eval.numel()) for d in tasks.values()),
                     f"{evaluations} evaluations per task: --steps x --methods x --seeds, and the baseline")
    rows = []
    for name, data in tasks.items():
        aligned = resample is not None and resample["align"] == "position"
        value_methods = [m for m in method_list if not (aligned and get_ablation(m).per_input)]
        offs, samples = reference_values(ref, ref_task_for(name), value_methods, **peak_opts)
        if aligned:
            from neurospec.intervene.aligned import position_aligned_samples

            study_sites = loaded.sites.sites if kind == "both" else loaded.sites.of_kind(kind)
            samples = position_aligned_samples(loaded, data.collect, site_names=[s.name for s in study_sites],
                                               batch_size=batch_size)
            resample["samples"][name] = f"collection split of {name}: {data.collect.shape[0]} sequences of " \
                                        f"{data.collect.shape[1]} tokens"
        elif resample is not None:
            resample["samples"][name] = f"reservoir of reference task {ref_task_for(name)}"
        rows += ablation_study(loaded, loaded.sites, {name: data.eval}, study_cfg, offsets_by_method=offs,
                               samples=samples, skip_ids=skip_ids_for(data.collect))
    res = {"steps": [{k: r[k] for k in ("fraction", "method", "task", "loss", "top1", "seed", "loss_increase",
                                        "top1_drop", "n_ablated")} for r in rows],
           "summary": summarise(rows), "resample": resample}
    if out_dir is not None:
        from neurospec.report.html import build_report

        write_result_json(out_dir / ABLATION, {"rows": rows, "resample": resample, "study_config": study_cfg.to_dict(),
                                               "command": " ".join(sys.argv)})
        res["figure"] = str(plot_ablation(rows, out_dir / ABLATION_FIGURE)[0])
        res["report"] = str(build_report(out_dir))

    def human():
        t = Table(title=f"ablation methods: increase of {rows[0]['loss_metric']} (mean over seeds)")
        for c in ("task", "fraction", *method_list):
            t.add_column(c, justify="right")
        summ = res["summary"]
        keys = sorted({(s["task"], s["fraction"]) for s in summ})
        for tk, fr in keys:
            vals = {s["method"]: s for s in summ if s["task"] == tk and s["fraction"] == fr}
            t.add_row(tk, f"{fr:.2f}", *(f"{vals[m]['loss_increase_mean']:+.4f}" if m in vals else "" for m in method_list))
        out.print(t)

    emit(res, json_, human)


RESAMPLE_ALIGN = ("random", "position")


def _resample_options(methods: list[str], align: str, per_neuron: bool) -> dict | None:
    """The resample settings recorded in the output (``None`` when no method resamples); checks the options."""
    from neurospec.errors import NeurospecError
    from neurospec.intervene.ablate import get_ablation

    if align not in RESAMPLE_ALIGN:
        raise NeurospecError(f"--resample-align must be one of {', '.join(RESAMPLE_ALIGN)}, got {align!r}")
    if not any(get_ablation(m).per_input for m in methods):
        if align != "random" or per_neuron:
            raise NeurospecError("--resample-align and --resample-per-neuron apply to the resample method; add "
                                 "resample to --methods")
        return None
    return {"align": align, "per_neuron": per_neuron, "samples": {}}
