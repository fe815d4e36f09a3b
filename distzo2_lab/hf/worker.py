"""A launched rank of a ZOTrainer run: importable, so the launcher's `spawn` can start it."""
from __future__ import annotations

import os


def trainer_worker(rank: int, world_size: int, q, build, *args) -> dict:
    """Join the process group (gloo), build this rank's ZOTrainer with `build(*args)` (an
    importable function: ZOArguments.layout names the layout), train it, and return its digest,
    per-step records and the eval losses its evaluations logged."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("DISTZO2_TIMEOUT", "1800")))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        trainer = build(*args)
        trainer.train()
        evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        return {"rank": rank, "digest": trainer.digest(), "steps": trainer.history, "eval_losses": evals}
    finally:
        dist.destroy_process_group()
