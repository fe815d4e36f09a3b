"""Derived seeds: every seed of a run (a step's noise, the model's initial weights, the data order)
is a pure function of the run seed and a name, so a resumed or replayed run draws the same."""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for (seed, name, index); a pure function of its three arguments."""
    digest = hashlib.blake2b(f"{seed}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step `step` of a run."""
    return derive_seed(run_seed, "step", step)
