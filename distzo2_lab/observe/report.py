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
