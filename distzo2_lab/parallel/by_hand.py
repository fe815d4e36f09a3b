"""The parallel pieces built by hand: the workers tutorials 04-06 launch before train_worker.

Each worker is one rank: it joins the gloo process group, cuts its groups from the grid
(groups.ParallelGroups), builds a tiny OPT's adapter and a ZO2Engine told which signs this rank
runs and how to exchange the losses, runs a few steps and returns its l+, l-, g and a digest of
its weights. :func:`one_rank` runs the same steps in one process, the reference every worker is
checked against: PertP bit for bit, DDP and 2D within float order (the micro-batch losses are
token-weighted, DistZO2 arXiv 2507.03211, Sec. 3). The workers live in this importable module
because ``spawn`` cannot pickle a function defined in a notebook.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from distzo2_lab.config import OffloadConfig, ZOConfig
from distzo2_lab.models import adapter_for, build_model
from distzo2_lab.offload.tiers import Offload
from distzo2_lab.parallel.exchange import LossExchange
from distzo2_lab.parallel.groups import ParallelGroups
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.parallel.slicer import Slicer
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.engine import ZO2Engine

ZO = ZOConfig()
BATCH, SEQ, SEED = 4, 12, 0  # global batch rows, tokens per row, run seed
TINY = {"model": "tiny", "init_seed": 0, "device": "cpu"}


def lesson_batch(t: int) -> dict:
    """The global batch of step t: random tokens, the same on every rank (a pure function of t)."""
    g = torch.Generator().manual_seed(1000 + t)
    ids = torch.randint(4, 20, (BATCH, SEQ), generator=g)  # (B, T)
    return {"input_ids": ids, "labels": ids}


def rows_of(batch: dict, d: int, dp: int) -> dict:
    """dp group d's contiguous rows of the global batch."""
    n = BATCH // dp
    return {k: v[d * n : (d + 1) * n] for k, v in batch.items()}


def run_steps(engine: ZO2Engine, steps: int, dp: int = 1, d: int = 0) -> list[tuple[float, float, float]]:
    """`steps` ZO steps on this rank's rows; [(l+, l-, g)] per step; the last update flushed."""
    out = []
    for t in range(steps):
        r = engine.step(rows_of(lesson_batch(t), d, dp), step_seed(SEED, t), step=t)
        out.append((r.loss_plus, r.loss_minus, r.grad))
    engine.flush()
    return out


def weights_digest(adapter, values=None) -> str:
    """sha256 of every bucket's values (`values(bucket)` for buckets that live in a store)."""
    h = hashlib.sha256()
    for b in adapter.buckets:
        flat = b.master if b.master is not None else values(b)
        h.update(flat.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def one_rank(steps: int = 3) -> dict:
    """The reference: one process, both signs, the whole batch (ZO2's dual forward)."""
    adapter = adapter_for(build_model("tiny", seed=0))
    engine = ZO2Engine(adapter, ZO)
    return {"steps": run_steps(engine, steps), "digest": weights_digest(adapter)}


def _start(rank: int, world_size: int, layout: Layout) -> ParallelGroups:
    torch.set_num_threads(1)  # the ranks share this machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # the launcher set the address
    return ParallelGroups.build(layout, "gloo")


def _result(g: ParallelGroups, steps: list, digest: str, exchange: LossExchange) -> dict:
    return {"rank": g.rank, "coords": g.coords, "signs": g.signs, "steps": steps, "digest": digest,
            "exchange_bytes": exchange.bytes_sent / max(1, len(steps))}


def pertp_pair_worker(rank: int, world_size: int, q, steps: int = 3) -> dict:
    """PertP(2): both ranks see the whole batch and the same seed; rank 0 runs +eps, rank 1 -eps,
    and the pair swaps its two losses."""
    g = _start(rank, world_size, Layout(dp=1, pert=2))
    try:
        adapter = adapter_for(build_model("tiny", seed=0))
        exchange = LossExchange(pert=g.pert)  # the pair's group: l+ from rank 0, l- from rank 1
        engine = ZO2Engine(adapter, ZO, signs=g.signs, exchange=exchange)
        return _result(g, run_steps(engine, steps), weights_digest(adapter), exchange)
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, world_size: int, q, steps: int = 3) -> dict:
    """DDP(2): each rank runs both signs on its half of the batch; the dp group averages the
    losses (token-weighted), so every rank computes the same g."""
    g = _start(rank, world_size, Layout(dp=2, pert=1))
    try:
        adapter = adapter_for(build_model("tiny", seed=0))
        exchange = LossExchange(dp=g.dp)
        engine = ZO2Engine(adapter, ZO, exchange=exchange)
        return _result(g, run_steps(engine, steps, dp=2, d=g.coords[0]), weights_digest(adapter), exchange)
    finally:
        dist.destroy_process_group()


def mesh_worker(rank: int, world_size: int, q, steps: int = 3) -> dict:
    """2D (dp=2 x pert=2), blocks on the host tier, sliced: each rank uploads one shard of every
    block, the world all-gathers the shards; the losses cross the pert pair, then the dp group."""
    layout = Layout(dp=2, pert=2, slice=True)
    g = _start(rank, world_size, layout)
    off = None
    try:
        slicer = Slicer(g.rank, g.world_size, group=g.world)
        off = Offload(TINY, OffloadConfig(tier="host"), slicer=slicer)  # this rank's own host store
        exchange = LossExchange(pert=g.pert, dp=g.dp)
        engine = ZO2Engine(off.adapter, ZO, signs=g.signs, exchange=exchange, slicer=slicer, **off.engine_options())
        steps_out = run_steps(engine, steps, dp=2, d=g.coords[0])
        off.streamer.drain()
        return _result(g, steps_out, weights_digest(off.adapter, off.block_values), exchange)
    finally:
        if off is not None:
            off.close()
        dist.destroy_process_group()


def max_differences(a: list, b: list) -> tuple[float, float]:
    """(max relative difference of l+ / l-, max absolute difference of g) over the steps."""
    rel = max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b) for k in (0, 1))
    return rel, max(abs(x[2] - y[2]) for x, y in zip(a, b))
