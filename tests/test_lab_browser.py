"""The lab in a real browser: JupyterLab on 127.0.0.1 with a token, the overlap notebook opened in
headless Chromium, its live run executed there, and the live plotly widget drawn with bars (a
non-blank screenshot of it, no errors in the browser console or in the cell outputs).

The notebook is copied into a temporary root first, so the saved copy in the repository is never
touched, and every Jupyter / IPython directory points into that temporary folder."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distzo2_lab.parallel.launch import free_port
from tests.browser import browser_or_skip, image_stats

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "overlap_profiler.ipynb"
SHOTS = os.environ.get("DISTZO2_SCREENSHOTS")


def test_make_lab_serves_tutorials_and_notebooks_on_loopback_only():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    text = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cmd = [line for line in text.replace("\\\n", " ").splitlines() if "jupyter lab" in line]
    assert cmd, text
    assert "--ip=127.0.0.1" in cmd[0] and "--no-browser" in cmd[0]
    assert f"--ServerApp.root_dir={ROOT}" in cmd[0]  # tutorials/ and notebooks/ both below it


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 over a copy of the notebook; yields (url, root)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    env = dict(os.environ, DISTZO2_TUTORIAL_SIZE="tiny", PYDEVD_DISABLE_FILE_VALIDATION="1")
    for var in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        (tmp_path / var.lower()).mkdir()
        env[var] = str(tmp_path / var.lower())
    # no news / update toasts over the page (they would ask the network and cover the widget)
    settings = tmp_path / "lab_settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env["JUPYTERLAB_SETTINGS_DIR"] = str(tmp_path / "lab_settings")
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_STATE = """(() => {
  // the notebook panel (shell.currentWidget stays null in a window that never has focus)
  const w = window.jupyterapp && Array.from(window.jupyterapp.shell.widgets('main'))
    .find(p => p.content && p.content.model && p.sessionContext);
  if (!w) return null;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = [];
  const m = w.content.model.cells;
  for (let i = 0; i < m.length; i++) {
    const c = m.get(i);
    cells.push({type: c.type, count: c.type === 'code' ? c.executionCount : null,
                errors: c.type === 'code' ? c.outputs.toJSON().filter(o => o.output_type === 'error')
                                                   .map(o => o.ename + ': ' + o.evalue) : [],
                head: c.sharedModel.getSource().slice(0, 40)});
  }
  return {kernel: k ? k.status : null, cells: cells};
})()"""


def test_jupyterlab_runs_the_live_notebook_and_draws_the_widget(lab, tmp_path):
    url, root = lab
    browser = browser_or_skip("JupyterLab not tested in a browser", width=1400, height=1000)
    with browser:
        browser.goto(url, settle=1.0)
        browser.wait_for(f"(() => {{ const s = {_STATE}; return s && s.kernel === 'idle'; }})()", timeout=120)
        state = browser.eval(_STATE)
        # run everything above section 2: parameters, imports, the live run, join()
        stop = next(i for i, c in enumerate(state["cells"]) if c["type"] == "markdown" and "## 2." in c["head"])
        code = [i for i, c in enumerate(state["cells"][:stop]) if c["type"] == "code"]
        browser.eval("Array.from(window.jupyterapp.shell.widgets('main')).find(p => p.content && p.sessionContext)"
                     f".content.activeCellIndex = {stop}")
        browser.eval("window.jupyterapp.commands.execute('notebook:run-all-above')")
        done = f"""(() => {{ const s = {_STATE};
            return s && s.kernel === 'idle' && {json.dumps(code)}.every(i => s.cells[i].count) ? s : null; }})()"""
        state = browser.wait_for(done, timeout=240, poll=1.0)
        errors = [e for c in state["cells"] for e in c["errors"]]
        assert errors == [], errors
        # the live FigureWidget: a plotly graph inside a widget output, with bars on its timeline
        widget = ".jp-Notebook .jp-OutputArea-output .js-plotly-plot"
        browser.wait_for(f"document.querySelectorAll('{widget} .barlayer .point').length > 20", timeout=60)
        rect = browser.eval(f"""(() => {{ const el = document.querySelector('{widget}');
            el.scrollIntoView({{block: 'start'}}); const r = el.getBoundingClientRect();
            return {{x: r.x, y: r.y, width: r.width, height: Math.min(r.height, window.innerHeight - r.y)}}; }})()""")
        browser.pump(1.0)
        stop_button = browser.eval("[...document.querySelectorAll('.jp-OutputArea-output button')]"
                                   ".some(b => b.textContent.trim() === 'Stop')")
        status = browser.eval("[...document.querySelectorAll('.jp-OutputArea-output .widget-html-content')]"
                              ".map(e => e.textContent.trim())")
        rows = browser.eval(f"[...document.querySelectorAll('{widget} .ytick text')].map(t => t.textContent)")
        shot = browser.screenshot(os.path.join(SHOTS or str(tmp_path), "lab_widget.png"), clip=rect)
        full = browser.screenshot(os.path.join(SHOTS or str(tmp_path), "lab.png"))
        console = browser.console_errors()
    assert {"rank 0 · compute", "rank 1 · compute", "rank 0 · upload"} <= set(rows), rows
    assert stop_button, "no Stop button beside the live widget"
    assert "finished" in status, status  # the background thread saw the run end
    assert rect["width"] > 300 and rect["height"] > 200, rect
    stats = image_stats(shot)
    assert stats["colours"] > 30 and stats["non_background"] > 0.05, stats
    assert image_stats(full)["colours"] > 30
    assert console == [], console
