"""Hardware-aware slicing (DistZO2, arXiv 2507.03211, Sec. 3.3): one shard per rank.

A block's flat bucket is padded to a multiple of the world size and cut into one shard per rank
(the noise is counter-based, so a shard's z regenerates at any start). Each rank uploads only its
shard (its own share of the host link), applies the deferred update to that shard alone (z
regenerated for the shard only), and the ranks all-gather the updated shards into the whole block
(over NVLink on GPUs; gloo on CPU here). After the dual forward each rank writes back only its
shard. The arithmetic per element is the unsliced engine's, so the results are the same bit for bit.
The method family's slot [master | state...] is cut section by section: a rank moves and updates its
shard of the master and of each state tensor, and gathers what the passes read whole (the master;
HiZOO's h), zo/family_engine.py.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from distzo2_lab.observe.events import Recorder
from distzo2_lab.parallel.exchange import all_gather_flat


class Slicer:
    """Shard geometry of every bucket size, and the assemble step of a sliced visit."""

    def __init__(self, rank: int, world: int, group=None, recorder: Recorder | None = None):
        self.rank, self.world, self.group = rank, world, group
        self.recorder = recorder or Recorder(enabled=False)
        self.bytes_gathered = 0

    def shard_size(self, numel: int) -> int:
        """Elements per shard: numel / world rounded up."""
        return -(-numel // self.world)

    def padded(self, numel: int) -> int:
        return self.shard_size(numel) * self.world

    def bounds(self, numel: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of a rank's shard inside the real (unpadded) bucket; may be empty."""
        r = self.rank if rank is None else rank
        s = self.shard_size(numel)
        return min(r * s, numel), min((r + 1) * s, numel)

    def assemble(self, buf: torch.Tensor, numel: int, step: int, block: int) -> None:
        """buf (padded) holds this rank's updated shard; fill in every other rank's."""
        s = self.shard_size(numel)
        mine = buf[self.rank * s : (self.rank + 1) * s].clone()  # the send buffer may not alias the output
        t0 = self.recorder.now()
        all_gather_flat(buf[: s * self.world], mine, group=self.group)
        nbytes = s * self.world * buf.element_size()
        self.bytes_gathered += nbytes
        self.recorder.add("exchange", "allgather", step, block, t0, self.recorder.now(), nbytes)

    def whole(self, read: Callable[[torch.Tensor, int], None], numel: int, block: int = -1) -> torch.Tensor:
        """A bucket (or one section of a slot) of which this rank's store is current on its own shard
        only: read(dst, start) fills the shard, the all-gather the rest. Every rank calls it, in the
        same order (digests, checkpoints, the optimiser state)."""
        out = torch.empty(self.padded(numel))
        start, stop = self.bounds(numel)
        read(out[start:stop], start)
        self.assemble(out, numel, -1, block)
        return out[:numel]
