"""Shared test helpers: a tiny model pair and a fixed batch stream."""
from __future__ import annotations

import torch

from distzo2_lab.config import PrecisionConfig, ZOConfig
from distzo2_lab.models import OPTAdapter, build_model
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO


def batches(n: int, batch: int = 3, seq: int = 12, vocab: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, vocab, (batch, seq), generator=g)} for _ in range(n)]


def engine_pair(zo: ZOConfig = ZOConfig(), precision: PrecisionConfig = PrecisionConfig(),
                threads: int = 1, model: str = "tiny"):
    """(eager reference, ZO2 engine) on two identical copies of the same random model."""
    a = OPTAdapter(build_model(model, seed=7), precision.storage)
    b = OPTAdapter(build_model(model, seed=7), precision.storage)
    return EagerMeZO(a, zo, precision, threads), ZO2Engine(b, zo, precision, threads)


def run(engine, bs, run_seed: int = 0):
    return [engine.step(b, step_seed(run_seed, t)) for t, b in enumerate(bs)]


def masters_equal(x: OPTAdapter, y: OPTAdapter) -> bool:
    return all(torch.equal(a.master, b.master) for a, b in zip(x.buckets, y.buckets))
