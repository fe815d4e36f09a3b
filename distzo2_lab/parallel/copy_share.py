"""Perturbed block copies made once per node (zo.perturb copy): the ranks of one machine that
run the same signs and directions on identical weights (DDP ranks; the ranks of one sign in 2D)
make the same copies theta +- eps z in the same order, so each copy is a shared piece of
node_share.SharedPieces whose chunks go to whichever member claims them.
"""
from __future__ import annotations

from typing import Callable

import torch

from distzo2_lab.config import share_grain
from distzo2_lab.parallel.groups import ParallelGroups
from distzo2_lab.parallel.node_share import SharedPieces, join_node


class CopyShare:
    """Perturbed copies theta +- eps z of the visited block made once per node (zo.perturb copy):
    ranks that run the same signs and directions on identical weights (DDP ranks; the ranks of one
    sign in 2D) make the same copies in the same order, so each copy is a shared piece whose chunks
    go to whichever member claims them (:class:`SharedPieces`), and every member's forward reads
    the shared slot. Bit-identical to each rank making its own copy: the copy is elementwise."""

    def __init__(self, index: int, size: int, barrier: Callable[[], None], path: str, create: bool,
                 slot_elems: int, dtype: torch.dtype = torch.float32, slots: int = 3, timeout: float = 600.0,
                 grain: int | None = None):
        """`grain`: elements a member claims at once (default config.share_grain())."""
        self.index, self.size = index, size
        self.ring = SharedPieces(index, size, barrier, path, create, slot_elems, grain or share_grain(), dtype,
                                 slots, timeout)
        self.served = 0  # elements of copies it received through the ring (what it would have computed alone)
        self.alone = 0  # elements of one-chunk copies this rank made itself (nothing to split)
        self._own: torch.Tensor | None = None  # where those go (allocated on first use)

    @property
    def computed(self) -> int:
        return self.ring.computed

    def piece(self, n: int, fill: Callable[[torch.Tensor, int, int], None]) -> torch.Tensor:
        """One block copy of n elements (at most one slot): `fill(out, a, b)` writes its elements
        [a, b) into out[a:b]. Returns the shared slot, valid until this rank's next copy; a copy of
        one chunk is made alone in this rank's own buffer."""
        if not self.ring.shares(n):  # one chunk: made alone
            if self._own is None or self._own.numel() < n:
                self._own = torch.empty(max(n, self.ring.chunk), dtype=self.ring.flat.dtype)
            self.alone += n
            fill(self._own, 0, n)
            return self._own[:n]
        self.served += n
        return self.ring.piece(n, fill)

    def close(self) -> None:
        self.ring.close()


def open_node_copies(groups: ParallelGroups, slot_elems: int, dtype: torch.dtype) -> CopyShare | None:
    """Join the ranks of this node that make the same perturbed copies (groups.node_copies: same
    directions and signs). Returns None when this rank makes its copies alone (PertP: one sign per rank)."""
    return join_node(groups.node_copies, groups.token, "copies",
                     lambda i, n, barrier, path, create: CopyShare(i, n, barrier, path, create, slot_elems,
                                                                   dtype))
