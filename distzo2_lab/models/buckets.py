"""Flat parameter buckets: the unit that is perturbed, updated, stored and streamed.

Each group of modules (resident-in, one transformer block, resident-out) owns one flat fp32
master tensor; the modules' parameters become views into it (or into a lower-precision working
copy). One flat tensor per block is what ZO2 (arXiv 2503.12668, Sec. 3) moves between host and
device, what the DistZO2 slicer cuts into shards, and it turns hundreds of small per-tensor
noise calls into a few large ones. A tied parameter (OPT's lm_head / embed_tokens) is one
Parameter object and therefore lands in exactly one bucket, once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Slot:
    name: str
    param: nn.Parameter
    start: int
    stop: int
    shape: torch.Size
    decay: bool


def _no_decay(name: str) -> bool:
    # MeZO: no weight decay on biases and LayerNorm weights.
    leaf, name = name.rsplit(".", 1)[-1], name.lower()
    return leaf == "bias" or "layer_norm" in name or "layernorm" in name or ".norm" in name


class ParamBucket:
    """One flat fp32 master holding every unique parameter of a group of modules."""

    def __init__(self, key: str, named_params: list[tuple[str, nn.Parameter]], storage: str = "fp32",
                 norms: set[int] = frozenset(), layout_only: bool = False):
        """`norms`: ids of norm-layer parameters (no weight decay whatever their names are).
        `layout_only`: the values live elsewhere (an offloaded block, the shell included): no master."""
        self.key = key
        self.slots: list[Slot] = []
        offset = 0
        for name, p in named_params:
            decay = not (_no_decay(name) or id(p) in norms)
            self.slots.append(Slot(name, p, offset, offset + p.numel(), p.shape, decay))
            offset += p.numel()
        self.numel = offset
        self.storage = storage
        self.working_dtype = DTYPES[storage]
        self.decay_spans = _merge([(s.start, s.stop) for s in self.slots if s.decay])
        self.master: torch.Tensor | None = None
        self.working: torch.Tensor | None = None
        if layout_only or any(p.is_meta for _, p in named_params):
            return  # layout only: the values live in a store and are attached per visit
        device = named_params[0][1].device if named_params else torch.device("cpu")
        master = torch.empty(offset, dtype=torch.float32, device=device)
        for s in self.slots:
            master[s.start : s.stop].copy_(s.param.detach().reshape(-1))
        self.attach(master, None if storage == "fp32" else master.to(DTYPES[storage]))

    def attach(self, master: torch.Tensor, working: torch.Tensor | None = None) -> None:
        """Make `master` (flat fp32, or bf16 under precision.master='bf16') this bucket's values; the
        forward reads `working`, a buffer of the storage dtype (the master itself when the dtypes agree)."""
        self.master = master
        self.working = master if master.dtype == self.working_dtype else working
        if self.working is None:
            raise ValueError(f"bucket {self.key}: storage {self.storage} needs a working buffer")
        self.sync()
        self.bind(self.working)

    def hold_master(self, dtype: torch.dtype) -> None:
        """Hold the master in `dtype` (rounded to nearest once; precision.master='bf16'), which must be
        the storage dtype: the forward then reads the master itself and no working copy exists."""
        if self.master is None or self.master.dtype == dtype:
            return
        if dtype != self.working_dtype:
            raise ValueError(f"bucket {self.key}: a {dtype} master needs storage of that dtype, not {self.storage}")
        self.attach(self.master.to(dtype))

    def detach(self) -> None:
        self.master = self.working = None

    def unbind(self) -> None:
        """Point the parameters at a one-element placeholder, so the values can be freed."""
        holder = torch.empty(1, dtype=self.slots[0].param.dtype) if self.slots else None
        for s in self.slots:
            s.param.data = holder.expand(s.shape)

    def bind(self, flat: torch.Tensor) -> None:
        """Point every parameter of the group at views of `flat` (no copy)."""
        for s in self.slots:
            s.param.data = flat[s.start : s.stop].view(s.shape)

    def sync(self) -> None:
        """Refresh the lower-precision working copy from the master (no-op for fp32)."""
        if self.working is not self.master:
            self.working.copy_(self.master)

    def state(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> fp32 tensor view of the master, or of `flat` (values held by a store)."""
        flat = self.master if flat is None else flat
        return {s.name: flat[s.start : s.stop].view(s.shape) for s in self.slots}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for s in self.slots:
            self.master[s.start : s.stop].copy_(tensors[s.name].reshape(-1))
        self.sync()


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged
