"""The relu co-moments a run records equal the published co-activation of the full activation tensor."""

import json

import numpy as np
import torch

from neurospec.cluster.moefication import relu_coactivation
from neurospec.models.loading import from_module
from neurospec.record.recorder import RecordConfig, _forward_body, record
from neurospec.record.store import open_run

from tiny import char_tokenizer, tiny_model, write_corpus


def test_recorded_relu_comoments_equal_the_full_tensor(tmp_path, monkeypatch):
    from neurospec.data.tasks import build_task_data, parse_task_spec

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded = from_module(tiny_model("llama"), char_tokenizer(), name="tiny-llama")
    spec = f"alpha={write_corpus(tmp_path / 'a.txt', seed=1)}"
    cfg = RecordConfig(tokens=320, eval_tokens=64, seq_len=32, batch_size=4, kinds=("mlp",), reservoir=0,
                       relu_comoments=("mlp",))
    record(loaded, [spec], tmp_path / "run", cfg)
    run = open_run(tmp_path / "run")
    data = build_task_data(parse_task_spec(spec), loaded.tokenizer, seq_len=32, collect_tokens=320, eval_tokens=64,
                           seed=0)
    site = loaded.sites["layers.1.mlp"]
    seen = []
    h = loaded.model.get_submodule(site.module).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, site.width).double()))
    with torch.no_grad():
        _forward_body(loaded.model)(input_ids=data.collect)
    h.remove()
    x = torch.cat(seen)
    assert x.shape[0] == 320 and (x < 0).any()  # SiLU-gated activations: rectifying matters
    acc = run.accumulators("alpha")[site.name]["relu_comoments"]
    np.testing.assert_allclose(acc.coactivation().numpy(), relu_coactivation(x), rtol=1e-4, atol=1e-7)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["relu_comoments"] == ["mlp"]
    # a config without relu co-moments serialises as before (older manifests keep matching)
    assert "relu_comoments" not in RecordConfig().to_dict()
    assert RecordConfig.from_dict(cfg.to_dict()) == cfg
