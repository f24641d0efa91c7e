"""Devices and dtypes: the option rules, models placed by a device map (tested on the CPU through accelerate's own
dispatch with disk offload), and non-finite half-precision activations."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from neurospec.cli.common import check_model_options
from neurospec.errors import NeurospecError
from neurospec.intervene.ablate import ablated, fold_ablation
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models import placement as P
from neurospec.models.loading import from_module, load_model, model_fingerprint
from neurospec.record.recorder import RecordConfig, record_task

from tiny import tiny_config, tiny_inputs, tiny_model

NO_GPU = not torch.cuda.is_available()
SPLIT_MAP = {  # layer 1 and the head offloaded to disk, the rest in memory: the same hook path as GPUs + offload
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
    "model.rotary_emb": "cpu", "lm_head": "disk",
}


# ----------------------------------------------------------------------------------------------- option rules


def test_float16_is_refused_on_the_cpu_and_bfloat16_allowed():
    for device in (None, "cpu"):
        with pytest.raises(NeurospecError, match="float16 is not supported on the CPU.*bfloat16"):
            check_model_options(device, "float16")
        check_model_options(device, "bfloat16")
        check_model_options(device, "float32")
    with pytest.raises(NeurospecError, match="unknown --dtype"):
        check_model_options("cpu", "float8")


@pytest.mark.skipif(not NO_GPU, reason="checks the messages of a machine without a GPU")
def test_cuda_and_auto_without_a_gpu_are_one_line_errors():
    with pytest.raises(NeurospecError, match="CUDA is not available.*--device cpu"):
        check_model_options("cuda", "bfloat16")
    with pytest.raises(NeurospecError, match="no CUDA GPU is visible: use --device cpu"):
        check_model_options("auto", None)


def test_load_model_refuses_float16_on_the_cpu(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path / "m")  # refused before any weight is read
    with pytest.raises(NeurospecError, match="float16 is not supported on the CPU"):
        load_model(str(tmp_path / "m"), dtype="float16")


@pytest.mark.skipif(not NO_GPU, reason="checks the message of a machine without a GPU")
def test_load_model_auto_without_a_gpu_says_to_use_the_cpu(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")  # the size is read from the config before loading
    with pytest.raises(NeurospecError, match="no CUDA GPU is visible"):
        load_model(str(tmp_path / "m"), device="auto")


def test_auto_device_map_keeps_a_model_that_fits_on_one_gpu():
    gib = 2**30
    with pytest.warns(UserWarning, match="fits on cuda:1.*instead of being split"):
        assert P.auto_device_map(10 * gib, free=[8 * gib, 40 * gib]) == {"": 1}
    assert P.auto_device_map(10 * gib, free=[40 * gib]) == {"": 0}  # one GPU: no warning needed
    assert P.auto_device_map(10 * gib, free=[12 * gib, 12 * gib]) == "auto"  # no room for activations: split
    assert P.auto_device_map(100 * gib, free=[80 * gib, 80 * gib]) == "auto"
    with pytest.raises(NeurospecError, match="no CUDA GPU"):
        P.auto_device_map(gib, free=[])


def test_config_model_bytes_counts_the_weights_once():
    import transformers as T

    model = tiny_model("llama")
    seen = {id(p): p for p in model.parameters()}.values()
    numel = sum(p.numel() for p in seen)
    cfg = tiny_config("llama")
    assert P.config_model_bytes(T.LlamaForCausalLM, cfg, torch.bfloat16) == 2 * numel
    assert P.config_model_bytes(T.LlamaForCausalLM, cfg, torch.float32) == 4 * numel


def test_a_bad_device_map_is_refused():
    model = tiny_model("llama")
    with pytest.raises(NeurospecError, match="no module 'model.layers.7'"):
        P.check_device_map(model, {**SPLIT_MAP, "model.layers.7": "cpu"})
    with pytest.raises(NeurospecError, match="placed by no entry"):
        P.check_device_map(model, {k: v for k, v in SPLIT_MAP.items() if k != "model.norm"})
    with pytest.raises(NeurospecError, match="several entries"):
        P.check_device_map(model, {**SPLIT_MAP, "model.layers.1.mlp": "cpu"})
    with pytest.raises(NeurospecError, match="need an offload_dir"):
        P.dispatch(model, SPLIT_MAP)


# ----------------------------------------------------------------------------------------------- device maps


def _split(tmp_path, model=None):
    """A tiny llama and a copy dispatched by SPLIT_MAP (disk offload), both wrapped as LoadedModel."""
    ref = from_module(model if model is not None else tiny_model("llama"))
    moved = P.dispatch(copy.deepcopy(ref.model), SPLIT_MAP, offload_dir=str(tmp_path / "offload"))
    return ref, dataclasses.replace(ref, model=moved)


def test_site_devices_follow_the_nearest_accelerate_hook():
    model = tiny_model("llama")
    loaded = from_module(model)
    model.model.layers[1]._hf_hook = SimpleNamespace(execution_device=torch.device("meta"))
    where = P.site_devices(model, loaded.sites)
    assert {where[s.name] for s in loaded.sites if s.layer == 1} == {torch.device("meta")}
    assert {where[s.name] for s in loaded.sites if s.layer == 0} == {torch.device("cpu")}
    model.model.embed_tokens._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device=0)])
    assert P.input_device(model) == torch.device("cuda", 0)  # a GPU index means that CUDA device


def test_dispatched_model_reads_offloaded_weights_and_keeps_its_fingerprint(tmp_path):
    ref, split = _split(tmp_path)
    down = "model.layers.1.mlp.down_proj"
    assert P.is_offloaded(split.model, down) and not P.is_offloaded(split.model, "model.layers.0.mlp.down_proj")
    assert P.execution_device(split.model, down) == torch.device("cpu") and split.device == torch.device("cpu")
    assert model_fingerprint(split.model) == ref.fingerprint
    x = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(split.model(**x).logits, ref.model(**x).logits, rtol=0, atol=0)


def test_recording_a_dispatched_model_equals_the_single_device_model(tmp_path):
    ref, split = _split(tmp_path)
    blocks = tiny_inputs("llama", batch=6, seq=16)["input_ids"]
    cfg = RecordConfig(tokens=96, seq_len=16, batch_size=2, reservoir=8)
    a = record_task(ref, blocks, ref.sites.select(), cfg)
    b = record_task(split, blocks, split.sites.select(), cfg)
    assert set(a) == set(b)
    for site in a:
        for name in a[site]:
            sa, sb = a[site][name].state_dict(), b[site][name].state_dict()
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, equal_nan=True, msg=f"{site}/{name}/{k}")


@pytest.mark.parametrize("fold", [True, False])
def test_ablating_a_dispatched_model_equals_the_single_device_model(tmp_path, fold):
    ref, split = _split(tmp_path)
    sites = ref.sites.select(kinds=("mlp",))
    neurons = NeuronSet.from_ids([f"{s.name}:{i}" for s in sites for i in (1, 5, 9)], ref.sites)
    offsets = {s.name: torch.linspace(-1, 1, s.width) for s in sites}
    x = tiny_inputs("llama")
    with torch.no_grad(), ablated(ref.model, ref.sites, neurons, "mean", offsets=offsets, fold=fold):
        want = ref.model(**x).logits
    with torch.no_grad(), ablated(split.model, split.sites, neurons, "mean", offsets=offsets, fold=fold) as info:
        got = split.model(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    offloaded = {"model.layers.1.mlp.down_proj"}
    if fold:  # in-memory weights fold; the offloaded layer is ablated by a hook instead
        assert set(info.folded) == {s.module for s in sites} - offloaded and set(info.hooked) == offloaded
    assert model_fingerprint(split.model) == ref.fingerprint  # put back on exit


def test_folding_into_offloaded_weights_is_refused(tmp_path):
    _, split = _split(tmp_path)
    neurons = NeuronSet.from_ids(["layers.1.mlp:0"], split.sites)
    with pytest.raises(NeurospecError, match="offloaded.*ablated"):
        fold_ablation(split.model, split.sites, neurons)


# ----------------------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_overflow_is_counted_as_nonfinite(dtype):
    """A neuron whose activation overflows the half dtype (a planted huge weight row) is counted as non-finite
    per token, exactly as in the full activation tensor, and left out of its moments."""
    model = tiny_model("llama").to(dtype)
    big = torch.finfo(dtype).max
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3].fill_(big)  # up_proj(x)[3] overflows to +-inf, or nan
    loaded = from_module(model)
    site = loaded.sites["layers.0.mlp"]
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, site.width).float()))
    blocks = tiny_inputs("llama", batch=4, seq=16)["input_ids"]
    try:
        accs = record_task(loaded, blocks, [site], RecordConfig(tokens=64, seq_len=16, batch_size=2, reservoir=0))
    finally:
        handle.remove()
    full = torch.cat(seen)
    bad = (~torch.isfinite(full)).sum(0)
    assert int(bad[3]) > 0  # the plant overflowed
    state = accs[site.name]["stats"].state_dict()
    torch.testing.assert_close(state["nonfinite"], bad)
    torch.testing.assert_close(state["count"], (torch.isfinite(full)).sum(0))
    keep = torch.isfinite(full)
    want = torch.where(keep, full.double(), 0.0).sum(0)
    torch.testing.assert_close(state["sum"], want, rtol=1e-6, atol=1e-6)


def test_gpu_bench_runs_its_cpu_smoke_setting(capsys):
    """benchmarks/gpu_bench.py: every figure but the GPU's comes out of the same code on a tiny CPU model."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--cpu-smoke", "--json", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out) == out and out["gpu"] is None
    (run,) = out["runs"]
    # timings only (a ratio can fall either side of 1 on a tiny model): finite and positive
    assert all(0 < run[k] < float("inf") for k in ("record_ratio", "fold_ratio", "eval_tokens_per_s"))
    assert run["peak_bytes_record"] is None  # GPU memory only on a GPU
