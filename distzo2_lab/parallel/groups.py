"""One owner of the process groups: every group is cut from one (dp x pert) grid of ranks.

DistZO2 (arXiv 2507.03211, Sec. 3) lays the ranks out as a grid, row-major (rank = d * pert + p).
For dp=2, pert=2:

                 pert 0 (+eps)   pert 1 (-eps)
        dp 0        rank 0          rank 1       <- a pert group: one micro-batch, l+ and l- swapped
        dp 1        rank 2          rank 3
                      ^               ^
                      dp groups: the same sign on different micro-batches, losses averaged

The pert group of a rank is its row, its dp group its column, the world group all of them. The
ranks of one machine that make the same noise draws (same directions) or the same perturbed
copies (same directions and signs) form node groups, used by the node's shared memory
(node_share.py, copy_share.py). Like picotron's process-group manager or torchtitan's
ParallelDims, :meth:`ParallelGroups.build` runs once per rank after ``init_process_group``, and
every module is handed the group it needs. A dimension of one rank has no group (None).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from distzo2_lab.parallel.layout import Layout


@dataclass(frozen=True)
class NodeGroup:
    """The ranks of one machine that share a piece of work; this rank is `index` of them."""

    ranks: tuple[int, ...]
    group: object
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the grid and the groups it talks over."""

    layout: Layout
    rank: int
    backend: str
    world: object
    """The whole world (the slicer's all-gather)."""
    dp: object | None
    """This rank's column: the ranks of its pert index on every micro-batch (None when dp = 1)."""
    pert: object | None
    """This rank's row: the ranks sharing its micro-batch (None when pert = 1)."""
    node_noise: NodeGroup | None
    """The ranks of this machine drawing the same z (None: alone, or layout.share_noise off)."""
    node_copies: NodeGroup | None
    """The ranks of this machine making the same perturbed copies (same directions and signs)."""
    token: str
    """A name common to the run (the node groups' shared-memory files)."""
    directions_total: int = 1
    node_ranks: tuple[int, ...] = ()
    """Every rank of this machine (their weights are identical in every layout)."""

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def coords(self) -> tuple[int, int]:
        return self.layout.coords(self.rank)

    @property
    def signs(self) -> tuple[bool, bool]:
        return self.layout.signs(self.rank)

    @property
    def directions(self) -> list[int]:
        return self.layout.directions(self.rank, self.directions_total)

    @classmethod
    def build(cls, layout: Layout, backend: str | None = None, directions: int = 1) -> ParallelGroups:
        """Cut every group from the grid (a collective: every rank calls it, in the same order).
        `directions` is zo.directions (n-SPSA), which decides who draws the same z."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != layout.world_size:
            raise ValueError(f"the process group has {world} ranks; layout {layout.describe()} needs "
                             f"{layout.world_size}")
        grid = [[d * layout.pert + p for p in range(layout.pert)] for d in range(layout.dp)]
        d, p = layout.coords(rank)
        dp = _cut([[row[q] for row in grid] for q in range(layout.pert)], p)  # the columns
        pert = _cut(grid, d)  # the rows
        hosts: list = [None] * world
        dist.all_gather_object(hosts, (os.uname().nodename, os.urandom(8).hex()))
        noise = copies = None
        if layout.share_noise and world > 1:
            noise = _node(hosts, rank, lambda r: tuple(layout.directions(r, directions)))
            copies = _node(hosts, rank, lambda r: (tuple(layout.directions(r, directions)), layout.signs(r)))
        here = tuple(r for r in range(world) if hosts[r][0] == hosts[rank][0])
        return cls(layout, rank, backend or dist.get_backend(), dist.group.WORLD, dp, pert, noise, copies,
                   hosts[0][1], directions, here)


def _cut(lines: list[list[int]], mine: int):
    """new_group for every line of the grid (every rank creates all of them); this rank's line."""
    if len(lines[0]) < 2:
        return None
    groups = [dist.new_group(line) for line in lines]
    return groups[mine]


def _node(hosts: list, rank: int, key) -> NodeGroup | None:
    """The ranks of this rank's machine with its `key`; groups of one rank are not made."""
    keys = [(hosts[r][0], key(r)) for r in range(len(hosts))]
    out = None
    for k in sorted(set(keys)):  # every rank creates every group, in one order
        members = tuple(r for r, kk in enumerate(keys) if kk == k)
        if len(members) < 2:
            continue
        group = dist.new_group(list(members))
        if rank in members:
            out = NodeGroup(members, group, members.index(rank))
    return out
