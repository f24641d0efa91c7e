"""Two gloo processes each record half of the data; after all_reduce_ both hold the single-process answer."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neurospec.record.accumulators import CoMoments, NeuronStats, Reservoir
from neurospec.record.distributed import all_reduce_

W, K, SEED = 12, 40, 7


def data() -> list[torch.Tensor]:
    """Four batches: ranks take batches (0, 1) and (2, 3); some non-finite values."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, W, generator=g) * torch.linspace(0.1, 3, W) + 1.0 for n in (90, 60, 75, 50)]
    batches[1][4, 3] = math.nan
    batches[2][7, 5] = math.inf
    return batches


def single_process_answer() -> tuple[NeuronStats, Reservoir, CoMoments]:
    batches = data()
    stats = NeuronStats(W)
    for b in batches:
        stats.update(b)
    res = Reservoir(W, K, seed=SEED)
    for b in batches[:2]:
        res.update(b)
    other = Reservoir(W, K, seed=SEED + 1)
    for b in batches[2:]:
        other.update(b)
    co = CoMoments(W)
    for b in batches:
        co.update(b)
    return stats, res.merge(other), co


def worker(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = data()[2 * rank : 2 * rank + 2]
        stats = NeuronStats(W)
        res = Reservoir(W, K, seed=SEED + rank)
        co = CoMoments(W)
        for b in mine:
            for acc in (stats, res, co):
                acc.update(b)
        for acc in (stats, res, co):
            assert all_reduce_(acc) is acc
        want_stats, want_res, want_co = single_process_answer()
        got, want = stats.state_dict(), want_stats.state_dict()
        for name, t in want.items():
            if t.dtype == torch.float64 and name not in ("min", "max", "hist_lo", "hist_hi"):
                torch.testing.assert_close(got[name], t, rtol=1e-13, atol=1e-12)
            else:
                assert torch.equal(got[name], t), name
        assert torch.equal(res.compute()["samples"], want_res.compute()["samples"])
        assert int(res.state_dict()["seen"]) == 275
        torch.testing.assert_close(co.compute(), want_co.compute(), rtol=1e-12, atol=1e-12)
        same_seed = Reservoir(W, K, seed=SEED)
        same_seed.update(mine[0])
        with pytest.raises(ValueError, match="same seed"):
            all_reduce_(same_seed)
        dist.barrier()  # both ranks done before the group goes away
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_all_reduce_equals_single_process():
    mp.spawn(worker, args=(2, free_port()), nprocs=2, join=True)


def test_all_reduce_without_process_group_is_a_no_op():
    acc = NeuronStats(W)
    acc.update(data()[0])
    before = acc.state_dict()
    assert all_reduce_(acc) is acc
    assert all(torch.equal(before[k], v) for k, v in acc.state_dict().items())


# ------------------------------------------------------------------------------------- devices and backends


def fake_gpus(monkeypatch, n: int) -> None:
    """Pretend that ``n`` CUDA devices are visible (the device choice is tested without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_collective_device_follows_the_backend(monkeypatch):
    from neurospec.errors import NeurospecError
    from neurospec.record.distributed import collective_device

    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert collective_device("gloo") == torch.device("cpu")
    assert collective_device("nccl") == torch.device("cuda", 1)  # NCCL only moves tensors on the rank's own GPU
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(NeurospecError, match=r"one GPU per rank.*--nproc_per_node 2.*--device cpu"):
        collective_device("nccl")
    fake_gpus(monkeypatch, 0)
    with pytest.raises(NeurospecError, match="no GPU is visible"):
        collective_device("nccl")


def test_rank_device_gives_each_rank_its_own_gpu(monkeypatch):
    from neurospec.errors import NeurospecError
    from neurospec.record.distributed import rank_device

    fake_gpus(monkeypatch, 2)
    env = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert rank_device("cuda", env) == ("nccl", "cuda:1")
    assert rank_device(None, env) == ("gloo", None)  # a model on the CPU talks over gloo, GPUs or not
    assert rank_device("cpu", env) == ("gloo", "cpu")
    with pytest.raises(NeurospecError, match=r"this node runs 3 ranks and has 2 GPU\(s\).*--nproc_per_node 2"):
        rank_device("cuda", {**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"})  # every rank refuses alike
    with pytest.raises(NeurospecError, match="pass --device cuda, not cuda:0"):
        rank_device("cuda:0", env)
    with pytest.raises(NeurospecError, match="cannot be combined with torchrun"):
        rank_device("auto", env)
    fake_gpus(monkeypatch, 0)
    with pytest.raises(NeurospecError, match="no GPU is visible"):
        rank_device("cuda", env)


def test_join_process_group_sets_the_rank_device_backend_and_timeout(monkeypatch):
    from datetime import timedelta

    from neurospec.cli.common import init_distributed
    from neurospec.errors import NeurospecError
    from neurospec.record.distributed import default_timeout

    fake_gpus(monkeypatch, 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cuda") == "cuda" and calls == []  # not under torchrun: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("NEUROSPEC_DIST_TIMEOUT", raising=False)
    assert init_distributed("cuda") == "cuda:1"
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", {"timeout": timedelta(minutes=10)})]
    calls.clear()
    monkeypatch.setenv("NEUROSPEC_DIST_TIMEOUT", "45")
    assert init_distributed(None) is None
    assert calls == [("gloo", {"timeout": timedelta(seconds=45)})]
    monkeypatch.setenv("NEUROSPEC_DIST_TIMEOUT", "soon")
    with pytest.raises(NeurospecError, match="NEUROSPEC_DIST_TIMEOUT must be a positive number"):
        default_timeout()


def test_leaving_the_group_skips_the_barrier_while_an_error_propagates(monkeypatch):
    """A rank that fails must not wait at a barrier for ranks that may be inside another collective."""
    from neurospec.cli.common import finish_distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **kw: calls.append("destroy"))
    finish_distributed()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(KeyError):
        try:
            raise KeyError("failed on this rank")
        finally:
            finish_distributed()
    assert calls == ["destroy"]
