"""Metrics against hand computations with the model's own logits."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from neurospec.errors import NeurospecError
from neurospec.evaluate import (
    evaluate_lm,
    evaluate_representation,
    mlm_positions,
    most_frequent_tokens,
    reference_states,
)
from neurospec.intervene.ablate import ablated
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.sites import find_sites

from tiny import VOCAB, tiny_model


def blocks(n=7, seq=20, seed=0, low=0):
    g = torch.Generator().manual_seed(seed)
    # a skewed distribution, so that "frequent tokens" means something
    probs = torch.linspace(1.0, 0.05, VOCAB - low) ** 3
    return low + torch.multinomial(probs, n * seq, replacement=True, generator=g).reshape(n, seq)


def hand_metrics(logits, targets, skip):
    logits, targets = logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1)
    top10 = logits.topk(10, dim=-1).indices
    top1 = logits.argmax(-1) == targets
    keep = ~torch.isin(targets, skip)
    loss = F.cross_entropy(logits, targets).item()
    return {
        "top1": top1.double().mean().item(),
        "top10": (top10 == targets[:, None]).any(-1).double().mean().item(),
        "skip_top1": top1[keep].double().mean().item(),
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": targets.numel(),
        "skip_tokens": int(keep.sum()),
    }


def test_most_frequent_tokens_matches_counter():
    b = blocks()
    counts = Counter(b.reshape(-1).tolist())
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    assert most_frequent_tokens(b, n=50).tolist() == ranked[:50]
    assert most_frequent_tokens(torch.tensor([[3, 3, 1]]), n=50).tolist() == [3, 1]


def test_causal_lm_metrics_equal_hand_computation():
    model = tiny_model("llama")
    b = blocks()
    skip = most_frequent_tokens(blocks(seed=1), n=50)
    got = evaluate_lm(model, b, batch_size=3, skip_ids=skip)  # batches of 3, 3, 1
    with torch.no_grad():
        lg = model(input_ids=b).logits
    want = hand_metrics(lg[:, :-1], b[:, 1:], skip)
    assert got["objective"] == "causal"
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert 0 < got["skip_tokens"] < got["tokens"] == 7 * 19
    assert evaluate_lm(model, b)["skip_top1"] is None
    assert "top5" in evaluate_lm(model, b, topk=5)


def test_masked_lm_metrics_on_seeded_masks():
    model = tiny_model("bert")
    b = blocks(n=9, seq=24, low=5)
    b[:, 0], b[:, -1] = 2, 3  # "CLS"/"SEP"-like special tokens at both ends
    mask_id, special = 4, torch.tensor([2, 3, 4])
    kw = dict(mask_token_id=mask_id, special_ids=torch.tensor([2, 3]))
    got = evaluate_lm(model, b, batch_size=4, skip_ids=torch.tensor([5, 6]), seed=3, **kw)
    sel = mlm_positions(b, special, seed=3)
    assert not sel[:, 0].any() and not sel[:, -1].any()
    assert 0.08 < sel.float().mean() < 0.25
    with torch.no_grad():
        lg = model(input_ids=b.masked_fill(sel, mask_id)).logits
    want = hand_metrics(lg[sel], b[sel], torch.tensor([5, 6]))
    assert got["objective"] == "masked"
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    assert evaluate_lm(model, b, seed=3, **kw)["loss"] == pytest.approx(got["loss"])
    assert evaluate_lm(model, b, seed=4, **kw)["loss"] != pytest.approx(got["loss"])
    with pytest.raises(NeurospecError, match="mask_token_id"):
        evaluate_lm(model, b)


def test_models_without_lm_head_get_a_pointer_to_the_right_metric():
    encoder = tiny_model("bert", head=False)
    with pytest.raises(NeurospecError, match="evaluate_representation"):
        evaluate_lm(encoder, blocks())
    with pytest.raises(NeurospecError, match="classification accuracy"):
        evaluate_lm(tiny_model("vit"), blocks())
    with pytest.raises(NeurospecError, match="LongTensor"):
        evaluate_lm(tiny_model("llama"), blocks().float())
    with pytest.raises(NeurospecError, match="vocabulary"):
        evaluate_lm(tiny_model("llama"), blocks() + VOCAB)


def test_representation_metric():
    encoder = tiny_model("bert", head=False)
    sites = find_sites(encoder)
    b = blocks(n=5, seq=16)
    ref = reference_states(encoder, b, batch_size=2)
    assert ref.shape == (5, 16, 64)
    same = evaluate_representation(encoder, b, ref, batch_size=2)
    assert same["cosine"] == pytest.approx(1.0) and same["cosine_distance"] == pytest.approx(0.0, abs=1e-7)
    assert same["rel_l2"] == pytest.approx(0.0, abs=1e-7) and same["tokens"] == 80
    with ablated(encoder, sites, NeuronSet.random(sites, frac=0.5, seed=0), "zero"):
        got = evaluate_representation(encoder, b, ref, batch_size=3)
        with torch.no_grad():
            h = encoder(input_ids=b).last_hidden_state.reshape(-1, 64).double()
    r = ref.reshape(-1, 64).double()
    cos = (h * r).sum(-1) / (h.norm(dim=-1) * r.norm(dim=-1))
    assert got["cosine"] == pytest.approx(cos.mean().item(), rel=1e-6)
    assert got["rel_l2"] == pytest.approx(((h - r).norm(dim=-1) / r.norm(dim=-1)).mean().item(), rel=1e-6)
    assert got["cosine_distance"] > 1e-5


@pytest.mark.slow
def test_real_model_metrics_are_sensible_and_match_hand_computation():
    from neurospec.models.loading import load_model

    loaded = load_model("smollm2-135m")
    text = ("The cat sat on the mat. The dog sat on the rug. The bird sat on the branch and sang a song "
            "for the morning sun, and the children listened from the window of the old house. ") * 3
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"][:96]).reshape(2, 48)
    got = evaluate_lm(loaded, ids, batch_size=1)
    with torch.no_grad():
        lg = loaded.model(input_ids=ids).logits
    want = hand_metrics(lg[:, :-1], ids[:, 1:], torch.tensor([], dtype=torch.long))
    for k in ("top1", "top10", "loss", "tokens"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert got["loss"] < 4.0 and got["top1"] > 0.3
