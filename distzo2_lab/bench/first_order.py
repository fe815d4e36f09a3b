"""First-order fine-tuning (backprop + Adam): the upper reference a ZO run is compared with.

MeZO (arXiv 2305.17333, Sec. 3-4) reports ZO beside fine-tuning with Adam on the same model and
data, and memory beside memory: Adam keeps gradients and two moments per parameter and the
activations of the backward pass, ZO only inference activations. This module trains the same
adapter (same buckets, same loss, same batches) with autograd and ``torch.optim.AdamW`` and
measures the peak memory of the training phase: CUDA's allocator peak on a GPU, the process's
resident-set high-water mark (``VmHWM``, reset before the phase) on CPU.
"""
from __future__ import annotations

import resource
import time

import torch

from distzo2_lab.bench.procstatus import status_kib


class PeakMemory:
    """Peak memory (MiB) of a phase: ``with PeakMemory(device) as m: ...; m.peak_mb, m.start_mb``.

    CPU: the resident-set high-water mark, reset at entry through /proc/self/clear_refs (Linux >= 4.0);
    where that is refused the lifetime peak (``ru_maxrss``) is reported and `reset` is False."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.start_mb = self.peak_mb = 0.0
        self.reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb, self.reset = torch.cuda.memory_allocated(self.device) / 2**20, True
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.start_mb = (status_kib("VmRSS") or 0) / 1024.0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        hwm = status_kib("VmHWM") if self.reset else None
        self.peak_mb = hwm / 1024.0 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    @property
    def added_mb(self) -> float:
        """Peak above the memory held when the phase began (the model, the data)."""
        return self.peak_mb - self.start_mb

    def to_dict(self) -> dict:
        kind = "cuda_allocated" if self.device.type == "cuda" else ("rss_hwm" if self.reset else "rss_lifetime")
        return {"peak_mb": self.peak_mb, "start_mb": self.start_mb, "added_mb": self.added_mb, "measure": kind}


def finetune_first_order(adapter, task, steps: int, lr: float = 5e-5, weight_decay: float = 0.0,
                         device: str = "cpu", on_step=None) -> dict:
    """`steps` AdamW steps on task.batch(0 .. steps-1); the adapter's weights are trained in place.

    Returns losses, seconds and the peak memory of the phase (see :class:`PeakMemory`)."""
    from distzo2_lab.config import ConfigError

    if adapter.offloaded or any(b.storage != "fp32" for b in adapter.buckets):
        raise ConfigError("first-order fine-tuning trains a resident fp32 adapter (Adam writes the parameters "
                          "in place); build it with storage='fp32' and offload.tier='resident'")
    model = adapter.model
    params = [p for p in model.parameters()]  # tied weights appear once
    losses = []
    with PeakMemory(device) as mem:
        model.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        t0 = time.perf_counter()
        try:
            for t in range(steps):
                b = {k: v.to(device) for k, v in task.batch(t).items()}
                loss = adapter.loss(adapter.forward(b["input_ids"], b.get("attention_mask")), b["labels"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(t, losses[-1])
        finally:
            model.requires_grad_(False)
            for p in params:
                p.grad = None
        seconds = time.perf_counter() - t0
    return {"steps": steps, "lr": lr, "losses": losses, "seconds": seconds, "memory": mem.to_dict()}
