"""The wire-level collectives of DistZO2: only scalars cross ranks for the optimiser.

Every rank contributes four float64 numbers per step and perturbation direction: (l+, l-, tokens
behind l+, tokens behind l-), with 0 tokens for a sign or direction it did not run (PertP,
n-SPSA). The exchange runs in the two dimensions of the grid (groups.py): first the pert group
(the ranks of one micro-batch) all-gathers its rows and fills in the signs each rank did not
run, then the dp group all-gathers the completed rows of its micro-batches. Every rank combines
each table in rank order, so all agree on g to the bit.
A sign computed by one rank keeps that rank's value exactly (PertP is bit-exact with the
single-rank engine); several contributions (DDP) are token-weighted, which equals the
full-batch mean up to the order of the float sums (2D gives DDP's numbers bit for bit).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from distzo2_lab.observe.events import Recorder

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_flat(out: torch.Tensor, mine: torch.Tensor, group=None) -> None:
    """out (world * n) <- every rank's `mine` (n) in rank order."""
    _all_gather(out, mine, group=group)


def combine(table: torch.Tensor) -> tuple[float, float]:
    """(world, 4) rows of (l+, l-, n+, n-) -> (l+, l-) over the ranks that ran each sign (of one
    direction)."""
    out = []
    for value, count in ((0, 2), (1, 3)):
        rows = [(float(r[value]), float(r[count])) for r in table if r[count] > 0]
        if not rows:
            raise RuntimeError("no rank ran this perturbed pass; the layout lost a sign")
        out.append(rows[0][0] if len(rows) == 1 else sum(v * n for v, n in rows) / sum(n for _, n in rows))
    return out[0], out[1]


class LossExchange:
    """exchange([(l+, l-) per direction], tokens, step) over this rank's pert group, then its dp
    group (either may be None: a dimension of one rank); records its bytes as spans."""

    def __init__(self, pert=None, dp=None, recorder: Recorder | None = None, device: str = "cpu"):
        self.stages = [g for g in (pert, dp) if g is not None]
        self.device = device  # nccl needs the scalars on the rank's GPU
        self.recorder = recorder or Recorder(enabled=False)
        self.bytes_sent = 0

    def __call__(self, losses: list[tuple], tokens: int, step: int) -> list[tuple[float, float]]:
        """losses: (l+, l-) per direction, None where this rank did not run it -> the combined list."""
        rows = [[math.nan if lp is None else lp, math.nan if lm is None else lm,
                 0 if lp is None else tokens, 0 if lm is None else tokens] for lp, lm in losses]
        for group in self.stages:
            table = self._gather(rows, group, step)
            # the next stage sees one complete row per micro-batch: both signs, its tokens
            rows = [[*combine(table[:, j]), tokens, tokens] for j in range(len(losses))]
        return [(lp, lm) for lp, lm, _, _ in rows]

    def _gather(self, rows: list, group, step: int) -> torch.Tensor:
        """(group size, directions, 4): every member's rows in rank order."""
        mine = torch.tensor(rows, dtype=torch.float64, device=self.device).reshape(-1)
        flat = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=torch.float64, device=self.device)
        t0 = self.recorder.now()
        all_gather_flat(flat, mine, group=group)
        nbytes = mine.numel() * mine.element_size()
        self.bytes_sent += nbytes
        self.recorder.add("exchange", "exchange", step, -1, t0, self.recorder.now(), nbytes)
        return flat.cpu().view(-1, len(rows), 4)
