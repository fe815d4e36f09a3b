"""What the eager references share: a resident model, its batch losses, evaluation.

The eager MeZO step (zo/reference.py) and the eager method family (zo/family_reference.py) both
keep the whole model resident and apply each update at once, so nothing is ever pending. They
differ only in how a step perturbs and updates; the set-up, the token-weighted loss of a batch
cut into micro-batches and evaluation are this base class.
"""
from __future__ import annotations

import torch

from distzo2_lab.config import PrecisionConfig, ZOConfig
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.zo.perturb import Perturber
from distzo2_lab.zo.spsa import (
    check_engine_setup,
    compute_context,
    count_tokens,
    split_micro,
    unpack_batch,
    weighted_loss,
)


class EagerResident:
    """A resident model stepped eagerly: checked set-up, batch losses, flush (a no-op), evaluate."""

    def __init__(self, adapter: BlockAdapter, zo: ZOConfig, precision: PrecisionConfig, micro_batches: int):
        check_engine_setup(adapter, zo, precision)
        self.adapter, self.zo, self.precision, self.micro_batches = adapter, zo, precision, micro_batches
        # frozen spans and decay spans (and, for the copies, the fused pass)
        self.perturber = Perturber(zo.noise).freeze(adapter.buckets, zo.freeze)
        self.device = adapter.bucket_in.master.device
        self.step_count = 0
        self.pending = None  # every update is applied at once; nothing is ever pending

    def _begin(self, batch: dict, lr: float | None, step: int | None) -> tuple[list, float]:
        """(micro-batches, lr) of a step; `step` sets its index (default: the step after the last)."""
        if step is not None:
            self.step_count = step
        micro = split_micro(batch, self.micro_batches)
        for ids, _, _ in micro:
            self.adapter.check_batch(ids)
        return micro, self.zo.lr if lr is None else lr

    def _loss(self, ids, labels, mask) -> float:
        with compute_context(self.precision.compute, self.device):
            return float(self.adapter.loss(self.adapter.forward(ids, mask), labels))

    def _batch_loss(self, micro) -> float:
        """The token-weighted mean of the micro-batches' losses."""
        return weighted_loss([self._loss(*m) for m in micro], [count_tokens(m[1]) for m in micro])

    def flush(self) -> None:
        """Nothing is ever pending in an eager reference."""

    @torch.no_grad()
    def evaluate(self, batch: dict) -> float:
        ids, labels, mask = unpack_batch(batch)
        self.adapter.check_batch(ids)
        return self._loss(ids, labels, mask)
