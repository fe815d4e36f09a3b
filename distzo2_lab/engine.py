"""The ZO2 step for one rank: dual forward per block and the deferred, fused update.

ZO2 (arXiv 2503.12668, Sec. 3.2-3.3): each transformer block is visited once per step. On the
visit it first receives the pending update of the previous step (z regenerated from that
step's seed), then z of this step is generated *once* and reused for +eps, -2 eps and the +eps
restore while both perturbed activations (h+, h-) pass through it. The update of this step is
only known after the last block, so it becomes an explicit :class:`PendingUpdate`, applied on
the next visit or by :meth:`ZO2Engine.flush` (before evaluation, checkpoints and at the end).
Resident buckets (embeddings, final norm, head) keep a copy of their +eps state so the head can
run both passes after the blocks. Same arithmetic as the eager reference, so bit-identical.
"""
from __future__ import annotations

import torch

from .config import PrecisionConfig, ZOConfig
from .models.buckets import ParamBucket
from .models.opt import OPTAdapter
from .perturb import Perturber
from .zo import (
    PendingUpdate,
    StepResult,
    apply_update_,
    check_engine_setup,
    compute_context,
    count_tokens,
    perturb_,
    projected_grad,
    unpack_batch,
)


class ZO2Engine:
    """Block-by-block ZO step with two noise generations per parameter per step (ratio ~1.1)."""

    def __init__(self, adapter: OPTAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1):
        check_engine_setup(adapter, zo, precision)
        self.adapter, self.zo, self.precision = adapter, zo, precision
        self.perturber = Perturber(zo.noise, zo.chunk_size, threads)
        self.device = adapter.bucket_in.master.device
        self._z_block = torch.empty(max((b.numel for b in adapter.blocks), default=0), device=self.device)
        self._z_in = torch.empty(adapter.bucket_in.numel, device=self.device)
        self._z_out = torch.empty(adapter.bucket_out.numel, device=self.device)
        # The +eps state of the resident buckets, kept for the head's plus pass (reused buffers:
        # fresh allocations cost page faults every step).
        self._plus = [torch.empty_like(b.working) for b in (adapter.bucket_in, adapter.bucket_out)]
        self.pending: PendingUpdate | None = None
        self.step_count = 0

    # -- the deferred update -------------------------------------------------------------
    def _apply_pending(self, bucket: ParamBucket, scratch: torch.Tensor) -> None:
        p = self.pending
        if p is None:
            return
        z = self.perturber.fill(scratch[: bucket.numel], p.seed, bucket.key)
        apply_update_(bucket.master, z, p.grad, p.lr, self.zo.weight_decay, bucket.decay_spans)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every bucket now (evaluation never sees stale weights)."""
        if self.pending is None:
            return
        for b in self.adapter.buckets:
            self._apply_pending(b, self._scratch_for(b))
            b.sync()
        self.pending = None

    def _scratch_for(self, b: ParamBucket) -> torch.Tensor:
        if b is self.adapter.bucket_in:
            return self._z_in
        return self._z_out if b is self.adapter.bucket_out else self._z_block

    # -- one step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None) -> StepResult:
        a, eps = self.adapter, self.zo.eps
        ids, labels, mask = unpack_batch(batch)
        a.check_batch(ids)
        lr = self.zo.lr if lr is None else lr
        resident = ((a.bucket_in, self._z_in), (a.bucket_out, self._z_out))
        with compute_context(self.precision.compute, self.device):
            # Resident buckets: deferred update, then +eps; keep the +eps state for the head.
            for b, z in resident:
                self._apply_pending(b, z)
                self.perturber.fill(z, seed, b.key)
                perturb_(b.master, z, eps)
                b.sync()
            for (b, _), state in zip(resident, self._plus):
                state.copy_(b.working)
            h_plus, ctx = a.embed(ids, mask)  # (B, T, C)
            for b, z in resident:
                perturb_(b.master, z, -2 * eps)
                b.sync()
            h_minus, _ = a.embed(ids, mask)  # (B, T, C)

            # Blocks: update, perturb, dual forward, restore; z generated once per visit.
            z = self._z_block
            for i, b in enumerate(a.blocks):
                self._apply_pending(b, z)
                zb = self.perturber.fill(z[: b.numel], seed, b.key)
                perturb_(b.master, zb, eps)
                b.sync()
                h_plus = a.run_block(i, h_plus, ctx)
                perturb_(b.master, zb, -2 * eps)
                b.sync()
                h_minus = a.run_block(i, h_minus, ctx)
                perturb_(b.master, zb, eps)
                b.sync()

            # Head: -eps state is live; swap in the saved +eps state for the plus pass.
            loss_minus = float(a.loss(a.head(h_minus), labels))
            for (b, _), state in zip(resident, self._plus):
                b.bind(state)
            loss_plus = float(a.loss(a.head(h_plus), labels))
            for b, z in resident:
                b.bind(b.working)
                perturb_(b.master, z, eps)
                b.sync()
        grad = projected_grad(loss_plus, loss_minus, eps)
        self.pending = PendingUpdate(self.step_count, seed, grad, lr)
        self.step_count += 1
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr, count_tokens(labels))

    @torch.no_grad()
    def evaluate(self, batch: dict) -> float:
        """Loss at the current parameters, after flushing the pending update."""
        self.flush()
        ids, labels, mask = unpack_batch(batch)
        self.adapter.check_batch(ids)
        with compute_context(self.precision.compute, self.device):
            return float(self.adapter.loss(self.adapter.forward(ids, mask), labels))
