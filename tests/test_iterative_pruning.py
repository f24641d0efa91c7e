"""Iterative selective pruning: runs end to end, and a rerun into the same directory never scores from statistics
recorded under another pruned model."""

import shutil

import pytest

from neurospec.experiments.selective import PruneConfig, selective_pruning
from neurospec.models.loading import from_module
from neurospec.record.recorder import Intervention, RecordConfig
from neurospec.record.store import open_run
from neurospec.score import score_neurons
from neurospec.score.selection import select

from tiny import char_tokenizer, tiny_model, write_corpus

RC = RecordConfig(tokens=256, eval_tokens=128, seq_len=32, batch_size=4, reservoir=0, hist_bins=16)
BASE = PruneConfig(score="abs", frac=0.05, steps=2, mode="iterative")  # 9 of the 192 MLP neurons per step


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny model, two tasks and one iterative pruning run in ``base`` (copied by the tests that rerun)."""
    tmp = tmp_path_factory.mktemp("iterative")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROSPEC_CACHE", str(tmp / "cache"))
        loaded = from_module(tiny_model("llama", seed=1), char_tokenizer(), name="tiny-llama")
        forget = "fgt=" + write_corpus(tmp / "f.txt", seed=1, words=("quick", "quiet", "queen", "aqua"))
        retain = "ret=" + write_corpus(tmp / "r.txt", seed=2, words=("alpha", "beta", "delta", "gamma"))
        res = selective_pruning(loaded, forget, retain, tmp / "base", record_cfg=RC, prune_cfg=BASE)
        yield loaded, forget, retain, tmp, res


def _run(world, out, pcfg):
    loaded, forget, retain, tmp, _ = world
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROSPEC_CACHE", str(tmp / "cache"))
        return selective_pruning(loaded, forget, retain, out, record_cfg=RC, prune_cfg=pcfg)


def _outcome(res, out):
    rows = [{k: r[k] for k in ("step", "n_pruned", "forget", "retain")} for r in res["steps"]]
    return rows, (out / "pruned_neurons.txt").read_text()


def test_iterative_pruning_runs_end_to_end(world):
    loaded, forget, retain, tmp, res = world
    base = tmp / "base"
    assert [r["n_pruned"] for r in res["steps"]] == [0, 9, 18]
    ids = [ln for ln in (base / "pruned_neurons.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(ids) == len(set(ids)) == 18
    # step 1 prunes the top 9 by the unpruned statistics; step 2's statistics are recorded under exactly that set
    run0 = open_run(base / "step0")
    sites = loaded.sites
    widths = {s.name: s.width for s in sites.select(kinds=("mlp",))}
    first = select(score_neurons("abs", run0.stats("fgt"), run0.stats("ret")), 0.05, 0.0, "global", sites=sites)
    first = type(first)({s: first.indices(s) if s in first.site_names else [] for s in widths}, widths)
    run1 = open_run(base / "step1")
    assert run1.manifest["intervention"] == Intervention.ablation(first, "zero").to_dict()
    assert run0.manifest["intervention"] is None
    assert set(first.to_ids()) < set(ids)
    # the recording under the pruned model differs from the unpruned one (layer 1 reads layer 0's pruned output)
    assert any(not run1.stats("fgt")[s]["mean"].equal(run0.stats("fgt")[s]["mean"]) for s in widths)
    # the second step's neurons are the top 9 of the scores recorded under the first step's pruning
    rescored = score_neurons("abs", run1.stats("fgt"), run1.stats("ret"))
    second = select(rescored, 0.05, 0.0, "global", exclude=first, sites=sites)
    assert set(ids) == set(first.to_ids()) | set(second.to_ids())


@pytest.mark.parametrize("change", [dict(score="freq"), dict(frac=0.08), dict(ablation="mean")])
def test_rerun_with_other_settings_equals_a_fresh_run(world, change):
    loaded, forget, retain, tmp, _ = world
    key = next(iter(change))
    reused, fresh = tmp / f"reused-{key}", tmp / f"fresh-{key}"
    shutil.copytree(tmp / "base", reused)
    pcfg = PruneConfig(**{**BASE.__dict__, **change})
    a = _outcome(_run(world, reused, pcfg), reused)
    b = _outcome(_run(world, fresh, pcfg), fresh)
    # the step run holds the statistics of this pruned model, not those left by the earlier settings
    old, new, ref = open_run(tmp / "base" / "step1"), open_run(reused / "step1"), open_run(fresh / "step1")
    for task in ("fgt", "ret"):
        for site, st in ref.stats(task).items():
            for k, v in st.items():
                assert new.stats(task)[site][k].equal(v), f"{task} {site} {k}"
    assert a == b
    assert new.manifest["intervention"] == ref.manifest["intervention"] != old.manifest["intervention"]


def test_same_settings_rerun_reuses_every_recording(world):
    loaded, forget, retain, tmp, res = world
    again = tmp / "again"
    shutil.copytree(tmp / "base", again)
    files = sorted(again.glob("step*/stats/*.safetensors"))
    assert [f.parent.parent.name for f in files] == ["step0", "step0", "step1", "step1"]
    before = {f: f.stat().st_mtime_ns for f in files}
    manifests = {d: (d / "manifest.json").read_text() for d in again.glob("step*")}
    rerun = _run(world, again, BASE)
    assert {f: f.stat().st_mtime_ns for f in files} == before, "nothing recorded again"
    assert {d: (d / "manifest.json").read_text() for d in again.glob("step*")} == manifests
    assert _outcome(rerun, again) == _outcome(res, tmp / "base")
