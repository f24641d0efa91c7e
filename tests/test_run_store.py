"""The run store: damaged files, the run lock, file modes, the environment and interventions in the manifest."""

import json
import os
import stat

import pytest
import torch

from neurospec.errors import RunStoreError
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import from_module
from neurospec.record import store
from neurospec.record.recorder import Intervention, RecordConfig, record
from neurospec.record.store import open_run

from tiny import char_tokenizer, tiny_model, write_corpus

CFG = RecordConfig(tokens=384, eval_tokens=64, seq_len=32, batch_size=4, hist_bins=32, reservoir=8)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded = from_module(tiny_model("llama"), char_tokenizer(), name="tiny-llama")
    a = write_corpus(tmp_path / "a.txt", seed=1)
    b = write_corpus(tmp_path / "b.txt", seed=2, words=("one", "two", "three"))
    return loaded, [f"alpha={a}", f"beta={b}"], tmp_path


def _assert_same_stats(a, b, tasks=("alpha", "beta")):
    for task in tasks:
        sa, sb = a.stats(task), b.stats(task)
        assert sa.keys() == sb.keys()
        for site in sa:
            for k, v in sa[site].items():
                torch.testing.assert_close(sb[site][k], v, rtol=0, atol=0, msg=f"{task} {site} {k}")


# ----------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not an object", "missing keys"])
def test_damaged_manifest_is_named_and_force_starts_over(setup, damage):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "ref", CFG)
    record(loaded, tasks, tmp / "run", CFG)
    mf = tmp / "run" / "manifest.json"
    text = mf.read_text()
    mf.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\x01 not json",
                   "not an object": "[1, 2]", "missing keys": json.dumps({"schema": 1, "tasks": {}})}[damage])
    for call in (lambda: open_run(tmp / "run"), lambda: record(loaded, tasks, tmp / "run", CFG)):
        with pytest.raises(RunStoreError, match=r"manifest\.json is damaged.*--force") as e:
            call()
        assert str(mf) in str(e.value)
    with pytest.warns(UserWarning, match="damaged run"):
        record(loaded, tasks, tmp / "run", CFG, force=True)
    _assert_same_stats(open_run(tmp / "ref"), open_run(tmp / "run"))


def test_run_without_its_manifest_is_refused_and_force_starts_over(setup):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "ref", CFG)

    class Stop(Exception):
        pass

    def interrupt(task, done, total):
        if task == "beta" and done >= 2 * CFG.batch_size * CFG.seq_len:
            raise Stop

    with pytest.raises(Stop):  # leaves stats/alpha and a checkpoint of beta
        record(loaded, tasks, tmp / "run", CFG, progress=interrupt, checkpoint_every=1)
    (tmp / "run" / "manifest.json").unlink()
    with pytest.raises(RunStoreError, match=r"manifest\.json is missing; pass --force"):
        record(loaded, tasks, tmp / "run", CFG)
    seen = []
    record(loaded, tasks, tmp / "run", CFG, force=True, progress=lambda t, d, n: seen.append((t, d)))
    assert ("alpha", 0) in seen and ("beta", 0) in seen, "nothing of the unknown run is reused"
    _assert_same_stats(open_run(tmp / "ref"), open_run(tmp / "run"))


def test_damaged_statistics_file_is_named_and_force_records_it_again(setup):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "ref", CFG)
    record(loaded, tasks, tmp / "run", CFG)
    f = tmp / "run" / "stats" / "beta.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    with pytest.raises(RunStoreError, match=r"beta\.safetensors is damaged or truncated.*--force") as e:
        open_run(tmp / "run").stats("beta")
    assert str(f) in str(e.value)
    open_run(tmp / "run").stats("alpha")  # the other task still reads
    with pytest.raises(RunStoreError, match=r"beta\.safetensors of the finished task 'beta' is damaged.*--force"):
        record(loaded, tasks, tmp / "run", CFG)
    alpha_file = tmp / "run" / "stats" / "alpha.safetensors"
    alpha_mtime = alpha_file.stat().st_mtime_ns
    with pytest.warns(UserWarning, match="recording task 'beta' again"):
        record(loaded, tasks, tmp / "run", CFG, force=True)
    assert alpha_file.stat().st_mtime_ns == alpha_mtime, "the intact task is kept"
    _assert_same_stats(open_run(tmp / "ref"), open_run(tmp / "run"))
    f.write_bytes(b"\x08" + bytes(20))  # a header that is not JSON
    with pytest.raises(RunStoreError, match="damaged or truncated"):
        open_run(tmp / "run").accumulators("beta")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad metadata"])
def test_damaged_checkpoint_is_discarded_and_recomputed(setup, damage):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "whole", CFG)

    class Stop(Exception):
        pass

    def interrupt(task, done, total):
        if task == "beta" and done >= 2 * CFG.batch_size * CFG.seq_len:
            raise Stop

    with pytest.raises(Stop):
        record(loaded, tasks, tmp / "cut", CFG, progress=interrupt, checkpoint_every=1)
    part = tmp / "cut" / "partial" / "beta.rank0.safetensors"
    data = part.read_bytes()
    if damage == "truncated":
        part.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        part.write_bytes(os.urandom(len(data)))
    else:
        tensors, meta = store.load_tensors(part)
        store.save_tensors(part, tensors, {**meta, "accumulators": "{not json"})
    seen = []
    with pytest.warns(UserWarning, match=r"discarding the damaged checkpoint .*beta\.rank0\.safetensors"):
        record(loaded, tasks, tmp / "cut", CFG, progress=lambda t, d, n: seen.append((t, d)))
    assert seen[0] == ("beta", 0), "recorded again from its start"
    assert not part.exists()
    _assert_same_stats(open_run(tmp / "whole"), open_run(tmp / "cut"))


# ----------------------------------------------------------------------------------------------- lock, modes


def test_second_recorder_into_the_same_run_is_refused(setup):
    import fcntl

    loaded, tasks, tmp = setup
    run = tmp / "run"
    record(loaded, tasks[:1], run, CFG)
    before = (run / "manifest.json").read_text()
    # another process holding the lock: a second open file description of the lock file, as a process would have
    fd = os.open(run / store.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, b"4242")
        with pytest.raises(RunStoreError, match=r"another process \(pid 4242\) is recording into .*run"):
            record(loaded, tasks, run, CFG)
        with pytest.raises(RunStoreError, match="another process"):
            record(loaded, tasks, run, CFG, force=True)
        assert (run / "manifest.json").read_text() == before, "the refused call wrote nothing"
        assert not (run / "stats" / "beta.safetensors").exists()
    finally:
        os.close(fd)
    record(loaded, tasks, run, CFG)  # released: recording goes on
    assert open_run(run).tasks == ["alpha", "beta"]


def test_lock_is_held_while_recording_and_released_after_an_error(setup):
    import fcntl

    loaded, tasks, tmp = setup
    run = tmp / "run"
    held = []

    class Stop(Exception):
        pass

    def probe(task, done, total):
        fd = os.open(run / store.LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        if done > 0:
            raise Stop

    with pytest.raises(Stop):
        record(loaded, tasks[:1], run, CFG, progress=probe)
    assert held and all(held)
    fd = os.open(run / store.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)


def test_lock_file_does_not_make_a_fresh_directory_look_foreign(setup):
    loaded, tasks, tmp = setup
    (tmp / "run").mkdir()
    (tmp / "run" / store.LOCK).write_text("")  # left by a run that failed before its manifest was written
    record(loaded, tasks[:1], tmp / "run", CFG)
    assert open_run(tmp / "run").tasks == ["alpha"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_get_the_umask_mode(setup, umask):
    loaded, tasks, tmp = setup
    old = os.umask(umask)
    try:
        record(loaded, tasks[:1], tmp / "run", CFG)
    finally:
        os.umask(old)
    for f in (tmp / "run" / "manifest.json", tmp / "run" / "stats" / "alpha.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert not list((tmp / "run").glob("**/*.tmp")), "no temporary file left behind"


def test_directory_is_fsynced_after_each_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.atomic_write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert synced == [False, True], "the file, then its directory"
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 1}


# ----------------------------------------------------------------------------------------------- manifest


def test_manifest_records_the_environment(setup):
    import transformers

    loaded, tasks, tmp = setup
    record(loaded, tasks[:1], tmp / "run", CFG)
    m = json.loads((tmp / "run" / "manifest.json").read_text())
    want = {"world_size": 1, "device": "cpu", "dtype": "float32", "torch": torch.__version__,
            "transformers": transformers.__version__}
    for env in (m["environment"], m["tasks"]["alpha"]["environment"]):
        assert {k: env[k] for k in want} == want
    loaded.model.to(torch.bfloat16)
    from neurospec.models.loading import model_fingerprint

    loaded.fingerprint = model_fingerprint(loaded.model)
    record(loaded, tasks[:1], tmp / "bf16", CFG)
    m = json.loads((tmp / "bf16" / "manifest.json").read_text())
    assert m["environment"]["dtype"] == m["tasks"]["alpha"]["environment"]["dtype"] == "bfloat16"


def test_intervention_is_part_of_the_run_identity(setup):
    loaded, tasks, tmp = setup
    widths = {s.name: s.width for s in loaded.sites}
    one = NeuronSet({"layers.0.mlp": [3, 5]}, widths)
    other = NeuronSet({"layers.0.mlp": [3, 6]}, widths)
    iv = Intervention.ablation(one, "zero")
    assert iv == Intervention.ablation(NeuronSet({"layers.0.mlp": [5, 3]}, widths), "zero")
    assert iv != Intervention.ablation(other, "zero") and iv != Intervention.ablation(one, "mean")
    means = {"layers.0.mlp": torch.zeros(96)}
    shifted = {"layers.0.mlp": torch.zeros(96).index_fill_(0, torch.tensor([5]), 1.0)}
    unused = {"layers.0.mlp": torch.zeros(96).index_fill_(0, torch.tensor([7]), 1.0)}
    assert Intervention.ablation(one, "mean", means) != Intervention.ablation(one, "mean", shifted)
    assert Intervention.ablation(one, "mean", means) == Intervention.ablation(one, "mean", unused), \
        "only the pruned neurons' values count"

    run = tmp / "run"
    record(loaded, tasks[:1], run, CFG, intervention=iv)
    assert json.loads((run / "manifest.json").read_text())["intervention"] == iv.to_dict()
    stat_file = run / "stats" / "alpha.safetensors"
    mtime = stat_file.stat().st_mtime_ns
    record(loaded, tasks[:1], run, CFG, intervention=iv)
    assert stat_file.stat().st_mtime_ns == mtime, "the same intervention reuses the run"
    for bad in (Intervention.ablation(other, "zero"), None):
        with pytest.raises(RunStoreError, match="different intervention"):
            record(loaded, tasks[:1], run, CFG, intervention=bad)
    record(loaded, tasks[:1], run, CFG, intervention=Intervention.ablation(other, "zero"), force=True)
    assert stat_file.stat().st_mtime_ns != mtime
    assert open_run(run).manifest["intervention"] == Intervention.ablation(other, "zero").to_dict()


def test_run_from_the_sampled_fingerprint_says_so(setup):
    """A run whose manifest has a fingerprint of the old kind (no fingerprint_version) is refused with a message
    that explains why the same model no longer matches."""
    loaded, tasks, tmp = setup
    record(loaded, tasks[:1], tmp / "run", CFG)
    mf = tmp / "run" / "manifest.json"
    m = json.loads(mf.read_text())
    assert m["model"]["fingerprint_version"] == 2
    del m["model"]["fingerprint_version"]
    m["model"]["fingerprint"] = "0123456789abcdef"
    mf.write_text(json.dumps(m))
    with pytest.raises(RunStoreError, match="older neurospec computed it from a sample.*--force"):
        record(loaded, tasks[:1], tmp / "run", CFG)
    m["model"]["fingerprint_version"] = 2
    mf.write_text(json.dumps(m))
    with pytest.raises(RunStoreError, match="different model;"):
        record(loaded, tasks[:1], tmp / "run", CFG)


# ----------------------------------------------------------------------------------------------- memory


def test_save_tensors_writes_the_file_without_building_it_in_memory(tmp_path, monkeypatch):
    import safetensors.torch

    tensors = {"a/hist": torch.arange(12, dtype=torch.int64).reshape(3, 4), "a/sum": torch.linspace(0, 1, 5).double()}
    expected = safetensors.torch.save(tensors, metadata={"k": "v"})

    def in_memory(*args, **kwargs):
        raise AssertionError("save_tensors built the whole file in memory")

    monkeypatch.setattr(safetensors.torch, "save", in_memory)
    store.save_tensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == expected, "the same file as before"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_tensor_write_leaves_no_file(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 (whatever safetensors raises for a non-contiguous-able object)
        store.save_tensors(tmp_path / "x.safetensors", {"a": "not a tensor"})
    assert not list(tmp_path.iterdir())


def test_packed_accumulators_are_the_live_states_not_copies(setup):
    from neurospec.record.recorder import pack_accumulators, record_task

    loaded, _, _ = setup
    blocks = torch.randint(0, 20, (4, 32))
    accs = record_task(loaded, blocks, loaded.sites.select(), CFG)
    tensors, _ = pack_accumulators(accs)
    for site, group in accs.items():
        for name, acc in group.items():
            for k, v in acc.state_view().items():
                assert tensors[f"{site}/{name}/{k}"] is v, f"{site}/{name}/{k} was copied"
    with pytest.raises(TypeError):  # the view cannot replace the state
        acc.state_view()["seen"] = torch.zeros(())


def test_record_lets_each_task_s_accumulators_go_before_the_next_task(setup, monkeypatch):
    import gc
    import weakref

    from neurospec.record import recorder

    loaded, tasks, tmp = setup
    real = recorder.record_task
    states: list[list[weakref.ref]] = []

    def spy(*args, **kwargs):
        gc.collect()
        alive = [r for refs in states for r in refs if r() is not None]
        assert not alive, f"{len(alive)} state tensors of an earlier task are still referenced"
        accs = real(*args, **kwargs)
        states.append([weakref.ref(t) for g in accs.values() for a in g.values() for t in a.state_view().values()])
        return accs

    monkeypatch.setattr(recorder, "record_task", spy)
    record(loaded, tasks, tmp / "run", CFG)
    assert len(states) == 2


def test_statistics_are_read_without_the_reservoir_samples(setup, monkeypatch):
    loaded, tasks, tmp = setup
    record(loaded, tasks, tmp / "run", CFG)
    run = open_run(tmp / "run")
    full = {s: a["stats"].compute() for s, a in run.accumulators("alpha").items()}
    read: list[str] = []
    real = store.load_tensors

    def spy(*args, **kwargs):
        tensors, meta = real(*args, **kwargs)
        read.extend(tensors)
        return tensors, meta

    monkeypatch.setattr(store, "load_tensors", spy)
    stats = run.stats("alpha")
    run.merged_stats(["alpha", "beta"])
    assert read and not [k for k in read if "/stats/" not in k], "only the statistics' tensors are read"
    for site, st in full.items():
        for k, v in st.items():
            torch.testing.assert_close(stats[site][k], v, rtol=0, atol=0, equal_nan=True)
    read.clear()
    assert run.reservoir("alpha") and {k.split("/")[1] for k in read} == {"reservoir"}
