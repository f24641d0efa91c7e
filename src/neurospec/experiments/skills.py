"""The skill-neuron pipeline (METHODS.md section 4) on any model neurospec loads, from streaming statistics.

For each labelled task (:mod:`neurospec.data.labelled`): build the prompt runs (a hard prompt, or ``seeds`` soft
prompts trained on the frozen model), stream train and dev through the MLP sites of every run
(:mod:`neurospec.skills.collect`), turn the sums into per-neuron predictivity, reduce the one-vs-rest sub-tasks (max)
and the runs (mean or min), take the top ``p`` of every layer as the task's skill neurons, perturb them (noise,
zero) against random same-per-layer-count sets on the test split, and compare the tasks' skill sets.

Outputs in ``out``: ``skills.json`` (what :func:`run_skills` returns), ``scores/<task>.safetensors`` (per site: the
aggregated score ``[width]`` and the per-sub-task predictivity of every run ``[runs, S, width]``), and
``prompts/<task>/seed<k>/`` for soft prompts (reused when the run is repeated).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurospec.data.labelled import LabelledTask, load_labelled
from neurospec.errors import NeurospecError
from neurospec.models.loading import LoadedModel, random_init_copy
from neurospec.models.sites import SITE_KINDS, NeuronId
from neurospec.record import layout
from neurospec.record.store import atomic_write_json, save_tensors
from neurospec.score.selective import SCORERS
from neurospec.skills.agreement import class_statistics, overlap_test, selective_scores
from neurospec.skills.baseline import TEST as BASELINE_TEST
from neurospec.skills.baseline import compare_with_random
from neurospec.skills.collect import prompt_statistics
from neurospec.skills.perturb import METHODS, MIN_RANDOM, parse_method, perturbation_study, similarity
from neurospec.skills.predictivity import AGGREGATES, aggregate, predictivity, select_top_p, task_scores
from neurospec.skills.prompting import PromptedModel, hard_prompt, is_decoder, verbaliser_ids
from neurospec.skills.pruning import prune_model, pruning_study, save_pruned, token_means
from neurospec.skills.soft import SoftPromptConfig, train_soft_prompt
from neurospec.skills.tuning import TUNING_METHODS, TuningConfig, check_tunable, tune_model

PROMPT_KINDS = ("hard", "soft")
RANDOM_DIR = "random_init"  # outputs of the random-init baseline, laid out like the main ones


@dataclass(frozen=True)
class SkillsConfig:
    """Settings of :func:`run_skills`. ``template``: the hard prompt text (default ``"\\nAnswer:"`` for decoders,
    ``"Category:"`` for encoders). ``verbaliser``: class -> word; by default the class names when each is one
    token, else the letters A, B, C, ... ``p``: the fraction per layer whose neurons are reported; ``ps``: the
    fractions of the perturbation study."""

    prompt: str = "hard"
    template: str | None = None
    verbaliser: Mapping[str, str] = field(default_factory=dict)
    seeds: int = 1
    aggregate: str = "mean"
    class_reduce: str = "max"
    p: float = 0.05
    ps: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    methods: tuple[str, ...] = METHODS
    n_random: int = MIN_RANDOM
    noise_std: float = 0.1
    # Perturbation cost: at most this many test examples per class (balanced, seeded; 0 = all), and the number of
    # neuron sets stacked in one forward pass (same accuracies, fewer and larger passes).
    perturb_examples: int = 100
    sets_per_forward: int = 4
    batch_size: int = 16
    max_tokens: int = 64
    task_seed: int = 0
    # Site kinds whose neurons are scored: the MLP activations (the paper's neurons), and the attention outputs
    # (the input of the output projection, one neuron per head dimension) as an option.
    kinds: tuple[str, ...] = ("mlp",)
    soft: SoftPromptConfig = field(default_factory=SoftPromptConfig)
    # Extra studies (off by default): kept fractions of skill-based pruning, a directory for the model pruned to
    # the top ``p`` (one task only), agreement with selective-pruning neurons, tuning beyond prompts.
    prune_keeps: tuple[float, ...] = ()
    save_pruned: str | None = None
    agreement: bool = False
    agreement_score: str = "abs"
    beyond: str | None = None
    tuning: TuningConfig = field(default_factory=TuningConfig)
    # Control of predictivity: the same pipeline on a randomly initialised copy of the model (seeded).
    random_baseline: bool = False
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.perturb_examples < 0:
            raise NeurospecError(f"perturb_examples must be 0 (all) or positive, got {self.perturb_examples}")
        if self.sets_per_forward < 1:
            raise NeurospecError(f"sets_per_forward must be at least 1, got {self.sets_per_forward}")
        if self.beyond is not None and self.beyond not in TUNING_METHODS:
            raise NeurospecError(f"--beyond must be one of {TUNING_METHODS}, got {self.beyond!r}")
        if self.agreement_score not in SCORERS:
            raise NeurospecError(f"agreement score must be one of {', '.join(SCORERS)}, got {self.agreement_score!r}")
        if any(not 0 <= q <= 1 for q in self.prune_keeps):
            raise NeurospecError(f"kept fractions of pruning must lie in [0, 1], got {list(self.prune_keeps)}")
        if self.prompt not in PROMPT_KINDS:
            raise NeurospecError(f"prompt must be one of {PROMPT_KINDS}, got {self.prompt!r}")
        if self.aggregate not in AGGREGATES:
            raise NeurospecError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.seeds < 1:
            raise NeurospecError(f"seeds must be at least 1, got {self.seeds}")
        for m in self.methods:
            parse_method(m, self.noise_std)
        if not self.kinds or any(k not in SITE_KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            raise NeurospecError(f"kinds must be distinct site kinds among {SITE_KINDS}, got {list(self.kinds)}")
        if not 0 < self.p <= 0.5 or any(not 0 < q <= 1 for q in self.ps):
            raise NeurospecError("p must lie in (0, 0.5] and every fraction of ps in (0, 1]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verbaliser"] = dict(self.verbaliser)
        return {"type": "SkillsConfig", "version": 1, **d}


def _verbaliser(loaded: LoadedModel, task: LabelledTask, words: Mapping[str, str]) -> list[int]:
    decoder = is_decoder(loaded)
    unknown = sorted(set(words) - set(task.classes))
    if unknown:
        raise NeurospecError(f"--verbaliser names class(es) {unknown} that task {task.name!r} does not have; its "
                             f"classes are {', '.join(task.classes)}")
    if words:
        return verbaliser_ids(loaded.tokenizer, [words.get(c, c) for c in task.classes], decoder=decoder)
    try:
        return verbaliser_ids(loaded.tokenizer, list(task.classes), decoder=decoder)
    except NeurospecError:
        letters = string.ascii_uppercase
        if task.n_classes > len(letters):
            raise NeurospecError(f"task {task.name!r} has {task.n_classes} classes: give --verbaliser words") from None
        return verbaliser_ids(loaded.tokenizer, list(letters[: task.n_classes]), decoder=decoder)


def _sites(loaded: LoadedModel, cfg: SkillsConfig):
    """The sites whose neurons are scored (``cfg.kinds``); an error when the model has none of them."""
    sites = loaded.sites.select(kinds=cfg.kinds)
    if not sites:
        raise NeurospecError(f"the model has no site of kind {', '.join(cfg.kinds)}: choose other kinds "
                             f"(it has {', '.join(sorted({s.kind for s in loaded.sites.sites})) or 'none'})")
    return sites


def _runs(loaded: LoadedModel, pm: PromptedModel, task: LabelledTask, cfg: SkillsConfig, out: Path,
          progress: Callable[[str, int, int], None] | None = None):
    """``[(prompt or None, info)]``: the prompt runs of a task."""
    if task.kind == "image":
        if pm.readout == "probe":
            pm.fit_probe(*task.split("train"), None, cfg.batch_size)
        return [(None, {"prompt": "class token"})]
    if cfg.prompt == "hard":
        template = cfg.template or ("\nAnswer:" if pm.decoder else "Category:")
        prompt = hard_prompt(loaded, template)
        if pm.readout == "probe":
            pm.fit_probe(*task.split("train"), prompt, cfg.batch_size)
        return [(prompt, {"prompt": "hard", "template": template})]
    runs = []
    for k in range(cfg.seeds):
        sp = train_soft_prompt(pm, task, seed=k, config=cfg.soft, out=out / "prompts" / task.name / f"seed{k}",
                               progress=progress)
        probe = None if pm.probe is None else {n: v.clone() for n, v in pm.probe.state_dict().items()}
        runs.append((sp.prompt, {"prompt": "soft", "seed": k, "dev_accuracy": sp.dev_accuracy, "reused": sp.reused,
                                 "probe": probe}))
    return runs


def _task_predictivity(loaded: LoadedModel, task: LabelledTask, cfg: SkillsConfig, out: Path,
                       progress: Callable[[str, int, int], None] | None = None):
    """Prompt runs and predictivity of one task on one model: ``(pm, runs, per_run, scores, accuracies)`` with
    ``per_run`` ``{site: [per-sub-task predictivity [S, width] per run]}`` and ``scores`` ``{site: [width]}``."""
    sites = _sites(loaded, cfg)
    lm = task.kind == "text" and loaded.head in ("causal-lm", "masked-lm")
    pm = PromptedModel(loaded, task.n_classes, max_tokens=cfg.max_tokens,
                       verbaliser=_verbaliser(loaded, task, cfg.verbaliser) if lm else None)
    runs = _runs(loaded, pm, task, cfg, out, progress)
    per_run: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    accs = []
    for prompt, info in runs:
        if info.get("probe") is not None:
            pm.probe.load_state_dict(info["probe"])
        counts = prompt_statistics(pm, task, prompt, sites, batch_size=cfg.batch_size)
        for s in sites:
            per_run[s.name].append(predictivity(counts[s.name].compute()["accuracy"]).float())
        accs.append({k: v for k, v in info.items() if k != "probe"} | {
            "test_accuracy": pm.accuracy(*task.split("test"), prompt, cfg.batch_size)})
    scores = {s: aggregate([task_scores(r, cfg.class_reduce) for r in runs_], cfg.aggregate)
              for s, runs_ in per_run.items()}
    return pm, runs, per_run, scores, accs


def run_skills(loaded: LoadedModel, tasks: Sequence[str | LabelledTask], out: str | Path,
               config: SkillsConfig | None = None, *, progress: Callable[[str, int, int], None] | None = None
               ) -> dict[str, Any]:
    """Run the pipeline (module docstring); writes ``out/skills.json`` and returns the same dictionary."""
    cfg = config or SkillsConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built = [t if isinstance(t, LabelledTask) else load_labelled(t, seed=cfg.task_seed) for t in tasks]
    names = [t.name for t in built]
    if not built:
        raise NeurospecError("no task given: name at least one labelled task (e.g. --task python-vs-c)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise NeurospecError(f"task(s) named more than once: {', '.join(dupes)}")
    if cfg.save_pruned is not None and len(built) != 1:
        raise NeurospecError(f"--save-pruned writes the model pruned for one task; {len(built)} tasks were given")
    if cfg.beyond is not None:
        check_tunable(loaded, cfg.beyond)
    if cfg.random_baseline and getattr(loaded.model, "config", None) is None:
        raise NeurospecError("--random-baseline rebuilds the model from its Hugging Face config, and this model has "
                             "none; run without --random-baseline")
    sites = _sites(loaded, cfg)
    widths = {s.name: s.width for s in sites}
    result: dict[str, Any] = {"model": loaded.describe(), "config": cfg.to_dict(), "tasks": {}, "readout": {},
                              "accuracy": {}, "predictivity": {s.name: {} for s in sites}, "skill_neurons": {},
                              "perturbation": {}, "notes": []}
    skill_sets = {}
    rnd: LoadedModel | None = None
    for n_done, task in enumerate(built):
        if progress is not None:
            progress(f"skills {task.name}", n_done, len(built))
        pm, runs, per_run, scores, accs = _task_predictivity(loaded, task, cfg, out, progress)
        if pm.readout == "probe":
            result["notes"].append(
                f"{task.name}: the model has no LM head usable here ({loaded.head}); predictions come from a linear "
                "head on the final hidden state at the read position, " +
                ("trained with each soft prompt" if cfg.prompt == "soft" and task.kind == "text" else
                 "fit on frozen features of the training split"))
        tensors = {f"{s}/score": v for s, v in scores.items()}
        tensors.update({f"{s}/subtasks": torch.stack(r) for s, r in per_run.items()})
        save_tensors(out / "scores" / f"{task.name}.safetensors", tensors, {"task": task.name})
        chosen = select_top_p(scores, cfg.p, key=task.name)
        skill_sets[task.name] = chosen
        result["tasks"][task.name] = task.sizes()
        result["readout"][task.name] = pm.readout
        result["accuracy"][task.name] = accs
        result["skill_neurons"][task.name] = [str(NeuronId(s, int(i))) for s, idx in chosen.items() for i in idx]
        for s in sites:
            v = scores[s.name]
            result["predictivity"][s.name][task.name] = {
                "mean": float(v.mean()), "max": float(v.max()), "skill_mean": float(v[chosen[s.name]].mean())
                if chosen[s.name].numel() else None}
        # Perturbation with the first prompt run (and its probe) on the test split.
        prompt, info = runs[0]
        if info.get("probe") is not None:
            pm.probe.load_state_dict(info["probe"])
        rows = perturbation_study(pm, *task.split("test"), prompt, scores, cfg.ps, methods=cfg.methods,
                                  n_random=cfg.n_random, std=cfg.noise_std, key=task.name,
                                  batch_size=cfg.batch_size, per_class=cfg.perturb_examples,
                                  sets_per_forward=cfg.sets_per_forward, progress=progress)
        result["perturbation"][task.name] = rows
        result["tasks"][task.name]["licence"] = task.licence
        _extra_studies(result, loaded, pm, task, prompt, scores, chosen, widths, cfg, progress)
        if cfg.random_baseline:
            if rnd is None:
                rnd = random_init_copy(loaded, seed=cfg.random_seed)
                result["random_baseline"] = {"seed": cfg.random_seed, "p": cfg.p, "test": BASELINE_TEST,
                                             "tasks": {}}
            if progress is not None:
                progress(f"skills {task.name} (random copy)", n_done, len(built))
            _, _, _, rscores, raccs = _task_predictivity(rnd, task, cfg, out / RANDOM_DIR, progress)
            save_tensors(out / RANDOM_DIR / "scores" / f"{task.name}.safetensors",
                         {f"{s}/score": v for s, v in rscores.items()}, {"task": task.name})
            result["random_baseline"]["tasks"][task.name] = {"accuracy": raccs} | compare_with_random(
                scores, rscores, cfg.p, key=task.name)
    if progress is not None:
        progress("skills", len(built), len(built))
    result["similarity"] = similarity(skill_sets, widths) | {"p": cfg.p}
    atomic_write_json(out / layout.SKILLS_RESULT, result)
    return result


def _extra_studies(result: dict, loaded: LoadedModel, pm: PromptedModel, task: LabelledTask, prompt, scores, chosen,
                   widths: Mapping[str, int], cfg: SkillsConfig,
                   progress: Callable[[str, int, int], None] | None = None) -> None:
    """Pruning, agreement and beyond-prompt studies of one task (each only when ``cfg`` asks for it), with the
    first prompt run; results under ``pruning`` (rows with their task), ``agreement`` and ``beyond`` (by task).
    ``progress`` hears when each study starts (and the steps of the beyond-prompt perturbation study)."""

    def starts(study: str) -> None:
        if progress is not None:
            progress(f"{study} {task.name}", 0, 1)

    sites = _sites(loaded, cfg)
    if cfg.prune_keeps or cfg.save_pruned is not None:
        starts("pruning")
        means = token_means(pm, task.split("train")[0], prompt, sites, batch_size=cfg.batch_size)
        if cfg.prune_keeps:
            rows = pruning_study(pm, *task.split("test"), prompt, scores, means, cfg.prune_keeps,
                                 n_random=cfg.n_random, key=task.name, batch_size=cfg.batch_size)
            result.setdefault("pruning", []).extend({"task": task.name, **r} for r in rows)
        if cfg.save_pruned is not None:
            pruned = prune_model(loaded, chosen, means)
            path = save_pruned(pruned, cfg.save_pruned)
            ppm = PromptedModel(pruned, task.n_classes, readout=pm.readout, max_tokens=pm.max_tokens,
                                verbaliser=None if pm.verbaliser is None else pm.verbaliser.tolist())
            ppm.probe = pm.probe
            result["pruned_model"] = {"task": task.name, "path": str(path), "keep": cfg.p,
                                      "n_kept": sum(int(v.numel()) for v in chosen.values()),
                                      "test_accuracy": ppm.accuracy(*task.split("test"), prompt, cfg.batch_size)}
    if cfg.agreement:
        starts("agreement")
        stats = class_statistics(pm, task, prompt, sites, batch_size=cfg.batch_size)
        selective = select_top_p(selective_scores(stats, cfg.agreement_score, task=task.name), cfg.p, key=task.name)
        result.setdefault("agreement", {})[task.name] = overlap_test(chosen, selective, widths) | {
            "score": cfg.agreement_score, "p": cfg.p}
    if cfg.beyond is not None:
        starts(f"{cfg.beyond} tuning")
        hard = None
        if task.kind == "text":
            hard = hard_prompt(loaded, cfg.template or ("\nAnswer:" if pm.decoder else "Category:"))
        tuned = tune_model(pm, task, hard, config=dataclasses.replace(cfg.tuning, method=cfg.beyond,
                                                                      batch_size=cfg.batch_size),
                           progress=progress)
        rows = perturbation_study(tuned.pm, *task.split("test"), hard, scores, cfg.ps, methods=cfg.methods,
                                  n_random=cfg.n_random, std=cfg.noise_std, key=task.name,
                                  batch_size=cfg.batch_size, per_class=cfg.perturb_examples,
                                  sets_per_forward=cfg.sets_per_forward,
                                  progress=None if progress is None else
                                  (lambda label, done, total: progress(f"{cfg.beyond}: {label}", done, total)))
        result.setdefault("beyond", {})[task.name] = [
            {**r, "tuning": cfg.beyond, "tuned_dev_accuracy": tuned.dev_accuracy} for r in rows]
