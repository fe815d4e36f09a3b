"""Watch a run while it trains: lanes of every rank, losses, projected gradient and tokens/s.

Workers started with ``launch(train_worker, ..., args=(cfg, layout, out, trace, True))`` send
their spans in batches and a record per step through the launcher's queue (see
:func:`distzo2_lab.run.worker.train_worker`). :class:`LiveView` turns them into one plotly
``FigureWidget`` (needs anywidget): a rolling-window timeline with one row per (rank, lane) -
horizontal bars with ``base=start`` as in :mod:`distzo2_lab.observe.viz` - above the per-step curves.
Redraws are batched to at most `max_fps` per second, and spaced so that drawing takes at most
`budget` (1 %) of the time. ``watch(handle)`` blocks until the run ends
(tests, headless); ``start(handle)`` returns at once, follows the run on a background thread and
shows a Stop button. :meth:`LiveView.figure` is the same picture as a static ``go.Figure``.
"""
from __future__ import annotations

import threading
import time

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from distzo2_lab.errors import WorkerError
from distzo2_lab.observe.events import Span, spans_from_rows
from distzo2_lab.observe.viz import _FALLBACK, PHASE_COLOURS, _lane_rows

_RANK_COLOURS = ("#2ca02c", "#9467bd", "#e377c2", "#bcbd22", "#17becf", "#8c564b", "#7f7f7f", "#ff7f0e")


def _layout_figure(fig, title: str) -> None:
    fig.update_layout(title=title, barmode="overlay", template="plotly_white", height=720, bargap=0.25,
                      legend_title_text="phase / series", uirevision="live")
    fig.update_xaxes(title_text="seconds since the first rank started", type="linear", row=1, col=1)
    fig.update_yaxes(type="category", row=1, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=2)
    fig.update_xaxes(title_text="seconds", row=3, col=1)
    fig.update_yaxes(title_text="loss", row=2, col=1)
    fig.update_yaxes(title_text="g", row=2, col=2)
    fig.update_yaxes(title_text="tokens/s", row=3, col=1)


def _empty(widget: bool, title: str):
    specs = [[{"colspan": 2}, None], [{}, {}], [{"colspan": 2}, None]]
    base = make_subplots(rows=3, cols=2, specs=specs, row_heights=[0.55, 0.25, 0.2], vertical_spacing=0.09,
                         subplot_titles=("lanes (rolling window)", "perturbed losses (rank 0)",
                                         "projected gradient g (rank 0)", "tokens/s per rank"))
    fig = go.FigureWidget(base) if widget else base
    _layout_figure(fig, title)
    return fig


class LiveView:
    """Collects a run's events and draws them; `window_s` seconds of lanes are shown at a time."""

    def __init__(self, title: str = "live run", window_s: float = 5.0, max_fps: float = 10.0, widget: bool = True,
                 budget: float = 0.01):
        self.title, self.window_s, self.min_interval = title, window_s, 1.0 / max_fps
        self.budget = budget  # at most this share of wall time goes into redraws
        self._cost = 0.0  # seconds the last redraw took
        self.spans: list[Span] = []  # start / end in ns on the host clock (origin added)
        self.steps: dict[int, list[dict]] = {}  # rank -> per-step records, 't' in host-clock ns
        self.logs: list[str] = []
        self.redraws = 0
        self.results: dict | None = None
        self.error: BaseException | None = None
        self.stopped = False
        self._last_draw = 0.0
        self._dirty = False  # something arrived since the last redraw
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._handle = None
        self.widget = _empty(True, title) if widget else None

    # -- events ---------------------------------------------------------------------------
    def feed(self, rank: int, event) -> None:
        """Take one ("event", rank, payload) payload from the launcher's queue; redraw when due."""
        if not isinstance(event, dict):
            return
        with self._lock:
            if "spans" in event:
                o = event.get("origin_ns", 0)
                self.spans += [Span(s.rank, s.lane, s.phase, s.step, s.block, s.start + o, s.end + o, s.bytes)
                               for s in spans_from_rows(event["spans"])]
            elif "step" in event:
                rec = dict(event)
                if "t" in rec:
                    rec["t_ns"] = rec.get("origin_ns", 0) + int(rec["t"] * 1e9)
                self.steps.setdefault(rank, []).append(rec)
            elif "log" in event:
                self.logs.append(f"[rank {rank}] {event['log']}")
            self._dirty = True
        if time.monotonic() - self._last_draw >= max(self.min_interval, self._cost / self.budget):
            self.redraw()

    def _snapshot(self) -> tuple[list[Span], dict[int, list[dict]], int]:
        """(spans, steps, t0) copied under the lock (a background thread may be feeding)."""
        with self._lock:
            spans, steps = list(self.spans), {r: list(v) for r, v in self.steps.items()}
        times = [s.start for s in spans] + [r["t_ns"] for rs in steps.values() for r in rs if "t_ns" in r]
        return spans, steps, min(times) if times else 0

    @property
    def t0(self) -> int:
        """The host-clock ns shown as 0 s: the earliest span or step seen."""
        return self._snapshot()[2]

    def rank_spans(self) -> list[Span]:
        """All spans so far, shifted so that 0 is :attr:`t0` (for metrics and static figures)."""
        spans, _, t0 = self._snapshot()
        return [Span(s.rank, s.lane, s.phase, s.step, s.block, s.start - t0, s.end - t0, s.bytes) for s in spans]

    def tokens_per_s(self) -> dict[int, list[tuple[float, float]]]:
        """rank -> [(seconds since t0, tokens/s over the step that ended then)]."""
        _, steps, t0 = self._snapshot()
        out = {}
        for rank, recs in steps.items():
            recs = [r for r in recs if "t_ns" in r]
            out[rank] = [((b["t_ns"] - t0) / 1e9, b["tokens"] / max(1e-9, (b["t_ns"] - a["t_ns"]) / 1e9))
                         for a, b in zip(recs, recs[1:])]
        return out

    # -- drawing --------------------------------------------------------------------------
    def _traces(self, window: bool) -> tuple[list[dict], tuple[float, float] | None, list[str]]:
        """Bar (per phase) and Scatter (curves) data for the current state."""
        spans = self.rank_spans()
        rows = _lane_rows(spans)
        labels = [r[0] for r in rows]
        end = max((s.end for s in spans), default=0) / 1e9
        rng = (max(0.0, end - self.window_s), max(end, self.window_s * 0.05)) if window else None
        by_phase: dict[str, tuple[list, list, list]] = {}
        for label, sel, _ in rows:
            for s in sel:
                a, b = s.start / 1e9, s.end / 1e9
                if rng is None or b >= rng[0]:
                    ys, bs, xs = by_phase.setdefault(s.phase, ([], [], []))
                    ys.append(label), bs.append(a), xs.append(b - a)
        order = [p for p in PHASE_COLOURS if p in by_phase] + sorted(set(by_phase) - set(PHASE_COLOURS))
        traces = [dict(type="bar", orientation="h", name=p, y=by_phase[p][0], base=by_phase[p][1], x=by_phase[p][2],
                       marker={"color": PHASE_COLOURS.get(p, _FALLBACK[k % len(_FALLBACK)]), "line": {"width": 0}},
                       legendgroup="lanes", row=1, col=1) for k, p in enumerate(order)]
        steps = self._snapshot()[1]
        first = steps[min(steps)] if steps else []
        steps = [r["step"] for r in first]
        traces += [dict(type="scatter", name="l+", x=steps, y=[r["loss_plus"] for r in first], row=2, col=1),
                   dict(type="scatter", name="l-", x=steps, y=[r["loss_minus"] for r in first], row=2, col=1),
                   dict(type="scatter", name="g", x=steps, y=[r["projected_grad"] for r in first], mode="markers",
                        row=2, col=2)]
        for rank, pts in self.tokens_per_s().items():
            traces.append(dict(type="scatter", name=f"tokens/s rank {rank}", x=[p[0] for p in pts],
                               y=[p[1] for p in pts], mode="lines+markers", row=3, col=1,
                               line={"color": _RANK_COLOURS[rank % len(_RANK_COLOURS)]}))
        return traces, rng, labels

    def _apply(self, fig, traces, rng, labels) -> None:
        have = {t.name: t for t in fig.data}
        for t in traces:
            t = dict(t)
            row, col, kind = t.pop("row"), t.pop("col"), t.pop("type")
            if t["name"] in have:
                have[t["name"]].update(x=t["x"], y=t["y"], **({"base": t["base"]} if "base" in t else {}))
            else:
                fig.add_trace(go.Bar(**t) if kind == "bar" else go.Scatter(**t), row=row, col=col)
        fig.update_yaxes(categoryorder="array", categoryarray=labels[::-1], row=1, col=1)
        fig.update_xaxes(range=list(rng) if rng else None, row=1, col=1)
        fig.layout.height = max(720, 560 + 36 * len(labels))

    def redraw(self) -> None:
        """Update the widget from everything received so far (rolling window)."""
        self._last_draw = time.monotonic()
        if self.widget is None or not self._dirty:
            return
        self._dirty = False
        fig = self.widget
        traces, rng, labels = self._traces(window=True)
        if any(t["name"] not in {d.name for d in fig.data} for t in traces):  # a new phase or rank: add it
            with fig.batch_update():
                self._apply(fig, traces, rng, labels)
        else:  # the common case: one restyle (plotly validates less than per-property updates)
            index = {d.name: i for i, d in enumerate(fig.data)}
            shown = {t["name"] for t in traces}  # phases with no span in the window: empty them
            traces += [dict(name=d.name, x=[], y=[], base=[]) for d in fig.data
                       if isinstance(d, go.Bar) and d.name not in shown]
            bars = [t for t in traces if "base" in t]
            fig.plotly_restyle({"x": [t["x"] for t in traces], "y": [t["y"] for t in traces]},
                               trace_indexes=[index[t["name"]] for t in traces])
            if bars:
                fig.plotly_restyle({"base": [t["base"] for t in bars]}, trace_indexes=[index[t["name"]] for t in bars])
            fig.plotly_relayout({"yaxis.categoryarray": labels[::-1], "xaxis.range": list(rng),
                                 "height": max(720, 560 + 36 * len(labels))})
        self.redraws += 1
        self._cost = time.monotonic() - self._last_draw

    def figure(self, window: bool = False) -> go.Figure:
        """The same view as a static go.Figure (whole run unless `window`), for HTML export."""
        fig = _empty(False, self.title)
        self._apply(fig, *self._traces(window))
        return fig

    # -- following a run ------------------------------------------------------------------
    def watch(self, handle, display: bool = True) -> dict:
        """Blocking: show the widget (in IPython), follow `handle` to its end, return its results."""
        if display:
            self._display()
        try:
            self.results = handle.wait(on_event=self.feed)
        finally:
            self.redraw()
        return self.results

    def start(self, handle) -> LiveView:
        """Non-blocking: show the widget and a Stop button, follow `handle` on a thread; returns at once."""
        import ipywidgets as w

        self._handle = handle
        self._status = w.HTML("running…")
        stop = w.Button(description="Stop", button_style="danger", icon="stop")
        stop.on_click(lambda _: self.stop())
        self._display(w.VBox([w.HBox([stop, self._status]), self.widget]))
        self._thread = threading.Thread(target=self._follow, args=(handle,), daemon=True, name="distzo2-live")
        self._thread.start()
        return self

    def _follow(self, handle) -> None:
        try:
            self.results = handle.wait(on_event=self.feed)
            state = "finished"
        except WorkerError as e:
            if not self.stopped:
                self.error = e
            state = "stopped" if self.stopped else f"failed: {str(e).splitlines()[0]}"
        finally:
            self.redraw()
        self._status.value = state

    def stop(self) -> None:
        """Stop the run now (every worker is terminated)."""
        self.stopped = True
        if self._handle is not None:
            self._handle.stop()

    def join(self, timeout: float | None = None) -> dict | None:
        """Wait for a run followed with :meth:`start`; re-raise its failure (not a user's Stop)."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.results

    def _display(self, what=None) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is not None:
            display(what if what is not None else self.widget)
