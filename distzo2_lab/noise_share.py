"""z drawn once per node: the ranks of a node that draw the same noise split the drawing.

Every rank of a PertP, DDP or 2D layout draws the same z for every bucket at every step (a PertP
rank runs the whole +eps / -2 eps / +eps round trip, DDP ranks share the seed). On a CPU the draw
costs ~6 ns per element per thread (``normal_``), as much as a large share of the forward, and W
ranks of one node would each pay it in full. Here the G ranks of a node that make the same draws
(same directions, n-SPSA) cut every draw into pieces of at most one slot; each rank fills its
contiguous run of the piece's noise chunks (the runs rotate from piece to piece) into a
shared-memory slot, the G ranks meet at a barrier, and every rank copies the whole piece out
(or, for a draw used up before the rank's next one, reads it in the slot: :meth:`NoiseShare.view`).
The values are the perturber's own (chunk c of bucket k at seed s is a pure function of the
three), so a run is bit-identical with or without sharing; only the work moves.

Two slots, alternating: a rank writes slot n % 2 for piece n only after the barrier of piece n - 1,
which every rank reaches after copying piece n - 2 out of that slot. Every rank must make the same
sequence of shared draws (the engine draws whole buckets in a fixed order; sliced updates draw
only the rank's own shard and stay local). The file is unlinked once every rank has mapped it.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .perturb import Perturber


def split_run(chunks: int, index: int, size: int) -> tuple[int, int]:
    """[lo, hi) of `chunks` chunks that member `index` of `size` draws (contiguous, balanced)."""
    base, extra = divmod(chunks, size)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


class NoiseShare:
    """Shared draws for the `size` ranks of one node that draw the same z; this rank is `index`."""

    def __init__(self, perturber: Perturber, index: int, size: int, barrier: Callable[[], None], path: str,
                 create: bool, slot_elems: int):
        if not 0 <= index < size:
            raise ValueError(f"index={index} is not in [0, {size})")
        chunk = perturber.chunk_size
        self.perturber, self.index, self.size, self.barrier = perturber, index, size, barrier
        self.slot_elems = max(1, -(-slot_elems // chunk)) * chunk  # whole chunks
        if create:
            with open(path, "wb") as f:
                f.truncate(2 * self.slot_elems * 4)
        barrier()  # the file exists
        self.flat = torch.from_file(path, shared=True, size=2 * self.slot_elems, dtype=torch.float32)
        barrier()  # every member has mapped it: its name can go
        if create and os.path.exists(path):
            os.unlink(path)
        self._pieces = 0
        self.drawn = 0  # elements this rank generated (the work it did)
        self.served = 0  # elements of z it received (what it would have drawn alone)
        self.copied = 0  # elements copied out of the slots (views of a slot copy nothing)

    def _piece(self, p0: int, p1: int, n: int, seed: int, key: str) -> torch.Tensor:
        """Elements [p0, p1) of z(seed, key) of an n-element bucket, in the next slot (after the barrier)."""
        chunk = self.perturber.chunk_size
        slot = self.flat[(self._pieces % 2) * self.slot_elems :][: p1 - p0]
        # the runs rotate with the piece count, so one-chunk buckets are drawn by every member in turn
        lo, hi = split_run(-(-(p1 - p0) // chunk), (self.index + self._pieces) % self.size, self.size)
        self._pieces += 1
        s0, s1 = p0 + lo * chunk, min(p1, p0 + hi * chunk)
        if s1 > s0:
            self.perturber.fill(slot[s0 - p0 : s1 - p0], seed, key, start=s0, total=n)
            self.drawn += s1 - s0
        self.barrier()  # every member's run of this piece is in the slot
        return slot

    def fill(self, out: torch.Tensor, seed: int, key: str) -> torch.Tensor:
        """Write the whole z(seed, key) of a bucket of out.numel() elements into the flat `out`."""
        if out.dim() != 1 or not out.is_contiguous():
            raise ValueError("NoiseShare.fill needs a flat contiguous buffer")
        n = out.numel()
        for p0 in range(0, n, self.slot_elems):
            p1 = min(n, p0 + self.slot_elems)
            out[p0:p1].copy_(self._piece(p0, p1, n, seed, key))
        self.served += n
        self.copied += n
        return out

    def view(self, out: torch.Tensor, seed: int, key: str) -> torch.Tensor:
        """z(seed, key) of a bucket of out.numel() elements without the copy out when it fits one slot:
        the returned tensor is the slot itself, valid until this rank's next draw (the other members
        rewrite the slot two pieces later, after a barrier this rank reaches only by drawing again).
        A bucket larger than a slot is written into `out` as by :meth:`fill`."""
        n = out.numel()
        if n > self.slot_elems:
            return self.fill(out, seed, key)
        self.served += n
        return self._piece(0, n, n, seed, key)


def open_node_noise(perturber: Perturber, rank: int, directions: list[int], slot_elems: int) -> NoiseShare | None:
    """Join the ranks of this node that draw the same directions (a collective: every rank of the
    default group calls it). Returns None when this rank draws alone."""
    import torch.distributed as dist

    from .offload import SHM_DIR

    world = dist.get_world_size()
    mine = (os.uname().nodename, tuple(directions))
    keys: list = [None] * world
    dist.all_gather_object(keys, mine)
    name = [os.urandom(8).hex() if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    share = None
    for gi, key in enumerate(sorted(set(keys))):  # every rank creates every group, in one order
        members = [r for r, k in enumerate(keys) if k == key]
        if len(members) < 2:
            continue
        group = dist.new_group(members)
        if key == mine:
            path = os.path.join(SHM_DIR, f"distzo2-noise-{name[0]}-{gi}.bin")
            share = NoiseShare(perturber, members.index(rank), len(members), lambda g=group: dist.barrier(group=g),
                               path, create=members[0] == rank, slot_elems=slot_elems)
    return share
