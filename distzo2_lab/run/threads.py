"""How many threads a rank uses when the user does not say, and how idle OpenMP threads wait.

torch's OpenMP workers spin (burn a core while waiting for the next parallel region) by default.
On a machine whose cores are already busy, a spinning thread takes the core another process
or rank needs, and a ZO step of small matrices becomes many times slower than with one thread.
So a small machine (<= 2 cores) or one whose load average says its cores are busy gets one
thread per rank and OMP_WAIT_POLICY=PASSIVE (waiting threads sleep); an idle large machine gets
up to MAX_DEFAULT threads per rank from its free cores.
"""
from __future__ import annotations

import os

MAX_DEFAULT = 4  # beyond this a tiny-to-small model gains little from more intra-op threads


def machine_load() -> tuple[int, float]:
    """(cores this process may run on, 1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores, load


def busy_machine(cores: int | None = None, load: float | None = None) -> bool:
    """True on a machine where spinning OpenMP threads would steal cores: <= 2 cores, or a load
    average above half of them."""
    if cores is None or load is None:
        cores, load = machine_load()
    return cores <= 2 or load > cores / 2


def default_threads(ranks: int = 1, cores: int | None = None, load: float | None = None) -> int:
    """Threads per rank: 1 on a busy machine, else the free cores shared by the ranks (1..MAX_DEFAULT)."""
    if cores is None or load is None:
        cores, load = machine_load()
    if busy_machine(cores, load):
        return 1
    return max(1, min(MAX_DEFAULT, int((cores - load) // max(1, ranks))))


def passive_wait_on_busy_machine() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE on a busy machine unless the user chose a policy. OpenMP reads
    it when torch loads, so this runs before torch is imported (and launched ranks inherit it)."""
    if busy_machine():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
