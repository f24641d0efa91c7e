"""Recording: statistics equal the full activation tensor; runs resume, refuse conflicts, and merge across ranks."""

import json
import os
import socket

import pytest
import torch

from neurospec.errors import RunStoreError, TaskError
from neurospec.models.loading import from_module
from neurospec.record.recorder import RecordConfig, _forward_body, record
from neurospec.record.store import open_run

from tiny import char_tokenizer, tiny_model, write_corpus

CFG = RecordConfig(tokens=640, eval_tokens=128, seq_len=32, batch_size=4, hist_bins=64, reservoir=16,
                   comoments=("attn",))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded = from_module(tiny_model("llama"), char_tokenizer(), name="tiny-llama")
    a = write_corpus(tmp_path / "a.txt", seed=1)
    b = write_corpus(tmp_path / "b.txt", seed=2, words=("one", "two", "three"))
    return loaded, [f"alpha={a}", f"beta={b}"], tmp_path


def _full_activations(loaded, blocks, cfg):
    acts = {s.name: [] for s in loaded.sites}
    hooks = [loaded.model.get_submodule(s.module).register_forward_pre_hook(
        lambda m, a, n=s.name, w=s.width: acts[n].append(a[0].reshape(-1, w).double())) for s in loaded.sites]
    with torch.no_grad():
        for i in range(0, blocks.shape[0], cfg.batch_size):
            _forward_body(loaded.model)(input_ids=blocks[i : i + cfg.batch_size])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}


def test_recorded_statistics_equal_the_full_tensor(setup):
    from neurospec.data.tasks import build_task_data, parse_task_spec

    loaded, tasks, tmp = setup
    summary = record(loaded, tasks, tmp / "run", CFG)
    assert summary["tasks"] == {"alpha": 640, "beta": 640}
    assert [s["name"] for s in summary["sites"]][:2] == ["layers.0.mlp", "layers.0.attn"]
    run = open_run(tmp / "run")
    data = build_task_data(parse_task_spec(tasks[0]), loaded.tokenizer, seq_len=32, collect_tokens=640,
                           eval_tokens=128, seed=0)
    full = _full_activations(loaded, data.collect[:20], CFG)
    stats = run.stats("alpha")
    for site, x in full.items():
        s = stats[site]
        assert s["count"][0] == x.shape[0] == 640
        torch.testing.assert_close(s["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["std"], x.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s["mean_abs"], x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["mean_sqrt_abs"], x.abs().sqrt().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["frac_pos"], (x > 0).double().mean(0))
        torch.testing.assert_close(s["max"], x.max(0).values, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s["min"], x.min(0).values, rtol=1e-6, atol=1e-6)
    samples = run.reservoir("alpha")["layers.1.mlp"]
    assert samples.shape == (16, 96)
    rows = full["layers.1.mlp"].float()
    for r in samples:  # every sample is a real activation row
        assert torch.isclose(rows, r.unsqueeze(0), rtol=1e-5, atol=1e-6).all(1).any()
    cm = run.comoments("alpha")["layers.0.attn"]
    torch.testing.assert_close(cm["cov"], torch.cov(full["layers.0.attn"].t(), correction=0), rtol=1e-3, atol=1e-5)
    # co-moments exist for exactly the kinds asked for (attn), for every task, and nowhere else
    attn_sites = {s.name for s in loaded.sites if s.kind == "attn"}
    assert set(run.comoments("alpha")) == set(run.comoments("beta")) == attn_sites
    assert set(run.accumulators("beta")["layers.0.mlp"]) == {"stats", "reservoir"}
    with pytest.raises(RunStoreError, match="--comoments"):
        _no_comoments(tmp, loaded, tasks)
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == loaded.fingerprint
    assert manifest["tasks"]["alpha"]["status"] == "done" and manifest["config"]["tokens"] == 640


def _no_comoments(tmp, loaded, tasks):
    cfg = RecordConfig(**{**CFG.__dict__, "comoments": ()})
    record(loaded, tasks[:1], tmp / "run2", cfg)
    open_run(tmp / "run2").comoments("alpha")


def test_same_record_is_a_no_op_and_conflicts_are_refused(setup):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "run", CFG)
    stat = tmp / "run" / "stats" / "alpha.safetensors"
    before = (stat.stat().st_mtime_ns, (tmp / "run" / "manifest.json").read_text())
    record(loaded, tasks, tmp / "run", CFG)
    assert (stat.stat().st_mtime_ns, (tmp / "run" / "manifest.json").read_text()) == before
    other = RecordConfig(**{**CFG.__dict__, "tokens": 320})
    with pytest.raises(RunStoreError, match="tokens: 640 -> 320"):
        record(loaded, tasks, tmp / "run", other)
    record(loaded, tasks, tmp / "run", other, force=True)
    assert open_run(tmp / "run").config["tokens"] == 320
    with pytest.raises(RunStoreError, match="another model"):
        open_run(tmp / "run").check_model("0" * 16)


def test_interrupted_record_resumes_to_the_same_result(setup):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "whole", CFG)

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def interrupt(task, done, total):
        calls["n"] += 1
        if task == "beta" and done >= 3 * CFG.batch_size * CFG.seq_len:
            raise Stop

    with pytest.raises(Stop):
        record(loaded, tasks, tmp / "cut", CFG, progress=interrupt, checkpoint_every=1)
    manifest = json.loads((tmp / "cut" / "manifest.json").read_text())
    assert manifest["tasks"]["alpha"]["status"] == "done" and manifest["tasks"]["beta"]["status"] == "running"
    assert (tmp / "cut" / "partial" / "beta.rank0.safetensors").exists()
    seen = []
    record(loaded, tasks, tmp / "cut", CFG, progress=lambda t, d, n: seen.append((t, d)))
    assert seen[:2] == [("beta", 3 * CFG.batch_size * CFG.seq_len), ("beta", 4 * CFG.batch_size * CFG.seq_len)], \
        "resumed after the checkpoint"
    assert not (tmp / "cut" / "partial" / "beta.rank0.safetensors").exists()
    a, b = open_run(tmp / "whole"), open_run(tmp / "cut")
    for task in ("alpha", "beta"):
        for site, s in a.stats(task).items():
            for k, v in s.items():
                torch.testing.assert_close(b.stats(task)[site][k], v, rtol=1e-12, atol=1e-12, msg=f"{site} {k}")
        for site, v in a.reservoir(task).items():
            assert torch.equal(b.reservoir(task)[site], v)


def test_bad_inputs(setup):
    loaded, tasks, tmp = setup
    with pytest.raises(TaskError, match="more than once"):
        record(loaded, [tasks[0], tasks[0]], tmp / "r", CFG)
    with pytest.raises(TaskError, match="Lower --tokens"):
        record(loaded, tasks[:1], tmp / "r", RecordConfig(tokens=10**6, seq_len=32, batch_size=4))
    (tmp / "file").write_text("x")
    with pytest.raises(RunStoreError, match="not a directory"):
        record(loaded, tasks[:1], tmp / "file", CFG)
    (tmp / "notrun").mkdir()
    (tmp / "notrun" / "x").write_text("x")
    with pytest.raises(RunStoreError, match="not a neurospec run"):
        record(loaded, tasks[:1], tmp / "notrun", CFG)
    with pytest.raises(RunStoreError, match="no task"):
        record(loaded, tasks[:1], tmp / "ok", CFG)
        open_run(tmp / "ok").stats("gamma")


def test_nonfinite_activations_are_counted(setup):
    loaded, tasks, tmp = setup
    mod = loaded.model.get_submodule(loaded.sites["layers.0.mlp"].module)

    def poison(m, args):
        x = args[0].clone()
        x[..., 3] = float("nan")
        return (x,)

    h = mod.register_forward_pre_hook(poison)
    try:
        summary = record(loaded, tasks[:1], tmp / "nan", CFG)
    finally:
        h.remove()
    stats = open_run(tmp / "nan").stats("alpha")
    s = stats["layers.0.mlp"]
    assert s["nonfinite"][3] == 640 and s["count"][3] == 0 and torch.isfinite(s["mean"][:3]).all()
    assert s["nonfinite"].sum() == 640 and (s["count"][torch.arange(96) != 3] == 640).all()
    # the NaN reaches every later site through the residual stream: all of it is counted and reported
    assert summary["nonfinite"]["alpha"] == sum(int(v["nonfinite"].sum()) for v in stats.values()) > 640


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, tmp, tasks):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NEUROSPEC_CACHE=str(tmp / "cache"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        loaded = from_module(tiny_model("llama"), char_tokenizer(), name="tiny-llama")
        record(loaded, tasks, tmp / "dist", CFG)
        dist.barrier()  # rank 0 may still be writing: let both ranks finish before the group goes away
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_one_process(setup):
    """What the README promises under torchrun: counts, extremes, histograms (edges and bins) and peaks equal the
    single process's exactly; float64 sums only up to their order of addition; the reservoir is another sample."""
    import torch.multiprocessing as mp

    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "single", CFG)
    mp.spawn(_rank_main, args=(2, _free_port(), tmp, tasks), nprocs=2, join=True)
    a, b = open_run(tmp / "single"), open_run(tmp / "dist")
    for task in ("alpha", "beta"):
        acc_a, acc_b = a.accumulators(task), b.accumulators(task)
        for site in acc_a:
            sa, sb = acc_a[site]["stats"].state_dict(), acc_b[site]["stats"].state_dict()
            for k, v in sa.items():
                if v.dtype == torch.int64 or k in ("min", "max", "hist_lo", "hist_hi"):
                    assert torch.equal(sb[k], v), f"{task} {site} {k}"  # counts, histogram, extremes: exact
                else:
                    torch.testing.assert_close(sb[k], v, rtol=1e-12, atol=1e-12, msg=f"{task} {site} {k}")
            assert torch.equal(b.stats(task)[site]["peak"], a.stats(task)[site]["peak"])
            ra, rb = a.reservoir(task)[site], b.reservoir(task)[site]
            assert ra.shape == rb.shape and not torch.equal(ra, rb)  # each rank samples with its own seed
        for site, cm in a.comoments(task).items():
            for k, v in cm.items():
                torch.testing.assert_close(b.comoments(task)[site][k], v, rtol=1e-10, atol=1e-12)
