"""The HTML report renders in a real browser (headless Chromium) without errors and shows every figure."""

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from neurospec.cli import _register, app

from tiny import save_tiny_lm

_register()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PROBE_HEAD = "<script>window.__errs=[];window.addEventListener('error',e=>window.__errs.push(String(e.message)));</script>"
PROBE_BODY = """<script>window.addEventListener('load',()=>{const im=[...document.images];
document.body.setAttribute('data-check',JSON.stringify({n:im.length,ok:im.filter(i=>i.complete&&i.naturalWidth>0).length,
errs:window.__errs,sections:document.querySelectorAll('section').length}));});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("NEUROSPEC_CACHE", str(tmp / "cache"))
    d = tmp / "tiny"
    save_tiny_lm(d)
    r = CliRunner().invoke(app, ["run", "--model", str(d), "--task", "prose", "--task", "dialog", "--tokens", "256",
                                 "--eval-tokens", "64", "--seq-len", "32", "--batch-size", "4", "--out",
                                 str(tmp / "main"), "--json"])
    mp.undo()
    assert r.exit_code == 0, r.output
    return tmp / "main" / "report.html"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs Debian's chromium)")
def test_report_renders_in_chromium(report, tmp_path):
    html = report.read_text()
    n_figures = html.count("data:image/png;base64,")
    assert n_figures >= 8
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1))
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"data-check=\"([^\"]*)\"", dom.stdout)
    assert m, f"the page did not finish loading: {dom.stderr[-2000:]}"
    check = json.loads(m.group(1).replace("&quot;", '"'))
    assert check["errs"] == []
    assert check["n"] == n_figures and check["ok"] == n_figures, check
    assert check["sections"] >= 6
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
