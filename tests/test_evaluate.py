"""Metrics against hand computations with the model's own logits."""

import math
import warnings
from collections import Counter

import numpy as np
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
    from neurospec.evaluate.metrics import hidden_path

    assert hidden_path(loaded.model) is not None  # evaluated through the LM head in chunks, compared to full logits
    got = evaluate_lm(loaded, ids, batch_size=1, chunk=17)
    with torch.no_grad():
        lg = loaded.model(input_ids=ids).logits
    want = hand_metrics(lg[:, :-1], ids[:, 1:], torch.tensor([], dtype=torch.long))
    for k in ("top1", "top10", "loss", "tokens"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert got["loss"] < 4.0 and got["top1"] > 0.3


# ------------------------------------------------------------------ one definition of a hit: ties, NaN, chunks


def sort_rank(row: list[float], target: int) -> int:
    """Brute force: the target's position when the row is sorted by logit, the target last among equal logits."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j == target))
    return order.index(target)


def test_target_rank_equals_a_sort_with_ties_against_the_target():
    from neurospec.evaluate.metrics import TokenCounts

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 40, generator=g)
    logits[:150] = torch.randint(0, 4, (150, 40), generator=g).float()  # rows of heavy ties
    targets = torch.randint(0, 40, (300,), generator=g)
    logits[150:200, 0] = logits[150:200].gather(1, targets[150:200, None])[:, 0]  # the target tied with token 0
    ranks = torch.tensor([sort_rank(r, int(t)) for r, t in zip(logits.tolist(), targets.tolist(), strict=True)])
    counts = TokenCounts(5, None, chunk=37)
    counts.update(logits, targets)
    got = counts.compute("causal")
    assert got["top1"] == pytest.approx(float((ranks < 1).double().mean()))
    assert got["top5"] == pytest.approx(float((ranks < 5).double().mean()))
    assert got["nonfinite"] == 0
    assert 0 < got["top1"] < 0.5  # the tie rows are not all hits


def test_nan_and_constant_logits_are_never_correct():
    from neurospec.evaluate.metrics import TokenCounts

    targets = torch.arange(6)
    for fill, nonfinite in ((float("nan"), 6), (0.0, 0)):
        counts = TokenCounts(10, torch.tensor([1]))
        counts.update(torch.full((6, 8), fill), targets)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = counts.compute("causal")
        assert got["top1"] == 0 and got["top10"] == 1.0 * (nonfinite == 0) and got["skip_top1"] == 0
        assert got["nonfinite"] == nonfinite and (len(caught) == 1) == bool(nonfinite)
    lg = torch.randn(4, 8)
    lg[1, 3] = float("inf")
    lg[2, 5] = float("nan")
    counts = TokenCounts(10, None)
    counts.update(lg, lg.argmax(-1).clamp(max=7))
    with pytest.warns(RuntimeWarning, match="2 of 4 positions"):
        got = counts.compute("causal")
    assert got["nonfinite"] == 2 and got["top1"] == 0.5 and math.isnan(got["loss"])


def _constant_head(model, value):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else model.classifier
    with torch.no_grad():
        head.weight.fill_(value)
        if getattr(head, "bias", None) is not None:
            head.bias.fill_(0.0)
    return model


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_models_with_constant_or_nan_logits_score_zero_everywhere(value):
    from neurospec.evaluate import task_metrics
    from neurospec.evaluate.site_ablation import LMEvaluator
    from neurospec.models.loading import from_module

    b = torch.zeros(3, 10, dtype=torch.long)  # every target is token 0, the first of the tied logits
    model = _constant_head(tiny_model("llama"), value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for full in (False, True):
            got = evaluate_lm(model, b, full_logits=full)
            assert got["top1"] == 0 and got["nonfinite"] == (27 if value != 0 else 0)
        lm = from_module(model, name="tiny")
        assert LMEvaluator(lm, {"t": b}).baseline["t"]["top1"] == 0
        vit = from_module(_constant_head(tiny_model("vit"), value), name="vit")
        m = task_metrics(vit, torch.randn(5, 1, 8, 8), label=0)
    assert m["top1"] == 0 and m["nonfinite"] == (5 if value != 0 else 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "qwen2", "gemma"])
def test_chunked_head_path_equals_the_full_logits(family):
    from neurospec.evaluate.metrics import hidden_path

    model = tiny_model(family)
    base, head = hidden_path(model)
    rows = []
    hook = head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    b = blocks(n=5, seq=16, low=2)
    skip = most_frequent_tokens(b, n=10)
    try:
        got = evaluate_lm(model, b, batch_size=2, skip_ids=skip, chunk=7)
    finally:
        hook.remove()
    want = evaluate_lm(model, b, batch_size=2, skip_ids=skip, full_logits=True)
    assert rows and max(rows) <= 7  # the head only ever saw chunks of positions
    for k, v in want.items():
        assert got[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), k


def test_heads_that_transform_logits_take_the_full_path():
    from neurospec.evaluate.metrics import hidden_path

    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    assert hidden_path(model) is None
    assert hidden_path(tiny_model("bert")) is None  # masked LMs always take the full logits


# ------------------------------------------------------------------------- head-less encoders in every analysis


@pytest.fixture
def encoder(monkeypatch, tmp_path):
    from neurospec.models.loading import from_module

    from tiny import char_tokenizer

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    return from_module(tiny_model("bert", head=False), tokenizer=char_tokenizer(), name="tiny-encoder")


def hand_similarity(model, ids, ref):
    with torch.no_grad():
        h = model(input_ids=ids).last_hidden_state.reshape(-1, ref.shape[-1]).double()
    r = ref.reshape(-1, ref.shape[-1]).double()
    return float(((h * r).sum(-1) / (h.norm(dim=-1) * r.norm(dim=-1))).mean())


def test_task_metrics_of_a_headless_encoder_is_the_representation_similarity(encoder):
    from neurospec.evaluate import task_metrics

    b = blocks(n=4, seq=12, low=2)
    with pytest.raises(NeurospecError, match="reference_states"):
        task_metrics(encoder, b)
    ref = reference_states(encoder, b)
    ns = NeuronSet.random(encoder.sites, frac=0.3, seed=1)
    with ablated(encoder.model, encoder.sites, ns, "zero"):
        m = task_metrics(encoder, b, reference=ref, batch_size=3)
        want = hand_similarity(encoder.model, b, ref)
    assert m["objective"] == "representation" and m["metric"] == "representation similarity"
    assert m["top1"] == pytest.approx(want, rel=1e-6) and m["loss"] == pytest.approx(1 - want, rel=1e-5)
    assert want < 1 - 1e-5 and m["top10"] is None and m["nonfinite"] == 0


def test_task_map_and_pruning_of_a_headless_encoder(encoder, tmp_path):
    from neurospec.experiments.selective import PruneConfig, selective_pruning
    from neurospec.experiments.taskmap import TaskMapConfig, task_map
    from neurospec.record.recorder import RecordConfig
    from neurospec.score.selection import select_kind

    rc = RecordConfig(tokens=400, eval_tokens=64, seq_len=16, batch_size=4, reservoir=0, hist_bins=16)
    res = task_map(encoder, ["prose", "dialog"], tmp_path / "map", record_cfg=rc,
                   cfg=TaskMapConfig(fractions=(0.1,), select_frac=0.1, random_init=False))
    assert res["metric"] == "representation similarity"
    sel = np.array(res["selectivity"])
    assert sel.shape == (2, 2) and (sel > 0).all()
    # row "prose", column "dialog" by hand: prune prose's neurons, similarity of dialog's states to the unpruned
    from neurospec.data.build import build_tasks
    from neurospec.experiments.taskmap import task_scores
    from neurospec.record.store import open_run

    data = build_tasks(encoder, ["prose", "dialog"], rc)
    ref = reference_states(encoder, data["dialog"].eval)
    ns = select_kind(task_scores(open_run(tmp_path / "map" / "model"), ["prose", "dialog"], TaskMapConfig())["prose"],
                      0.1, "mlp", encoder.sites)
    with ablated(encoder.model, encoder.sites, ns, "zero"):
        want = 1 - hand_similarity(encoder.model, data["dialog"].eval, ref)
    assert sel[0, 1] == pytest.approx(want, rel=1e-5)

    p = selective_pruning(encoder, "prose", ["dialog"], tmp_path / "prune", record_cfg=rc,
                          prune_cfg=PruneConfig(frac=0.1, steps=2))
    assert p["metric"] == "representation similarity" and math.isfinite(p["area"])
    forget = [s["forget"]["top1"] for s in p["steps"]]
    assert forget[0] == pytest.approx(1.0) and forget[2] < forget[1] < 1.0


def test_evaluate_command_on_a_headless_encoder_names_its_metric(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from neurospec.cli import _register, app

    from tiny import char_tokenizer

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    _register()
    tiny_model("bert", head=False).save_pretrained(tmp_path / "enc")
    char_tokenizer().save_pretrained(tmp_path / "enc")
    args = ["evaluate", "--model", str(tmp_path / "enc"), "--task", "prose", "--tokens", "64", "--seq-len", "16"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["prose"]
    assert m["metric"] == "representation similarity" and m["tokens"] == 64
    assert m["cosine_distance"] == pytest.approx(0.0, abs=1e-6) and m["top10"] is None
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "representation similarity" in r.output


@pytest.mark.slow
def test_real_minilm_evaluate_and_task_map(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from neurospec.cli import _register, app

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    _register()
    r = CliRunner().invoke(app, ["evaluate", "--model", "minilm-l6", "--task", "prose", "--tokens", "128",
                                 "--seq-len", "64", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["prose"]["metric"] == "representation similarity"
    r = CliRunner().invoke(app, ["taskmap", "--model", "minilm-l6", "--task", "prose", "--task", "python",
                                 "--tokens", "512", "--eval-tokens", "128", "--seq-len", "64", "--fractions", "0.05",
                                 "--select-frac", "0.05", "--no-random-init", "--out", str(tmp_path / "map"), "--json"])
    assert r.exit_code == 0, r.output
    sel = np.array(json.loads(r.stdout)["selectivity"])
    assert sel.shape == (2, 2) and (sel > 0).all() and (sel < 1).all()


def test_ablation_study_names_the_metric_of_its_loss(encoder):
    from neurospec.experiments.ablation import ablation_study
    from neurospec.report.ablation import summarise

    b = blocks(n=3, seq=12, low=2)
    rows = ablation_study(encoder, encoder.sites, {"t": b}, kind="mlp", frac_per_step=0.5, steps=1,
                          methods=["zero"], seeds=[0], batch_size=2)
    ref = reference_states(encoder, b)
    with ablated(encoder.model, encoder.sites, NeuronSet.random_nested(encoder.sites.of_kind("mlp"), [0.5],
                                                                       seed=0)[0], "zero"):
        want = 1 - hand_similarity(encoder.model, b, ref)
    assert rows[-1]["loss"] == pytest.approx(want, rel=1e-5) and rows[-1]["top1"] is None
    assert {r["loss_metric"] for r in summarise(rows)} == {"cosine distance to the unablated model"}
    lm = ablation_study(tiny_model("llama"), find_sites(tiny_model("llama")), {"t": b}, kind="mlp",
                        frac_per_step=0.5, steps=1, methods=["zero"], seeds=[0])
    assert lm[0]["loss_metric"] == "next-token cross-entropy"


def _whole_chunk_counts(hidden, head, targets, skip, chunk, topk):
    """The metrics of TokenCounts.update computed over each whole chunk at once (the reference)."""
    loss, top1, hits, nonfinite, skip_n, skip_top1 = 0.0, 0, 0, 0, 0, 0
    for lo in range(0, targets.numel(), chunk):
        lg, tg = head(hidden[lo : lo + chunk]).float(), targets[lo : lo + chunk]
        tgt = lg.gather(1, tg[:, None])
        rank = (lg >= tgt).sum(1) - 1
        finite = torch.isfinite(lg).all(1)
        loss += float((torch.logsumexp(lg, 1) - tgt[:, 0]).double().sum())
        top1 += int((finite & (rank < 1)).sum())
        hits += int((finite & (rank < topk)).sum())
        nonfinite += int((~finite).sum())
        keep = ~torch.isin(tg, skip)
        skip_n += int(keep.sum())
        skip_top1 += int((finite & (rank < 1) & keep).sum())
    return loss, top1, hits, nonfinite, skip_n, skip_top1


@pytest.mark.parametrize("rows", [128, 7])
def test_chunk_reductions_in_slices_give_the_whole_chunk_result_bit_for_bit(rows, monkeypatch):
    from neurospec.evaluate import metrics

    monkeypatch.setattr(metrics, "_REDUCE_ROWS", rows)
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 3001, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3001, 16, generator=g))
    hidden = torch.randn(700, 16, generator=g)
    targets = torch.randint(0, 3001, (700,), generator=g)
    with torch.no_grad():
        targets[100:400] = head(hidden[100:400]).argmax(1)  # hits
    targets[:40] = 7  # many rows whose target is skipped
    skip = torch.tensor([7, 11])
    counts = metrics.TokenCounts(10, skip, chunk=300)  # chunks of 300, 300, 100 rows: slices with short tails
    with torch.no_grad():
        counts.update(hidden, targets, head=head)
        ref = _whole_chunk_counts(hidden, head, targets, skip, 300, 10)
    got = (counts.loss, counts.top1, counts.topk_hits, counts.nonfinite, counts.skip_n, counts.skip_top1)
    assert got == ref  # exact, the loss included
    assert counts.n == 700 and counts.top1 >= 300


def test_chunk_reductions_never_see_the_whole_chunk(monkeypatch):
    from neurospec.evaluate import metrics

    seen = []
    real = metrics.target_rank

    def spy(logits, targets):
        seen.append(logits.shape[0])
        return real(logits, targets)

    monkeypatch.setattr(metrics, "target_rank", spy)
    counts = metrics.TokenCounts(10, None)  # the default chunk
    counts.update(torch.randn(2 * metrics._CHUNK + 5, 50), torch.randint(0, 50, (2 * metrics._CHUNK + 5,)))
    assert sum(seen) == 2 * metrics._CHUNK + 5
    assert max(seen) < 2 * metrics._REDUCE_ROWS < metrics._CHUNK
