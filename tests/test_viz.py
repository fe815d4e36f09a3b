"""Timelines are horizontal Bars with base = span start (seconds) on a linear axis, one row per
(rank, lane), one trace per phase; they read spans from a real offloaded run; the comparison and
metrics views build and serialise."""
from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

from distzo2_lab.config import OffloadConfig, TrainConfig
from distzo2_lab.observe.events import Span, overlap_metrics, read_jsonl
from distzo2_lab.observe.viz import compare_timelines, metrics_table, timeline_figure
from distzo2_lab.run.train import train

MS = 1_000_000  # ns


def _spans() -> list[Span]:
    return [
        Span(0, "upload", "upload", 0, 0, 0 * MS, 2 * MS, 4096),
        Span(0, "compute", "forward", 0, 0, 2 * MS, 7 * MS),
        Span(0, "upload", "upload", 0, 1, 3 * MS, 5 * MS, 4096),
        Span(0, "compute", "head", 0, -1, 7 * MS, 8 * MS),
        Span(0, "offload", "offload", 0, 0, 7 * MS, 9 * MS, 4096),
        Span(1, "compute", "forward", 0, 0, 1 * MS, 4 * MS),
    ]


def _bars(fig: go.Figure) -> dict[str, go.Bar]:
    return {t.name: t for t in fig.data}


def test_timeline_bars_are_horizontal_with_base_at_span_start_in_seconds():
    spans = _spans()
    fig = timeline_figure(spans)
    bars = _bars(fig)
    assert set(bars) == {"upload", "forward", "head", "offload"}  # one trace (legend entry) per phase
    for t in fig.data:
        assert isinstance(t, go.Bar) and t.orientation == "h"
    for phase, bar in bars.items():
        sel = [s for s in spans if s.phase == phase]
        assert list(bar.base) == pytest.approx([s.start / 1e9 for s in sel])
        assert list(bar.x) == pytest.approx([s.seconds for s in sel])
    assert fig.layout.xaxis.type == "linear" and fig.layout.barmode == "overlay"


def test_timeline_has_one_row_per_rank_and_lane_first_on_top():
    fig = timeline_figure(_spans())
    rows = ["rank 0 · upload", "rank 0 · compute", "rank 0 · offload", "rank 1 · compute"]
    assert list(fig.layout.yaxis.categoryarray) == rows[::-1]  # category axes draw bottom-up
    assert list(_bars(fig)["upload"].y) == ["rank 0 · upload"] * 2
    assert list(_bars(fig)["forward"].y) == ["rank 0 · compute", "rank 1 · compute"]


def test_timeline_hover_names_step_block_bytes_and_duration():
    bar = _bars(timeline_figure(_spans()))["upload"]
    assert [list(c[:3]) for c in bar.customdata] == [[0, 0, 4096], [0, 1, 4096]]
    assert bar.customdata[0][3] == pytest.approx(2.0)  # ms
    for word in ("upload", "step", "block", "bytes", "ms"):
        assert word in bar.hovertemplate


def test_timeline_window_keeps_overlapping_spans_and_sets_the_range():
    fig = timeline_figure(_spans(), window=(0.0055, 0.0085))
    assert tuple(fig.layout.xaxis.range) == (0.0055, 0.0085)
    kept = {(t.name, b) for t in fig.data for b in t.base}
    assert kept == {("forward", 0.002), ("head", 0.007), ("offload", 0.007)}


def test_compare_timelines_starts_every_run_at_zero_with_run_labels():
    shifted = [Span(s.rank, s.lane, s.phase, s.step, s.block, s.start + 5_000 * MS, s.end + 5_000 * MS, s.bytes)
               for s in _spans() if s.rank == 0]
    fig = compare_timelines({"resident": [s for s in _spans() if s.lane == "compute" and s.rank == 0],
                             "host": shifted})
    assert list(fig.layout.yaxis.categoryarray)[::-1] == [
        "resident · compute", "host · upload", "host · compute", "host · offload"]
    bases: dict[str, list[float]] = {}
    for t in fig.data:
        for y, b in zip(t.y, t.base):
            bases.setdefault(y, []).append(b)
    assert bases["resident · compute"] == [0.0, pytest.approx(0.005)]  # forward, then head
    assert bases["host · upload"] == [0.0, pytest.approx(0.003)]  # the host run starts at 0 too
    assert bases["host · offload"] == [pytest.approx(0.007)]
    json.loads(fig.to_json())


def test_metrics_table_lists_overlap_metrics_per_run():
    spans = _spans()
    fig = metrics_table({"a": spans, "empty": []})
    table = fig.data[0]
    assert isinstance(table, go.Table)
    header = list(table.header.values)
    assert header[:2] == ["run", "window s"] and "hidden" in header and "busy upload" in header
    columns = dict(zip(header, table.cells.values))
    m = overlap_metrics(spans)
    assert list(columns["run"]) == ["a", "empty"]
    assert columns["hidden"][0] == f"{m['hidden_fraction']:.0%}" and columns["hidden"][1] == "—"
    assert columns["upload MB"][0] == f"{8192 / 1e6:.1f}"
    json.loads(fig.to_json())


def test_timeline_of_a_real_host_offloaded_run(tmp_path):
    cfg = TrainConfig(model="tiny-deep", steps=2, batch_size=2, seq_len=12, threads=1,
                      offload=OffloadConfig(tier="host"))
    summary = train(cfg, trace=str(tmp_path), progress=False)
    spans = read_jsonl(summary["trace"]["jsonl"])
    fig = timeline_figure(spans, title="host tier")
    rows = set(fig.layout.yaxis.categoryarray)
    assert rows == {"rank 0 · upload", "rank 0 · compute", "rank 0 · offload"}
    bars = _bars(fig)
    assert {"upload", "offload", "forward", "update", "embed", "head"} <= set(bars)
    assert len(bars["upload"].base) == sum(s.phase == "upload" for s in spans)
    assert all(b >= 0 for t in fig.data for b in t.base) and all(x >= 0 for t in fig.data for x in t.x)
    json.loads(fig.to_json())
    both = compare_timelines({"host": spans, "again": spans})
    assert min(b for t in both.data for b in t.base) == 0.0
    json.loads(metrics_table({"host": spans}).to_json())


def test_compare_runs_puts_runs_on_one_axis_above_a_metrics_table_per_rank():
    from distzo2_lab.observe.viz import compare_runs

    spans = _spans()
    fig = compare_runs({"two ranks": spans, "rank 0 only": [s for s in spans if s.rank == 0]},
                       tokens={"two ranks": 1234.0})
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    table = [t for t in fig.data if isinstance(t, go.Table)][0]
    assert bars and all(t.orientation == "h" and t.xaxis == "x" for t in bars)
    header = list(table.header.values)
    assert header[:3] == ["run", "rank", "window s"] and {"hidden", "bubble ms", "tokens/s"} <= set(header)
    cols = dict(zip(header, table.cells.values))
    assert list(cols["run"]) == ["two ranks", "two ranks", "rank 0 only"] and list(cols["rank"]) == ["0", "1", "0"]
    assert list(cols["tokens/s"]) == ["1,234", "1,234", "—"]
    assert min(b for t in bars for b in t.base) == 0.0  # every run starts at 0 s
    json.loads(fig.to_json())


def test_bubble_figure_has_one_bar_series_per_rank():
    from distzo2_lab.observe.viz import bubble_figure

    fig = bubble_figure(_spans())
    assert [t.name for t in fig.data] == ["rank 0", "rank 1"]
    # rank 0: block 0's upload ends at 2 ms when compute starts (no compute before it: no wait)
    assert list(fig.data[0].x) == [0] and list(fig.data[0].y) == [0.0]
