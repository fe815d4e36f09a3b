"""`distzo2 plan calibrate --device cuda`: measure this machine's GPU into a hardware profile.

The CPU calibration's code paths (calibrate.py), timed on the working device: block forwards at
OPT-125m's and OPT-1.3B's widths under the engine's compute context, the fixed costs of a pass
(in bursts of calls per synchronise, as a step issues them), the noise fill, the perturb pass,
pinned copies each way, the disk and short real runs. One GPU: no peer link is measured. Written
to DIR/this-machine.json and read as hardware 'this-machine' by the planner (docs/planner.md).
"""
from __future__ import annotations

import os
import time

import torch

from distzo2_lab.bench.calibrate import _copy_gbps, _disk_gbps, _in_turns, _probe_block, _probe_ends, engine_overheads
from distzo2_lab.bench.efficiency import median_time
from distzo2_lab.config import ConfigError
from distzo2_lab.plan.hardware import DEFAULT_DIR, THIS_MACHINE, Hardware, calibration_path, save_profile

BURST = 20
"""Calls timed back to back per synchronise on a GPU."""
WIDTHS = {768: (12, 3072), 2048: (32, 8192)}
"""Hidden width -> (heads, ffn) of the block forwards timed (OPT-125m's and OPT-1.3B's)."""


def _synced(fn, device: str, calls: int = 1):
    """`calls` calls of `fn` back to back, then a synchronise of `device`: timed, the seconds of the
    burst (divide by `calls`). In a burst the host issues a call's kernels while the device runs the
    earlier ones, as in a training step, so a call costs the longer of the two."""
    def run():
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def link_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> dict[str, float]:
    """Pinned host <-> device copy bandwidth (GB/s, the best of `repeats`): 'h2d', 'd2h' alone, and
    'both', each direction's rate while the two run at once on two streams (the lanes overlap)."""
    host_in, host_out = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    dev_in, dev_out = (torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def best(copies) -> float:
        t = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for stream, dst, src in copies:
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            t = min(t, time.perf_counter() - t0)
        return nbytes / t / 1e9

    out = {"h2d": best([(up, dev_in, host_in)]), "d2h": best([(down, host_out, dev_out)]),
           "both": best([(up, dev_in, host_in), (down, host_out, dev_out)])}
    del host_in, host_out, dev_in, dev_out
    torch.cuda.empty_cache()
    return out


def calibrate_device(directory: str = DEFAULT_DIR, device: str = "cuda", compute: str = "bf16",
                     save: bool = True) -> Hardware:
    """Measure the working `device` (a GPU; 'cpu' runs the same probes, for tests) into a 'gpu'
    profile; `compute` is the dtype the block forwards run in (the engine's autocast)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not valid here: torch sees no CUDA device; calibrate the CPU with "
                          "device='cpu' (`distzo2 plan calibrate` without --device)")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r} is not valid; choose cuda or cpu")
    burst = BURST if device == "cuda" else 1
    tiny, _ = _probe_block(64, 4, 256, 1, 4, device, compute)
    ends = {k: _synced(fn, device, burst) for k, fn in _probe_ends(device).items()}
    fixed = {k: v / burst for k, v in _in_turns({"launch": _synced(tiny, device, burst), **ends}).items()}
    launch = fixed["launch"]
    rate_by_width = {}
    for width, (heads, ffn) in WIDTHS.items():
        run, flops = _probe_block(width, heads, ffn, 1, 2048 if device == "cuda" else 64, device, compute)
        seconds = median_time(_synced(run, device, burst), repeats=5, warmup=1) / burst
        # a GPU pass costs the longer of issuing it and running it (the simulator's max): the burst's
        # time per pass is that; on the CPU the two add up, so the fixed cost comes off first
        rate_by_width[width] = flops / max(seconds - (0.0 if device == "cuda" else launch), 1e-9) / 1e12
    from distzo2_lab.zo.perturb import Perturber
    from distzo2_lab.zo.spsa import perturb_

    n = 1 << 24 if device == "cuda" else 1 << 21
    buf, few = torch.empty(n, device=device), torch.empty(64, device=device)
    p = Perturber("gaussian")
    noise = _in_turns({"rng": _synced(lambda: p.fill(buf, 1, "calibrate"), device),
                       "call": _synced(lambda: (p.fill(few, 1, "calibrate"), perturb_(few, few, 1e-3)), device)},
                      repeats=4)
    rng = n / noise["rng"] / 1e9
    n = 1 << 26 if device == "cuda" else 1 << 22
    z, master = torch.ones(n, device=device), torch.zeros(n, device=device)
    axpy = 12 * n / median_time(_synced(lambda: perturb_(master, z, 1e-3), device), repeats=5) / 1e9
    if device == "cuda":
        links = link_gbps()
    else:  # the working device is the host: the lanes are copies between buffers in RAM
        one = _copy_gbps(64 << 20, 1)
        links = {"h2d": one, "d2h": one, "both": _copy_gbps(64 << 20, 2) / 2}
    disk_read, disk_write = _disk_gbps(directory, 64 << 20)
    overheads = engine_overheads(directory, device)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        context = (total - free - torch.cuda.memory_reserved()) / 1e9
        name, memory, count = torch.cuda.get_device_name(0), total / 1e9, torch.cuda.device_count()
    else:
        name, memory, count, context = "cpu", ram, 1, 0.0
    top = max(rate_by_width.values())
    hw = Hardware(
        name=THIS_MACHINE, description=f"this machine's {name} ({count} on the node), measured by distzo2 plan "
        f"calibrate --device {device}", kind="gpu", device_memory_gb=memory,
        host_memory_gb=ram, devices_per_node=count,
        matmul_tflops={compute: top}, matmul_efficiency=1.0, memory_gbps=axpy, rng_gsamples=rng,
        launch_us=launch * 1e6, h2d_gbps=links["h2d"], d2h_gbps=links["d2h"], link_latency_us=10.0,
        devices_per_switch=1, switch_gbps=None, host_gbps=min(links["both"], links["h2d"]) or None, peer_gbps=None,
        disk_read_gbps=disk_read, disk_write_gbps=disk_write, context_gb=max(0.0, context),
        rate_by_width=rate_by_width, call_us=noise["call"] / 2 * 1e6, embed_us=fixed["embed"] * 1e6,
        head_us=fixed["head"] * 1e6, **overheads,
        source=f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')} on {name}; block forwards in {compute} "
               f"(rate_by_width, at 1 x {2048 if device == 'cuda' else 64} tokens); noise at 2^20-element chunks")
    if save:
        save_profile(hw, calibration_path(directory))
    return hw
