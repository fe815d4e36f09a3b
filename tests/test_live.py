"""Spans reach a live view while a real two-rank run trains; metrics read the same spans.

The live view follows processes started by the project's launcher (blocking mode), and the
non-blocking mode's Stop stops a run that would otherwise go on for minutes."""
from __future__ import annotations

import threading
import time

import plotly.graph_objects as go
import pytest

from distzo2_lab.config import OffloadConfig, TrainConfig
from distzo2_lab.observe.events import Recorder, Span, SpanBatcher, read_jsonl, spans_from_rows
from distzo2_lab.observe.live import LiveView
from distzo2_lab.observe.metrics import bubbles, rank_metrics, run_metrics, tokens_rate
from distzo2_lab.observe.viz import compare_runs
from distzo2_lab.parallel.launch import launch
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.run.worker import train_worker

MS = 1_000_000


def test_batcher_sends_every_span_once_in_batches_from_many_threads():
    sent: list[list[tuple]] = []
    batcher = SpanBatcher(sent.append, every_s=60.0, max_spans=10)
    rec = Recorder(rank=3, listener=batcher)

    def lane(name):
        for i in range(25):
            rec.add(name, name, i, i, i, i + 1, 8)

    threads = [threading.Thread(target=lane, args=(n,)) for n in ("upload", "offload", "compute")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(b) == 10 for b in sent)  # only full batches so far (the time limit is far away)
    batcher.flush()
    got = [s for b in sent for s in spans_from_rows(b)]
    assert sorted(got, key=lambda s: (s.lane, s.step)) == sorted(rec.spans, key=lambda s: (s.lane, s.step))
    assert len(got) == 75 and all(s.rank == 3 for s in got)


def test_batcher_sends_after_its_interval():
    sent = []
    batcher = SpanBatcher(sent.append, every_s=0.05, max_spans=10_000)
    batcher(Span(0, "compute", "forward", 0, 0, 0, 1))
    assert sent == []
    time.sleep(0.06)
    batcher(Span(0, "compute", "forward", 0, 1, 1, 2))
    assert len(sent) == 1 and len(sent[0]) == 2


def test_bubble_is_the_idle_time_before_a_block_whose_data_came_late():
    spans = [
        Span(0, "upload", "upload", 0, 0, 0 * MS, 2 * MS, 100),
        Span(0, "compute", "forward", 0, 0, 2 * MS, 5 * MS),
        Span(0, "upload", "upload", 0, 1, 2 * MS, 8 * MS, 100),  # arrives 3 ms after compute is free
        Span(0, "compute", "forward", 0, 1, 8 * MS, 10 * MS),
        Span(0, "upload", "upload", 0, 2, 8 * MS, 9 * MS, 100),  # ready before compute needs it
        Span(0, "compute", "rng", 0, 2, 10 * MS, 11 * MS),
        Span(0, "offload", "offload", 0, 0, 5 * MS, 6 * MS, 100),
    ]
    assert bubbles(spans) == pytest.approx({0: 0.0, 1: 0.003, 2: 0.0})
    m = rank_metrics(spans, 0)
    assert m["bubble_s"] == pytest.approx(0.003)
    assert m["bytes_per_step"] == {"upload": 300, "offload": 100}
    assert m["busy"]["compute"] == pytest.approx(6 / 11)
    # transfers 0-9 ms (union), compute covers 2-5 and 8-9 of it
    assert m["hidden_fraction"] == pytest.approx(4 / 9)
    assert tokens_rate([{"t": 1.0, "tokens": 10}, {"t": 2.0, "tokens": 10}, {"t": 3.0, "tokens": 30}]) == 20.0


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    cfg = TrainConfig(model="tiny-deep", steps=6, batch_size=4, seq_len=16, threads=1,
                      offload=OffloadConfig(tier="host"))
    view = LiveView(title="test", max_fps=10)
    trace = tmp_path_factory.mktemp("trace")
    t0 = time.monotonic()
    handle = launch(train_worker, 2, args=(cfg, Layout(dp=1, pert=2), None, str(trace), True), timeout=240)
    results = view.watch(handle, display=False)
    view.trace = trace
    return cfg, view, results, time.monotonic() - t0


def test_live_view_receives_spans_and_steps_of_every_rank(live_run):
    cfg, view, results, elapsed = live_run
    assert set(results) == {0, 1}
    assert {r: [x["step"] for x in recs] for r, recs in view.steps.items()} == {0: list(range(6)), 1: list(range(6))}
    # what arrived live is what the ranks trained: same per-step losses as their results
    for r in (0, 1):
        assert [x["loss_plus"] for x in view.steps[r]] == [x["loss_plus"] for x in results[r]["steps"]]
    lanes = {(s.rank, s.lane) for s in view.spans}
    assert {(r, lane) for r in (0, 1) for lane in ("upload", "compute", "offload", "exchange")} <= lanes
    # every span a rank recorded (and wrote to its trace file at the end) arrived live, once
    for r in (0, 1):
        written = read_jsonl(str(view.trace / f"rank{r}.jsonl"))
        live = sorted((s.lane, s.phase, s.step, s.block, s.bytes, s.end - s.start) for s in view.spans if s.rank == r)
        assert live == sorted((s.lane, s.phase, s.step, s.block, s.bytes, s.end - s.start) for s in written)
    assert 1 <= view.redraws <= 10 * elapsed + 2  # at most max_fps redraws per second


def test_live_widget_draws_horizontal_bars_per_rank_and_lane(live_run):
    _, view, _, _ = live_run
    fig = view.widget
    assert isinstance(fig, go.FigureWidget)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert bars and all(t.orientation == "h" for t in bars)
    rows = set(fig.layout.yaxis.categoryarray)
    assert {"rank 0 · upload", "rank 1 · compute", "rank 1 · offload"} <= rows
    lo, hi = fig.layout.xaxis.range
    assert hi - lo <= view.window_s + 1e-9 and all(b + x >= lo for t in bars for b, x in zip(t.base, t.x))
    names = {t.name for t in fig.data}
    assert {"l+", "l-", "g", "tokens/s rank 0", "tokens/s rank 1"} <= names
    static = view.figure()
    assert isinstance(static, go.Figure) and not isinstance(static, go.FigureWidget)
    n_bars = sum(len(t.base) for t in static.data if isinstance(t, go.Bar))
    # the static figure shows the whole run; a rank's wait for the exchange on its compute lane is
    # drawn once, as the exchange lane's bar
    waits = [x for x in view.spans if x.lane == "compute" and x.phase == "exchange"
             and any(y.rank == x.rank and y.lane == "exchange" for y in view.spans)]
    assert n_bars == len(view.spans) - len(waits)


def test_metrics_and_comparison_of_the_live_spans(live_run):
    _, view, _, _ = live_run
    spans = view.rank_spans()
    m = run_metrics(spans, view.steps[0])
    assert set(m["ranks"]) == {0, 1} and m["tokens_per_s"] > 0
    for r in (0, 1):
        x = m["ranks"][r]
        assert 0 < x["busy"]["compute"] <= 1 and 0 <= x["hidden_fraction"] <= 1
        assert x["bytes_per_step"]["upload"] > 0 and x["steps"] == 6
    fig = compare_runs({"a": [s for s in spans if s.rank == 0], "b": spans})
    table = [t for t in fig.data if isinstance(t, go.Table)][0]
    assert list(table.cells.values[0]) == ["a", "b", "b"] and list(table.cells.values[1]) == ["0", "0", "1"]


def test_stop_button_stops_a_long_run():
    cfg = TrainConfig(model="tiny-deep", steps=100_000, batch_size=2, seq_len=8, threads=1,
                      offload=OffloadConfig(tier="host"))
    handle = launch(train_worker, 1, args=(cfg, Layout(), None, None, True), timeout=300)  # one rank is enough
    view = LiveView(title="stop me").start(handle)  # returns at once
    deadline = time.monotonic() + 120
    while not view.steps.get(0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert view.steps.get(0), "no step arrived"
    view.stop()
    assert view.join(timeout=60) is None  # a user's Stop is not an error; there are no results
    assert not view._thread.is_alive() and not handle.alive()
    assert view._status.value == "stopped"
    assert len(view.steps[0]) < cfg.steps



def test_overhead_benchmark_prints_recording_and_plotting_cost(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--model", "tiny-deep", "--batch", "2", "--seq", "8", "--steps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "% of step time" in out and "recorded + batched" in out
    assert r["off_step_s"] > 0 and r["on_step_s"] > 0 and r["spans"] > 0
    assert r["overhead_percent"] == pytest.approx(100 * (r["on_step_s"] / r["off_step_s"] - 1))


def test_rolling_window_shows_only_recent_spans_and_ranks_share_one_clock():
    view = LiveView(window_s=5.0, max_fps=1e9, budget=1.0)  # redraw on every event
    s = 1_000_000_000
    # rank 1 started 2 s after rank 0: its origin is 2 s later on the host clock
    view.feed(0, {"spans": [(0, "compute", "embed", 0, -1, 0, s // 2, 0)], "origin_ns": 10 * s})
    view.feed(1, {"spans": [(1, "compute", "forward", 0, 0, 0, s, 0)], "origin_ns": 12 * s})
    bars = {t.name: t for t in view.widget.data if isinstance(t, go.Bar)}
    assert list(bars["embed"].base) == [0.0] and list(bars["forward"].base) == [2.0]  # one clock
    view.feed(0, {"spans": [(0, "compute", "forward", 5, 0, 19 * s, 20 * s, 0)], "origin_ns": 10 * s})
    bars = {t.name: t for t in view.widget.data if isinstance(t, go.Bar)}
    assert tuple(view.widget.layout.xaxis.range) == (15.0, 20.0)  # the last 5 s
    assert list(bars["forward"].base) == [19.0] and len(bars["embed"].base) == 0  # old spans left the window
    assert view.figure().data[0].base is not None and sum(len(t.base) for t in view.figure().data
                                                          if isinstance(t, go.Bar)) == 3  # static: whole run
