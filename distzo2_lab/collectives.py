"""The wire-level collectives of DistZO2: only scalars cross ranks for the optimiser.

Every rank contributes four float64 numbers per step: (l+, l-, tokens behind l+, tokens behind
l-), with 0 tokens for a sign it did not run (PertP). One ``all_gather_into_tensor`` gives every
rank the same table, and every rank combines it in rank order, so all agree on g to the bit.
A sign computed by one rank keeps that rank's value exactly (PertP is bit-exact with the
single-rank engine); several contributions (DDP) are token-weighted, which equals the
full-batch mean up to the order of the float sums.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .events import Recorder

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_flat(out: torch.Tensor, mine: torch.Tensor, group=None) -> None:
    """out (world * n) <- every rank's `mine` (n) in rank order."""
    _all_gather(out, mine, group=group)


def combine(table: torch.Tensor) -> tuple[float, float]:
    """(world, 4) rows of (l+, l-, n+, n-) -> (l+, l-) over the ranks that ran each sign."""
    out = []
    for value, count in ((0, 2), (1, 3)):
        rows = [(float(r[value]), float(r[count])) for r in table if r[count] > 0]
        if not rows:
            raise RuntimeError("no rank ran this perturbed pass; the layout lost a sign")
        out.append(rows[0][0] if len(rows) == 1 else sum(v * n for v, n in rows) / sum(n for _, n in rows))
    return out[0], out[1]


class LossExchange:
    """exchange(l+, l-, tokens, step) for a process group; records its bytes as a span."""

    def __init__(self, group=None, recorder: Recorder | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.recorder = recorder or Recorder(enabled=False)
        self.bytes_sent = 0

    def __call__(self, loss_plus, loss_minus, tokens: int, step: int) -> tuple[float, float]:
        mine = torch.tensor([math.nan if loss_plus is None else loss_plus,
                             math.nan if loss_minus is None else loss_minus,
                             0 if loss_plus is None else tokens,
                             0 if loss_minus is None else tokens], dtype=torch.float64)
        flat = torch.empty(self.world * 4, dtype=torch.float64)
        t0 = self.recorder.now()
        all_gather_flat(flat, mine, group=self.group)
        table = flat.view(self.world, 4)
        nbytes = mine.numel() * mine.element_size()
        self.bytes_sent += nbytes
        self.recorder.add("exchange", "exchange", step, -1, t0, self.recorder.now(), nbytes)
        return combine(table)
