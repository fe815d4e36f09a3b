"""Static plotly views (layer 9): loss and projected-gradient curves of a run."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def loss_figure(records: list[dict], title: str = "ZO fine-tuning") -> go.Figure:
    """Two panels: l+ and l- per step; the projected gradient g per step."""
    steps = [r["step"] for r in records]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("perturbed losses", "projected gradient g = (l+ - l-) / 2 eps"))
    fig.add_trace(go.Scatter(x=steps, y=[r["loss_plus"] for r in records], name="l+ (theta + eps z)"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[r["loss_minus"] for r in records], name="l- (theta - eps z)"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[r["projected_grad"] for r in records], name="g", mode="markers",
                             marker={"size": 3}), 2, 1)
    fig.update_layout(title=title, height=520, template="plotly_white")
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig
