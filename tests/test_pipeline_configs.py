"""The typed configs of the ablation study, MoE routing and cluster alignment: each bad setting is refused with a
clear message before any model work, the config and keyword paths are one, and the configs serialise."""

import json

import pytest
import torch

from neurospec.errors import NeurospecError
from neurospec.experiments import clusters as clusters_mod
from neurospec.experiments import routing as routing_mod
from neurospec.experiments.ablation import AblationStudyConfig, ablation_study
from neurospec.experiments.clusters import AlignConfig, align
from neurospec.experiments.routing import RoutingConfig, routing
from neurospec.models.sites import find_sites

from tiny import VOCAB, tiny_model


class Untouchable:
    """A model (or sites) whose every attribute access fails: any model work shows up as an AssertionError."""

    def __getattr__(self, name):
        raise AssertionError(f"model work before the settings were checked (.{name})")


@pytest.fixture
def no_cluster_work(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("clustering read before the settings were checked")

    for mod in (routing_mod, clusters_mod):
        monkeypatch.setattr(mod, "load_clustering", boom)
    monkeypatch.setattr(clusters_mod, "task_masks", boom)
    monkeypatch.setattr(routing_mod, "load_model", boom)


BAD_ABLATION = [
    ({"kind": "heads"}, "kind must be one of attn, mlp, both"),
    ({"frac_per_step": 0.0}, r"frac_per_step must be in \(0, 1\]"),
    ({"frac_per_step": 1.5}, r"frac_per_step must be in \(0, 1\]"),
    ({"frac_per_step": "half"}, "frac_per_step must be a number"),
    ({"frac_per_step": 0.3, "steps": 4}, r"4 steps of 0.3 ablate more than every neuron"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer >= 1"),
    ({"methods": ("zero", "blur")}, "unknown ablation method 'blur'; known: "),
    ({"methods": ()}, "methods is empty"),
    ({"methods": "zero"}, "methods must be a sequence of method names"),
    ({"methods": ("zero", "zero")}, "methods names a method twice"),
    ({"seeds": ()}, "seeds is empty"),
    ({"seeds": (0, -1)}, "each seed must be an integer >= 0, got -1"),
    ({"seeds": (0, True)}, "each seed must be an integer >= 0, got True"),
    ({"seeds": 3}, "seeds must be a sequence of integers"),
    ({"seeds": (1, 1)}, "seeds names a seed twice"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"metric": "accuracy"}, "metric must be one of auto, lm, representation"),
    ({"per_neuron": "yes"}, "per_neuron must be True or False"),
    ({"per_neuron": True, "methods": ("zero",)}, "per_neuron applies to methods that draw values per input"),
]


@pytest.mark.parametrize("bad, message", BAD_ABLATION)
def test_ablation_study_config_refuses_each_bad_setting_before_model_work(bad, message):
    with pytest.raises(NeurospecError, match=message):
        AblationStudyConfig(**bad)
    # the keyword path builds the same config first: the model is never touched
    with pytest.raises(NeurospecError, match=message):
        ablation_study(Untouchable(), Untouchable(), {"t": torch.zeros(1, 4, dtype=torch.long)}, **bad)


BAD_ROUTING = [
    ({"tasks": "python"}, "tasks must be a sequence of task names"),
    ({"tasks": ("python", "python")}, "tasks names a task twice"),
    ({"ks": ()}, "ks is empty"),
    ({"ks": 4}, "ks must be a sequence of integers"),
    ({"ks": (1, 0)}, "each k must be an integer >= 1, got 0"),
    ({"ks": (1, 2.5)}, "each k must be an integer >= 1, got 2.5"),
    ({"eval_tokens": 0}, "eval_tokens must be an integer >= 1"),
    ({"seq_len": -4}, "seq_len must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"score": "max"}, "score must be one of sum, abs"),
    ({"threads": 0}, r"threads \(or None: leave them as they are\) must be an integer >= 1"),
]


@pytest.mark.parametrize("bad, message", BAD_ROUTING)
def test_routing_config_refuses_each_bad_setting_before_reading_anything(bad, message, no_cluster_work, tmp_path):
    with pytest.raises(NeurospecError, match=message):
        RoutingConfig(**bad)
    with pytest.raises(NeurospecError, match=message):
        routing(tmp_path / "missing", **{"tasks": ("python",), "ks": (1,), **bad})


BAD_ALIGN = [
    ({"n_perm": 0}, "n_perm must be an integer >= 1"),
    ({"n_perm": 9.5}, "n_perm must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"frac": 0.0}, r"frac must be a number in \(0, 1\] \(or None"),
    ({"frac": 1.2}, r"frac must be a number in \(0, 1\]"),
    ({"frac": float("nan")}, r"frac must be a number in \(0, 1\]"),
    ({"alpha": 1.0}, r"alpha must be a number in \(0, 1\)"),
    ({"alpha": 0}, r"alpha must be a number in \(0, 1\)"),
]


@pytest.mark.parametrize("bad, message", BAD_ALIGN)
def test_align_config_refuses_each_bad_setting_before_reading_anything(bad, message, no_cluster_work, tmp_path):
    with pytest.raises(NeurospecError, match=message):
        AlignConfig(**bad)
    with pytest.raises(NeurospecError, match=message):
        align(tmp_path / "c", tmp_path / "t", **bad)


def test_a_config_and_keywords_together_or_a_wrong_config_type_are_refused(no_cluster_work, tmp_path):
    blocks = {"t": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(NeurospecError, match=r"steps given both as keywords and through cfg"):
        ablation_study(Untouchable(), Untouchable(), blocks, AblationStudyConfig(), steps=2)
    with pytest.raises(NeurospecError, match="cfg must be a AblationStudyConfig, got RoutingConfig"):
        ablation_study(Untouchable(), Untouchable(), blocks, RoutingConfig())
    with pytest.raises(NeurospecError, match="ks given both"):
        routing(tmp_path, ks=(1,), cfg=RoutingConfig())
    with pytest.raises(NeurospecError, match="seed given both"):
        align(tmp_path, tmp_path, AlignConfig(), seed=1)


def test_config_and_keyword_paths_give_identical_rows_on_a_tiny_model():
    model = tiny_model("llama")
    sites = find_sites(model)
    g = torch.Generator().manual_seed(5)
    tasks = {"a": torch.randint(0, VOCAB, (3, 12), generator=g), "b": torch.randint(0, VOCAB, (2, 12), generator=g)}
    offsets = {"mean": {s.name: torch.randn(s.width, generator=g) for s in sites.of_kind("mlp")}}
    settings = {"kind": "mlp", "frac_per_step": 0.25, "steps": 2, "methods": ("zero", "mean"), "seeds": (3, 4),
                "batch_size": 2}
    by_keywords = ablation_study(model, sites, tasks, offsets_by_method=offsets, **settings)
    by_config = ablation_study(model, sites, tasks, AblationStudyConfig(**settings), offsets_by_method=offsets)
    assert by_config == by_keywords
    assert len(by_config) == 2 * (1 + 2) * 2 * 2  # seeds x (baseline + steps) x methods x tasks
    assert {r["n_ablated"] for r in by_config} == {0, 2 * 24, 2 * 48}  # 25% and 50% of 96 neurons in 2 layers
    assert any(r["loss_increase"] != 0 for r in by_config)


@pytest.mark.parametrize("cfg", [
    AblationStudyConfig(kind="both", methods=("zero", "resample"), seeds=(2,), per_neuron=True),
    RoutingConfig(tasks=("python", "prose"), ks=(8, 1, 8), threads=None),
    AlignConfig(n_perm=50, frac=0.1, alpha=0.01, seed=4),
])
def test_configs_serialise_and_rebuild_themselves(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["type"] == type(cfg).__name__ and d["version"] == 1
    rebuilt = type(cfg)(**{k: v for k, v in d.items() if k not in ("type", "version")})
    assert rebuilt == cfg and rebuilt.to_dict() == d


def test_configs_normalise_their_settings():
    from neurospec.intervene.ablate import study_methods

    assert AblationStudyConfig().methods == study_methods()  # None: every reference-run method, resolved
    assert AblationStudyConfig(seeds=[1, 2], methods=["zero"]).seeds == (1, 2)
    assert RoutingConfig(ks=[8, 1, 8]).ks == (1, 8)
    assert AlignConfig(frac=1).frac == 1.0 and isinstance(AlignConfig(frac=1).frac, float)


def test_routing_config_takes_parsed_task_specs_and_records_their_names():
    from neurospec.data.tasks import parse_task_spec

    cfg = RoutingConfig(tasks=(parse_task_spec("python"), "prose"))
    assert cfg.to_dict()["tasks"] == ["python", "prose"]
    with pytest.raises(NeurospecError, match="tasks names a task twice"):
        RoutingConfig(tasks=(parse_task_spec("python"), "python"))
