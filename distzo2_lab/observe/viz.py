"""Static plotly views: loss curves of a run, and span timelines of its lanes.

Timelines are horizontal ``go.Bar`` traces with ``base=start`` on a linear time axis in seconds
(``px.timeline`` turns sub-second numeric spans into zero-width bars at 1970): one row per
(rank, lane), one colour per phase. They read the span list of :mod:`distzo2_lab.observe.events`, the
same schema as the JSONL and Perfetto sinks; the numbers in :func:`metrics_table` come from
:func:`~distzo2_lab.observe.events.overlap_metrics`. ZO2 (arXiv 2503.12668, Sec. 3.3) shows this picture
as Nsight traces of its upload / compute / offload streams.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from distzo2_lab.observe.events import LANES, TRANSFER_LANES, Span, overlap_metrics
from distzo2_lab.observe.metrics import bubbles, metrics_rows

# Transfers in blues, compute phases in warm colours, so the lanes read at a glance.
PHASE_COLOURS = {"upload": "#1f77b4", "offload": "#17becf", "exchange": "#7f7f7f", "forward": "#d62728",
                 "update": "#2ca02c", "rng": "#ff7f0e", "perturb": "#ff9896", "embed": "#9467bd",
                 "head": "#8c564b"}
_FALLBACK = ("#e377c2", "#bcbd22", "#aec7e8", "#ffbb78")


def loss_figure(records: list[dict], title: str = "ZO fine-tuning") -> go.Figure:
    """Two panels: l+ and l- per step; the projected gradient g per step."""
    steps = [r["step"] for r in records]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("perturbed losses", "projected gradient g = (l+ - l-) / 2 eps"))
    # l+ and l- differ by about eps * g, so one line would hide the other: l- solid underneath,
    # l+ dashed and translucent on top
    fig.add_trace(go.Scatter(x=steps, y=[r["loss_minus"] for r in records], name="l- (theta - eps z)",
                             line={"color": "#1f77b4", "width": 2}), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[r["loss_plus"] for r in records], name="l+ (theta + eps z)",
                             line={"color": "#d62728", "width": 2, "dash": "dash"}, opacity=0.75), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[r["projected_grad"] for r in records], name="g", mode="markers",
                             marker={"size": 3}), 2, 1)
    fig.update_layout(title=title, height=520, template="plotly_white")
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


# -- timelines --------------------------------------------------------------------------------
def _lane_rows(spans: list[Span], prefix: str = "", shift_ns: int = 0,
               show_rank: bool = True) -> list[tuple[str, list[Span], int]]:
    """(row label, spans of that row, ns subtracted from their times) per (rank, lane) present."""
    rows = []
    for rank in sorted({s.rank for s in spans}):
        # the engine times its wait for the exchange on the compute lane, the exchange itself has a
        # lane of its own: draw each exchange once, on its lane
        own_lane = any(s.rank == rank and s.lane == "exchange" and s.phase == "exchange" for s in spans)
        for lane in LANES:
            sel = [s for s in spans if s.rank == rank and s.lane == lane
                   and not (own_lane and lane == "compute" and s.phase == "exchange")]
            if sel:
                rows.append((prefix + (f"rank {rank} · " if show_rank else "") + lane, sel, shift_ns))
    return rows


def _timeline(rows: list[tuple[str, list[Span], int]], title: str, window) -> go.Figure:
    """One horizontal Bar trace per phase over the given rows; `window` = (t0, t1) seconds."""
    by_phase: dict[str, list] = {}
    for label, spans, shift in rows:
        for s in spans:
            a, b = (s.start - shift) / 1e9, (s.end - shift) / 1e9
            if window is None or (b >= window[0] and a <= window[1]):
                by_phase.setdefault(s.phase, []).append((label, a, b - a, s))
    order = [p for p in PHASE_COLOURS if p in by_phase] + sorted(set(by_phase) - set(PHASE_COLOURS))
    fig = go.Figure()
    for k, phase in enumerate(order):
        items = by_phase[phase]
        colour = PHASE_COLOURS.get(phase, _FALLBACK[k % len(_FALLBACK)])
        fig.add_trace(go.Bar(
            orientation="h", name=phase, marker={"color": colour, "line": {"width": 0}},
            y=[i[0] for i in items], base=[i[1] for i in items], x=[i[2] for i in items],
            customdata=[[s.step, "none" if s.block < 0 else s.block, s.bytes, d * 1e3, a] for _, a, d, s in items],
            hovertemplate=(f"<b>{phase}</b> · %{{y}}<br>step %{{customdata[0]}}, block %{{customdata[1]}}<br>"
                           "%{customdata[2]:,} bytes<br>%{customdata[3]:.3f} ms from %{customdata[4]:.4f} s"
                           "<extra></extra>")))
    labels = [r[0] for r in rows]
    fig.update_layout(title=title, barmode="overlay", template="plotly_white", legend_title_text="phase",
                      height=160 + 36 * len(labels), bargap=0.25)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=labels[::-1])  # first row on top
    fig.update_xaxes(type="linear", title_text="seconds", range=list(window) if window else None)
    return fig


def timeline_figure(spans: list[Span], title: str = "lanes over time", window=None) -> go.Figure:
    """Spans as a timeline: one row per (rank, lane), one colour per phase, times in seconds on
    the recorder's clock; `window=(t0, t1)` shows only that stretch (seconds)."""
    return _timeline(_lane_rows(spans), title, window)


def compare_timelines(runs: dict[str, list[Span]], title: str = "runs side by side", window=None) -> go.Figure:
    """Several runs stacked one above another, each shifted so that its first span starts at 0 s;
    rows are labelled '<run> · <lane>' ('<run> · rank R · <lane>' when a run has several ranks)."""
    rows = []
    for name, spans in runs.items():
        if spans:
            t0, several = min(s.start for s in spans), len({s.rank for s in spans}) > 1
            rows += _lane_rows(spans, f"{name} · ", t0, show_rank=several)
    return _timeline(rows, title, window)


def metrics_table(runs: dict[str, list[Span]], title: str = "overlap metrics") -> go.Figure:
    """A table of :func:`~distzo2_lab.observe.events.overlap_metrics` per run: busy fraction per lane,
    share of transfer time hidden under compute, transfer seconds and bytes moved."""
    metrics = {name: overlap_metrics(spans) for name, spans in runs.items()}
    lanes = [lane for lane in LANES if any(lane in m["busy"] for m in metrics.values())]
    header = ["run", "window s", *[f"busy {lane}" for lane in lanes], "hidden", "transfer s",
              *[f"{lane} MB" for lane in TRANSFER_LANES]]
    rows = []
    for name, m in metrics.items():
        hidden = m["hidden_fraction"]
        rows.append([name, f"{m['window_s']:.3f}", *[f"{m['busy'].get(lane, 0.0):.0%}" for lane in lanes],
                     "—" if hidden is None else f"{hidden:.0%}", f"{m['transfer_s']:.3f}",
                     *[f"{m.get('bytes', {}).get(lane, 0) / 1e6:.1f}" for lane in TRANSFER_LANES]])
    fig = go.Figure(go.Table(header={"values": header, "align": "left"},
                             cells={"values": [list(col) for col in zip(*rows)] if rows else [[]] * len(header),
                                    "align": "left"}))
    fig.update_layout(title=title, height=120 + 30 * len(rows), template="plotly_white",
                      margin={"t": 50, "b": 10})
    return fig


def compare_runs(runs: dict[str, list[Span]], tokens: dict[str, float | None] | None = None,
                 title: str = "runs compared", window=None) -> go.Figure:
    """Two or more runs (layouts, tiers, prefetch depths) on one time axis, each starting at 0 s,
    above a table of their metrics per rank (see :mod:`distzo2_lab.observe.metrics`); `tokens` gives
    each run's tokens/s for the table."""
    tl = compare_timelines(runs, title, window)
    header, rows = metrics_rows(runs, tokens)
    labels = list(tl.layout.yaxis.categoryarray)
    fig = make_subplots(rows=2, cols=1, specs=[[{"type": "xy"}], [{"type": "table"}]], vertical_spacing=0.08,
                        row_heights=[0.62, 0.38])
    for t in tl.data:
        fig.add_trace(t, row=1, col=1)
    fig.add_trace(go.Table(header={"values": header, "align": "left"},
                           cells={"values": [list(c) for c in zip(*rows)] if rows else [[]] * len(header),
                                  "align": "left"}), row=2, col=1)
    fig.update_layout(title=title, barmode="overlay", template="plotly_white", legend_title_text="phase",
                      height=360 + 36 * len(labels) + 30 * len(rows), bargap=0.25)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=labels, row=1, col=1)
    fig.update_xaxes(type="linear", title_text="seconds from each run's start", row=1, col=1,
                     range=list(window) if window else None)
    return fig


def bubble_figure(spans: list[Span], title: str = "compute waiting for data, per block") -> go.Figure:
    """Bars of :func:`~distzo2_lab.observe.metrics.bubbles` per rank: ms compute waited for each block."""
    fig = go.Figure()
    for rank in sorted({s.rank for s in spans}):
        b = bubbles([s for s in spans if s.rank == rank])
        fig.add_trace(go.Bar(name=f"rank {rank}", x=list(b), y=[v * 1e3 for v in b.values()]))
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=320)
    fig.update_xaxes(title_text="block", type="category")
    fig.update_yaxes(title_text="ms waited (all steps)")
    return fig
