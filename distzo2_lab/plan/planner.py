"""The planner: memory plan + simulated step for one layout, the baselines, and the nearest layout that fits.

`plan_layout` answers "will it fit, how fast will it go" for a model on a node: peak memory per
device and host memory per node (memory.py), step time, tokens/s and the busiest lane from the
stream simulator (simulator.py), and the speed-up over single-GPU ZO2 (same hardware, one device,
host tier) and over plain MeZO (everything resident on one device) where that fits.
"""
from __future__ import annotations

import dataclasses

from distzo2_lab.config import ConfigError, share_grain
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import Hardware
from distzo2_lab.plan.memory import (
    GB,
    MemoryPlan,
    Workload,
    check_workload,
    copies_of,
    directions_of,
    memory_plan,
    mezo_bytes,
    model_shape,
)
from distzo2_lab.plan.simulator import Simulation, simulate


def check_layout(layout: Layout, gpus: int, hw: Hardware) -> None:
    """One clear error per bad layout (pert must be 1 or even; dp x pert = gpus)."""
    if layout.dp < 1 or layout.pert < 1 or (layout.pert > 1 and layout.pert % 2):
        raise ConfigError(f"layout dp={layout.dp}, pert={layout.pert} is not valid; dp >= 1 and pert 1 or even "
                          "(+eps / -eps pairs)")
    if layout.world_size != gpus:
        options = ", ".join(f"dp={d},pert={p}" for d, p in candidate_grids(gpus))
        raise ConfigError(f"layout dp={layout.dp},pert={layout.pert} uses {layout.world_size} devices, not "
                          f"gpus={gpus}; for {gpus} devices choose one of {options}")
    if hw.kind == "gpu" and gpus > 64 * hw.devices_per_node:
        raise ConfigError(f"gpus={gpus} is not valid; at most {64 * hw.devices_per_node} on {hw.name}")


def candidate_grids(gpus: int, perts: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """(dp, pert) grids of `gpus` devices: pert 1 or even (pert = 2m runs m n-SPSA pairs)."""
    perts = perts or tuple(p for p in range(1, gpus + 1) if p == 1 or p % 2 == 0)
    return [(gpus // p, p) for p in perts if gpus % p == 0]


def fits(w: Workload, layout: Layout, hw: Hardware) -> MemoryPlan:
    return memory_plan(w, layout, hw)


def nearest_fit(w: Workload, layout: Layout, hw: Hardware, gpus: int) -> tuple[Workload, Layout, MemoryPlan] | None:
    """The layout closest to the asked one that fits: same devices first, then fewer; grid, slicing,
    prefetch and tier changed as little as possible."""
    best = None
    for g in range(gpus, 0, -1):
        for dp, pert in candidate_grids(g, tuple(dict.fromkeys((1, 2, layout.pert)))):
            for sl in (False, True):
                if sl and g == 1:
                    continue
                for tier in dict.fromkeys((w.tier, "host", "disk")):
                    if sl and tier != "host":
                        continue
                    for pre in range(w.prefetch, -1, -1):
                        cand_w = dataclasses.replace(w, tier=tier, prefetch=pre)
                        cand = Layout(dp, pert, sl)
                        mp = memory_plan(cand_w, cand, hw)
                        if not mp.fits:
                            continue
                        dist = (10 * (gpus - g) + abs(dp - layout.dp) + abs(pert - layout.pert)
                                + (sl != layout.slice) + (w.prefetch - pre) + 3 * (tier != w.tier))
                        if best is None or dist < best[0]:
                            best = (dist, cand_w, cand, mp)
        if best is not None and best[0] < 10 * (gpus - g + 1):
            break
    return None if best is None else best[1:]


def describe(w: Workload, layout: Layout) -> str:
    sl = ",slice" if layout.slice else ""
    return f"dp={layout.dp},pert={layout.pert}{sl} ({w.tier} tier, prefetch {w.prefetch})"


def plan_layout(w: Workload, layout: Layout, hw: Hardware, gpus: int | None = None, steps: int = 3,
                baselines: bool = True) -> dict:
    """Memory, step time, tokens/s, bottleneck and speed-ups of one layout; ConfigError if it does not fit."""
    check_workload(w)
    gpus = layout.world_size if gpus is None else gpus
    check_layout(layout, gpus, hw)
    copies_of(w, layout)  # pert = 2m needs m to divide the directions; in-place cannot run n-SPSA
    mp = memory_plan(w, layout, hw)
    if not mp.fits:
        near = nearest_fit(w, layout, hw, gpus)
        hint = (f"no layout of up to {gpus} devices fits; use a larger device or a smaller model"
                if near is None else
                f"nearest layout that fits: {describe(near[0], near[1])}, "
                f"{near[2].device_total / GB:.1f} GB per device, {near[2].host_total / GB:.0f} GB host")
        raise ConfigError(f"layout {describe(w, layout)} of {w.model} does not fit {hw.name}: "
                          f"{'; '.join(mp.problems())}. {hint}")
    sim = simulate(w, layout, hw, steps=steps)
    out = {"model": w.model, "hardware": hw.name, "gpus": gpus, "layout": {"dp": layout.dp, "pert": layout.pert,
           "slice": layout.slice}, "directions": directions_of(w, layout),
           "perturb": "copy" if copies_of(w, layout) else "in-place",
           "tier": w.tier, "prefetch": w.prefetch, "batch_per_dp_group": w.batch, "seq": w.seq,
           "precision": dataclasses.asdict(w.precision), "implementation": w.implementation.name,
           "memory_per_device_gb": {k: v / GB for k, v in mp.device.items()},
           "device_total_gb": mp.device_total / GB, "device_capacity_gb": mp.device_capacity / GB,
           "host_per_node_gb": {k: v / GB for k, v in mp.host.items()}, "host_total_gb": mp.host_total / GB,
           "disk_gb": mp.disk_total / GB, "step_s": sim.step_s, "tokens_per_s": sim.tokens_per_s,
           "bottleneck": sim.bottleneck(), "shares": sim.shares()}
    if baselines:
        out.update(baseline_speedups(w, hw, sim, steps))
    out["_simulation"] = sim
    return out


def baseline_speedups(w: Workload, hw: Hardware, sim: Simulation, steps: int = 3) -> dict:
    """tokens/s against single-device ZO2 (host tier, one rank) and plain MeZO (all resident), if they fit."""
    out = {}
    zo2_w = dataclasses.replace(w, tier="host", prefetch=1, directions=None, perturb="auto")  # single-device ZO2
    zo2_mem = memory_plan(zo2_w, Layout(), hw)
    if zo2_mem.fits:
        z = simulate(zo2_w, Layout(), hw, steps=steps)
        out["zo2_single_tokens_per_s"] = z.tokens_per_s
        out["speedup_vs_zo2"] = sim.tokens_per_s / z.tokens_per_s
    else:
        out["speedup_vs_zo2"] = None
        out["zo2_note"] = f"single-device ZO2 does not fit ({'; '.join(zo2_mem.problems())})"
    need = mezo_bytes(w, hw)
    out["mezo_gb"] = need / GB
    if need <= hw.device_memory_gb * GB:
        mezo_w = dataclasses.replace(w, tier="resident", directions=None, perturb="auto")
        m = simulate(mezo_w, Layout(), hw, steps=steps)
        out["mezo_tokens_per_s"] = m.tokens_per_s
        out["speedup_vs_mezo"] = sim.tokens_per_s / m.tokens_per_s
    else:
        out["speedup_vs_mezo"] = None
        out["mezo_note"] = f"MeZO does not fit: it needs {need / GB:.0f} GB on one device of {hw.device_memory_gb:.0f}"
    return out


def format_plan(p: dict) -> str:
    lay = p["layout"]
    prec = p["precision"]
    nspsa = f" ({p['directions']} n-SPSA directions)" if p.get("directions", 1) > 1 else ""
    nspsa += " (perturbed copies)" if p.get("perturb") == "copy" and p.get("directions", 1) == 1 else ""
    lines = [f"{p['model']} on {p['gpus']} x {p['hardware']}: layout dp={lay['dp']} x pert={lay['pert']}{nspsa}"
             f"{' sliced' if lay['slice'] else ''}, {p['tier']} tier, prefetch {p['prefetch']}, "
             f"batch {p['batch_per_dp_group']} x {p['seq']} per dp group, compute {prec['compute']} / storage "
             f"{prec['storage']} / master {prec['master']} ({p['implementation']})",
             f"memory per device: {p['device_total_gb']:.2f} GB of {p['device_capacity_gb']:.0f} GB"]
    lines += [f"  {k:<28} {v:8.2f} GB" for k, v in p["memory_per_device_gb"].items()]
    lines.append(f"host memory per node: {p['host_total_gb']:.1f} GB" + ("" if not p["disk_gb"] else
                                                                          f"; disk {p['disk_gb']:.1f} GB"))
    lines += [f"  {k:<28} {v:8.1f} GB" for k, v in p["host_per_node_gb"].items()]
    lines.append(f"step time {p['step_s']:.3f} s; {p['tokens_per_s']:.1f} tokens/s; bottleneck: {p['bottleneck']} "
                 "lane")
    lines.append("lane shares of device activity: " + ", ".join(f"{k} {v:.0%}" for k, v in p["shares"].items()))
    if "speedup_vs_zo2" in p:
        z = p["speedup_vs_zo2"]
        lines.append(f"speed-up over single-device ZO2: {z:.2f}x" if z is not None else p.get("zo2_note", ""))
        m = p["speedup_vs_mezo"]
        lines.append(f"speed-up over MeZO (all resident on one device): {m:.2f}x" if m is not None
                     else p.get("mezo_note", ""))
    return "\n".join(lines)


def _block_elems(model: str | None) -> int | None:
    """Elements of one block of an OPT preset (None for other names: the plan then says less)."""
    if model is None:
        return None
    try:
        return model_shape(model).block_params
    except ConfigError:
        return None


def plan_text(layout, batch_size: int, directions: int = 1, micro_batches: int = 1, device: str = "cpu",
              model: str | None = None) -> str:
    """What each rank of a layout does, without starting anything (`model` says whether the node's
    ranks have any draw to split: they share draws in chunks of config.share_grain() elements)."""
    import torch

    from distzo2_lab.parallel.layout import choose_backend

    rows = batch_size // layout.dp
    backend = choose_backend(device, layout.world_size, torch.cuda.device_count() if device == "cuda" else 0)
    lines = [f"layout {layout.describe()}: mesh (dp={layout.dp}, pert={layout.pert}), {backend} on 127.0.0.1"]
    for r in range(layout.world_size):
        d, p = layout.coords(r)
        plus, minus = layout.signs(r)
        passes = "+eps and -eps (dual forward)" if plus and minus else ("+eps" if plus else "-eps")
        dirs = layout.directions(r, directions)
        if directions > 1:
            passes += f" of direction{'s' if len(dirs) > 1 else ''} {', '.join(map(str, dirs))} (n-SPSA)"
        micro = f" in {micro_batches} micro-batches" if micro_batches > 1 else ""
        lines.append(f"  rank {r}: dp {d}, pert {p}: batch rows {d * rows}..{(d + 1) * rows - 1}{micro}, runs {passes}")
    if layout.slice:
        lines.append(f"  sliced: each rank uploads and writes back 1/{layout.world_size} of every block; "
                     "the ranks all-gather the shards")
    block, grain = _block_elems(model), share_grain()
    if layout.share_noise and device == "cpu" and layout.world_size > 1 and block is not None and block <= grain:
        lines.append(f"  noise: every rank draws all of z: a block ({block:,} elements) fits one share chunk "
                     f"({grain:,}), so there is no draw to split")
    elif layout.share_noise and device == "cpu" and layout.world_size > 1:
        groups = layout.world_size // min(layout.world_size, max(1, layout.pert // 2))
        lines.append(f"  noise: the ranks of a node that draw the same z (groups of up to {groups}) split every draw "
                     "of more than one chunk through shared memory")
    elif layout.world_size > 1:
        lines.append("  noise: every rank draws all of z" + (" (on its GPU)" if device == "cuda" else ""))
    lines.append(f"  per step every rank all-gathers {4 * directions} float64 scalars (l+, l-, tokens per direction) "
                 "for the optimiser")
    return "\n".join(lines)
