"""Where a run writes: checked before any work starts, written atomically as the run goes.

A run's outputs (summary.json, seedlog.jsonl, a checkpoint, a report) are worth as much as its
steps, so an output directory that cannot be written is refused up front, and each file is
replaced whole (written to a temporary sibling, then renamed) so that a reader or an
interruption never sees half of one.
"""
from __future__ import annotations

import json
import os
import time

from distzo2_lab.errors import ConfigError


def check_writable(path: str, field: str = "out") -> str:
    """Create directory `path` if needed, write and remove a probe file; ConfigError if that fails."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{field}={path!r} is a file, not a directory; choose a directory")
    probe = os.path.join(path, f".distzo2-probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{field}={path!r} is not writable ({e.strerror or e}); choose another directory") from None
    return path


def fresh_out(root: str = "runs/train") -> str:
    """A directory name for a run that has none given: ROOT/<date>-<time>[-k], not yet existing."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = os.path.join(root, stamp), 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(root, f"{stamp}-{k}")
    return path


def write_json(path: str, data: dict) -> None:
    """Replace `path` with `data` as JSON in one rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
