"""Eager MeZO: the reference step, the oracle every other variant is tested against.

Exactly MeZO's Algorithm 1 (arXiv 2305.17333): the whole model is perturbed +eps z, a full
forward gives l+, perturbed -2 eps z, a full forward gives l-, restored with +eps z, then
updated with z regenerated once more. z is regenerated from the seed for each of the four
passes (never stored). It is deliberately simple and slow (ratio ~1.6 of two forwards here).
"""
from __future__ import annotations

import torch

from .config import PrecisionConfig, ZOConfig
from .models.opt import OPTAdapter
from .perturb import Perturber
from .zo import (
    StepResult,
    apply_update_,
    check_engine_setup,
    compute_context,
    count_tokens,
    perturb_,
    projected_grad,
    unpack_batch,
)


class EagerMeZO:
    """MeZO step on a resident model: four noise passes, update applied at once."""

    def __init__(self, adapter: OPTAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1):
        check_engine_setup(adapter, zo, precision)
        self.adapter, self.zo, self.precision = adapter, zo, precision
        self.perturber = Perturber(zo.noise, zo.chunk_size, threads)
        self.device = adapter.bucket_in.master.device
        self._z = torch.empty(max(b.numel for b in adapter.buckets), device=self.device)
        self.step_count = 0
        self.pending = None  # the reference applies every update at once; nothing is ever pending

    def _z_for(self, bucket, seed: int) -> torch.Tensor:
        return self.perturber.fill(self._z[: bucket.numel], seed, bucket.key)

    def _perturb_all(self, seed: int, scale: float) -> None:
        for b in self.adapter.buckets:
            perturb_(b.master, self._z_for(b, seed), scale)
            b.sync()

    def _loss(self, ids, labels, mask) -> float:
        with compute_context(self.precision.compute, self.device):
            return float(self.adapter.loss(self.adapter.forward(ids, mask), labels))

    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None) -> StepResult:
        ids, labels, mask = unpack_batch(batch)
        self.adapter.check_batch(ids)
        lr = self.zo.lr if lr is None else lr
        eps = self.zo.eps
        self._perturb_all(seed, eps)
        loss_plus = self._loss(ids, labels, mask)
        self._perturb_all(seed, -2 * eps)
        loss_minus = self._loss(ids, labels, mask)
        self._perturb_all(seed, eps)
        grad = projected_grad(loss_plus, loss_minus, eps)
        for b in self.adapter.buckets:
            apply_update_(b.master, self._z_for(b, seed), grad, lr, self.zo.weight_decay, b.decay_spans)
            b.sync()
        self.step_count += 1
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr, count_tokens(labels))

    def flush(self) -> None:
        """Nothing is ever pending in the eager reference."""

    @torch.no_grad()
    def evaluate(self, batch: dict) -> float:
        ids, labels, mask = unpack_batch(batch)
        self.adapter.check_batch(ids)
        return self._loss(ids, labels, mask)
