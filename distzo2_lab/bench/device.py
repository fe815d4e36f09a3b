"""The engine on one working device (a GPU where there is one): MeZO against ZO2, and the planner beside it.

:func:`device_cases` runs the same model and batches as eager MeZO and as the ZO2 engine (ZO2,
arXiv 2503.12668, Sec. 3) with the blocks resident, streamed from pinned host memory and from a
disk store, and reports per case the median step, the peak device memory beside the memory
planner's figure, the lanes' overlap, the losses (identical across cases) and the simulator's step
on each profile named. On CPU the same cases run without device memory: that is how tests check it.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time

import torch

from distzo2_lab.bench.calibrate_gpu import link_gbps
from distzo2_lab.bench.offload import _fmt, _pct, _sync, _Tier
from distzo2_lab.config import ConfigError, OffloadConfig, PrecisionConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.models.presets import count_parameters
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import THIS_MACHINE

CASES = (("eager", "resident"), ("zo2", "resident"), ("zo2", "host"), ("zo2", "host-bf16"), ("zo2", "disk"))
"""(engine, tier) in the order they run; host-bf16 is the host tier with precision.master='bf16'."""
TIERS = ("host", "host-bf16", "disk")


def _settings(tier: str, compute: str) -> tuple[str, PrecisionConfig]:
    """(offload tier, precision) of a case's tier name: host-bf16 holds bf16 masters (bf16 compute)."""
    if tier == "host-bf16":
        return "host", PrecisionConfig(compute=compute, storage=compute, master="bf16")
    return tier, PrecisionConfig(compute=compute)


def _phase_seconds(spans, steps: int) -> dict[str, float]:
    """Seconds per step spent in each lane:phase (span durations summed; CUDA spans are device time)."""
    out: dict[str, float] = {}
    for s in spans:
        k = f"{s.lane}:{s.phase}"
        out[k] = out.get(k, 0.0) + (s.end - s.start) / 1e9 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_case(model: str, engine: str, tier: str, batch: int, seq: int, steps: int, compute: str, prefetch: int,
             device: str, threads: int, store: str | None = None) -> dict:
    """One case: 1 warm-up step and `steps` timed steps (each waits for its write-backs)."""
    where, precision = _settings(tier, compute)
    cfg = validate(TrainConfig(model=model, steps=1 + steps, batch_size=batch, seq_len=seq, threads=threads,
                               device=device, engine=engine, zo=ZOConfig(lr=1e-6, eps=1e-3), precision=precision,
                               offload=OffloadConfig(tier=where, prefetch=prefetch, store=store)))
    cuda = device == "cuda"
    gc.collect()  # the previous case's tensors (reference cycles) must be gone before its peak is read
    base = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    run = _Tier(cfg)
    for t in range(1, steps + 1):
        run.step(t)
    out = run.finish()
    return {"model": model, "engine": engine, "tier": tier, "build_s": out["build_s"], "step_s": out["step_s"],
            "step_times": out["step_times"], "losses": out["losses"],
            "peak_bytes": torch.cuda.max_memory_allocated() - base if cuda else None, "base_bytes": base,
            "overlap": out["overlap"], "phases_s": _phase_seconds(run.spans, steps), "upload_gbps": out["upload_gbps"]}


def stock_forward_s(model: str, batch: int, seq: int, compute: str, device: str, repeats: int = 4) -> float:
    """Median seconds of one no-grad forward of the plain Hugging Face model held in the compute
    dtype (no masters, no autocast): the floor a ZO step is measured against is two of these."""
    from distzo2_lab.models.buckets import DTYPES
    from distzo2_lab.models.presets import build_model

    m = build_model(model, device=device).to(DTYPES[compute]).eval()
    ids = torch.randint(4, m.config.vocab_size, (batch, seq), device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            m(input_ids=ids)
            _sync(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    del m
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def planned(model: str, tier: str, batch: int, seq: int, compute: str, prefetch: int, hardware: tuple[str, ...],
            links: dict | None, plan_dir: str | None = None) -> dict:
    """The planner's peak (less its runtime overhead) and the simulator's step time on each profile of
    `hardware` for one ZO2 case; with `links`, each datasheet profile also with its host links
    replaced by those measured (named '<profile>+links')."""
    from distzo2_lab.plan.hardware import DEFAULT_DIR, get_hardware, with_overrides
    from distzo2_lab.plan.memory import THIS_ENGINE, Workload, memory_plan
    from distzo2_lab.plan.simulator import simulate

    tier, precision = _settings(tier, compute)
    w = Workload(model=model, batch=batch, seq=seq, precision=precision, tier=tier,
                 prefetch=prefetch, implementation=THIS_ENGINE)
    profiles = {}
    for name in hardware:
        hw = get_hardware(name, plan_dir or DEFAULT_DIR)
        profiles[name] = hw
        if links is not None and name != THIS_MACHINE:  # this machine's profile holds the links measured already
            profiles[f"{name}+links"] = with_overrides(hw, name=f"{name}+links", h2d_gbps=links["h2d"],
                                                       d2h_gbps=links["d2h"], host_gbps=links["both"], switch_gbps=None)
    mp = memory_plan(w, Layout(), profiles[hardware[0]])
    return {"planned_bytes": mp.device_total - mp.device["runtime overhead"],
            "planned_components": {k: v for k, v in mp.device.items() if k != "runtime overhead"},
            "predicted_s": {k: simulate(w, Layout(), hw, steps=4).step_s for k, hw in profiles.items()}}


def device_cases(model: str = "opt-125m", batch: int = 1, seq: int = 2048, steps: int = 4, compute: str = "bf16",
                 prefetch: int = 1, device: str = "cuda", threads: int = 4, tiers: tuple[str, ...] = ("host",),
                 hardware: tuple[str, ...] = ("h100-sxm",), store_dir: str | None = None,
                 plan_dir: str | None = None) -> dict:
    """Eager MeZO, ZO2 resident and ZO2 on each of `tiers`, one after another; see the module's text.
    `hardware` names the simulator's profiles; 'this-machine' reads the calibration in `plan_dir`
    (``distzo2 plan calibrate --device cuda``)."""
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        raise ConfigError(f"tiers={bad!r} is not valid; choose from {', '.join(TIERS)} (resident always runs)")
    if "host-bf16" in tiers and compute != "bf16":
        raise ConfigError(f"tiers host-bf16 holds bf16 masters, read by bf16 compute; compute={compute!r}: choose "
                          "compute='bf16' or drop host-bf16")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not valid here: torch sees no CUDA device; choose device='cpu'")
    hardware = (hardware,) if isinstance(hardware, str) else tuple(hardware)
    links = link_gbps() if device == "cuda" else None
    floor_s = 2 * stock_forward_s(model, batch, seq, compute, device)
    params = count_parameters(model)
    where = tempfile.mkdtemp(prefix="distzo2-device-", dir=store_dir) if "disk" in tiers else None
    rows = []
    try:
        for engine, tier in CASES:
            if tier != "resident" and tier not in tiers:
                continue
            store = os.path.join(where, "store") if tier == "disk" else None
            row = run_case(model, engine, tier, batch, seq, steps, compute, prefetch, device, threads, store)
            if engine == "zo2":
                row.update(planned(model, tier, batch, seq, compute, prefetch, hardware, links, plan_dir))
                row["ratio"] = {k: v / row["step_s"] for k, v in row["predicted_s"].items()}
            rows.append(row)
    finally:
        if where:
            shutil.rmtree(where, ignore_errors=True)
    ref = rows[0]
    resident = next(r for r in rows if r["engine"] == "zo2" and r["tier"] == "resident")
    for r in rows:
        r["step_vs_mezo"] = r["step_s"] / ref["step_s"]
        r["same_losses_as_mezo"] = r["losses"] == ref["losses"]
        r["step_vs_floor"] = r["step_s"] / floor_s
        moved = sum(r["overlap"].get("bytes", {}).values()) / steps
        r["bytes_per_param_per_step"] = moved / params
        if r["tier"] != "resident" and links:  # the tier's own floor: the resident step or its bytes on the link
            b = r["overlap"].get("bytes", {})  # uploads and write-backs travel in opposite directions at once
            wire_s = max(b.get("upload", 0) / (links["h2d"] * 1e9), b.get("offload", 0) / (links["d2h"] * 1e9)) / steps
            r["step_vs_tier_floor"] = r["step_s"] / max(resident["step_s"], wire_s)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"model": model, "batch": batch, "seq": seq, "steps": steps, "compute": compute, "prefetch": prefetch,
            "device": device, "device_name": name, "hardware": list(hardware),
            "links_gbps": links, "stock_forward_s": floor_s / 2, "params": params, "cases": rows}


def format_cases(r: dict) -> str:
    gb = lambda b: _fmt(None if b is None else b / 1e9, ".3f")
    links = r["links_gbps"]
    head = (f"{r['model']} on {r['device_name']}, batch {r['batch']}x{r['seq']}, {r['compute']} compute, prefetch "
            f"{r['prefetch']} (median of {r['steps']} steps after 1 warm-up)"
            + (f"; pinned copies here: H2D {links['h2d']:.1f} GB/s, D2H {links['d2h']:.1f} GB/s, each way at once "
               f"{links['both']:.1f}" if links else ""))
    head += (f"\nfloor: two forwards of the stock model in {r['compute']}, {2 * r['stock_forward_s']:.4f} s; "
             "tier floor: max(ZO2 resident step, bytes moved / measured link)")
    lines = [head, f"{'case':>14} {'step s':>8} {'/floor':>7} {'/tier fl':>8} {'B/param':>8} {'/MeZO':>6} {'same':>5} "
             f"{'peak GB':>8} {'plan GB':>8} {'hidden':>7} {'up GB/s':>8}   simulated s (predicted / measured)"]
    for c in r["cases"]:
        sims = "  ".join(f"{k} {v:.4f} ({c['ratio'][k]:.2f})" for k, v in c.get("predicted_s", {}).items())
        lines.append(f"{c['engine'] + ' ' + c['tier']:>14} {c['step_s']:>8.4f} {c['step_vs_floor']:>7.2f} "
                     f"{_fmt(c.get('step_vs_tier_floor'), '.2f'):>8} {c['bytes_per_param_per_step']:>8.2f} "
                     f"{c['step_vs_mezo']:>6.2f} "
                     f"{str(c['same_losses_as_mezo']):>5} {gb(c['peak_bytes']):>8} {gb(c.get('planned_bytes')):>8} "
                     f"{_pct(c['overlap'].get('hidden_fraction')):>7} {_fmt(c['upload_gbps']):>8}   {sims}")
    for c in r["cases"]:
        top = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in list(c["phases_s"].items())[:6])
        lines.append(f"  {c['engine']} {c['tier']} ms per step by phase: {top or 'no spans (eager MeZO)'}")
    return "\n".join(lines)
