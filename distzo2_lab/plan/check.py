"""Run a planned layout for real on this machine and set it beside the simulation.

:func:`measure` trains the workload with the package's own entry points (``train()`` in this
process for one rank, ``launch(train_worker, ...)`` for several), with span recording on, and
returns the measured seconds per step and the spans; :func:`compare` simulates the same layout
on a hardware profile and reports predicted / measured.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
from dataclasses import dataclass

from distzo2_lab.config import OffloadConfig, PrecisionConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.observe.events import Span, read_jsonl
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import Hardware
from distzo2_lab.plan.memory import Workload, directions_of
from distzo2_lab.plan.simulator import Simulation, simulate


def train_config(w: Workload, layout: Layout, steps: int, threads: int, store: str | None = None) -> TrainConfig:
    """The TrainConfig that runs workload `w` (batch per dp group) on this machine's CPU."""
    p = w.precision if w.precision.compute == "fp32" else PrecisionConfig()
    return validate(TrainConfig(model=w.model, steps=steps, batch_size=w.batch * layout.dp, seq_len=w.seq,
                                threads=threads, zo=ZOConfig(lr=1e-5, directions=directions_of(w, layout),
                                                                       perturb=w.perturb), precision=p,
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


def steady_step(spans: list[Span]) -> float | None:
    """Median seconds between rank 0's step ends (its exchange or head spans) after the first step;
    None with fewer than two steps."""
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
            from distzo2_lab.run.train import train

            summary = train(cfg, out=out, progress=False, trace=trace)
        else:
            from distzo2_lab.parallel.launch import launch
            from distzo2_lab.run.worker import train_worker

            launch(train_worker, world, (cfg, layout, out, trace), timeout=timeout).wait()
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
        spans = [s for r in range(world) for s in read_jsonl(os.path.join(trace, f"rank{r}.jsonl"))]
    step_s = summary["seconds"] / len(summary["steps"])
    steady = steady_step(spans)
    return Measured(step_s, steady if steady is not None else step_s, spans, steps)


def cases_worker(rank: int, world: int, q, cases: list) -> list[dict]:
    """One rank of several runs in one process group (the benchmark's cases of one world size):
    train() for each (cfg, layout, trace dir) in turn; spawning and importing once per world size
    instead of once per case keeps the benchmark's table within minutes on 2 cores."""
    from datetime import timedelta

    import torch.distributed as dist

    from distzo2_lab.run.train import train

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=float(os.environ.get("DISTZO2_TIMEOUT", "1800"))))
    try:
        out = []
        for cfg, layout, trace in cases:
            s = train(cfg, progress=False, trace=trace, layout=layout, rank=rank)
            out.append({"seconds": s["seconds"], "steps": len(s["steps"])})
            dist.barrier()
        return out
    finally:
        dist.destroy_process_group()


def measure_many(items: list[tuple[Workload, Layout]], steps: int = 4, threads: int = 1, timeout: float = 900.0,
                 workdir: str | None = None) -> list[Measured]:
    """measure() for several layouts of one world size, the ranks launched once for all of them."""
    worlds = {layout.world_size for _, layout in items}
    if len(worlds) != 1:
        raise ValueError(f"measure_many runs one world size at a time, got {sorted(worlds)}")
    world = worlds.pop()
    # an untimed warm-up run first (tiny model, 2 steps): the first run in a process pays one-time
    # costs (thread pools, allocator growth, gloo connections) that the timed cases must not
    first, layout0 = items[0]
    warm = dataclasses.replace(first, model="tiny", seq=min(first.seq, 32), tier="host")
    if world == 1:
        measure(warm, layout0, 2, threads, timeout, workdir)
        return [measure(w, layout, steps, threads, timeout, workdir) for w, layout in items]
    from distzo2_lab.parallel.launch import launch

    with tempfile.TemporaryDirectory(prefix="distzo2-plan-", dir=workdir) as tmp:
        cases = [(train_config(w, layout, n, threads, os.path.join(tmp, f"case{i}", "store")), layout,
                  os.path.join(tmp, f"case{i}", "trace"))
                 for i, (w, layout, n) in enumerate([(warm, layout0, 2)] + [(w, lay, steps) for w, lay in items])]
        result = launch(cases_worker, world, (cases,), timeout=timeout).wait()
        out = []
        for i, (_, _, trace) in enumerate(cases):
            if i == 0:
                continue
            spans = [s for r in range(world) for s in read_jsonl(os.path.join(trace, f"rank{r}.jsonl"))]
            summary = result[0][i]
            step_s = summary["seconds"] / summary["steps"]
            steady = steady_step(spans)
            out.append(Measured(step_s, steady if steady is not None else step_s, spans, steps))
    return out


def compare(w: Workload, layout: Layout, hw: Hardware, steps: int = 4, threads: int | None = None,
            measured: Measured | None = None) -> dict:
    """Predicted and measured seconds per step of one layout here, and their ratio."""
    world = layout.world_size
    threads = threads or max(1, (hw.cores or 1) // world)
    m = measured or measure(w, layout, steps, threads)
    sim: Simulation = simulate(w, layout, hw, steps=min(max(3, steps), 8), threads=threads)  # steady by then
    return {"model": w.model, "tier": w.tier, "dp": layout.dp, "pert": layout.pert, "slice": layout.slice,
            "world": world, "threads": threads, "predicted_s": sim.step_s, "measured_s": m.steady_step_s,
            "measured_loop_s": m.step_s, "ratio": sim.step_s / m.steady_step_s, "simulation": sim, "measured": m}
