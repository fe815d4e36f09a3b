"""The frozen base in the compute dtype, for the disk store and the node's shared host store.

A block's fixed spans (a peft model's frozen base, zo.freeze) are never perturbed nor updated,
and a copies run's forwards read them as compute-dtype copies (bf16 / fp16). So their fp32
masters need not travel: these stores also hold the fixed spans gathered in the compute dtype,
written once, and a visit reads those (2 bytes an element) beside the moving spans' fp32 masters,
then casts them into the block's fp32 working buffer where it lives. The fp32 masters stay whole
in the store, for digests, checkpoints and `--save`. A compute-dtype value cast to fp32 and back
is itself, so the run is the fp32 store's bit for bit (store.FrozenBaseHostStore does the same
for a one-rank host store).
- :class:`DiskBase`: one file beside a disk store's slots, recorded in its manifest;
- :class:`SharedBase`: a second /dev/shm file that every rank of the node maps.
"""
from __future__ import annotations

import os

import torch

from distzo2_lab.offload.store import _bytes_view, _pread_full, _pwrite_full, _write_json_atomic, complement
from distzo2_lab.zo.perturb import subtract

FILE = "frozen-base.bin"
RECORD = "frozen_base"  # the manifest's entry: {"dtype", "file", "spans": {block key: [[start, stop], ...]}}


class Gathered:
    """Where each block's fixed spans sit once gathered (element offsets), and its moving spans."""

    def __init__(self, numels: list[int], fixed: dict[int, list[tuple[int, int]]], dtype: torch.dtype):
        self.numels, self.dtype = list(numels), dtype
        self.fixed = [sorted(tuple(s) for s in fixed.get(i, ())) for i in range(len(numels))]
        self.moving = [complement(f, n) for f, n in zip(self.fixed, numels)]
        self.sizes = [sum(b - a for a, b in f) for f in self.fixed]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(numels))]
        self.total = sum(self.sizes)
        self._stage: torch.Tensor | None = None  # the gathered spans on the working device

    def nbytes(self, i: int) -> int:
        """Bytes one upload of block i moves: its moving spans in fp32, its fixed spans in `dtype`."""
        return (self.numels[i] - self.sizes[i]) * 4 + self.sizes[i] * self.dtype.itemsize

    def check(self, i: int, dst: torch.Tensor, start: int) -> None:
        if start != 0 or dst.numel() != self.numels[i]:
            raise ValueError("a store with a compute-dtype base uploads whole blocks (no slicer)")

    def cast_into(self, i: int, dst: torch.Tensor, gathered: torch.Tensor, non_blocking: bool = False) -> None:
        """Block i's gathered fixed spans (host, `dtype`) into the fp32 buffer `dst`: across the link
        in `dtype`, then cast where `dst` is."""
        src = gathered
        if gathered.device != dst.device:
            if self._stage is None or self._stage.device != dst.device:
                self._stage = torch.empty(max(self.sizes), dtype=self.dtype, device=dst.device)
            src = self._stage[: gathered.numel()]
            src.copy_(gathered, non_blocking=non_blocking)  # the link carries the compute dtype
        off = 0
        for a, b in self.fixed[i]:
            dst[a:b].copy_(src[off : off + b - a])
            off += b - a


class DiskBase(Gathered):
    """A disk store's fixed spans in the compute dtype: one file, every block's spans end to end.

    The file never changes once written, so it needs no slots: the manifest records it (dtype and
    spans) only after it is whole, and a reopened store finds it there. It is valid while no run
    changes its spans; :func:`open_disk_base` drops the record before a run that may, and rebuilds
    the file from the committed slots for a run that reads another dtype or other spans (a store
    an fp32 run made has none)."""

    def __init__(self, store, fixed: dict[int, list[tuple[int, int]]], dtype: torch.dtype):
        super().__init__(store.numels, fixed, dtype)
        self.store = store
        self.fd: int | None = None  # the file, once whole (open_disk_base)
        self._host: dict[tuple[torch.dtype, bool], torch.Tensor] = {}  # reused read buffers

    def record(self) -> dict:
        """What the manifest says of the file this run reads."""
        return {"dtype": str(self.dtype).removeprefix("torch."), "file": FILE,
                "spans": {k: [list(s) for s in f] for k, f in zip(self.store.keys, self.fixed) if f}}

    def build(self) -> None:
        """Write the file from the store's latest slots (the spans are fixed: the start values),
        then name it in the manifest, so a kill in between leaves a file no manifest names."""
        fd = os.open(os.path.join(self.store.path, FILE), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i, spans in enumerate(self.fixed):
                if not spans:
                    continue
                gathered = torch.empty(self.sizes[i])
                off = 0
                for a, b in spans:
                    self.store.read_into(i, gathered[off : off + b - a], start=a)
                    off += b - a
                half = gathered.to(self.dtype)
                _pwrite_full(fd, _bytes_view(half), self.offsets[i] * self.dtype.itemsize)
                self.store.bytes_written += half.numel() * self.dtype.itemsize
        finally:
            os.close(fd)
        self.store.manifest[RECORD] = self.record()
        _write_json_atomic(os.path.join(self.store.path, "manifest.json"), self.store.manifest)

    def _buffer(self, numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        if (dtype, pin) not in self._host:
            held = torch.empty(max(self.numels) if dtype == torch.float32 else max(self.sizes), dtype=dtype)
            self._host[dtype, pin] = held.pin_memory() if pin else held
        return self._host[dtype, pin][:numel]

    def upload(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """Block i into `dst` (CPU or the working device): moving spans from the latest slot in fp32,
        fixed spans from the file in the compute dtype (through pinned host buffers for CUDA)."""
        self.check(i, dst, start)
        cuda = dst.device.type == "cuda"
        host = self._buffer(dst.numel(), torch.float32, True) if cuda else dst
        for a, b in self.moving[i]:
            self.store.read_into(i, host[a:b], start=a)
            if cuda:
                dst[a:b].copy_(host[a:b], non_blocking=non_blocking)
        if not self.sizes[i]:
            return
        gathered = self._buffer(self.sizes[i], self.dtype, cuda)
        _pread_full(self.fd, _bytes_view(gathered), self.offsets[i] * self.dtype.itemsize)
        self.store.bytes_read += self.sizes[i] * self.dtype.itemsize
        self.cast_into(i, dst, gathered, non_blocking)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_disk_base(store, fixed: dict[int, list[tuple[int, int]]], dtype: torch.dtype | None,
                   leader: bool = True) -> DiskBase | None:
    """The compute-dtype base a run reads from disk store `store` (None: the run reads fp32 blocks).

    `fixed`: the spans this run holds fixed, by block index; `dtype`: what its forwards read them
    in (None for an fp32 or in-place run). A recorded file whose spans the run may change is
    dropped first, as it would go stale; one the run reads is rebuilt when its dtype or spans
    differ. Only the node's leader writes; the other ranks open what it left."""
    held = store.manifest.get(RECORD)
    stale = held is not None and any(subtract(tuple(s), fixed.get(i, [])) for i, k in enumerate(store.keys)
                                     for s in held["spans"].get(k, ()))
    if stale and leader:
        del store.manifest[RECORD]
        _write_json_atomic(os.path.join(store.path, "manifest.json"), store.manifest)
    if dtype is None or not any(fixed.values()):
        return None
    base = DiskBase(store, fixed, dtype)
    if store.manifest.get(RECORD) != base.record():
        if not leader:
            raise RuntimeError(f"offload.store={store.path!r}: the node's leader left no {FILE} for this run")
        if store.manifest.pop(RECORD, None) is not None:  # not named while it is rewritten
            _write_json_atomic(os.path.join(store.path, "manifest.json"), store.manifest)
        base.build()
    base.fd = os.open(os.path.join(store.path, FILE), os.O_RDONLY)
    return base


class SharedBase(Gathered):
    """The node's fixed spans in the compute dtype: a /dev/shm file beside the shared store's,
    filled once by the leader, mapped by every rank, never written again (so one copy, no slots)."""

    def __init__(self, path: str, store, fixed: dict[int, list[tuple[int, int]]], dtype: torch.dtype,
                 create: bool, pin: bool = False):
        super().__init__(store.numels, fixed, dtype)
        self.store, self.path = store, path
        size = max(self.total, 1)
        if create:
            with open(path, "wb") as f:
                f.truncate(size * dtype.itemsize)
        self.nbytes_total = size * dtype.itemsize
        self.flat = torch.from_file(path, shared=True, size=size, dtype=dtype)
        if pin:  # page-locked for async CUDA copies, in place
            torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), self.nbytes_total, 0)
        self.pinned = pin

    def _gathered(self, i: int) -> torch.Tensor:
        return self.flat[self.offsets[i] : self.offsets[i] + self.sizes[i]]

    def fill(self, i: int, values: torch.Tensor) -> None:
        """Block i's start values: its fixed spans, gathered and cast (the leader, once)."""
        if self.sizes[i]:
            self._gathered(i).copy_(torch.cat([values[a:b] for a, b in self.fixed[i]]))

    def upload(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """Block i into `dst`: moving spans from the store's latest slot in fp32, fixed spans from
        the shared file in the compute dtype."""
        self.check(i, dst, start)
        for a, b in self.moving[i]:
            self.store.read_into(i, dst[a:b], non_blocking, start=a)
        if self.sizes[i]:
            self.cast_into(i, dst, self._gathered(i), non_blocking)

    def unlink(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned = False
        self.flat = None
