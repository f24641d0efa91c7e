"""Sparsity on the bundled SmolLM2-135M: the first two blocks at 50%, SparseGPT against magnitude."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_sparsegpt_beats_magnitude_on_two_blocks(tmp_path, monkeypatch):
    from neurospec.data.tasks import build_task_data
    from neurospec.evaluate import evaluate_lm
    from neurospec.models.loading import load_model, model_fingerprint
    from neurospec.sparsity import sparsify

    loaded = load_model("smollm2-135m")
    fingerprint = model_fingerprint(loaded.model)
    data = build_task_data("prose", loaded.tokenizer, seq_len=256, collect_tokens=2048, eval_tokens=256)
    dense = evaluate_lm(loaded, data.eval)["perplexity"]
    ppl = {}
    for method in ("magnitude", "sparsegpt"):
        res = sparsify(loaded, method, calibration=data.collect, layers=[0, 1])
        assert len(res.layers) == 14 and all(r.sparsity == pytest.approx(0.5) for r in res.layers.values())
        ppl[method] = evaluate_lm(res.model, data.eval)["perplexity"]
        del res
    assert model_fingerprint(loaded.model) == fingerprint  # the loaded model is untouched
    assert torch.isfinite(torch.tensor(list(ppl.values()))).all()
    assert dense < ppl["sparsegpt"] < ppl["magnitude"], (dense, ppl)
