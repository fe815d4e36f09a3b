"""The demo runs a real two-rank PertP run and writes one self-contained report.html that renders
in headless Chromium without console errors."""
from __future__ import annotations

import json
import os
import re

import pytest

from distzo2_lab.demo import run_demo
from distzo2_lab.observe.events import read_jsonl
from tests.browser import browser_or_skip, image_stats

SHOTS = os.environ.get("DISTZO2_SCREENSHOTS")  # keep screenshots here when set (to look at them)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    s = run_demo(str(out), steps=12)
    return out, s


def test_demo_runs_two_ranks_and_checks_them(demo, capsys):
    out, s = demo
    assert set(s["ranks"]) == {0, 1} and len({r["digest"] for r in s["ranks"].values()}) == 1
    assert s["layout"] == {"dp": 1, "pert": 2} and s["spans"] > 0
    for f in ("summary.json", "seedlog.jsonl", "loss.html", "checkpoint/model.safetensors", "trace/rank0.jsonl",
              "trace/rank1.jsonl", "report.html"):
        assert (out / f).exists(), f
    # both ranks streamed their blocks: upload and offload spans on each
    for r in (0, 1):
        lanes = {sp.lane for sp in read_jsonl(str(out / f"trace/rank{r}.jsonl"))}
        assert {"upload", "compute", "offload", "exchange"} <= lanes, (r, lanes)


def test_report_is_one_self_contained_file(demo):
    out, _ = demo
    text = (out / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=", text), "report.html loads a script from elsewhere"
    assert "plotly" in text.lower() and text.count("Plotly.newPlot") >= 4
    for heading in ("Layout", "Overlap metrics", "Timeline", "Loss and projected gradient", "Bubbles"):
        assert heading in text, heading
    assert "rank 1: dp 0, pert 1" in text  # the layout plan
    json.loads((out / "summary.json").read_text())


def test_report_renders_in_headless_chromium(demo, tmp_path):
    out, _ = demo
    browser = browser_or_skip("report not rendered", width=1280, height=2400)
    with browser:
        browser.goto((out / "report.html").as_uri(), settle=1.0)
        n = browser.wait_for("document.querySelectorAll('.js-plotly-plot .main-svg').length", timeout=60)
        plots = browser.eval("document.querySelectorAll('.js-plotly-plot').length")
        bars = browser.eval("document.querySelectorAll('.js-plotly-plot .barlayer .point').length")
        shot = browser.screenshot(os.path.join(SHOTS or str(tmp_path), "report.png"))
        errors = browser.console_errors()
    assert plots >= 4 and n >= plots, (plots, n)
    assert bars > 0, "the timeline drew no bars"
    assert errors == [], errors
    stats = image_stats(shot)
    assert stats["colours"] > 50 and stats["non_background"] > 0.02, stats
