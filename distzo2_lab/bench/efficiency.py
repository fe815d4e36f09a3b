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


def efficiency(model: str = "opt-125m", batch: int = 8, seq: int = 128, precision: str = "fp32",
               threads: int = 2, repeats: int = 3, seed: int = 0) -> dict:
    """Median seconds of forward / eager step / engine step and their ratios to 2 x forward."""
    torch.set_num_threads(threads)
    prec = PrecisionConfig(compute=precision)
    zo = ZOConfig(lr=1e-6, eps=1e-3)
    adapter = adapter_for(build_model(model, seed=seed))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, adapter.config.vocab_size, (batch, seq), generator=g)
    b = {"input_ids": ids}

    def forward():
        with torch.no_grad(), compute_context(precision, ids.device):
            adapter.loss(adapter.forward(ids), ids)

    t_fwd = median_time(forward, repeats)
    counter = iter(range(10**9))
    eager = EagerMeZO(adapter, zo, prec, threads)
    t_eager = median_time(lambda: eager.step(b, step_seed(seed, next(counter))), repeats)
    engine = ZO2Engine(adapter, zo, prec, threads)
    t_engine = median_time(lambda: engine.step(b, step_seed(seed, next(counter))), repeats)
    engine.flush()
    return {
        "model": model, "batch": batch, "seq": seq, "precision": precision, "threads": threads,
        "repeats": repeats, "forward_s": t_fwd, "eager_step_s": t_eager, "engine_step_s": t_engine,
        "eager_ratio": t_eager / (2 * t_fwd), "engine_ratio": t_engine / (2 * t_fwd),
        "tokens_per_s_engine": batch * seq / t_engine,
    }
