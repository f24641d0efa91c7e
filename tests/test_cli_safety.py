"""The command line refuses bad options before a model loads, never writes over results or models it should not,
and tells user errors (one line, exit code 2) from bugs (a traceback and a request for a report, exit code 1)."""

import errno
import json

import pytest
from typer.testing import CliRunner

from neurospec.cli import _register, app, options
from neurospec.cli.common import INTERNAL_ERROR
from neurospec.errors import NeurospecError

from tiny import write_corpus

_register()
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class LoadReached(NeurospecError):
    pass


@pytest.fixture
def no_load(monkeypatch):
    """Model loading raises LoadReached: a command that gets that far passed its checks."""
    import neurospec.models.loading as loading

    def fake(*a, **k):
        raise LoadReached("model loading reached")

    monkeypatch.setattr(loading, "load_model", fake)


def one_line_error(r, match: str) -> None:
    assert r.exit_code == 2, r.output
    assert "model loading reached" not in r.output and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert match in lines[0], r.output


M = ["--model", "tiny-model-that-is-never-loaded"]
study_ablations = options.study_ablations
BAD_OPTIONS = [
    (["record", *M, "--task", "prose", "--out", "{tmp}/r", "--seed", -1], "--seed must be a non-negative integer"),
    (["ablate", *M, "--reference", "{tmp}", "--task", "prose", "--seeds", "a"], "--seeds must be comma-separated"),
    (["ablate", *M, "--reference", "{tmp}", "--task", "prose", "--seeds", "0,-1"], "--seeds must be"),
    (["record", *M, "--task", "prose", "--out", "{tmp}/r", "--device", "foo"], "unknown --device 'foo'"),
    (["evaluate", *M, "--task", "prose", "--dtype", "int8"], "unknown --dtype 'int8'; choose one of float32"),
    (["run", *M, "--out", "{tmp}/r", "--dtype", "int8"], "unknown --dtype 'int8'"),
    (["taskmap", *M, "--task", "prose", "--task", "python", "--out", "{tmp}/r", "--score", "nope"],
     "unknown --score 'nope'; choose one of abs, sqrt"),
    (["ablate", *M, "--reference", "{tmp}", "--task", "prose", "--methods", "zero,nope"],
     "unknown --methods 'nope'; choose one of " + ", ".join(study_ablations())),
    (["ablate", *M, "--reference", "{tmp}", "--neurons", "{tmp}/ids.txt", "--save", "{tmp}/s", "--method", "nope"],
     "unknown --method 'nope'"),
    (["ablate", *M, "--reference", "{tmp}", "--neurons", "{tmp}/ids.txt", "--save", "{tmp}/s", "--method",
      "resample"], "cannot be folded"),
    (["prune", *M, "--forget", "prose", "--retain", "python", "--out", "{tmp}/r", "--ablation", "peak"],
     "ablation must be one of"),
    (["ablate", *M, "--reference", "{tmp}", "--task", "prose", "--kind", "heads"], "unknown --kind 'heads'"),
    (["ablate", *M, "--reference", "{tmp}", "--task", "prose", "--random-frac", 0], "--random-frac must be in"),
    (["evaluate", *M, "--task", "prose", "--eval-tokens", 0], "--eval-tokens must be a positive integer"),
    (["cluster", *M, "--out", "{tmp}/c", "--seed", -3], "--seed must be a non-negative integer"),
    (["specialization", "{tmp}", "--score", "nope"], "unknown --score 'nope'"),
    (["align", "{tmp}", "{tmp}", "--seed", -1], "--seed must be"),
    (["zoo", "train", "digits-mlp", "--out", "{tmp}/z", "--seed", -1], "--seed must be"),
    (["taskmap", *M, "--task", "Prose=prose", "--task", "prose", "--out", "{tmp}/r"], "differ only by case"),
    (["record", *M, "--task", "a=x.txt", "--task", "A=y.txt", "--out", "{tmp}/r"], "differ only by case"),
]


@pytest.mark.parametrize(("args", "match"), BAD_OPTIONS, ids=[f"{a[0]}-{m[:20]}" for a, m in BAD_OPTIONS])
def test_bad_options_fail_in_one_line_before_the_model_loads(no_load, tmp_path, args, match):
    r = invoke(*[str(a).replace("{tmp}", str(tmp_path)) for a in args])
    one_line_error(r, match)


def test_unknown_scorer_lists_the_registry_and_fails_fast(no_load, tmp_path, monkeypatch):
    from neurospec.score.selective import SCORERS

    monkeypatch.setitem(SCORERS, "mine", SCORERS["abs"])  # the list comes from the registry
    r = invoke("prune", *M, "--forget", "prose", "--retain", "python", "--out", tmp_path / "p", "--score", "nope")
    one_line_error(r, f"choose one of {', '.join(SCORERS)}")
    assert "mine" in r.output and not (tmp_path / "p").exists()


def test_unknown_scorer_fails_fast_in_a_fresh_process(tmp_path):
    """`neurospec prune --score nope` in a new process: the list of scorers and exit code 2, before anything heavy
    is imported (transformers, which loading a model needs, is never imported; the model named does not exist
    either, so loading it would fail with another message). How long that takes is measured by the import time,
    not asserted here."""
    import os
    import subprocess
    import sys

    from neurospec.score.selective import SCORERS

    argv = ["neurospec", "prune", *M, "--forget", "prose", "--retain", "python", "--out", str(tmp_path / "p"),
            "--score", "nope"]
    script = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('neurospec', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('loaded transformers:', 'transformers' in sys.modules, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "NEUROSPEC_NO_PROGRESS": "1"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and f"choose one of {', '.join(SCORERS)}" in p.stderr, p.stderr
    assert "loaded transformers: False" in p.stderr, p.stderr
    assert not (tmp_path / "p").exists()


def test_old_tokens_flag_of_evaluate_and_ablate_still_works(no_load, tmp_path):
    """--tokens of evaluate/ablate is the deprecated name of --eval-tokens: the value is checked and used as the
    evaluation budget, with a note on stderr; both flags at once is an error."""
    r = invoke("evaluate", *M, "--task", "prose", "--tokens", 0)
    assert r.exit_code == 2 and "deprecated" in r.output and "--eval-tokens must be a positive integer" in r.output
    r = invoke("ablate", *M, "--reference", tmp_path, "--task", "prose", "--tokens", 512)
    assert "deprecated: --tokens" in r.output and "use --eval-tokens 512" in r.output
    assert "model loading reached" in r.output
    r = invoke("evaluate", *M, "--task", "prose", "--tokens", 512, "--eval-tokens", 100)
    one_line_error(r, "give --eval-tokens only")


def test_good_options_reach_the_model(no_load, tmp_path):
    r = invoke("prune", *M, "--forget", "prose", "--retain", "python", "--out", tmp_path / "p", "--score", "rms",
               "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 2 and "model loading reached" in r.output


def test_os_errors_are_one_line_and_bugs_print_a_traceback(monkeypatch, tmp_path):
    import neurospec.models.loading as loading

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(loading, "load_model", disk_full)
    r = invoke("sites", "m")
    one_line_error(r, f"No space left on device: {tmp_path / 'x'}")

    def bug(*a, **k):
        return {}["missing"]

    monkeypatch.setattr(loading, "load_model", bug)
    r = invoke("sites", "m")
    assert r.exit_code == 1
    assert "Traceback" in r.output and "KeyError: 'missing'" in r.output
    assert r.output.rstrip().splitlines()[-1] == INTERNAL_ERROR


def test_allow_pickle_is_passed_only_to_a_load_model_that_takes_it(monkeypatch):
    import neurospec.models.loading as loading

    seen = []

    def new_style(spec, *, device=None, dtype=None, allow_pickle=False):
        seen.append(allow_pickle)
        raise LoadReached("model loading reached")

    def old_style(spec, *, device=None, dtype=None):
        seen.append("old")
        raise LoadReached("model loading reached")

    monkeypatch.setattr(loading, "load_model", new_style)
    invoke("sites", "m", "--allow-pickle")
    invoke("evaluate", *M, "--task", "prose")
    monkeypatch.setattr(loading, "load_model", old_style)
    r = invoke("sites", "m", "--allow-pickle")
    assert "model loading reached" in r.output
    assert seen == [True, False, "old"]


# ------------------------------------------------------------------------------------------------------ --save


def test_save_refuses_a_non_empty_directory_and_the_models_own(no_load, model_dir, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    prune = ["prune", "--model", model_dir, "--forget", "prose", "--retain", "python", "--out", tmp_path / "p"]
    one_line_error(invoke(*prune, "--save", full), "is not empty")
    one_line_error(invoke(*prune, "--save", model_dir, "--force"), "the directory the model is loaded from")
    one_line_error(invoke(*prune, "--save", tmp_path / "p"), "is also --out")
    (tmp_path / "file").write_text("x")
    one_line_error(invoke(*prune, "--save", tmp_path / "file"), "is not a directory")
    fold = ["ablate", "--model", model_dir, "--reference", tmp_path, "--neurons", tmp_path / "ids.txt"]
    one_line_error(invoke(*fold, "--save", full), "is not empty")
    one_line_error(invoke(*fold, "--save", model_dir / ".", "--force"), "the directory the model is loaded from")
    # a new or empty directory, or a non-empty one with --force, passes the checks
    assert "model loading reached" in invoke(*prune, "--save", tmp_path / "new").output
    assert "model loading reached" in invoke(*fold, "--save", full, "--force").output
    assert (full / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------ --out


def test_out_refuses_another_commands_or_configurations_results(no_load, tmp_path):
    out = tmp_path / "out"
    taskmap = ["taskmap", *M, "--task", "prose", "--task", "python", "--out", out]
    assert "model loading reached" in invoke(*taskmap).output
    claim = json.loads((out / "command.json").read_text())
    assert claim["command"] == "taskmap" and claim["config"]["tokens"] == options.TOKENS
    # only the claim is there (the command stopped before writing anything): anything may take the directory
    assert "model loading reached" in invoke(*taskmap, "--tokens", 512).output
    (out / "taskmap.json").write_text("{}")
    one_line_error(invoke(*taskmap), "holds results of `neurospec taskmap` with another configuration (tokens 512 "
                                     f"there, {options.TOKENS} now); use --force")
    one_line_error(invoke("prune", *M, "--forget", "prose", "--retain", "python", "--out", out),
                   "holds results of `neurospec taskmap`")
    one_line_error(invoke("run", *M, "--out", out), "holds results of `neurospec taskmap`")
    one_line_error(invoke("cluster", *M, "--out", out), "holds results of `neurospec taskmap`")
    one_line_error(invoke("ablate", *M, "--reference", tmp_path, "--task", "prose", "--out", out),
                   "holds results of `neurospec taskmap`")
    one_line_error(invoke("zoo", "train", "digits-mlp", "--out", out), "holds results of `neurospec taskmap`")
    # the same command and configuration resumes; --force replaces the results (and the claim)
    assert "model loading reached" in invoke(*taskmap, "--tokens", 512).output
    assert (out / "taskmap.json").exists()
    assert "model loading reached" in invoke(*taskmap, "--force").output
    assert not (out / "taskmap.json").exists()
    assert json.loads((out / "command.json").read_text())["config"]["tokens"] == options.TOKENS


def test_out_refuses_unclaimed_files_but_takes_a_recorder_run(no_load, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    one_line_error(invoke("taskmap", *M, "--task", "prose", "--task", "python", "--out", mine),
                   "no neurospec command claimed it")
    rec = tmp_path / "rec"
    (rec / "stats").mkdir(parents=True)
    (rec / "manifest.json").write_text("{}")
    assert "model loading reached" in invoke("prune", *M, "--forget", "prose", "--retain", "python",
                                             "--out", rec).output


def test_prune_writes_into_a_record_run(model_dir, tmp_path):
    """The ordinary flow, record and then prune into the run directory, still works."""
    corpus = write_corpus(tmp_path / "a.txt", n_docs=60)
    small = ["--seq-len", 16, "--batch-size", 4, "--tokens", 64, "--eval-tokens", 32]
    rec = tmp_path / "rec"
    r = invoke("record", "--model", model_dir, "--task", f"words={corpus}", "--task", "prose", *small, "--out", rec)
    assert r.exit_code == 0, r.output
    r = invoke("prune", "--model", model_dir, "--forget", f"words={corpus}", "--retain", "prose", "--steps", 2,
               "--frac", 0.1, *small, "--out", rec, "--json")
    assert r.exit_code == 0, r.output
    assert {"manifest.json", "command.json", "result.json", "pruned_neurons.txt", "step0"} <= {
        p.name for p in rec.iterdir()}


def test_a_rerun_with_fewer_tasks_leaves_no_stale_result(model_dir, tmp_path, monkeypatch):
    """`run` with fewer tasks is refused on the old results; with --force it leaves no result of the dropped task
    for the report to show."""
    import neurospec.models.loading as loading

    corpus = write_corpus(tmp_path / "a.txt", n_docs=60)
    out = tmp_path / "main"
    # no ablation study (its task is not run), no random-init control: the smallest main job
    base = ["run", "--model", model_dir, "--tokens", 64, "--eval-tokens", 32, "--seq-len", 16, "--batch-size", 4,
            "--no-random-init", "--ablation-task", "none", "--out", out]
    with monkeypatch.context() as m:  # the three-task job claims the directory (its results are planted below)
        m.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(LoadReached("model loading reached")))
        assert "model loading reached" in invoke(*base, "--task", "prose", "--task", f"words={corpus}", "--task",
                                                 "dialog").output
    point = {"top1": 0.5, "top10": 0.9, "skip_top1": 0.4, "loss": 2.0}
    stale = {"forget": "dialog", "retain": ["prose", "words"], "area": 1.5,
             "steps": [{"fraction": f, "attn_fraction": 0.0, "n_pruned": 0, "forget": point, "retain": point}
                       for f in (0.0, 0.02)]}
    (out / "prune" / "dialog").mkdir(parents=True)
    (out / "prune" / "dialog" / "result.json").write_text(json.dumps(stale))
    r = invoke(*base, "--task", "prose", "--task", f"words={corpus}")
    assert r.exit_code == 2 and "another configuration (task" in r.output
    r = invoke(*base, "--task", "prose", "--task", f"words={corpus}", "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "prune" / "dialog" / "result.json").exists()
    assert (out / "prune" / "words" / "result.json").exists()
    report = (out / "report.html").read_text()
    assert "words" in report and "dialog" not in report
