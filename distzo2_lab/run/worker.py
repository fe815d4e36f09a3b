"""Worker functions the launcher (or torchrun) starts: importable, so `spawn` can pickle them."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def train_worker(rank: int, world_size: int, q, cfg, layout, out=None, trace=None, live: bool = False,
                 profile=None) -> dict:
    """One rank of a distributed ZO run: process group (nccl with one GPU per rank, else gloo),
    its process groups (parallel.groups.ParallelGroups), train(), a small result.

    `live=True`: every rank sends its per-step metrics and its spans (batched, see
    events.SpanBatcher) through the queue as ("event", rank, {"spans": rows, "origin_ns": ...});
    without it only rank 0 sends per-step metrics. `profile=DIR` writes torch.profiler traces."""
    from distzo2_lab.parallel.groups import ParallelGroups
    from distzo2_lab.parallel.layout import choose_backend, validate_layout
    from distzo2_lab.run.train import train

    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = choose_backend(cfg.device, local_world, gpus)
    nodes = max(1, world_size // local_world)  # torchrun: the same number of GPUs on every node
    validate_layout(layout, world_size, cfg.batch_size, backend, gpus * nodes, cfg.zo.directions, cfg.micro_batches)
    if backend == "nccl":  # one rank per GPU: this rank's device is cuda:LOCAL_RANK
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    from datetime import timedelta

    from distzo2_lab.parallel.launch import log

    if not dist.is_initialized():  # the launcher and torchrun both set MASTER_ADDR / MASTER_PORT
        # collectives give up after the launcher's timeout instead of torch's 30 min default
        timeout = timedelta(seconds=float(os.environ.get("DISTZO2_TIMEOUT", "1800")))
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    try:
        groups = ParallelGroups.build(layout, backend, directions=cfg.zo.directions)
        (d, p), (plus, minus) = groups.coords, groups.signs
        log(q, rank, f"pid {os.getpid()}: dp {d}, pert {p}, runs {'+eps ' if plus else ''}{'-eps' if minus else ''}"
                     f"{', sliced' if layout.slice else ''}")
        on_step, recorder, batcher = None, None, None
        if q is not None and live:
            from distzo2_lab.observe.events import Recorder, SpanBatcher

            recorder = Recorder(rank=rank)
            origin = recorder.origin  # perf_counter_ns is one clock for every process of a host
            batcher = SpanBatcher(lambda rows: q.put(("event", rank, {"spans": rows, "origin_ns": origin})))
            recorder.listener = batcher
        if q is not None and (live or rank == 0):
            def on_step(r):
                if recorder is not None and cfg.device == "cuda":
                    recorder.flush_cuda()  # device spans reach the live view once per step
                q.put(("event", rank, {"step": r.step, "loss_plus": r.loss_plus, "loss_minus": r.loss_minus,
                                       "projected_grad": r.grad, "tokens": r.tokens,
                                       **({"t": recorder.now() / 1e9, "origin_ns": recorder.origin}
                                          if recorder is not None else {})}))
                if batcher is not None:
                    batcher.flush()
        rank_out = out if rank == 0 else None
        rank_trace = trace  # each rank writes rank<R>.jsonl / rank<R>.trace.json there
        try:
            s = train(cfg, out=rank_out, progress=False, on_step=on_step, trace=rank_trace, layout=layout,
                      rank=rank, recorder=recorder, profile=profile, groups=groups)
        finally:
            if batcher is not None:
                batcher.flush()
        log(q, rank, f"done: digest {s['digest'][:16]}")
        return {"rank": rank, "digest": s["digest"], "state_digest": s.get("state_digest"),
                "steps": s["steps"], "eval_loss_end": s["eval_loss_end"],
                "exchange_bytes": s.get("exchange_bytes_per_step"), "overlap": s.get("overlap"),
                "memory": s["memory"], "node": os.uname().nodename,
                "noise_share": s.get("noise_share"), "copy_share": s.get("copy_share"),
                "master_share": s.get("master_share"),
                "interrupted": s["interrupted"], "next_step": s["next_step"]}
    finally:
        dist.destroy_process_group()


def node_memory(results: dict) -> dict[str, dict]:
    """Per node: the shared store once, each rank's private memory, and what one copy per rank
    would have cost (MiB). `results` is what the launcher's wait() returns."""
    out: dict[str, dict] = {}
    for r in results.values():
        m = out.setdefault(r["node"], {"ranks": 0, "shared_store_mb": 0.0, "private_mb": 0.0})
        m["ranks"] += 1
        m["shared_store_mb"] = max(m["shared_store_mb"], r["memory"]["shared_store_mb"])
        m["private_mb"] += r["memory"]["private_mb"]
    for m in out.values():
        m["total_mb"] = m["shared_store_mb"] + m["private_mb"]
        m["copy_per_rank_mb"] = m["shared_store_mb"] * m["ranks"] + m["private_mb"]
    return out
