"""One copy of the masters per node, each visit's work done once by whichever rank is free.

The ranks of a PertP, DDP or 2D layout keep identical weights (DistZO2, arXiv 2507.03211, Sec. 3):
they apply the same deferred update to the same masters. On one machine they can therefore hold
the resident masters once, in shared memory, and split every visit of a bucket: the deferred
update of the master and the perturbed copies theta +- eps z that the node's forwards read are one
fused pass (Perturber.visit) cut into chunks, each claimed by one rank (node_share.SharedPieces).
A node then computes z twice per parameter per step, like a single rank, however many ranks it
holds; each chunk of a master is updated exactly once. The pass is elementwise, so a run is
bit-identical to every rank working alone.

A slot holds the copies of every sign the node's ranks run (the union of their signs), one lane
each; a rank binds the lanes of its own signs. The resident buckets (embeddings; final norm and
head) keep their copies from the embedding to the head, so each has its own ring of two slots;
the blocks share one ring of three. An update without copies (flush) goes through a ring that
holds no data, so it too lands once.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from distzo2_lab.config import share_grain
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.models.buckets import ParamBucket
from distzo2_lab.parallel.groups import NodeGroup
from distzo2_lab.parallel.node_share import SharedPieces, join_node
from distzo2_lab.zo.perturb import Perturber


def share_masters(buckets: list[ParamBucket], barrier: Callable[[], None], path: str, create: bool) -> torch.Tensor:
    """Move every bucket's fp32 master into one shared file (the group's first member fills it from
    its own masters, identical on every member) and attach each bucket to its view. Returns the
    flat shared tensor; the file's name is gone once every member has mapped it."""
    total = sum(b.numel for b in buckets)
    if create:
        with open(path, "wb") as f:
            f.truncate(total * 4)
    barrier()  # the file exists
    flat = torch.from_file(path, shared=True, size=total, dtype=torch.float32)
    offsets = [0]
    for b in buckets:
        offsets.append(offsets[-1] + b.numel)
    if create:
        for b, a in zip(buckets, offsets):
            flat[a : a + b.numel].copy_(b.master)
    barrier()  # filled, and mapped by every member
    if create and os.path.exists(path):
        os.unlink(path)
    for b, a in zip(buckets, offsets):
        b.attach(flat[a : a + b.numel], None if b.working is b.master else b.working)
    return flat


class MasterShare:
    """The node's shared masters and the rings that split their visits (see the module docstring).

    Every member must make the same sequence of calls (the ranks of a layout visit the buckets in
    one order, step by step)."""

    def __init__(self, adapter: BlockAdapter, perturber: Perturber, node: NodeGroup, token: str,
                 signs: tuple[bool, bool], dtype: torch.dtype, grain: int | None = None, timeout: float = 600.0):
        """`signs`: the union of the node's ranks' signs (the lanes of a slot); `dtype`: the copies'
        (the compute dtype); `grain`: elements a member claims at once (default config.share_grain())."""
        if any(b.master is None or b.master.dtype != torch.float32 for b in adapter.buckets):
            raise ValueError("MasterShare holds resident fp32 masters (not an offloaded or bf16-master model)")
        self.perturber, self.signs = perturber, signs
        self.lane = {}  # sign -> its lane in a slot
        for sign in (0, 1):
            if signs[sign]:
                self.lane[sign] = len(self.lane)
        grain = grain or share_grain()
        buckets = adapter.buckets

        def join(kind: str, make):
            return join_node(node, token, kind, make)

        def ring(elems: int, slots: int, lanes: int):
            return lambda i, n, barrier, path, create: SharedPieces(i, n, barrier, path, create, elems, grain, dtype,
                                                                    slots, timeout, lanes)

        self.flat = join("masters", lambda i, n, barrier, path, create: share_masters(buckets, barrier, path, create))
        width = max((b.numel for b in adapter.blocks), default=1)
        self.blocks = join("block-copies", ring(width, 3, len(self.lane)))
        self.resident = {b.key: join(f"copies-{k}", ring(b.numel, 2, len(self.lane)))
                         for k, b in enumerate((adapter.bucket_in, adapter.bucket_out))}
        self.updates = join("updates", ring(max(b.numel for b in buckets), 3, 0))
        self.rings = [self.blocks, *self.resident.values(), self.updates]
        self.served = 0  # elements of the pieces this member took part in (what it would have done alone)

    @property
    def computed(self) -> int:
        """Elements this member computed itself (the work it did)."""
        return sum(r.computed for r in self.rings)

    @property
    def waited_s(self) -> float:
        return sum(r.waited_s for r in self.rings)

    def copies(self, b: ParamBucket, terms, keep: float, seed: int, eps: float,
               mine: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The pending update `terms` / `keep` (spsa.update_terms) on the node's master of `b`, and the
        copies theta + eps z(seed), theta - eps z(seed) in one pass; returns this rank's copies (None
        for a sign it does not run), valid until its next visit of the same ring."""
        ring = self.resident.get(b.key, self.blocks)
        lane = self.lane

        def fill(slot, x, y):
            rows = slot if slot.dim() == 2 else slot.unsqueeze(0)
            out = {name: rows[lane[k], x:y] for k, name in ((0, "plus"), (1, "minus")) if k in lane}
            self.perturber.visit(b, b.master[x:y], terms, keep, seed, eps, start=x, **out)

        slot = ring.piece(b.numel, fill)
        self.served += b.numel
        rows = slot if slot.dim() == 2 else slot.unsqueeze(0)
        return tuple(rows[lane[k]] if mine[k] else None for k in (0, 1))

    def update(self, b: ParamBucket, terms, keep: float) -> None:
        """The pending update alone (a flush), on the node's master of `b`, once per node."""
        if not terms:
            return

        def fill(_, x, y):
            self.perturber.visit(b, b.master[x:y], terms, keep, start=x)

        self.updates.piece(b.numel, fill)
        self.served += b.numel

    def close(self) -> None:
        for r in self.rings:
            r.close()


def open_node_masters(adapter: BlockAdapter, perturber: Perturber, groups, dtype: torch.dtype) -> MasterShare | None:
    """Share the masters with the ranks of this machine when all of them run the same directions
    (groups.node_noise is the whole machine: the same z in every copy); None otherwise (each rank
    keeps its own masters). Every rank of the machine must call it."""
    node = groups.node_noise
    if node is None or set(node.ranks) != set(groups.node_ranks):
        return None
    layout = groups.layout
    signs = tuple(any(layout.signs(r)[k] for r in node.ranks) for k in (0, 1))
    return MasterShare(adapter, perturber, node, groups.token, signs, dtype)
