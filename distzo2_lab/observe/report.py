"""One self-contained HTML report of a run: layout, metrics, timeline, loss curve, bubbles.

plotly.js is inlined once at the top and every figure is a ``<div>`` that uses it, so the file
opens offline in any browser (no CDN) and can be mailed or attached to CI. The figures are the
static ones of :mod:`distzo2_lab.observe.viz` / :mod:`distzo2_lab.observe.live`; the numbers come from
:mod:`distzo2_lab.observe.metrics`.
"""
from __future__ import annotations

import html
import os

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

_STYLE = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em}pre{background:#f6f6f6;padding:10px;overflow-x:auto}
table.kv td{padding:2px 12px 2px 0}.ok{color:#2ca02c}.bad{color:#d62728}"""


def _kv(items: dict) -> str:
    rows = "".join(f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items.items())
    return f'<table class="kv">{rows}</table>'


def render(title: str, summary: dict, layout_text: str, figures: list[tuple[str, go.Figure]],
           checks: dict[str, bool] | None = None) -> str:
    """The report as one HTML string: `summary` key/values, `layout_text` (pre), named figures."""
    parts = [f"<h1>{html.escape(title)}</h1>", _kv(summary)]
    if checks:
        parts.append("<h2>Checks</h2><ul>" + "".join(
            f'<li class="{"ok" if ok else "bad"}">{"passed" if ok else "FAILED"}: {html.escape(name)}</li>'
            for name, ok in checks.items()) + "</ul>")
    parts.append(f"<h2>Layout</h2><pre>{html.escape(layout_text)}</pre>")
    for name, fig in figures:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True}))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")


def write_report(path: str, *args, **kwargs) -> str:
    """:func:`render` into `path` (directories created); returns the absolute path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(*args, **kwargs))
    return os.path.abspath(path)


# -- the figures of a training run (shared by `distzo2 demo` and `distzo2 train --report`) ---------
def _last_steps_window(spans, first_step: int) -> tuple[float, float]:
    """(t0, t1) seconds covering the spans of steps >= first_step on every rank."""
    sel = [s for s in spans if s.step >= first_step and s.lane == "compute"] or spans
    return min(s.start for s in sel) / 1e9, max(s.end for s in sel) / 1e9


def report_figures(spans: list, records: list[dict], title: str, tokens_per_s: float | None = None,
                   last_steps: int = 3) -> list[tuple[str, go.Figure]]:
    """Metrics table, the last steps' timeline, loss curve, per-block bubbles. `spans` may be
    empty (a run recorded none): then only the loss curve. `tokens_per_s` is the run's one
    throughput figure (the summary's), shown in the metrics table."""
    from distzo2_lab.observe.metrics import metrics_rows
    from distzo2_lab.observe.viz import bubble_figure, loss_figure, timeline_figure

    loss = ("Loss and projected gradient", loss_figure(records, title))
    if not spans:
        return [loss]
    header, rows = metrics_rows({title: spans}, {title: tokens_per_s})
    table = go.Figure(go.Table(header={"values": header, "align": "left"},
                               cells={"values": [list(c) for c in zip(*rows)], "align": "left"}))
    table.update_layout(height=110 + 30 * len(rows), margin={"t": 10, "b": 10})
    stepped = [s.step for s in spans if s.step >= 0]
    last = (max(stepped) if stepped else 0) - last_steps + 1
    ranks = len({s.rank for s in spans})
    return [
        ("Overlap metrics (whole run, per rank)", table),
        (f"Timeline: the last {last_steps} steps" + (f", {ranks} ranks on one clock" if ranks > 1 else ""),
         timeline_figure(spans, title="lanes over time (hover a bar: step, block, bytes)",
                         window=_last_steps_window(spans, last))),
        loss,
        ("Bubbles: compute waiting for each block's data", bubble_figure(spans)),
    ]


def write_run_report(path: str, title: str, summary: dict, records: list[dict], spans: list | None = None,
                     layout_text: str = "one rank", tokens_per_s: float | None = None,
                     checks: dict[str, bool] | None = None) -> str:
    """The report of one run (summary key/values, layout, figures of `records` and `spans`) in `path`."""
    figures = report_figures(spans or [], records, title, tokens_per_s)
    return write_report(path, title, summary, layout_text, figures, checks=checks)
