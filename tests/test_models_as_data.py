"""Models as data: every public library function that takes a model leaves the caller's model exactly as it was
(weights bit for bit, the same parameter and module objects in the same places, the same config), whether it
works on a copy or inside a context that it undoes, and also when an error interrupts it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurospec.intervene.ablate import ablated, fold_ablation, folded_copy
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import from_module
from neurospec.record.recorder import RecordConfig

from tiny import char_tokenizer, tiny_model, write_corpus

RC = RecordConfig(tokens=256, eval_tokens=128, seq_len=32, batch_size=4, reservoir=16, hist_bins=16)


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a caller could observe of a model's state: values, objects, structure and config."""
    cfg = getattr(model, "config", None)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)],
        "modules": [(n, id(m), type(m).__name__, m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "config": None if cfg is None else cfg.to_json_string(use_diff=False),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.dtype == v.dtype and w.shape == v.shape and torch.equal(w, v), f"{k} changed"
    for key in ("params", "buffers", "modules", "hooks", "config"):
        assert after[key] == before[key], f"the model's {key} changed"


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    a = write_corpus(tmp_path / "a.txt", seed=1, words=("quick", "quiet", "queen", "aqua"))
    b = write_corpus(tmp_path / "b.txt", seed=2, words=("alpha", "beta", "delta", "gamma"))
    loaded = from_module(tiny_model("llama"), char_tokenizer(), name="tiny")
    return loaded, {"a": f"a={a}", "b": f"b={b}"}, tmp_path


def _blocks(loaded, tasks):
    from neurospec.data.build import build_tasks

    return build_tasks(loaded, [tasks["a"], tasks["b"]], RC)


def _record(loaded, tasks, tmp):
    from neurospec.record.recorder import record

    record(loaded, [tasks["a"], tasks["b"]], tmp / "run", RC)


def _task_metrics(loaded, tasks, tmp):
    from neurospec.evaluate.tasks import task_metrics

    task_metrics(loaded, _blocks(loaded, tasks)["a"].eval)


def _task_map(loaded, tasks, tmp):
    from neurospec.experiments.taskmap import TaskMapConfig, task_map

    task_map(loaded, [tasks["a"], tasks["b"]], tmp / "map", record_cfg=RC,
             cfg=TaskMapConfig(fractions=(0.1,), select_frac=0.1, random_init=False))


def _selective_pruning(loaded, tasks, tmp):
    from neurospec.experiments.selective import PruneConfig, selective_pruning

    res = selective_pruning(loaded, tasks["a"], [tasks["b"]], tmp / "prune", record_cfg=RC, save_dir=tmp / "saved",
                            prune_cfg=PruneConfig(frac=0.05, steps=1, ablation="mean"))
    assert res["steps"][-1]["n_pruned"] > 0 and (tmp / "saved" / "config.json").is_file()


def _ablation_study(loaded, tasks, tmp):
    from neurospec.experiments.ablation import ablation_study

    data = _blocks(loaded, tasks)
    ablation_study(loaded.model, loaded.sites, {"a": data["a"].eval}, kind="mlp", steps=1, seeds=(0,),
                   methods=("zero",), frac_per_step=0.1)


def _cluster(loaded, tasks, tmp):
    from neurospec.experiments.clusters import ClusterConfig, cluster

    cluster(loaded, ClusterConfig("moefication", experts=4))
    cluster(loaded, ClusterConfig("spectral", graph="weights", k=3, shuffles=2))


def _specialization_and_routing(loaded, tasks, tmp):
    from neurospec.experiments.clusters import ClusterConfig, cluster_to_dir
    from neurospec.experiments.routing import routing
    from neurospec.experiments.specialization import SpecializationConfig, specialization

    cluster_to_dir(loaded, ClusterConfig("moefication", experts=4), tmp / "c")
    specialization(tmp / "c", SpecializationConfig(tasks=(tasks["a"], tasks["b"]), n_random=2, tokens=128,
                                                   eval_tokens=64, seq_len=32, n_random_coherence=9),
                   target=loaded)
    routing(tmp / "c", [tasks["a"]], [1, 2], target=loaded, eval_tokens=64, seq_len=32)


def _lm_evaluator(loaded, tasks, tmp):
    """The prefix cache runs a stand-in model: the caller's block list is never edited, not even while it runs."""
    from neurospec.evaluate.site_ablation import LMEvaluator, block_list

    blocks = block_list(loaded.model, loaded.sites)
    originals = list(blocks)
    seen = []
    site = loaded.sites["layers.1.mlp"]
    handle = loaded.model.get_submodule(site.module).register_forward_pre_hook(
        lambda *_: seen.append([a is b for a, b in zip(blocks, originals, strict=True)]))
    try:
        ev = LMEvaluator(loaded, {"a": _blocks(loaded, tasks)["a"].eval}, layers=[1], batch_size=2)
        seen.clear()
        ev.ablate(site.name, [1, 2, 3])
    finally:
        handle.remove()
    assert seen and all(all(x) for x in seen)


def _skills(loaded, tasks, tmp):
    from neurospec.data.labelled import make_labelled
    from neurospec.experiments.skills import SkillsConfig, run_skills

    words = {"x": "quick quiet queen", "y": "alpha beta gamma"}
    items = [f"{words[c]} {i}" for i in range(8) for c in ("x", "y")]
    labels = [c for _ in range(8) for c in ("x", "y")]
    task = make_labelled("t", items, labels, seed=0)
    run_skills(loaded, [task], tmp / "skills", SkillsConfig(ps=(0.1,), p=0.1, n_random=20, max_tokens=16, methods=("zero",)))


def _sparsify(loaded, tasks, tmp):
    from neurospec.sparsity import sparsify

    sparsify(loaded, "magnitude", sparsity=0.5)
    sparsify(loaded, "wanda", sparsity=0.5, calibration=_blocks(loaded, tasks)["a"].collect[:2])


def _folded_copy(loaded, tasks, tmp):
    site = loaded.sites["layers.0.mlp"]
    ns = NeuronSet({site.name: torch.tensor([1, 4, 9])}, {site.name: site.width})
    copy, info = folded_copy(loaded.model, loaded.sites, ns, {site.name: torch.full((site.width,), 0.5)},
                             method="mean")
    assert copy is not loaded.model and info.created_biases  # Llama's MLP has no bias: the copy's config changes


def _random_init_and_shuffle(loaded, tasks, tmp):
    from neurospec.cluster.baselines import shuffle_weights
    from neurospec.models.loading import random_init_copy

    random_init_copy(loaded, seed=3)
    shuffle_weights(loaded, seed=3)


def _aligned_samples(loaded, tasks, tmp):
    from neurospec.intervene.aligned import position_aligned_samples

    position_aligned_samples(loaded, _blocks(loaded, tasks)["a"].collect[:2])


CASES = {
    "record": _record,
    "task_metrics": _task_metrics,
    "task_map": _task_map,
    "selective_pruning": _selective_pruning,
    "ablation_study": _ablation_study,
    "cluster": _cluster,
    "specialization_and_routing": _specialization_and_routing,
    "lm_evaluator": _lm_evaluator,
    "skills": _skills,
    "sparsify": _sparsify,
    "folded_copy": _folded_copy,
    "random_init_and_shuffle": _random_init_and_shuffle,
    "aligned_samples": _aligned_samples,
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_callers_model_is_unchanged(world, case):
    loaded, tasks, tmp = world
    before = snapshot(loaded.model)
    CASES[case](loaded, tasks, tmp)
    assert_unchanged(loaded.model, before)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_an_error_inside_ablated_restores_the_model(world, method):
    loaded, _, _ = world
    site = loaded.sites["layers.0.mlp"]
    ns = NeuronSet({site.name: torch.tensor([0, 3, 5])}, {site.name: site.width})
    kw = {"offsets": {site.name: torch.ones(site.width)}} if method == "mean" else {}
    if method == "resample":
        kw = {"samples": {site.name: torch.randn(8, site.width)}}
    before = snapshot(loaded.model)
    ids = torch.randint(2, 100, (1, 8))
    with pytest.raises(RuntimeError, match="interrupted"), ablated(loaded.model, loaded.sites, ns, method, **kw):
        changed = loaded.model(input_ids=ids).logits
        raise RuntimeError("interrupted")
    assert_unchanged(loaded.model, before)
    assert not torch.equal(changed, loaded.model(input_ids=ids).logits)  # the ablation did act inside


def test_install_routing_is_undone_on_error(world):
    from neurospec.cluster.moefication import install_routing

    loaded, _, _ = world
    before = snapshot(loaded.model)
    labels = np.arange(96) % 4
    with pytest.raises(RuntimeError, match="interrupted"), install_routing(loaded, "layers.0.mlp", labels, 1):
        raise RuntimeError("interrupted")
    assert_unchanged(loaded.model, before)


def test_fold_ablation_says_it_changes_the_model_and_does(world):
    """The one in-place intervention is named so; :func:`folded_copy` is the copy-returning form."""
    loaded, _, _ = world
    site = loaded.sites["layers.0.mlp"]
    ns = NeuronSet({site.name: torch.tensor([2])}, {site.name: site.width})
    model = loaded.model
    copy, _ = folded_copy(model, loaded.sites, ns)
    fold_ablation(model, loaded.sites, ns)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(),
                                                   strict=True))
