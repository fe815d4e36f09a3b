"""Worker functions the launcher (or torchrun) starts: importable, so `spawn` can pickle them."""
from __future__ import annotations

import torch.distributed as dist


def train_worker(rank: int, world_size: int, q, cfg, layout, out=None, trace=None) -> dict:
    """One rank of a distributed ZO run: gloo group, (dp, pert) mesh, train(), a small result."""
    from .mesh import build_mesh, validate_layout
    from .train import train

    validate_layout(layout, world_size, cfg.batch_size)
    if not dist.is_initialized():  # the launcher and torchrun both set MASTER_ADDR / MASTER_PORT
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        build_mesh(layout)
        on_step = None
        if q is not None and rank == 0:
            def on_step(r):
                q.put(("event", rank, {"step": r.step, "loss_plus": r.loss_plus, "loss_minus": r.loss_minus,
                                       "projected_grad": r.grad}))
        rank_out = out if rank == 0 else None
        rank_trace = trace  # each rank writes rank<R>.jsonl / rank<R>.trace.json there
        s = train(cfg, out=rank_out, progress=False, on_step=on_step, trace=rank_trace, layout=layout,
                  rank=rank)
        return {"rank": rank, "digest": s["digest"], "steps": s["steps"], "eval_loss_end": s["eval_loss_end"],
                "exchange_bytes": s.get("exchange_bytes_per_step"), "overlap": s.get("overlap")}
    finally:
        dist.destroy_process_group()
