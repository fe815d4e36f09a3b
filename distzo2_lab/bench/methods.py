"""The ZO method family side by side: one short run per method, its losses, time and state.

Every run starts from the same model, sees the same batches and the same step seeds, and is built
by the same path as ``distzo2 train --engine eager`` (run/train.py's build_engine), so only the
zo settings differ. A run reports the held-out loss along the way, the seconds per step, the
forwards a step runs (config.forwards_per_step) and the optimiser state the engine holds, beside
the state the memory planner budgets for it (plan/memory.py's state_bytes per parameter).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from distzo2_lab.config import ConfigError, TrainConfig, ZOConfig, forwards_per_step, validate
from distzo2_lab.plan.memory import Workload, state_bytes
from distzo2_lab.run.train import EVAL_STEP, base_of, build_adapter, build_engine, make_task
from distzo2_lab.seeds import step_seed


@dataclass(frozen=True)
class MethodRun:
    """What one method did in a short run."""

    label: str
    zo: ZOConfig
    eval_losses: list[tuple[int, float]]
    """(steps taken, loss on a held-out batch), from 0 to the last step."""
    step_s: float
    """Median wall-clock seconds of one step (evaluation not included)."""
    forwards: int
    """Forward passes one step runs."""
    params: int
    """Parameters the method perturbs and updates (every bucket's elements)."""
    state_bytes: int
    """Bytes of optimiser state the engine holds beside its masters."""
    planned_state_bytes: int
    """The planner's optimiser state for the same parameters."""


def _held_state_bytes(engine) -> int:
    state = getattr(engine, "state", {})  # EagerMeZO (plain ZO-SGD) keeps none
    return sum(t.numel() * t.element_size() for per in state.values() for t in per.values())


def run_method(zo: ZOConfig, steps: int, label: str | None = None, model: str = "tiny", batch_size: int = 4,
               seq_len: int = 16, seed: int = 0, eval_every: int = 10) -> MethodRun:
    """`steps` steps of the method `zo` names on the synthetic task, from the seeded `model`."""
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ConfigError(f"eval_every={eval_every!r} is not valid; it must be a positive integer")
    cfg = validate(TrainConfig(model=model, engine="eager", zo=zo, batch_size=batch_size, seq_len=seq_len,
                               seed=seed, steps=steps))
    adapter = build_adapter(base_of(cfg))
    engine, task = build_engine(cfg, adapter), make_task(cfg, adapter)
    held_out = task.batch(EVAL_STEP)
    evals, times = [(0, engine.evaluate(held_out))], []
    for t in range(steps):
        t0 = time.perf_counter()
        engine.step(task.batch(t), step_seed(seed, t))
        times.append(time.perf_counter() - t0)
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            evals.append((t + 1, engine.evaluate(held_out)))
    params = sum(b.numel for b in adapter.buckets)
    return MethodRun(label or zo.optimizer, zo, evals, statistics.median(times),
                     forwards_per_step(zo), params, _held_state_bytes(engine),
                     params * state_bytes(Workload(model=model, optimizer=zo.optimizer)))


def method_rows(runs: list[MethodRun]) -> list[dict]:
    """One dict per run: label, loss start and end, ms per step, forwards, state KiB (held, planned)."""
    return [{"method": r.label, "loss_start": r.eval_losses[0][1], "loss_end": r.eval_losses[-1][1],
             "ms_per_step": 1e3 * r.step_s, "forwards": r.forwards, "state_kib": r.state_bytes / 2**10,
             "planned_kib": r.planned_state_bytes / 2**10} for r in runs]


def method_table(runs: list[MethodRun]) -> str:
    """The markdown table of :func:`method_rows`."""
    lines = ["| method | held-out loss | ms / step | forwards / step | optimiser state (planned) |",
             "|---|---|---|---|---|"]
    for w in method_rows(runs):
        lines.append(f"| {w['method']} | {w['loss_start']:.3f} -> {w['loss_end']:.3f} | {w['ms_per_step']:.1f} "
                     f"| {w['forwards']} | {w['state_kib']:,.0f} KiB ({w['planned_kib']:,.0f} KiB) |")
    return "\n".join(lines)

