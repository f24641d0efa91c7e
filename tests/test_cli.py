"""The command line: JSON contracts and clear errors, on a tiny model saved to disk."""

import json

import pytest
from typer.testing import CliRunner

from neurospec.cli import _register, app

from tiny import write_corpus

_register()
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result



def test_models_and_tasks_json():
    r = invoke("models", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {b["alias"] for b in data["bundled"]} == {"smollm2-135m", "minilm-l6"}
    assert {"llama", "gpt2", "gpt_neox", "opt", "bert", "vit"} <= {f["name"] for f in data["families"]}
    r = invoke("tasks", "--json")
    assert r.exit_code == 0, r.output
    names = {row["name"] for row in json.loads(r.stdout)}
    assert {"python", "c", "prose", "dialog", "dialog-french", "dialog-spanish", "dialog-german"} <= names


def test_sites_and_record_json_contract(model_dir, tmp_path):
    r = invoke("sites", model_dir, "--json")
    assert r.exit_code == 0, r.output
    sites = json.loads(r.stdout)["sites"]
    assert [s["name"] for s in sites] == ["layers.0.mlp", "layers.0.attn", "layers.1.mlp", "layers.1.attn"]
    corpus = write_corpus(tmp_path / "a.txt")
    args = ["record", "--model", model_dir, "--task", f"words={corpus}", "--task", "prose", "--tokens", 256,
            "--eval-tokens", 64, "--seq-len", 32, "--batch-size", 4, "--out", tmp_path / "run", "--json"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["run"] == str(tmp_path / "run")
    assert out["tasks"] == {"words": 256, "prose": 256}
    assert [{k: s[k] for k in ("name", "kind", "layer", "width")} for s in sites] == out["sites"]
    r = invoke(*args)  # the same record again: nothing to do, same answer
    assert r.exit_code == 0 and json.loads(r.stdout)["tasks"] == out["tasks"]


def test_errors_are_one_clear_line(model_dir, tmp_path):
    r = invoke("sites", tmp_path / "nope")
    assert r.exit_code == 2 and "no such model" in r.output and "Traceback" not in r.output
    r = invoke("record", "--model", model_dir, "--task", "prose", "--task", "prose", "--out", tmp_path / "r",
               "--tokens", 64, "--seq-len", 32)
    assert r.exit_code == 2 and "more than once" in r.output
    r = invoke("record", "--model", model_dir, "--task", f"x={tmp_path / 'missing.txt'}", "--out", tmp_path / "r",
               "--tokens", 64, "--seq-len", 32)
    assert r.exit_code == 2 and "missing.txt" in r.output


@pytest.mark.dist
def test_torchrun_record_equals_single_process(model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m neurospec record` (gloo on CPU) gives the single-process statistics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from neurospec.record.store import open_run

    corpus = write_corpus(tmp_path / "a.txt", n_docs=80)
    common = ["record", "--model", model_dir, "--task", f"words={corpus}", "--tokens", 512, "--eval-tokens", 64,
              "--seq-len", 32, "--batch-size", 4, "--reservoir", 0]
    r = invoke(*common, "--out", tmp_path / "single")
    assert r.exit_code == 0, r.output
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEUROSPEC_NO_PROGRESS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "neurospec",
                           *map(str, common), "--out", str(tmp_path / "dist"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["tasks"] == {"words": 512}  # printed once, by rank 0
    a, b = open_run(tmp_path / "single").stats("words"), open_run(tmp_path / "dist").stats("words")
    for site in a:
        for k in ("count", "nonfinite", "frac_pos", "min", "max", "peak"):  # exact, as the README says
            assert torch.equal(b[site][k], a[site][k]), f"{site} {k}"
        for k in ("mean", "std", "mean_abs"):  # float64 sums, added in another order
            torch.testing.assert_close(b[site][k], a[site][k], rtol=1e-12, atol=1e-12, msg=f"{site} {k}")


@pytest.mark.dist
def test_torchrun_error_on_one_rank_stops_every_rank(model_dir, tmp_path):
    """Only rank 0 prepares the run directory: a --out that is a file stops both ranks at once, each with the
    one-line message (no rank waits in a collective for the group's timeout)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    corpus = write_corpus(tmp_path / "a.txt", n_docs=20)
    (tmp_path / "a-file").write_text("not a run")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEUROSPEC_NO_PROGRESS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "neurospec", "record", "--model",
           str(model_dir), "--task", f"words={corpus}", "--tokens", "128", "--eval-tokens", "32", "--seq-len", "32",
           "--batch-size", "2", "--reservoir", "0", "--out", str(tmp_path / "a-file")]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        pytest.fail("the ranks were still running after 120 s")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120
    text = " ".join(stderr.split())  # rich may wrap the message
    # rank 1 learns rank 0's message; once one rank has exited, torchrun may stop the other before it prints
    assert "error: run path" in text or "error: rank 0: run path" in text, stderr[-3000:]
    assert "is not a directory: choose another --out" in text and "Timed out" not in stderr


def test_allocator_tuning_respects_the_user(monkeypatch):
    import neurospec
    from neurospec.cli.common import tune_allocator

    assert neurospec.tune_allocator is tune_allocator  # the Python API's opt-in is the command line's own

    monkeypatch.setenv("NEUROSPEC_NO_MALLOPT", "1")
    assert tune_allocator() is False
    monkeypatch.delenv("NEUROSPEC_NO_MALLOPT")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    import sys

    assert tune_allocator() is sys.platform.startswith("linux")
