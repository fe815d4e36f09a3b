"""This process's memory as Linux counts it: a field of ``/proc/self/status``.

The memory benchmarks compare a run's resident set (``VmRSS``) and its high-water mark
(``VmHWM``) with the model's size; one reader serves them all.
"""
from __future__ import annotations


def status_kib(field: str) -> int | None:
    """The value of line `field` (e.g. ``VmRSS``, ``VmHWM``) of /proc/self/status in KiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
