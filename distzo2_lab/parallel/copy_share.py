"""Perturbed block copies made once per node (zo.perturb copy): the ranks of one machine that
run the same signs and directions on identical weights (DDP ranks; the ranks of one sign in 2D)
make the same copies theta + scale z in the same order, so each copy is a shared piece of
node_share.SharedPieces whose chunks go to whichever member claims them.
"""
from __future__ import annotations

from typing import Callable

import torch

from distzo2_lab.parallel.groups import ParallelGroups
from distzo2_lab.parallel.node_share import SharedPieces, join_node


class CopyShare:
    """Perturbed copies theta + scale z of the visited block made once per node (zo.perturb copy):
    ranks that run the same signs and directions on identical weights (DDP ranks; the ranks of one
    sign in 2D) make the same copies in the same order, so each copy is a shared piece whose chunks
    go to whichever member claims them (:class:`SharedPieces`), and every member's forward reads
    the shared slot. Bit-identical to each rank making its own copy: an elementwise add per chunk."""

    def __init__(self, index: int, size: int, barrier: Callable[[], None], path: str, create: bool,
                 slot_elems: int, chunk: int, dtype: torch.dtype = torch.float32, slots: int = 3,
                 timeout: float = 600.0):
        self.index, self.size = index, size
        self.ring = SharedPieces(index, size, barrier, path, create, slot_elems, chunk, dtype, slots, timeout)
        self.served = 0  # elements of copies it received through the ring (what it would have computed alone)
        self.alone = 0  # elements of one-chunk copies this rank made itself (nothing to split)
        self._own: torch.Tensor | None = None  # where those go (allocated on first use)

    @property
    def computed(self) -> int:
        return self.ring.computed

    def copy(self, master: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
        """theta + scale z of one block (flat, at most one slot), in the shared slot; valid until
        this rank's next copy."""
        n = master.numel()
        if not self.ring.shares(n):  # one chunk: made alone
            if self._own is None:
                self._own = torch.empty(self.ring.chunk, dtype=self.ring.flat.dtype)
            self.alone += n
            return torch.add(master, z[:n], alpha=scale, out=self._own[:n])

        def add(slot, a, b):
            torch.add(master[a:b], z[a:b], alpha=scale, out=slot[a:b])

        self.served += n
        return self.ring.piece(n, add)

    def close(self) -> None:
        self.ring.close()


def open_node_copies(groups: ParallelGroups, slot_elems: int, chunk: int, dtype: torch.dtype) -> CopyShare | None:
    """Join the ranks of this node that make the same perturbed copies (groups.node_copies: same
    directions and signs). Returns None when this rank makes its copies alone (PertP: one sign per rank)."""
    return join_node(groups.node_copies, groups.token, "copies",
                     lambda i, n, barrier, path, create: CopyShare(i, n, barrier, path, create, slot_elems,
                                                                   chunk, dtype))
