"""Parameter stores: where the transformer blocks' fp32 masters live between visits.

ZO2 (arXiv 2503.12668, Sec. 3.1) keeps the blocks in CPU memory and streams them through the
GPU; its disk offloading is a stub. Tiers here:
- ``host``: one flat tensor per block in CPU memory, pinned when the working device is CUDA;
  for several ranks on one node, :class:`SharedHostStore`: one copy of the node's blocks in a
  /dev/shm file that every local rank maps (two slots per block, as on disk, so a rank that
  is a step behind never reads a block a faster rank has already updated);
- ``disk``: a directory of raw per-block files plus ``manifest.json``. Each block file has two
  slots (header: magic + the step it holds, then the fp32 values). A visit reads the block's
  latest slot and writes the other; ``commit(step)`` (after the step's seed-log record is on
  disk) atomically moves the manifest to that step. After a kill at any moment the committed
  slots are intact, so reopening gives every block at one step and training continues
  bit-exactly from the seed log's pending update. A method-family run's slots hold
  [master | state...] (one unit under one header), and each commit also moves the method's per-run
  scalars into the manifest (docs/offload.md).
The store always holds fp32 masters: a lower-precision copy is made on the working device, so
no update is rounded away (the no-lost-update rule). A block's fixed spans (a peft model's frozen
base) may also be held in the compute dtype and uploaded so (:class:`FrozenBaseHostStore`; the
shared and disk stores' ``base``, offload/frozen_base.py).
"""
from __future__ import annotations

import json
import os
import struct

import torch

from distzo2_lab.config import ConfigError
from distzo2_lab.zo.perturb import subtract

MAGIC = b"DZO2SLT1"
HEADER = 4096  # one page per slot header keeps every slot's values page-aligned
FORMAT = "distzo2-disk-store"
VERSION = 2  # 2: both slots hold the start values (write-backs may leave the fixed spans out)


class HostStore:
    """Block masters in host memory (pinned for CUDA, shared memory otherwise)."""

    tier = "host"

    def __init__(self, keys: list[str], numels: list[int], pin: bool = False, dtype: torch.dtype = torch.float32):
        """dtype: the masters' (fp32, or bf16 under precision.master='bf16')."""
        self.keys, self.numels, self.dtype = list(keys), list(numels), dtype
        self.blocks = []
        for n in self.numels:
            t = torch.empty(n, dtype=dtype)
            self.blocks.append(t.pin_memory() if pin else t.share_memory_())
        self.committed = -1

    def nbytes(self, i: int) -> int:
        """Bytes one upload of block i moves."""
        return self.numels[i] * self.dtype.itemsize

    def read_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """Elements [start, start + len(dst)) of block i into dst (a slicer reads one shard)."""
        dst.copy_(self.blocks[i][start : start + dst.numel()], non_blocking=non_blocking)

    def upload_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """What a visit's upload reads: the block's values (read_into)."""
        self.read_into(i, dst, non_blocking, start)

    def write_from(self, i: int, src: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        self.blocks[i][start : start + src.numel()].copy_(src, non_blocking=non_blocking)

    def write_spans(self, i: int, buf: torch.Tensor, spans, non_blocking: bool = False) -> None:
        """The [a, b) spans of block i from `buf` (the whole block's buffer); the rest keeps its values."""
        for a, b in spans:
            self.write_from(i, buf[a:b], non_blocking, start=a)

    def commit(self, step: int, resident: dict[str, torch.Tensor] | None = None) -> None:
        self.committed = step  # host memory does not outlive the process: nothing to persist

    def close(self) -> None:
        pass


class FrozenBaseHostStore(HostStore):
    """A host store whose blocks' fixed spans (a peft model's frozen base) travel in the compute dtype.

    The frozen base is never perturbed nor updated, so a visit needs only what the forwards read of
    it: its compute-dtype values (the copies the fused pass makes of a fixed span are those values,
    cast). Each block's fixed spans are therefore also held gathered in `dtype` (bf16 / fp16), and an
    upload moves them so (2 bytes an element) beside the trainable spans in fp32, then casts them into
    the fp32 block buffer on the working device; write-backs carry the trainable spans only (the
    streamer's `fixed`). The fp32 masters stay whole here, so the block's values (`read_into`: digests,
    checkpoints) are exact. The run is bit for bit the fp32 store's: a compute-dtype value cast to
    fp32 and back is itself."""

    def __init__(self, keys: list[str], numels: list[int], fixed: dict[int, list[tuple[int, int]]],
                 dtype: torch.dtype, pin: bool = False):
        """`fixed`: {block index: [start, stop) spans} held in the compute dtype `dtype`."""
        super().__init__(keys, numels, pin)
        self.fixed = {i: sorted(fixed.get(i, ())) for i in range(len(self.numels))}
        self.moving = [complement(self.fixed[i], n) for i, n in enumerate(self.numels)]
        self.half_dtype, self._pin = dtype, pin
        self.half: list[torch.Tensor | None] = [None] * len(self.numels)
        self._stage: torch.Tensor | None = None  # the gathered spans on the working device

    def seal(self) -> None:
        """Make the compute-dtype copies of the fixed spans (after the blocks' values are in)."""
        for i, spans in self.fixed.items():
            if spans:
                h = torch.cat([self.blocks[i][a:b] for a, b in spans]).to(self.half_dtype)
                self.half[i] = h.pin_memory() if self._pin else h

    def nbytes(self, i: int) -> int:
        fixed = sum(b - a for a, b in self.fixed[i])
        return (self.numels[i] - fixed) * self.dtype.itemsize + fixed * self.half_dtype.itemsize

    def upload_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        if start != 0 or dst.numel() != self.numels[i]:
            raise ValueError("a store with a compute-dtype base uploads whole blocks (no slicer)")
        if self.half[i] is None and self.fixed[i]:
            raise RuntimeError("FrozenBaseHostStore.seal() was not called after the blocks were filled")
        for a, b in self.moving[i]:
            dst[a:b].copy_(self.blocks[i][a:b], non_blocking=non_blocking)
        if not self.fixed[i]:
            return
        n = self.half[i].numel()
        if self._stage is None or self._stage.numel() < n or self._stage.device != dst.device:
            self._stage = torch.empty(max(self.half[j].numel() for j in range(len(self.half))
                                          if self.half[j] is not None),
                                      dtype=self.half_dtype, device=dst.device)
        stage = self._stage[:n]
        stage.copy_(self.half[i], non_blocking=non_blocking)  # the link carries the compute dtype
        off = 0
        for a, b in self.fixed[i]:  # cast into the block buffer where it is used
            dst[a:b].copy_(stage[off : off + b - a])
            off += b - a


def complement(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """[0, n) without the sorted, disjoint `spans` (a block's moving spans from its fixed ones)."""
    return subtract((0, n), spans)


class SharedHostStore:
    """Block masters of every rank of a node in one shared-memory file (one copy per node).

    Sliced ranks (slots=1) each read and write only their own shard: one copy, no rank ever
    touches another's elements. Ranks that move whole blocks (slots=2) read the slot holding a
    block's latest values and write the other, which then is the latest: every rank keeps this
    map for itself, and all ranks visit the blocks in the same order, step by step (the loss
    exchange ends every step, a barrier every flush: ZO2Engine.flush), so a slow rank still
    reads the block of its own step or flush while a fast one writes the next (with one slot it
    would apply an update twice); the ranks write identical bytes, their arithmetic being the same.
    The file is unlinked once every rank has mapped it, so nothing is left in /dev/shm whatever
    happens to the ranks."""

    tier = "host"

    def __init__(self, path: str, keys: list[str], numels: list[int], create: bool, pin: bool = False,
                 slots: int = 2, dtype: torch.dtype = torch.float32):
        if slots not in (1, 2):
            raise ValueError(f"slots={slots} is not valid; choose 1 (sliced ranks) or 2 (whole blocks)")
        self.keys, self.numels, self.slots, self.dtype = list(keys), list(numels), slots, dtype
        self.offsets, total = [], 0
        for n in self.numels:
            self.offsets.append(total)
            total += slots * n
        if create:
            with open(path, "wb") as f:
                f.truncate(total * dtype.itemsize)
        self.path, self.nbytes_total = path, total * dtype.itemsize
        self.flat = torch.from_file(path, shared=True, size=total, dtype=dtype)
        if pin:  # page-locked for async CUDA copies, in place (cudaHostRegister)
            torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), self.nbytes_total, 0)
        self.pinned = pin
        self._latest = [0] * len(self.numels)
        self.committed = -1
        self.base = None  # frozen_base.SharedBase: the fixed spans in the compute dtype

    def slot(self, i: int, which: int) -> torch.Tensor:
        n = self.numels[i]
        return self.flat[self.offsets[i] + which * n : self.offsets[i] + (which + 1) * n]

    def fill(self, i: int, values: torch.Tensor) -> None:
        """The start values of block i (written once, by the node's first rank) into every slot: a
        span no visit changes is then current in each."""
        for which in range(self.slots):
            self.slot(i, which).copy_(values)
        if self.base is not None:
            self.base.fill(i, values)

    def nbytes(self, i: int) -> int:
        return self.numels[i] * self.dtype.itemsize if self.base is None else self.base.nbytes(i)

    def read_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        dst.copy_(self.slot(i, self._latest[i])[start : start + dst.numel()], non_blocking=non_blocking)

    def upload_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """What a visit's upload reads: the block's values, its fixed spans from `base` when held."""
        (self.read_into if self.base is None else self.base.upload)(i, dst, non_blocking, start)

    def write_from(self, i: int, src: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        nxt = (self._latest[i] + 1) % self.slots
        self.slot(i, nxt)[start : start + src.numel()].copy_(src, non_blocking=non_blocking)
        self._latest[i] = nxt

    def write_spans(self, i: int, buf: torch.Tensor, spans, non_blocking: bool = False) -> None:
        """The [a, b) spans of block i from `buf` into the next slot, which becomes the latest; the
        rest of that slot holds the start values (fill writes every slot), as a span left out never
        changes."""
        nxt = (self._latest[i] + 1) % self.slots
        for a, b in spans:
            self.slot(i, nxt)[a:b].copy_(buf[a:b], non_blocking=non_blocking)
        self._latest[i] = nxt

    def commit(self, step: int, resident: dict[str, torch.Tensor] | None = None) -> None:
        self.committed = step

    def unlink(self) -> None:
        """Remove the file's name (the mappings stay valid until every rank closes)."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self.base is not None:
            self.base.unlink()

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned = False
        self.flat = None
        if self.base is not None:
            self.base.close()


class DiskStore:
    """Per-bucket two-slot files + manifest; crash-safe at step granularity.

    I/O is positional reads and writes into caller buffers (``os.preadv`` / ``os.pwritev``, which
    release the GIL), not memory maps: mapped pages would count towards the process's resident
    memory, and the point of this tier is that the model does not."""

    tier = "disk"
    dtype = torch.float32  # the slots hold fp32 masters

    def __init__(self, path: str):
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            raise ConfigError(f"store={path!r} has no manifest.json (not a distzo2 disk store)")
        with open(manifest) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"store={path!r}: manifest format {self.manifest.get('format')!r} is not {FORMAT!r}")
        self.path = path
        self.committed: int = self.manifest["committed"]
        # a committed flush (commit(flushed=True)): the committed slots hold the step's update applied
        self.flushed: bool = self.manifest.get("flushed", False)
        self.slot = self.manifest.get("slot", self.committed % 2)  # the committed slot of every bucket
        entries = self.manifest["blocks"] + self.manifest["resident"]
        self.keys = [e["key"] for e in self.manifest["blocks"]]
        self.numels = [e["numel"] for e in self.manifest["blocks"]]
        self._fds = {e["key"]: os.open(os.path.join(path, e["file"]), os.O_RDWR) for e in entries}
        self._numel = {e["key"]: e["numel"] for e in entries}
        self.bytes_read = self.bytes_written = 0
        self.base = None  # frozen_base.DiskBase: the fixed spans in the compute dtype
        # The slot each bucket's latest values are in; the committed one on open.
        self._latest = {k: self.slot for k in self._fds}
        for k in self._fds:
            held = self.slot_step(k, self._latest[k])
            if held != self.committed + self.flushed:  # a flush writes with the next step's header
                raise ConfigError(f"store={path!r}: bucket {k} slot holds step {held}, manifest says "
                                  f"{self.committed}{' (flushed)' if self.flushed else ''}; the store is damaged")

    # -- layout ----------------------------------------------------------------------------
    @staticmethod
    def slot_bytes(numel: int) -> int:
        return HEADER + -(-numel * 4 // HEADER) * HEADER

    def _offset(self, key: str, slot: int) -> int:
        return slot * self.slot_bytes(self._numel[key])

    def slot_step(self, key: str, slot: int) -> int | None:
        head = os.pread(self._fds[key], 16, self._offset(key, slot))
        return struct.unpack("<q", head[8:])[0] if head[:8] == MAGIC else None

    def _read(self, key: str, slot: int, dst: torch.Tensor, start: int = 0) -> None:
        _pread_full(self._fds[key], _bytes_view(dst), self._offset(key, slot) + HEADER + 4 * start)
        self.bytes_read += dst.numel() * 4

    def _write(self, key: str, src: torch.Tensor, step: int, start: int = 0) -> None:
        src = src if src.device.type == "cpu" else src.cpu()  # device buffers go through the host
        slot = 1 - self.slot  # never the committed slot
        fd, off = self._fds[key], self._offset(key, slot)
        _pwrite_full(fd, _bytes_view(src), off + HEADER + 4 * start)
        os.pwrite(fd, MAGIC + struct.pack("<q", step), off)  # the header last: the slot is whole
        self.bytes_written += src.numel() * 4
        self._latest[key] = slot

    # -- the store interface ---------------------------------------------------------------
    def nbytes(self, i: int) -> int:
        return self.numels[i] * 4 if self.base is None else self.base.nbytes(i)

    def read_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """Elements [start, start + len(dst)) of block i (a sliced rank reads its shard)."""
        key = self.keys[i]
        if start < 0 or start + dst.numel() > self._numel[key]:
            raise ValueError(f"read of [{start}, {start + dst.numel()}) is outside bucket {key} "
                             f"({self._numel[key]} elements)")
        self._read(key, self._latest[key], dst, start)

    def upload_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """What a visit's upload reads: the block's values, its fixed spans from `base` when held."""
        (self.read_into if self.base is None else self.base.upload)(i, dst, non_blocking, start)

    def write_from(self, i: int, src: torch.Tensor, non_blocking: bool = False, start: int = 0) -> None:
        """Block i's new values (or a sliced rank's shard of them) into the non-committed slot."""
        key = self.keys[i]
        if start < 0 or start + src.numel() > self._numel[key]:
            raise ValueError(f"write of [{start}, {start + src.numel()}) is outside bucket {key} "
                             f"({self._numel[key]} elements)")
        self._write(key, src, self.committed + 1, start)

    def write_spans(self, i: int, buf: torch.Tensor, spans, non_blocking: bool = False) -> None:
        """The [a, b) spans of block i from `buf` into the non-committed slot; the rest of that slot
        holds the start values (create writes both slots), as a span left out never changes. No
        spans: the slot is only marked with this step."""
        for a, b in spans or [(0, 0)]:
            self.write_from(i, buf[a:b], non_blocking, start=a)

    def write_resident(self, key: str, src: torch.Tensor) -> None:
        """Write a resident bucket's new state (the non-committed slot, like a block visit)."""
        self._write(key, src, self.committed + 1)

    def stash(self, name: str, src: torch.Tensor) -> None:
        """Park a temporary tensor in scratch file `name` (no crash-safety: within a step only)."""
        src = src if src.device.type == "cpu" else src.cpu()
        path = os.path.join(self.path, f"scratch-{name}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _pwrite_full(fd, _bytes_view(src), 0)
        finally:
            os.close(fd)
        self.bytes_written += src.numel() * src.element_size()

    def unstash(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(numel, dtype=dtype)
        fd = os.open(os.path.join(self.path, f"scratch-{name}.bin"), os.O_RDONLY)
        try:
            _pread_full(fd, _bytes_view(out), 0)
        finally:
            os.close(fd)
        self.bytes_read += out.numel() * out.element_size()
        return out

    def read_resident(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A resident bucket's latest values, into `out` when given (no temporary)."""
        out = torch.empty(self._numel[key], dtype=torch.float32) if out is None else out
        self._read(key, self._latest[key], out)
        return out

    def commit(self, step: int, resident: dict[str, torch.Tensor] | None = None, leader: bool = True,
               run_state: dict | None = None, flushed: bool = False) -> None:
        """Persist the resident buckets for `step`, then move the manifest to it (atomic rename).

        Several ranks sharing the store all call it once every rank's writes of the step have
        landed (a barrier); only the leader writes the resident buckets and the manifest.
        `run_state`: the method family's per-run scalars at `step` (JSON), committed in the manifest
        with it (manifest["run_state"]). `flushed=True` commits a flush of the committed step: the
        written slots hold its update applied (nothing is owed on reopening), and the next step
        writes the other slots."""
        if step != self.committed + (not flushed):
            raise RuntimeError(f"commit({step}{', flushed' if flushed else ''}) after step {self.committed}: "
                               "steps commit in order")
        new = 1 - self.slot
        if not leader:
            for k in self._fds:  # the leader writes the resident buckets' slots
                self._latest[k] = new
            self.committed, self.slot, self.flushed = step, new, flushed
            return
        for key, t in (resident or {}).items():
            self._write(key, t, self.committed + 1)
        missing = [k for k in self._fds if self._latest[k] != new]
        if missing:
            raise RuntimeError(f"commit({step}): buckets {missing[:3]} were not written this step")
        self.manifest.update(committed=step, slot=new, flushed=flushed)
        if run_state is not None:
            self.manifest["run_state"] = run_state
        _write_json_atomic(os.path.join(self.path, "manifest.json"), self.manifest)
        self.committed, self.slot, self.flushed = step, new, flushed

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self.base is not None:
            self.base.close()

    # -- creation ----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, blocks: list[tuple[str, int]], resident: list[tuple[str, int]], base: dict,
               values, method: dict | None = None) -> DiskStore:
        """Write a new store one bucket at a time: `values(key)` gives a flat fp32 CPU tensor.

        Nothing but the bucket at hand is needed, so a model larger than RAM can be written.
        `method`: the update rule the slots are laid out for (manifest["method"]; None: ZO-SGD's)."""
        if os.path.exists(os.path.join(path, "manifest.json")):
            raise ConfigError(f"store={path!r} already exists; open it or choose another directory")
        os.makedirs(path, exist_ok=True)
        entries = {"blocks": [], "resident": []}
        for kind, items in (("blocks", blocks), ("resident", resident)):
            for key, numel in items:
                name = f"{key}.bin"
                fd = os.open(os.path.join(path, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, 2 * cls.slot_bytes(numel))
                flat = values(key)
                if flat.numel() != numel:
                    raise ValueError(f"values({key!r}) gave {flat.numel()} elements, the layout says {numel}")
                sb = cls.slot_bytes(numel)  # the start state sits in slot 1, the slot of step -1, and in
                for slot in (0, 1):  # slot 0, so that a span no step changes is current in both
                    _pwrite_full(fd, _bytes_view(flat), slot * sb + HEADER)
                del flat  # values() may free its buffer before the next bucket
                os.pwrite(fd, MAGIC + struct.pack("<q", -1), sb)
                os.close(fd)
                entries[kind].append({"key": key, "numel": numel, "file": name})
        manifest = {"format": FORMAT, "version": VERSION, "base": base, "dtype": "float32", "committed": -1, **entries}
        if method is not None:
            manifest["method"] = method
        _write_json_atomic(os.path.join(path, "manifest.json"), manifest)
        return cls(path)


def _bytes_view(t: torch.Tensor) -> memoryview:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("disk I/O needs a contiguous CPU tensor")
    if t.dtype != torch.float32:  # numpy has no bfloat16: view the raw bytes
        t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"short read at offset {offset}")
        view, offset = view[n:], offset + n


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwritev(fd, [view], offset)
        view, offset = view[n:], offset + n


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
