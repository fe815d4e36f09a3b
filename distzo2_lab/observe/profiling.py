"""torch.profiler around training steps: per-rank Chrome traces (Perfetto) and a TensorBoard log.

`train(cfg, profile=DIR)` / `distzo2 train --profile DIR` runs the steps under
``torch.profiler.profile`` with a wait / warmup / active schedule. Every span the recorder opens
becomes a ``record_function`` range ``distzo2::<lane>::<phase>`` (a user annotation; NVTX too
when CUDA is present), on every thread, the streamer's upload / offload lanes included.
Output: ``DIR/rank<R>.pt.trace.json`` (open in https://ui.perfetto.dev) and ``DIR/tb/`` for
``tensorboard --logdir DIR/tb`` with torch-tb-profiler. :func:`phase_spans` reads the ranges back
as spans so the overlap metrics of both sources can be compared.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch

from distzo2_lab.config import ConfigError
from distzo2_lab.observe.events import RANGE_PREFIX, Span


@dataclass(frozen=True)
class ProfileOptions:
    """Where traces go and which steps are recorded: skip `wait`, warm up `warmup`, record `active`."""

    directory: str
    wait: int = 1
    warmup: int = 1
    active: int = 3


def as_options(profile) -> ProfileOptions:
    """A directory name or ProfileOptions -> checked ProfileOptions."""
    p = ProfileOptions(profile) if isinstance(profile, (str, os.PathLike)) else profile
    if not isinstance(p, ProfileOptions):
        raise ConfigError(f"profile={profile!r} is not valid; pass a directory or ProfileOptions")
    for name in ("wait", "warmup", "active"):
        if getattr(p, name) < (1 if name == "active" else 0):
            raise ConfigError(f"profile {name}={getattr(p, name)} is not valid; wait and warmup must be >= 0, "
                              "active >= 1")
    return p


class StepProfiler:
    """Context manager around a training loop; call :meth:`step` after every step."""

    def __init__(self, profile, rank: int = 0):
        self.opts, self.rank = as_options(profile), rank
        self.tb_dir = os.path.join(self.opts.directory, "tb")
        self.chrome = os.path.join(self.opts.directory, f"rank{rank}.pt.trace.json")
        self._prof = None

    def _ready(self, prof) -> None:
        os.makedirs(self.tb_dir, exist_ok=True)
        prof.export_chrome_trace(self.chrome)
        # torch-tb-profiler reads <logdir>/<worker>.<id>.pt.trace.json (tensorboard_trace_handler's names)
        shutil.copyfile(self.chrome, os.path.join(self.tb_dir, f"rank{self.rank}.{time.time_ns()}.pt.trace.json"))

    def __enter__(self) -> StepProfiler:
        from torch.profiler import ProfilerActivity, profile, schedule

        os.makedirs(self.opts.directory, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        o = self.opts
        self._prof = profile(
            activities=activities, schedule=schedule(wait=o.wait, warmup=o.warmup, active=o.active, repeat=1),
            on_trace_ready=self._ready,
            # the upload and offload lanes are threads: record their ranges too
            experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True))
        self._prof.__enter__()
        return self

    def step(self) -> None:
        self._prof.step()

    def wrap(self, on_step):
        """An on_step callback that also advances the profiler's schedule."""
        def hook(result):
            self.step()
            if on_step is not None:
                on_step(result)
        return hook

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)


def read_trace(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def phase_spans(path: str, rank: int = 0) -> list[Span]:
    """The distzo2:: ranges of a torch.profiler Chrome trace as spans (lane and phase from the
    name, step and block unknown = -1), on the Unix clock in ns."""
    trace = read_trace(path)
    base = int(trace.get("baseTimeNanoseconds", 0))
    out = []
    for e in trace["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") == "X" and name.startswith(RANGE_PREFIX) and name.count("::") == 2:
            _, lane, phase = name.split("::")
            start = base + int(float(e["ts"]) * 1e3)
            out.append(Span(rank, lane, phase, -1, -1, start, start + int(float(e["dur"]) * 1e3)))
    return sorted(out, key=lambda s: s.start)


def tensorboard_runs(directory: str) -> list[str]:
    """Trace files torch-tb-profiler will list under DIR/tb."""
    return sorted(glob.glob(os.path.join(directory, "tb", "*.pt.trace.json")))
