"""The interactive layout tuner behind notebooks/layout_tuner.ipynb (ipywidgets + plotly).

Controls (model, GPUs, hardware, dp, pert, slicing, precision, batch, sequence, prefetch, tier)
redraw the predicted memory per device by component, the step time / tokens/s / bottleneck
and a simulated timeline. The "Run for real" button trains the chosen layout on this machine
(``launch(train_worker, ...)`` for several ranks, ``train()`` for one) when it is small enough to
run here, and overlays the measured lanes on the predicted ones.

`capture=False` keeps the figures in ``tuner.figures`` instead of drawing them into the Output
widgets: headless execution (nbclient in CI) stalls until its timeout when an Output widget
captures a plotly figure, because nbclient syncs every captured output back to the kernel.
"""
from __future__ import annotations

import dataclasses

import ipywidgets as W
import plotly.graph_objects as go
from IPython.display import display

from distzo2_lab.config import ConfigError, PrecisionConfig
from distzo2_lab.models.presets import PRESETS
from distzo2_lab.observe.viz import compare_timelines, timeline_figure
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import DEFAULT_DIR, THIS_MACHINE, get_hardware, names
from distzo2_lab.plan.memory import GB, THIS_ENGINE, Workload, memory_plan
from distzo2_lab.plan.planner import check_layout, nearest_fit
from distzo2_lab.plan.simulator import simulate

RUNNABLE = ("tiny", "tiny-deep")  # what the button may run on this machine


def memory_figure(plan, title: str = "predicted memory per device") -> go.Figure:
    """One stacked horizontal bar per component, and the device's capacity as a line."""
    fig = go.Figure()
    for name, b in plan.device.items():
        fig.add_trace(go.Bar(orientation="h", y=["per device"], x=[b / GB], name=name,
                             hovertemplate=f"{name}: %{{x:.2f}} GB<extra></extra>"))
    fig.add_vline(x=plan.device_capacity / GB, line_dash="dash", annotation_text="capacity")
    fig.update_layout(barmode="stack", title=title, height=220, template="plotly_white",
                      xaxis_title="GB", margin={"t": 50, "b": 40})
    return fig


class LayoutTuner:
    """Widgets, the prediction they drive, and the real run of a layout that fits here."""

    def __init__(self, directory: str = DEFAULT_DIR, steps: int = 3, real_steps: int = 4, capture: bool = True):
        self.directory, self.steps, self.real_steps, self.capture = directory, steps, real_steps, capture
        self.figures: dict[str, go.Figure] = {}
        self.model = W.Dropdown(options=[p for p in PRESETS], value="opt-1.3b", description="model")
        self.hardware = W.Dropdown(options=list(names()), value="a100-80g-sxm", description="hardware")
        self.gpus = W.IntSlider(2, 1, 16, description="GPUs")
        self.dp = W.IntSlider(1, 1, 16, description="dp")
        self.pert = W.Dropdown(options=[1, 2, 4], value=2, description="pert")
        self.slice = W.Checkbox(False, description="slicing")
        self.precision = W.Dropdown(options=["fp16", "bf16", "fp32"], value="fp16", description="precision")
        self.batch = W.IntSlider(1, 1, 32, description="batch")
        self.seq = W.Dropdown(options=[32, 128, 512, 1024, 2048], value=2048, description="seq")
        self.prefetch = W.IntSlider(1, 0, 4, description="prefetch")
        self.tier = W.Dropdown(options=["host", "disk", "resident"], value="host", description="tier")
        self.run_button = W.Button(description="Run for real", button_style="primary")
        self.status = W.HTML()
        self.out_memory, self.out_timeline, self.out_real = W.Output(), W.Output(), W.Output()
        self.controls = [self.model, self.hardware, self.gpus, self.dp, self.pert, self.slice, self.precision,
                         self.batch, self.seq, self.prefetch, self.tier]
        for c in self.controls:
            c.observe(lambda _: self.redraw(), names="value")
        self.run_button.on_click(self.on_run)
        self.last: dict = {}

    # -- what the controls say --------------------------------------------------------------------
    def workload(self) -> Workload:
        p = self.precision.value
        prec = PrecisionConfig(p, p, "fp32") if p != "fp32" else PrecisionConfig()
        return Workload(model=self.model.value, batch=self.batch.value, seq=self.seq.value, precision=prec,
                        tier=self.tier.value, prefetch=self.prefetch.value, implementation=THIS_ENGINE)

    def layout(self) -> Layout:
        return Layout(dp=self.dp.value, pert=self.pert.value, slice=self.slice.value)

    def set(self, **values) -> None:
        """Set several controls at once and redraw once (notebook cells, tests)."""
        with self.hold():
            for k, v in values.items():
                getattr(self, k).value = v
        self.redraw()

    def hold(self):
        import contextlib

        @contextlib.contextmanager
        def held():
            self._holding = True
            try:
                yield
            finally:
                self._holding = False
        return held()

    # -- prediction -------------------------------------------------------------------------------
    def redraw(self) -> dict:
        if getattr(self, "_holding", False):
            return self.last
        self.last = {}
        w, layout = self.workload(), self.layout()
        try:
            hw = get_hardware(self.hardware.value, self.directory)
            check_layout(layout, self.gpus.value, hw)
            plan = memory_plan(w, layout, hw)
        except ConfigError as e:
            self.status.value = f"<b>not valid:</b> {e}"
            return self.last
        self._show("memory", self.out_memory,
                   memory_figure(plan, f"{w.model} on {hw.name}: {plan.device_total / GB:.2f} GB per device"))
        if not plan.fits:
            near = nearest_fit(w, layout, hw, self.gpus.value)
            hint = "nothing fits" if near is None else (f"nearest that fits: dp={near[1].dp}, pert={near[1].pert}"
                                                        f"{', sliced' if near[1].slice else ''}, {near[0].tier} tier, "
                                                        f"prefetch {near[0].prefetch}")
            self.status.value = f"<b>does not fit:</b> {'; '.join(plan.problems())}. {hint}"
            self.last = {"fits": False, "plan": plan}
            return self.last
        sim = simulate(w, layout, hw, steps=self.steps)
        self.status.value = (f"step {sim.step_s:.4g} s · {sim.tokens_per_s:,.1f} tokens/s · bottleneck: "
                             f"{sim.bottleneck()} lane · host {plan.host_total / GB:.1f} GB")
        self._show("timeline", self.out_timeline, timeline_figure(sim.steady_spans(), "simulated lanes (steady state)"))
        self.last = {"fits": True, "plan": plan, "simulation": sim, "hardware": hw}
        return self.last

    def _show(self, name: str, out: W.Output, fig: go.Figure) -> None:
        self.figures[name] = fig
        if self.capture:
            out.clear_output(wait=True)
            with out:
                display(fig)

    # -- the real run -----------------------------------------------------------------------------
    def runnable(self) -> str | None:
        """Why the chosen layout cannot run here, or None."""
        if self.model.value not in RUNNABLE:
            return f"model {self.model.value} is too large for this machine; choose one of {', '.join(RUNNABLE)}"
        if self.hardware.value != THIS_MACHINE:
            return f"choose hardware '{THIS_MACHINE}' to compare with a run on this machine"
        if self.gpus.value > 4:
            return "at most 4 ranks on this machine"
        if self.slice.value and self.tier.value == "resident":
            return "slicing moves shards of offloaded blocks: choose the host or disk tier"
        if self.precision.value != "fp32":
            return "this machine computes in fp32 here"
        return None if self.last.get("fits") else "the layout does not fit"

    def on_run(self, _button=None) -> dict | None:
        """Run the chosen layout here and overlay measured on predicted (the button's handler)."""
        from distzo2_lab.plan.check import measure

        self.redraw()
        why = self.runnable()
        if why is not None:
            self.status.value = f"<b>not run:</b> {why}"
            return None
        w, layout, sim = self.workload(), self.layout(), self.last["simulation"]
        w = dataclasses.replace(w, precision=PrecisionConfig())
        m = measure(w, layout, steps=self.real_steps, threads=1)
        real = [s for s in m.spans if s.step >= 1]
        self.status.value = (f"predicted {sim.step_s * 1e3:.1f} ms per step, measured {m.steady_step_s * 1e3:.1f} ms "
                             f"(predicted / measured = {sim.step_s / m.steady_step_s:.2f})")
        self._show("overlay", self.out_real, compare_timelines({"predicted": sim.steady_spans(), "measured": real},
                                                                "predicted vs measured lanes"))
        self.last["measured"] = m
        return {"predicted_s": sim.step_s, "measured_s": m.steady_step_s, "measured": m}

    def widget(self) -> W.Widget:
        grid = W.GridBox(self.controls, layout=W.Layout(grid_template_columns="repeat(3, 330px)"))
        return W.VBox([grid, W.HBox([self.run_button, self.status]), self.out_memory, self.out_timeline,
                       self.out_real])
