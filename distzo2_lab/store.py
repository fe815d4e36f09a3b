"""Parameter stores: where the transformer blocks' fp32 masters live between visits.

ZO2 (arXiv 2503.12668, Sec. 3.1) keeps the blocks in CPU memory and streams them through the
GPU; its disk offloading is a stub. Tiers here:
- ``host``: one flat tensor per block in CPU memory, pinned when the working device is CUDA,
  else in shared memory (so several local ranks can later map one copy);
- ``disk``: a directory of raw per-block files plus ``manifest.json``. Each block file has two
  slots (header: magic + the step it holds, then the fp32 values). A visit reads the block's
  latest slot and writes the other; ``commit(step)`` (after the step's seed-log record is on
  disk) atomically moves the manifest to that step. After a kill at any moment the committed
  slots are intact, so reopening gives every block at one step and training continues
  bit-exactly from the seed log's pending update.
The store always holds fp32 masters: a lower-precision copy is made on the working device, so
no update is rounded away (the no-lost-update rule).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch

from .config import ConfigError

TIERS = ("resident", "host", "disk")
MAGIC = b"DZO2SLT1"
HEADER = 4096  # one page per slot header keeps every slot's values page-aligned
FORMAT = "distzo2-disk-store"


class HostStore:
    """Block masters in host memory (pinned for CUDA, shared memory otherwise)."""

    tier = "host"

    def __init__(self, keys: list[str], numels: list[int], pin: bool = False):
        self.keys, self.numels = list(keys), list(numels)
        self.blocks = []
        for n in self.numels:
            t = torch.empty(n, dtype=torch.float32)
            self.blocks.append(t.pin_memory() if pin else t.share_memory_())
        self.committed = -1

    def nbytes(self, i: int) -> int:
        return self.numels[i] * 4

    def read_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False) -> None:
        dst.copy_(self.blocks[i], non_blocking=non_blocking)

    def write_from(self, i: int, src: torch.Tensor, non_blocking: bool = False) -> None:
        self.blocks[i].copy_(src, non_blocking=non_blocking)

    def commit(self, step: int, resident: dict[str, torch.Tensor] | None = None) -> None:
        self.committed = step  # host memory does not outlive the process: nothing to persist

    def close(self) -> None:
        pass


class DiskStore:
    """Per-block two-slot files + manifest; crash-safe at step granularity."""

    tier = "disk"

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
        entries = self.manifest["blocks"] + self.manifest["resident"]
        self.keys = [e["key"] for e in self.manifest["blocks"]]
        self.numels = [e["numel"] for e in self.manifest["blocks"]]
        self._maps = {e["key"]: np.memmap(os.path.join(path, e["file"]), dtype=np.uint8, mode="r+") for e in entries}
        self._numel = {e["key"]: e["numel"] for e in entries}
        # The slot each bucket's latest values are in; the committed one on open.
        self._latest = {k: self.committed % 2 for k in self._maps}
        for k in self._maps:
            held = self.slot_step(k, self._latest[k])
            if held != self.committed:
                raise ConfigError(f"store={path!r}: bucket {k} slot holds step {held}, manifest says "
                                  f"{self.committed}; the store is damaged")

    # -- layout ----------------------------------------------------------------------------
    @staticmethod
    def slot_bytes(numel: int) -> int:
        return HEADER + -(-numel * 4 // HEADER) * HEADER

    def _values(self, key: str, slot: int) -> torch.Tensor:
        n, sb = self._numel[key], self.slot_bytes(self._numel[key])
        raw = self._maps[key][slot * sb + HEADER : slot * sb + HEADER + n * 4]
        return torch.from_numpy(raw.view(np.float32))

    def slot_step(self, key: str, slot: int) -> int | None:
        sb = self.slot_bytes(self._numel[key])
        head = bytes(self._maps[key][slot * sb : slot * sb + 16])
        return struct.unpack("<q", head[8:])[0] if head[:8] == MAGIC else None

    def _write(self, key: str, src: torch.Tensor, step: int) -> None:
        slot = (self.committed + 1) % 2  # never the committed slot
        self._values(key, slot).copy_(src)
        sb = self.slot_bytes(self._numel[key])
        self._maps[key][slot * sb : slot * sb + 16] = np.frombuffer(MAGIC + struct.pack("<q", step), np.uint8)
        self._latest[key] = slot

    # -- the store interface ---------------------------------------------------------------
    def nbytes(self, i: int) -> int:
        return self.numels[i] * 4

    def read_into(self, i: int, dst: torch.Tensor, non_blocking: bool = False) -> None:
        key = self.keys[i]
        dst.copy_(self._values(key, self._latest[key]), non_blocking=non_blocking)

    def write_from(self, i: int, src: torch.Tensor, non_blocking: bool = False) -> None:
        self._write(self.keys[i], src.cpu() if src.device.type != "cpu" else src, self.committed + 1)

    def read_resident(self, key: str) -> torch.Tensor:
        return self._values(key, self._latest[key]).clone()

    def commit(self, step: int, resident: dict[str, torch.Tensor] | None = None) -> None:
        """Persist the resident buckets for `step`, then move the manifest to it (atomic rename)."""
        if step != self.committed + 1:
            raise RuntimeError(f"commit({step}) after step {self.committed}: steps commit in order")
        for key, t in (resident or {}).items():
            self._write(key, t.cpu(), step)
        missing = [k for k in self._maps if self._latest[k] != step % 2]
        if missing:
            raise RuntimeError(f"commit({step}): buckets {missing[:3]} were not written this step")
        self.manifest["committed"] = step
        _write_json_atomic(os.path.join(self.path, "manifest.json"), self.manifest)
        self.committed = step

    def close(self) -> None:
        for m in self._maps.values():
            m.flush()
        self._maps = {}

    # -- creation ----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, blocks: list[tuple[str, int]], resident: list[tuple[str, int]], base: dict,
               fill) -> DiskStore:
        """Write a new store one bucket at a time: `fill(key, out_flat_fp32)` provides values.

        Peak memory is one bucket, so a model larger than RAM can be written."""
        if os.path.exists(os.path.join(path, "manifest.json")):
            raise ConfigError(f"store={path!r} already exists; open it or choose another directory")
        os.makedirs(path, exist_ok=True)
        entries = {"blocks": [], "resident": []}
        for kind, items in (("blocks", blocks), ("resident", resident)):
            for key, numel in items:
                name = f"{key}.bin"
                with open(os.path.join(path, name), "wb") as f:
                    f.truncate(2 * cls.slot_bytes(numel))
                mm = np.memmap(os.path.join(path, name), dtype=np.uint8, mode="r+")
                buf = torch.from_numpy(mm[HEADER : HEADER + numel * 4].view(np.float32))  # slot 0
                fill(key, buf)
                sb = cls.slot_bytes(numel)
                mm[sb + HEADER : sb + HEADER + numel * 4] = mm[HEADER : HEADER + numel * 4]  # slot 1
                mm[sb : sb + 16] = np.frombuffer(MAGIC + struct.pack("<q", -1), np.uint8)
                mm.flush()
                del mm
                entries[kind].append({"key": key, "numel": numel, "file": name})
        manifest = {"format": FORMAT, "version": 1, "base": base, "dtype": "float32", "committed": -1, **entries}
        _write_json_atomic(os.path.join(path, "manifest.json"), manifest)
        return cls(path)


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
