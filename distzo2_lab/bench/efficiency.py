"""Efficiency benchmark: how close a ZO step comes to its floor of two forward passes.

In one process, on one model and batch: median time of a no-grad forward, of the eager MeZO
step and of the ZO2 engine step. The figure of merit is step / (2 x forward): 1.0 means the
step costs nothing beyond its two forwards (noise, perturbation and update all free).
"""
from __future__ import annotations

import statistics
import time

import torch

from distzo2_lab.config import PrecisionConfig, ZOConfig
from distzo2_lab.models import adapter_for, build_model
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO
from distzo2_lab.zo.spsa import compute_context


def median_time(fn, repeats: int = 3, warmup: int = 1, before=None) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` untimed ones; `before` (untimed) runs
    ahead of every timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_flags() -> str:
    """The CPU's model name and the flags that decide bf16 speed (avx2, avx512f, avx512_bf16, amx_bf16)."""
    import platform

    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(wanted) or 'no avx2'})"


def interleaved_rounds(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each named call per round, the calls of a round run back to back (their order
    rotated every round), so that a busy neighbour slows all of a round's calls alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def efficiency(model: str = "opt-125m", batch: int = 8, seq: int = 128, precision: str = "fp32",
               threads: int = 2, repeats: int = 5, seed: int = 0) -> dict:
    """Forward, eager MeZO step and engine step timed in `repeats` interleaved rounds; each step's
    ratio to 2 x forward is taken within a round and the median over rounds is reported. The
    forward is the stock model's with its weights in the compute dtype (the floor of two passes)."""
    torch.set_num_threads(threads)
    prec = PrecisionConfig(compute=precision)
    zo = ZOConfig(lr=1e-6, eps=1e-3)
    adapter = adapter_for(build_model(model, seed=seed))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, adapter.config.vocab_size, (batch, seq), generator=g)
    b = {"input_ids": ids}

    # the floor: a forward of the stock model held in the compute dtype (what the engine's forwards
    # read: its copies are made in that dtype), under the same autocast context
    stock = adapter_for(build_model(model, seed=seed), precision)  # storage = compute dtype: bf16 weights

    def forward():
        with torch.no_grad(), compute_context(precision, ids.device):
            stock.loss(stock.forward(ids), ids)

    counter = iter(range(10**9))
    # each step on its own copy of the model: the engine's pending update is its own business
    eager = EagerMeZO(adapter_for(build_model(model, seed=seed)), zo, prec, threads)
    engine = ZO2Engine(adapter, zo, prec, threads)

    def eager_step():
        eager.step(b, step_seed(seed, next(counter)))

    def engine_step():
        engine.step(b, step_seed(seed, next(counter)))

    t = interleaved_rounds({"forward": forward, "eager": eager_step, "engine": engine_step}, repeats)
    med = statistics.median
    return {
        "model": model, "batch": batch, "seq": seq, "precision": precision, "threads": threads,
        "repeats": repeats, "cpu": cpu_flags() if ids.device.type == "cpu" else str(ids.device),
        "forward_s": med(t["forward"]), "eager_step_s": med(t["eager"]), "engine_step_s": med(t["engine"]),
        "eager_ratio": med([e / (2 * f) for e, f in zip(t["eager"], t["forward"])]),
        "engine_ratio": med([e / (2 * f) for e, f in zip(t["engine"], t["forward"])]),
        "tokens_per_s_engine": batch * seq / med(t["engine"]),
    }
