"""The device path of every command on a tiny model in bfloat16: recording, folded and hooked ablation, evaluation,
clustering and selective pruning give on the GPU what they give on the CPU, within bfloat16 tolerance.

Marked ``cuda`` and skipped without a GPU (``pytest -m cuda``; ``benchmarks/gpu_check.sh`` runs them).
``NEUROSPEC_TEST_DEVICE=cpu`` runs the same tests with the CPU standing in for the GPU, which checks the tests
themselves on a machine without one.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from neurospec.evaluate.metrics import evaluate_lm
from neurospec.experiments.clusters import ClusterConfig, cluster
from neurospec.experiments.selective import PruneConfig, selective_pruning
from neurospec.intervene.ablate import ablated
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import from_module, model_fingerprint
from neurospec.record.recorder import RecordConfig, record_task

from tiny import char_tokenizer, tiny_inputs, tiny_model, write_corpus

STAND_IN = os.environ.get("NEUROSPEC_TEST_DEVICE") == "cpu"
DEVICE = torch.device("cpu" if STAND_IN else "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() or STAND_IN), reason="needs a CUDA GPU"),
]
DTYPE = torch.bfloat16
TOL = {"rtol": 3e-2, "atol": 3e-2}  # two bfloat16 forwards by different kernels


def _pair(seed: int = 0):
    """The same tiny bfloat16 llama on the CPU and on the device, as LoadedModel."""
    cpu = from_module(tiny_model("llama", seed=seed).to(DTYPE), char_tokenizer(), name="tiny-llama")
    dev = from_module(copy.deepcopy(cpu.model).to(DEVICE), char_tokenizer(), name="tiny-llama")
    assert dev.fingerprint == cpu.fingerprint and dev.device.type == DEVICE.type
    return cpu, dev


def test_recording_on_the_device_equals_the_cpu():
    cpu, dev = _pair()
    blocks = tiny_inputs("llama", batch=8, seq=32)["input_ids"]
    cfg = RecordConfig(tokens=256, seq_len=32, batch_size=4, reservoir=16)
    seen = []
    site = dev.sites["layers.0.mlp"]
    handle = dev.model.get_submodule(site.module).register_forward_pre_hook(lambda m, a: seen.append(a[0].device))
    try:
        on_dev = record_task(dev, blocks, dev.sites.select(), cfg)
    finally:
        handle.remove()
    assert seen and all(d.type == DEVICE.type for d in seen)  # the activations reached the hooks on the device
    on_cpu = record_task(cpu, blocks, cpu.sites.select(), cfg)
    for name, group in on_cpu.items():
        a, b = group["stats"].compute(), on_dev[name]["stats"].compute()
        assert torch.equal(a["count"], b["count"]) and int(b["nonfinite"].sum()) == 0
        for key in ("mean", "std", "mean_abs", "max", "min"):
            torch.testing.assert_close(b[key], a[key], **TOL, msg=f"{name} {key}")
        assert on_dev[name]["reservoir"].state_dict()["values"].device.type == "cpu"  # state lives on the CPU


@pytest.mark.parametrize("fold", [True, False])
def test_ablation_on_the_device_equals_the_cpu(fold):
    cpu, dev = _pair()
    sites = cpu.sites.select(kinds=("mlp",))
    neurons = NeuronSet.from_ids([f"{s.name}:{i}" for s in sites for i in range(0, s.width, 7)], cpu.sites)
    offsets = {s.name: torch.linspace(-0.5, 0.5, s.width) for s in sites}
    x = tiny_inputs("llama", batch=4, seq=24)["input_ids"]
    with torch.no_grad(), ablated(cpu.model, cpu.sites, neurons, "mean", offsets=offsets, fold=fold):
        want = cpu.model(input_ids=x).logits.float()
    with torch.no_grad(), ablated(dev.model, dev.sites, neurons, "mean", offsets=offsets, fold=fold) as info:
        got = dev.model(input_ids=x.to(DEVICE)).logits.float().cpu()
        if fold:  # the created biases live on their weights' device
            assert all(dev.model.get_submodule(m).bias.device.type == DEVICE.type for m in info.created_biases)
    torch.testing.assert_close(got, want, **TOL)
    assert model_fingerprint(dev.model) == cpu.fingerprint  # every weight put back


def test_evaluation_on_the_device_equals_the_cpu():
    cpu, dev = _pair()
    blocks = tiny_inputs("llama", batch=8, seq=32, seed=2)["input_ids"]
    a = evaluate_lm(cpu.model, blocks, batch_size=4)
    b = evaluate_lm(dev.model, blocks, batch_size=4)
    assert a["tokens"] == b["tokens"] and b["nonfinite"] == 0
    assert abs(a["loss"] - b["loss"]) < 2e-2 * max(1.0, abs(a["loss"]))
    assert abs(a["top1"] - b["top1"]) <= 0.05


def test_clustering_on_the_device_equals_the_cpu():
    cpu, dev = _pair()
    cfg = ClusterConfig("moefication", experts=4)
    a, b = cluster(cpu, cfg), cluster(dev, cfg)
    la, lb = a.labels, b.labels
    assert set(la) == set(lb)
    for site in la:
        x, y = torch.as_tensor(la[site]), torch.as_tensor(lb[site])
        assert x.shape == y.shape and float((x == y).float().mean()) >= 0.9, site


def test_selective_pruning_on_the_device_equals_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    forget = "fgt=" + write_corpus(tmp_path / "f.txt", seed=1, words=("quick", "quiet", "queen", "aqua"))
    retain = "ret=" + write_corpus(tmp_path / "r.txt", seed=2, words=("alpha", "beta", "delta", "gamma"))
    rc = RecordConfig(tokens=256, eval_tokens=128, seq_len=32, batch_size=4, reservoir=0, hist_bins=16)
    pc = PruneConfig(score="abs", frac=0.05, steps=1)
    cpu, dev = _pair(seed=1)
    a = selective_pruning(cpu, forget, retain, tmp_path / "cpu", record_cfg=rc, prune_cfg=pc)
    b = selective_pruning(dev, forget, retain, tmp_path / "dev", record_cfg=rc, prune_cfg=pc)
    assert [s["n_pruned"] for s in a["steps"]] == [s["n_pruned"] for s in b["steps"]]
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        for side in ("forget", "retain"):
            assert abs(sa[side]["top1"] - sb[side]["top1"]) <= 0.05
    assert model_fingerprint(dev.model) == cpu.fingerprint  # the caller's model is unchanged
