"""Selective pruning seeds its random control and its tie order per forget task, and saving the pruned model
leaves the caller's model as it was."""

import pytest
import torch

from neurospec.experiments.selective import PruneConfig, selective_pruning
from neurospec.models.loading import from_module, load_model
from neurospec.record.recorder import RecordConfig
from neurospec.score import selective as scorers

from tiny import char_tokenizer, tiny_model, write_corpus

RC = RecordConfig(tokens=256, eval_tokens=128, seq_len=32, batch_size=4, reservoir=0, hist_bins=16)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded = from_module(tiny_model("llama", seed=3), char_tokenizer(), name="tiny-llama")
    a = "aaa=" + write_corpus(tmp_path / "a.txt", seed=1, words=("quick", "quiet", "queen", "aqua"))
    b = "bbb=" + write_corpus(tmp_path / "b.txt", seed=2, words=("alpha", "beta", "delta", "gamma"))
    return loaded, a, b, tmp_path


def _pruned(path) -> set[str]:
    return {ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")}


def _both_ways(world, score: str) -> tuple[set[str], set[str]]:
    loaded, a, b, tmp = world
    pcfg = PruneConfig(score=score, frac=0.25, steps=1)
    selective_pruning(loaded, a, b, tmp / f"{score}-a", record_cfg=RC, prune_cfg=pcfg)
    selective_pruning(loaded, b, a, tmp / f"{score}-b", record_cfg=RC, prune_cfg=pcfg)
    return _pruned(tmp / f"{score}-a" / "pruned_neurons.txt"), _pruned(tmp / f"{score}-b" / "pruned_neurons.txt")


def _chance_band(n_pick: int, width: int) -> tuple[float, float]:
    """Overlap |A∩B|/|A| of two independent uniform draws of n_pick of width neurons: mean and 4 standard errors
    (hypergeometric)."""
    mean = n_pick / width
    var = n_pick * (n_pick / width) * (1 - n_pick / width) * (width - n_pick) / (width - 1) / n_pick**2
    return mean, 4 * var**0.5


def test_rand_control_draws_other_neurons_for_another_forget_task(world):
    sel_a, sel_b = _both_ways(world, "rand")
    assert len(sel_a) == len(sel_b) == 48  # 25% of the 2 x 96 MLP neurons, ranked globally
    mean, band = _chance_band(48, 192)
    assert abs(len(sel_a & sel_b) / 48 - mean) < band, (len(sel_a & sel_b), mean, band)


def test_tied_scores_are_broken_per_forget_task(world, monkeypatch):
    monkeypatch.setitem(scorers.SCORERS, "const", lambda f, r, eps, g: torch.zeros_like(f["mean"], dtype=torch.float64))
    sel_a, sel_b = _both_ways(world, "const")
    mean, band = _chance_band(48, 192)
    # a stable sort would take the first 48 neurons of the first layer for both tasks (overlap 1)
    assert abs(len(sel_a & sel_b) / 48 - mean) < band, (len(sel_a & sel_b), mean, band)


def test_saving_the_pruned_model_leaves_the_callers_model_unchanged(world):
    loaded, a, b, tmp = world
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fp = loaded.fingerprint
    pcfg = PruneConfig(score="abs", frac=0.1, steps=1)
    selective_pruning(loaded, a, b, tmp / "p", record_cfg=RC, prune_cfg=pcfg, save_dir=tmp / "saved")
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = load_model(str(tmp / "saved"))
    assert saved.fingerprint != fp  # the saved copy is pruned
    pruned = _pruned(tmp / "p" / "pruned_neurons.txt")
    site, idx = next(iter(pruned)).split(":")
    down = saved.sites[site].module
    assert torch.count_nonzero(saved.model.get_submodule(down).weight[:, int(idx)]) == 0
