"""Run a planned layout for real on this machine and set it beside the simulation.

:func:`measure` trains the workload with the package's own entry points (``train()`` in this
process for one rank, ``launch(train_worker, ...)`` for several), with span recording on, and
returns the measured seconds per step and the spans; :func:`compare` simulates the same layout
on a hardware profile and reports predicted / measured.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import dataclass

from ..config import OffloadConfig, PrecisionConfig, TrainConfig, ZOConfig, validate
from ..events import Span, read_jsonl
from ..mesh import Layout
from .hardware import Hardware
from .memory import Workload
from .simulator import Simulation, simulate


def train_config(w: Workload, layout: Layout, steps: int, threads: int, store: str | None = None) -> TrainConfig:
    """The TrainConfig that runs workload `w` (batch per dp group) on this machine's CPU."""
    p = w.precision if w.precision.compute == "fp32" else PrecisionConfig()
    return validate(TrainConfig(model=w.model, steps=steps, batch_size=w.batch * layout.dp, seq_len=w.seq,
                                threads=threads, zo=ZOConfig(lr=1e-5), precision=p,
                                offload=OffloadConfig(tier=w.tier, prefetch=w.prefetch,
                                                      store=store if w.tier == "disk" else None)))


@dataclass
class Measured:
    step_s: float
    """Seconds per step over the whole loop (what train() reports as seconds / steps)."""
    steady_step_s: float
    """Median seconds per step after the first (between rank 0's step ends: exchange or head spans)."""
    spans: list[Span]
    steps: int


def _steady(spans: list[Span], steps: int) -> float | None:
    ends = {}
    for s in spans:
        if s.rank == 0 and s.phase in ("head", "exchange") and s.step >= 0:
            ends[s.step] = max(ends.get(s.step, 0), s.end)
    done = [ends[k] for k in sorted(ends)]
    if len(done) < 2:
        return None
    return statistics.median(b - a for a, b in zip(done, done[1:])) / 1e9  # one slow step does not count


def measure(w: Workload, layout: Layout, steps: int = 4, threads: int | None = None, timeout: float = 600.0,
            workdir: str | None = None) -> Measured:
    """Train `w` on `layout` for real (CPU, gloo) and return seconds per step and the spans."""
    world = layout.world_size
    threads = threads or max(1, len(os.sched_getaffinity(0)) // world)
    with tempfile.TemporaryDirectory(prefix="distzo2-plan-", dir=workdir) as tmp:
        out, trace = os.path.join(tmp, "out"), os.path.join(tmp, "trace")
        cfg = train_config(w, layout, steps, threads, os.path.join(tmp, "store"))
        if world == 1:
            from ..train import train

            summary = train(cfg, out=out, progress=False, trace=trace)
        else:
            from ..entrypoints import train_worker
            from ..launch import launch

            launch(train_worker, world, (cfg, layout, out, trace), timeout=timeout).wait()
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
        spans = [s for r in range(world) for s in read_jsonl(os.path.join(trace, f"rank{r}.jsonl"))]
    step_s = summary["seconds"] / len(summary["steps"])
    steady = _steady(spans, steps)
    return Measured(step_s, steady if steady is not None else step_s, spans, steps)


def compare(w: Workload, layout: Layout, hw: Hardware, steps: int = 4, threads: int | None = None,
            measured: Measured | None = None) -> dict:
    """Predicted and measured seconds per step of one layout here, and their ratio."""
    world = layout.world_size
    threads = threads or max(1, (hw.cores or 1) // world)
    m = measured or measure(w, layout, steps, threads)
    sim: Simulation = simulate(w, layout, hw, steps=max(3, steps), threads=threads)
    return {"model": w.model, "tier": w.tier, "dp": layout.dp, "pert": layout.pert, "slice": layout.slice,
            "world": world, "threads": threads, "predicted_s": sim.step_s, "measured_s": m.steady_step_s,
            "measured_loop_s": m.step_s, "ratio": sim.step_s / m.steady_step_s, "simulation": sim, "measured": m}
