"""Worker functions the launcher (or torchrun) starts: importable, so `spawn` can pickle them."""
from __future__ import annotations

import os

import torch.distributed as dist


def train_worker(rank: int, world_size: int, q, cfg, layout, out=None, trace=None) -> dict:
    """One rank of a distributed ZO run: gloo group, (dp, pert) mesh, train(), a small result."""
    from .mesh import build_mesh, validate_layout
    from .train import train

    validate_layout(layout, world_size, cfg.batch_size)
    from datetime import timedelta

    from .launch import log

    if not dist.is_initialized():  # the launcher and torchrun both set MASTER_ADDR / MASTER_PORT
        # collectives give up after the launcher's timeout instead of torch's 30 min default
        timeout = timedelta(seconds=float(os.environ.get("DISTZO2_TIMEOUT", "1800")))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        build_mesh(layout)
        d, p = layout.coords(rank)
        plus, minus = layout.signs(rank)
        log(q, rank, f"pid {os.getpid()}: dp {d}, pert {p}, runs {'+eps ' if plus else ''}{'-eps' if minus else ''}"
                     f"{', sliced' if layout.slice else ''}")
        on_step = None
        if q is not None and rank == 0:
            def on_step(r):
                q.put(("event", rank, {"step": r.step, "loss_plus": r.loss_plus, "loss_minus": r.loss_minus,
                                       "projected_grad": r.grad}))
        rank_out = out if rank == 0 else None
        rank_trace = trace  # each rank writes rank<R>.jsonl / rank<R>.trace.json there
        s = train(cfg, out=rank_out, progress=False, on_step=on_step, trace=rank_trace, layout=layout,
                  rank=rank)
        log(q, rank, f"done: digest {s['digest'][:16]}")
        return {"rank": rank, "digest": s["digest"], "steps": s["steps"], "eval_loss_end": s["eval_loss_end"],
                "exchange_bytes": s.get("exchange_bytes_per_step"), "overlap": s.get("overlap")}
    finally:
        dist.destroy_process_group()
