"""z drawn once per node: the ranks of a node that draw the same noise share the drawing.

Every rank of a PertP, DDP or 2D layout (DistZO2, arXiv 2507.03211, Sec. 3) draws the same z for
every bucket at every step, and on a CPU that draw costs about as much as a large part of the
forward. The G ranks of a node that make the same draws cut each draw into pieces; a member
claims the next unclaimed chunk (config.share_grain() elements) of a piece, draws it into a shared-memory slot and
marks it done, so each chunk is drawn exactly once, by whichever rank is free, and a rank that
arrives late finds its z ready. Claims live in a small control file guarded by ``flock``; no
collective is called. A one-chunk piece has nothing to split: every member draws it alone
(`alone`), and a run whose widest block fits one chunk opens no share at all.

The values are the perturber's own (a pure function of seed, bucket and element index), so a run is
bit-identical with or without sharing. `slots` pieces are in flight at once (a ring), so a rank
runs at most slots - 1 pieces ahead of the slowest; every member must make the same sequence of
shared draws.
"""
from __future__ import annotations

import fcntl
import os
import time
from typing import Callable

import torch

from distzo2_lab.config import share_grain
from distzo2_lab.parallel.groups import NodeGroup, ParallelGroups
from distzo2_lab.zo.perturb import Perturber

FREE, CLAIMED, DONE = 0, 1, 2


def split_run(chunks: int, index: int, size: int) -> tuple[int, int]:
    """[lo, hi) of `chunks` chunks that member `index` of `size` draws (contiguous, balanced)."""
    base, extra = divmod(chunks, size)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


class SharedPieces:
    """The ring of shared slots and the chunk claims behind :class:`NoiseShare` and copy_share.CopyShare.

    The `size` members (this one is `index`) ask for the same sequence of pieces; a piece of at
    most `slot_elems` elements is cut into chunks of `chunk` elements, and :meth:`piece` has this
    member compute (with `compute(slot, a, b)`, elements [a, b) of the piece) every chunk it can
    claim, then wait for the rest. `barrier()` is used only while the members open the shared
    files; `timeout` (seconds) bounds every wait for another member (a member that died or hangs
    raises instead of blocking).

    `lanes`: arrays of slot_elems a slot holds (a piece's chunk [a, b) is written in every lane,
    e.g. the +eps and -eps copies of one block: the slot is then a (lanes, length) view, one
    contiguous row per lane). lanes=0 holds no data at all, only the claims: the work lands
    elsewhere (in place in a shared master) and `compute` receives None."""

    def __init__(self, index: int, size: int, barrier: Callable[[], None], path: str, create: bool,
                 slot_elems: int, chunk: int, dtype: torch.dtype = torch.float32, slots: int = 3,
                 timeout: float = 600.0, lanes: int = 1):
        if not 0 <= index < size:
            raise ValueError(f"index={index} is not in [0, {size})")
        if slots < 2:
            raise ValueError(f"slots={slots} is not valid: a member reads one slot while the next is drawn (>= 2)")
        self.index, self.size, self.slots, self.chunk, self.timeout = index, size, slots, chunk, timeout
        self.slot_chunks = max(1, -(-slot_elems // chunk))
        self.slot_elems = self.slot_chunks * chunk  # whole chunks
        self.lanes = lanes
        ctl_len = size + slots + slots * self.slot_chunks  # progress | slot piece | chunk states
        ctl_path = path + ".ctl"
        if create:
            if lanes:
                with open(path, "wb") as f:
                    f.truncate(slots * lanes * self.slot_elems * torch.empty(0, dtype=dtype).element_size())
            with open(ctl_path, "wb") as f:
                f.truncate(ctl_len * 8)
        barrier()  # the files exist
        self.flat = (torch.from_file(path, shared=True, size=slots * lanes * self.slot_elems, dtype=dtype)
                     if lanes else None)
        ctl = torch.from_file(ctl_path, shared=True, size=ctl_len, dtype=torch.int64)
        self._fd = os.open(ctl_path, os.O_RDWR)
        barrier()  # every member has mapped and opened them: their names can go
        if create:
            for p in (path, ctl_path):
                if os.path.exists(p):
                    os.unlink(p)
        # progress[m]: the piece member m last asked for (it may still read it); -1 before any
        self.progress = ctl[:size]
        self.slot_piece = ctl[size : size + slots]  # the piece each slot holds; -1 when never used
        self.state = ctl[size + slots :].view(slots, self.slot_chunks)  # FREE / CLAIMED / DONE per chunk
        if create:
            with self._locked():
                self.progress.fill_(-1)
                self.slot_piece.fill_(-1)
        barrier()  # initialised before anyone computes
        self.pieces = 0
        self.computed = 0  # elements this member computed (the work it did)
        self.waited_s = 0.0  # seconds spent waiting for other members (a slot to free, chunks in progress)

    class _Lock:
        def __init__(self, fd: int):
            self.fd = fd

        def __enter__(self):
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def __exit__(self, *exc):
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _locked(self) -> SharedPieces._Lock:
        return SharedPieces._Lock(self._fd)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Poll `ready()` (called under the lock) until true; yield the core in between."""
        t0 = time.perf_counter()
        polls = 0
        while True:
            with self._locked():
                if ready():
                    break
            polls += 1
            if polls < 64:
                os.sched_yield()
            else:
                time.sleep(1e-4)
            if time.perf_counter() - t0 > self.timeout:
                raise RuntimeError(f"node share: member {self.index} of {self.size} waited {self.timeout:.0f} s "
                                   f"for {what} (piece {self.pieces - 1}): another rank died or hangs")
        self.waited_s += time.perf_counter() - t0

    def shares(self, length: int) -> bool:
        """Whether a piece of `length` elements goes through the ring: only when it has more than
        one chunk (one chunk has nothing to split; every member computes it alone). The same
        answer on every member, so their sequences of ring pieces stay equal."""
        return length > self.chunk

    def piece(self, length: int, compute: Callable[[torch.Tensor | None, int, int], None]) -> torch.Tensor | None:
        """The next piece (`length` <= slot_elems elements), complete in its slot (None with lanes=0);
        valid until this member asks for its next piece."""
        if length > self.slot_elems:
            raise ValueError(f"a piece of {length} elements does not fit a slot of {self.slot_elems}")
        chunk = self.chunk
        piece, s = self.pieces, self.pieces % self.slots
        self.pieces += 1
        chunks = -(-length // chunk)
        state = self.state[s, :chunks]
        with self._locked():
            self.progress[self.index] = piece  # done with every earlier piece

        def slot_ready() -> bool:
            held = int(self.slot_piece[s])
            if held == piece:
                return True
            if held < 0 or int(self.progress.min()) > held:  # every member moved past the slot's piece
                self.slot_piece[s] = piece
                state.fill_(FREE)
                return True
            return False

        if int(self.slot_piece[s]) != piece:
            self._wait(slot_ready, "a free shared slot")
        slot = self._slot(s, length)
        # claim chunks starting at this member's own run (rotating with the piece count, so a
        # piece's extra chunk goes to every member in turn), then wrap around
        lo, _ = split_run(chunks, (self.index + piece) % self.size, self.size)
        for c in [(lo + i) % chunks for i in range(chunks)]:
            with self._locked():
                if int(state[c]) != FREE:
                    continue
                state[c] = CLAIMED
            a, b = c * chunk, min(length, (c + 1) * chunk)
            compute(slot, a, b)
            with self._locked():
                state[c] = DONE
            self.computed += b - a
        if bool((state != DONE).any()):
            self._wait(lambda: bool((state == DONE).all()), "chunks other ranks are computing")
        return slot

    def _slot(self, s: int, length: int) -> torch.Tensor | None:
        if not self.lanes:
            return None
        if self.lanes == 1:
            return self.flat[s * self.slot_elems :][:length]
        whole = self.slot_elems * self.lanes
        return self.flat[s * whole : (s + 1) * whole].view(self.lanes, self.slot_elems)[:, :length]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NoiseShare:
    """Shared draws for the `size` ranks of one node that draw the same z; this rank is `index`
    (:class:`SharedPieces` with chunks of `grain` elements, default config.share_grain())."""

    def __init__(self, perturber: Perturber, index: int, size: int, barrier: Callable[[], None], path: str,
                 create: bool, slot_elems: int, slots: int = 3, timeout: float = 600.0, grain: int | None = None):
        self.perturber, self.index, self.size = perturber, index, size
        self.ring = SharedPieces(index, size, barrier, path, create, slot_elems, grain or share_grain(),
                                 slots=slots, timeout=timeout)
        self.slot_elems = self.ring.slot_elems
        self.served = 0  # elements of z it received through the ring (what it would have drawn alone)
        self.copied = 0  # elements copied out of the slots (views of a slot copy nothing)
        self.alone = 0  # elements of one-chunk pieces this rank drew itself (nothing to split)

    @property
    def drawn(self) -> int:
        """Elements this rank generated (the work it did)."""
        return self.ring.computed

    computed = drawn

    @property
    def waited_s(self) -> float:
        return self.ring.waited_s

    def _piece(self, p0: int, p1: int, seed: int, key: str) -> torch.Tensor:
        """Elements [p0, p1) of z(seed, key), complete in its slot."""
        def draw(slot, a, b):
            self.perturber.fill(slot[a:b], seed, key, start=p0 + a)

        return self.ring.piece(p1 - p0, draw)

    def fill(self, out: torch.Tensor, seed: int, key: str) -> torch.Tensor:
        """Write the whole z(seed, key) of a bucket of out.numel() elements into the flat `out`."""
        if out.dim() != 1 or not out.is_contiguous():
            raise ValueError("NoiseShare.fill needs a flat contiguous buffer")
        n = out.numel()
        for p0 in range(0, n, self.slot_elems):
            p1 = min(n, p0 + self.slot_elems)
            if not self.ring.shares(p1 - p0):  # one chunk: drawn alone
                self.perturber.fill(out[p0:p1], seed, key, start=p0)
                self.alone += p1 - p0
                continue
            out[p0:p1].copy_(self._piece(p0, p1, seed, key))
            self.served += p1 - p0
            self.copied += p1 - p0
        return out

    def view(self, out: torch.Tensor, seed: int, key: str) -> torch.Tensor:
        """z(seed, key) of a bucket of out.numel() elements without the copy out when it fits one slot:
        the returned tensor is the slot itself, valid until this rank's next draw (no member rewrites
        the slot before this rank has asked for a later piece). A bucket larger than a slot is
        written into `out` as by :meth:`fill`."""
        n = out.numel()
        if n > self.slot_elems or not self.ring.shares(n):
            return self.fill(out, seed, key)
        self.served += n
        return self._piece(0, n, seed, key)

    def close(self) -> None:
        self.ring.close()


def join_node(node: NodeGroup | None, token: str, kind: str, make: Callable) -> object | None:
    """This rank's member of a node group's shared files: make(index, size, barrier, path, create)
    (the group's first rank creates them). None when the rank is alone (no node group). Every
    member of the group must call it, in the same order as its other joins."""
    from distzo2_lab.offload.tiers import SHM_DIR

    if node is None:
        return None
    path = os.path.join(SHM_DIR, f"distzo2-{kind}-{token}-{node.ranks[0]}.bin")
    return make(node.index, node.size, node.barrier, path, node.index == 0)


def open_node_noise(perturber: Perturber, groups: ParallelGroups, slot_elems: int) -> NoiseShare | None:
    """Join the ranks of this node that draw the same directions (groups.node_noise). Returns None
    when this rank draws alone."""
    return join_node(groups.node_noise, groups.token, "noise",
                     lambda i, n, barrier, path, create: NoiseShare(perturber, i, n, barrier, path, create,
                                                                    slot_elems))
