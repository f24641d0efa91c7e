"""Progress of long commands when stderr is not a terminal (batch jobs write logs): plain lines with done/total,
the elapsed time and an estimate of the time left."""

import re

from typer.testing import CliRunner

from neurospec.cli import _register, app, common

from tiny import write_corpus

_register()


def _lines(monkeypatch, times):
    """The lines LogLines prints, with time.monotonic() returning ``times`` one call after another."""
    clock = iter(times)
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    lines = []
    monkeypatch.setattr(common.err, "print", lambda text, **kw: lines.append(text))
    return lines


def test_log_lines_say_done_total_and_time_left(monkeypatch):
    lines = _lines(monkeypatch, [100.0, 110.0, 130.0, 170.0, 175.0])
    log = common.LogLines("tokens", every=60)
    log("words", 0, 1000)       # t=100: the start of a label is always shown
    log("words", 100, 1000)     # t=110: within a minute of the last line: quiet
    log("words", 200, 1000)     # t=130: quiet
    log("words", 500, 1000)     # t=170: a minute after the last line: 500 tokens in 70 s, 500 left -> 70 s
    log("words", 1000, 1000)    # t=175: the end of a label is always shown
    assert lines == [
        "words: 0/1,000 tokens (0%), 0s elapsed",
        "words: 500/1,000 tokens (50%), 1m10s elapsed, about 1m10s left",
        "words: 1,000/1,000 tokens (100%), 1m15s elapsed, done",
    ]


def test_counted_steps_keep_one_timer_while_their_label_changes(monkeypatch):
    """Steps whose label names the current step (``skills TASK``, ``ablation METHOD``): every new label is shown,
    and elapsed time and time left cover the whole count, not the current label."""
    lines = _lines(monkeypatch, [0.0, 300.0, 600.0, 900.0])
    log = common.LogLines(every=60)
    log("skills a", 0, 3, key="steps")
    log("skills b", 1, 3, key="steps")
    log("skills c", 2, 3, key="steps")
    log("skills c", 3, 3, key="steps")
    assert lines == [
        "skills a: 0/3 (0%), 0s elapsed",
        "skills b: 1/3 (33%), 5m00s elapsed, about 10m00s left",
        "skills c: 2/3 (67%), 10m00s elapsed, about 5m00s left",
        "skills c: 3/3 (100%), 15m00s elapsed, done",
    ]


def test_a_new_phase_under_the_same_key_gets_its_own_timer(monkeypatch):
    """A long first phase (prompt training: 1 step in an hour) must not make the next phase (84 perturbations at
    a minute each) look like a day: a new total, or a count that starts over, restarts the timer."""
    lines = _lines(monkeypatch, [0.0, 3600.0, 3600.0, 3720.0, 3780.0, 3900.0])
    log = common.LogLines(every=60)
    log("train", 0, 1, key="steps")
    log("train", 1, 1, key="steps")
    log("perturb", 0, 84, key="steps")      # new total: a new timer at t=3600
    log("perturb", 2, 84, key="steps")      # 2 in 120 s -> 82 left at 60 s each
    log("again", 0, 84, key="steps")        # the same total, counted from 0 again: a new timer at t=3780
    log("again", 1, 84, key="steps")        # 1 in 120 s
    assert lines == [
        "train: 0/1 (0%), 0s elapsed",
        "train: 1/1 (100%), 1h00m elapsed, done",
        "perturb: 0/84 (0%), 0s elapsed",
        "perturb: 2/84 (2%), 2m00s elapsed, about 1h22m left",
        "again: 0/84 (0%), 0s elapsed",
        "again: 1/84 (1%), 2m00s elapsed, about 2h46m left",
    ]


def test_record_reports_progress_on_stderr_when_it_is_not_a_terminal(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)
    monkeypatch.setenv("NEUROSPEC_PROGRESS_EVERY", "0")
    corpus = write_corpus(tmp_path / "a.txt")
    r = CliRunner().invoke(app, [str(a) for a in (
        "record", "--model", model_dir, "--task", f"words={corpus}", "--tokens", 256, "--eval-tokens", 64,
        "--seq-len", 32, "--batch-size", 4, "--out", tmp_path / "run", "--json")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("words")]
    assert lines and lines[-1].startswith("words: 256/256 tokens (100%)") and lines[-1].endswith("done"), r.stderr
    assert any(re.search(r"tokens \(\d+%\), .* elapsed, about .* left$", ln) for ln in lines), r.stderr
    assert r.stdout.lstrip().startswith("{")  # the JSON result alone on stdout


def test_a_new_label_at_zero_with_the_same_total_gets_its_own_timer(monkeypatch):
    """Two one-step studies in a row (``pruning 0/1`` then ``agreement 0/1``): the second's elapsed time starts at
    its own start, not the first's."""
    lines = _lines(monkeypatch, [0.0, 600.0, 700.0])
    log = common.LogLines(every=60)
    log("pruning t", 0, 1, key="steps")
    log("agreement t", 0, 1, key="steps")   # t=600: a new timer
    log("agreement t", 1, 1, key="steps")   # t=700: 100 s of agreement
    assert lines[-1] == "agreement t: 1/1 (100%), 1m40s elapsed, done"
