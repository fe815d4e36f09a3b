"""Eager MeZO: the reference step, the oracle every other variant is tested against.

Exactly MeZO's Algorithm 1 (arXiv 2305.17333): the whole model is perturbed +eps z, a full
forward gives l+, perturbed -2 eps z, a full forward gives l-, restored with +eps z, then
updated with z regenerated once more. z is regenerated from the seed for each of the four
passes (never stored). It is deliberately simple and slow (see docs/results.md, efficiency).

With zo.perturb='copy' (the default) the passes read copies theta +- eps z made in the compute
dtype and the masters only receive the update, z computed inside the fused pass
(`Perturber.visit`) that every engine uses; zo.perturb='in-place' is the literal round trip on
the weights. Two options every engine variant is checked against: micro-batches (gradient
accumulation: the losses of equal row slices, token-weighted) and q > 1 directions (n-SPSA: for
each direction j the passes see theta +- eps z_j, and the update averages g_j z_j).
"""
from __future__ import annotations

import torch

from distzo2_lab.config import PrecisionConfig, ZOConfig, copies_perturbation
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.models.buckets import DTYPES
from distzo2_lab.zo.eager import EagerResident
from distzo2_lab.zo.spsa import (
    PendingUpdate,
    StepResult,
    apply_update_,
    count_tokens,
    direction_seed,
    hold_masters,
    perturb_,
    projected_grad,
    update_terms,
)


class EagerMeZO(EagerResident):
    """MeZO step on a resident model: four noise passes, update applied at once."""

    def __init__(self, adapter: BlockAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1, micro_batches: int = 1):
        super().__init__(adapter, zo, precision, micro_batches)
        hold_masters(adapter, precision)
        # in place, z is drawn into memory; the copies' fused pass computes it where it is used
        widest = max(b.numel for b in adapter.buckets) if not copies_perturbation(zo) else 0
        self._z = torch.empty(widest, device=self.device)

    def _z_for(self, bucket, seed: int) -> torch.Tensor:
        return self.perturber.fill(self._z[: bucket.numel], seed, bucket.key)

    def _perturb_all(self, seed: int, scale: float) -> None:
        for b in self.adapter.buckets:
            perturb_(b.master, self._z_for(b, seed), scale)
            b.sync()

    def _bind_perturbed(self, seed: int, sign: int, copies: list[torch.Tensor]) -> None:
        """Bind theta + eps z (sign 0) or theta - eps z (sign 1) of every bucket, made in `copies`."""
        for b, out in zip(self.adapter.buckets, copies):
            self.perturber.visit(b, b.master, (), 1.0, seed, self.zo.eps, **{("plus", "minus")[sign]: out})
            b.bind(out)

    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None, step: int | None = None) -> StepResult:
        """One ZO step, as ZO2Engine.step (`step`: its index, default the step after the last)."""
        micro, lr = self._begin(batch, lr, step)
        eps, q = self.zo.eps, self.zo.directions
        if not copies_perturbation(self.zo):
            self._perturb_all(seed, eps)
            loss_plus = self._batch_loss(micro)
            self._perturb_all(seed, -2 * eps)
            loss_minus = self._batch_loss(micro)
            self._perturb_all(seed, eps)
            grad = projected_grad(loss_plus, loss_minus, eps)
            update = PendingUpdate(self.step_count, seed, grad, lr)
        else:  # zo.perturb copy / n-SPSA: out-of-place perturbed copies, the masters only receive the update
            dtype = DTYPES[self.precision.compute]  # the forwards read compute-dtype copies
            copies = [torch.empty(b.numel, dtype=dtype, device=self.device) for b in self.adapter.buckets]
            terms, pluses, minuses = [], [], []
            for j in range(q):
                s = direction_seed(seed, j)
                self._bind_perturbed(s, 0, copies)
                pluses.append(self._batch_loss(micro))
                self._bind_perturbed(s, 1, copies)
                minuses.append(self._batch_loss(micro))
                terms.append((s, projected_grad(pluses[-1], minuses[-1], eps)))
            for b in self.adapter.buckets:
                b.bind(b.working)
            loss_plus, loss_minus, grad = sum(pluses) / q, sum(minuses) / q, sum(g for _, g in terms) / q
            update = PendingUpdate(self.step_count, seed, grad, lr, tuple(terms) if q > 1 else ())
        for b in self.adapter.buckets:
            if copies_perturbation(self.zo):  # the fused pass's update rule
                self.perturber.visit(b, b.master, *update_terms(update, self.zo.weight_decay))
            else:
                for s, g, lr_j, wd in update.updates(self.zo.weight_decay):
                    apply_update_(b.master, self._z_for(b, s), g, lr_j, wd, self.perturber.decay_spans(b))
            b.sync()
        self.step_count += 1
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr,
                          sum(count_tokens(m[1]) for m in micro), update.terms)
