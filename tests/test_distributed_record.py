"""Two gloo processes record together: a check that fails on one rank stops both at once with its message;
ranks that see different models or data are refused; checkpoints resume only when every rank can resume."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from neurospec.models.loading import from_module
from neurospec.record.recorder import RecordConfig, record
from neurospec.record.store import open_run

from tiny import char_tokenizer, tiny_model, write_corpus

CFG = RecordConfig(tokens=640, eval_tokens=128, seq_len=32, batch_size=4, hist_bins=64, reservoir=16)
PROMPT_S = 10  # every rank must have stopped within this many seconds of the call (the group's timeout is 30 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp: Path, deadline_s: float = 150) -> None:
    """Run ``fn(rank, tmp, port)`` in two processes; fail (and kill them) if they are not done by the deadline."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=(tmp, _free_port()), nprocs=2, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks were still running after {deadline_s} s")


def _join(rank: int, tmp: Path, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NEUROSPEC_CACHE=str(tmp / "cache"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))


def _leave() -> None:
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _outcome(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
        return {"error": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def _tiny(seed: int = 0):
    return from_module(tiny_model("llama", seed=seed), char_tokenizer(), name="tiny-llama")


# ------------------------------------------------------------------------------------------ one rank fails


def _warm_kernels() -> None:
    """Compile the CPU kernels (or load them from numba's cache) before anything is timed: right after their
    source changed, a first compile takes several seconds on each rank."""
    from neurospec.record.accumulators import NeuronStats
    from neurospec.record.reservoir import Reservoir

    x = torch.randn(64, 4)
    NeuronStats(4, hist_bins=8).update(x)
    Reservoir(4, k=8, seed=0).update(x)


def _one_rank_fails(rank: int, tmp: Path, port: int) -> None:
    _join(rank, tmp, port)
    _warm_kernels()
    loaded = _tiny()
    alpha, other = f"alpha={tmp / 'a.txt'}", f"alpha={tmp / 'b.txt'}"
    seen = {
        # only rank 0 prepares the run directory, so only rank 0 sees that --out is a file
        "bad_out": _outcome(lambda: record(loaded, [alpha], tmp / "a-file", CFG)),
        # a task file that only one rank cannot read
        "missing": _outcome(lambda: record(loaded, [alpha if rank == 0 else f"alpha={tmp / 'gone.txt'}"],
                                           tmp / "missing", CFG)),
        # the same task name, other data on rank 1
        "data": _outcome(lambda: record(loaded, [alpha if rank == 0 else other], tmp / "data", CFG)),
        # another model on rank 1
        "model": _outcome(lambda: record(loaded if rank == 0 else _tiny(seed=1), [alpha], tmp / "model", CFG)),
    }
    (tmp / f"rank{rank}.json").write_text(json.dumps(seen))
    _leave()


@pytest.mark.dist
def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    write_corpus(tmp_path / "a.txt", seed=1)
    write_corpus(tmp_path / "b.txt", seed=2, words=("one", "two", "three"))
    (tmp_path / "a-file").write_text("not a run")
    _spawn(_one_rank_fails, tmp_path)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, outcomes in enumerate(seen):
        for case, got in outcomes.items():
            assert got["error"] is not None, f"rank {rank} went on in case {case}"
            assert got["seconds"] < PROMPT_S, f"rank {rank} took {got['seconds']:.1f} s to stop in case {case}"
    r0, r1 = seen[0], seen[1]
    assert r0["bad_out"]["error"] == "RunStoreError" and "is not a directory" in r0["bad_out"]["message"]
    assert r1["bad_out"]["error"] == "NeurospecError" and r1["bad_out"]["message"].startswith("rank 0: run path")
    assert "is not a directory" in r1["bad_out"]["message"] and "--out" in r1["bad_out"]["message"]
    assert r1["missing"]["error"] == "TaskError" and "gone.txt" in r1["missing"]["message"]
    assert r0["missing"]["error"] == "NeurospecError" and r0["missing"]["message"].startswith("rank 1: ")
    assert "gone.txt" in r0["missing"]["message"]
    for case, what in (("data", "different data for task 'alpha'"), ("model", "different models")):
        for outcomes in seen:
            msg = outcomes[case]["message"]
            assert outcomes[case]["error"] == "NeurospecError" and what in msg, msg
            assert "rank 0: " in msg and "rank 1: " in msg, msg
    assert not (tmp_path / "model").exists(), "nothing was written for ranks that load different models"


# ------------------------------------------------------------------------------------------- checkpoints


class _Stop(Exception):
    pass


def _stop_after(batches: int):
    def progress(task, done, total):
        if done >= batches * CFG.batch_size * CFG.seq_len:
            raise _Stop

    return progress


def _checkpoints(rank: int, tmp: Path, port: int) -> None:
    from neurospec.record import store

    _join(rank, tmp, port)
    loaded, task = _tiny(), [f"alpha={tmp / 'a.txt'}"]
    seen: dict = {}
    # 1. A run interrupted in one process is not resumed by two, unless forced.
    seen["other_world"] = _outcome(lambda: record(loaded, task, tmp / "cut1", CFG))
    record(loaded, task, tmp / "cut1", CFG, force=True)
    # 2. Rank 0 fails to write the result: every rank keeps its checkpoint, and the next run resumes from them.
    save = store.save_tensors

    def failing_save(path, *a, **kw):
        if rank == 0 and Path(path).parent.name == "stats":
            raise OSError(28, "No space left on device")
        return save(path, *a, **kw)

    store.save_tensors = failing_save
    seen["write_fails"] = _outcome(lambda: record(loaded, task, tmp / "late", CFG, checkpoint_every=1))
    store.save_tensors = save
    seen["kept"] = (tmp / "late" / "partial" / f"alpha.rank{rank}.safetensors").exists()
    starts: list[int] = []
    record(loaded, task, tmp / "late", CFG, progress=lambda t, d, n: starts.append(d))
    seen["late_start"] = starts[0]
    # 3. Only rank 0 has a checkpoint: recorded again from the start.
    store.save_tensors = failing_save
    _outcome(lambda: record(loaded, task, tmp / "mixed", CFG, checkpoint_every=1))
    store.save_tensors = save
    if rank == 1:
        (tmp / "mixed" / "partial" / "alpha.rank1.safetensors").unlink(missing_ok=True)
    starts.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record(loaded, task, tmp / "mixed", CFG, progress=lambda t, d, n: starts.append(d))
    seen["mixed_start"] = starts[0]
    seen["mixed_warned"] = any("no checkpoint" in str(w.message) for w in caught)
    (tmp / f"rank{rank}.json").write_text(json.dumps(seen))
    _leave()


@pytest.mark.dist
def test_checkpoints_resume_only_with_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "a.txt", seed=1)
    loaded, task = _tiny(), [f"alpha={tmp_path / 'a.txt'}"]
    record(loaded, task, tmp_path / "single", CFG)
    with pytest.raises(_Stop):  # one process, interrupted after a checkpoint at batch 3 of 5
        record(loaded, task, tmp_path / "cut1", CFG, checkpoint_every=1, progress=_stop_after(3))
    _spawn(_checkpoints, tmp_path)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for outcomes in seen:
        got = outcomes["other_world"]
        assert got["error"] == "RunStoreError", got
        assert "recorded by 1 process(es)" in got["message"] and "--force" in got["message"], got
    assert seen[0]["write_fails"]["error"] == "OSError"
    assert seen[1]["write_fails"]["error"] == "NeurospecError"
    assert "rank 0: OSError" in seen[1]["write_fails"]["message"]
    assert seen[0]["kept"] and seen[1]["kept"], "a rank deleted its checkpoint before rank 0 wrote the result"
    # rank 0 records batches 0, 2, 4 and rank 1 batches 1, 3; checkpoints after each but their last
    tokens = CFG.batch_size * CFG.seq_len
    assert [s["late_start"] for s in seen] == [2 * tokens, 1 * tokens], "both ranks resumed"
    assert [s["mixed_start"] for s in seen] == [0, 0], "recorded again from the start"
    assert seen[0]["mixed_warned"]
    want = open_run(tmp_path / "single").accumulators("alpha")
    for run in ("cut1", "late", "mixed"):
        got = open_run(tmp_path / run).accumulators("alpha")
        assert not list((tmp_path / run / "partial").glob("*")), f"{run}: checkpoints left behind"
        for site, accs in want.items():
            a, b = accs["stats"].state_dict(), got[site]["stats"].state_dict()
            for k, v in a.items():
                if v.dtype == torch.int64 or k in ("min", "max", "hist_lo", "hist_hi"):
                    assert torch.equal(b[k], v), f"{run} {site} {k}"
                else:
                    torch.testing.assert_close(b[k], v, rtol=1e-12, atol=1e-12, msg=f"{run} {site} {k}")
