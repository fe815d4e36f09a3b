"""`distzo2 plan`: will a layout fit, how fast will it go; `distzo2 plan calibrate`: measure this machine."""
from __future__ import annotations

import argparse
import json

from distzo2_lab.config import COMPUTE_DTYPES, MASTER_DTYPES, STORAGE_DTYPES, ConfigError, PrecisionConfig
from distzo2_lab.plan.hardware import DEFAULT_DIR, WIDE_WIDTH, names


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` (and `plan calibrate`) on the top-level subparsers of `distzo2`."""
    p = subparsers.add_parser("plan", help="memory planner and stream simulator for any OPT size and node")
    p.add_argument("--model", default="opt-175b", help="preset name (opt-125m ... opt-175b, tiny)")
    p.add_argument("--gpus", type=int, default=None, help="devices in the run (default: dp x pert)")
    p.add_argument("--hardware", default="a100-80g-sxm", help=f"one of {', '.join(names())}")
    p.add_argument("--layout", default="dp=1,pert=1", help="dp=D,pert=P")
    p.add_argument("--slice", action="store_true", help="hardware-aware slicing (each rank moves one shard)")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp group per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--precision", default="fp16", choices=COMPUTE_DTYPES, help="compute dtype")
    p.add_argument("--storage", default="fp16", choices=STORAGE_DTYPES)
    p.add_argument("--master", default="fp32", choices=MASTER_DTYPES)
    p.add_argument("--tier", default="host", help="resident, host or disk")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--directions", type=int, default=None,
                   help="n-SPSA directions per step (default: pert / 2 with pert > 2, else 1)")
    p.add_argument("--perturb", default="auto", help="auto, in-place or copy (zo.perturb)")
    p.add_argument("--optimizer", default="sgd", help="zo.optimizer: its state joins the memory plan")
    p.add_argument("--estimator", default="two-point", help="zo.estimator: one-sided runs K + 1 forwards")
    p.add_argument("--implementation", default="distzo2_lab", help="distzo2_lab (this engine) or zo2 (ZO2's code)")
    p.add_argument("--steps", type=int, default=3, help="simulated steps")
    p.add_argument("--dir", default=DEFAULT_DIR, help="where 'this-machine' is calibrated")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
    sub = p.add_subparsers(dest="plan_cmd")
    c = sub.add_parser("calibrate", help="measure this machine (a few seconds) into DIR/this-machine.json")
    c.add_argument("--dir", default=DEFAULT_DIR, dest="calibrate_dir")
    c.add_argument("--no-collectives", action="store_true",
                   help="skip the 2- and 4-rank gloo probes (collective costs, contention)")
    c.add_argument("--device", default="cpu", choices=("cpu", "cuda"), dest="calibrate_device",
                   help="cuda: measure this machine's GPU (block forwards, noise, memory, pinned links); not yet "
                   "predictive, see docs/planner.md")
    c.add_argument("--compute", default="bf16", choices=COMPUTE_DTYPES, dest="calibrate_compute",
                   help="--device cuda: dtype of the timed block forwards (the engine's autocast)")
    c.add_argument("--json", action="store_true", dest="calibrate_json")
    c.set_defaults(fn=cmd_calibrate)
    return p


def cmd_calibrate(a) -> int:
    import time

    from distzo2_lab.bench.calibrate import calibrate
    from distzo2_lab.plan.hardware import calibration_path

    t0 = time.perf_counter()
    if a.calibrate_device == "cuda":
        from distzo2_lab.bench.calibrate_gpu import calibrate_device

        hw = calibrate_device(a.calibrate_dir, "cuda", a.calibrate_compute)
    else:
        hw = calibrate(a.calibrate_dir, collectives=not a.no_collectives)
    if a.calibrate_json:
        print(json.dumps(hw.to_dict(), indent=1))
        return 0
    print(f"calibrated this machine in {time.perf_counter() - t0:.1f} s -> {calibration_path(a.calibrate_dir)}")
    if hw.kind == "gpu":
        rates = ", ".join(f"{r:.0f} at width {w}" for w, r in hw.rate_by_width.items())
        print(f"  {hw.description}\n  block forward TFLOP/s: {rates}; {hw.launch_us:.0f} us per block pass, "
              f"embeddings {hw.embed_us:.0f} us, head {hw.head_us:.0f} us")
        print(f"  noise {hw.rng_gsamples:.1f} G samples/s; perturb pass {hw.memory_gbps:.0f} GB/s; pinned copies "
              f"{hw.h2d_gbps:.1f} GB/s up, {hw.d2h_gbps:.1f} down, {hw.host_gbps or 0:.1f} each way at once")
        print(f"  outside spans: step {hw.step_us:.0f} us, block {hw.block_us:.0f} us, visit +{hw.visit_us:.0f} us; "
              f"runtime overhead {hw.context_gb:.2f} GB")
        return 0
    print(f"  compute {hw.tflops('fp32') * 1e3:.1f} GFLOP/s per thread (fp32 block forward), "
          f"{hw.cores} cores at {hw.thread_scaling:.0%} per-core scaling; {hw.launch_us:.0f} us per block pass")
    print(f"  noise {hw.rng_gsamples:.3f} G samples/s per thread; perturb pass {hw.memory_gbps:.1f} GB/s")
    print(f"  upload / offload copies {hw.h2d_gbps:.1f} GB/s, two at once {hw.host_gbps:.1f} GB/s; "
          f"disk read {hw.disk_read_gbps:.2f} GB/s, write {hw.disk_write_gbps:.2f} GB/s")
    print(f"  exchange (gloo all-gather) {hw.peer_gbps:.2f} GB/s, scalar latency {hw.peer_latency_us:.0f} us; "
          f"process baseline {hw.context_gb:.2f} GB")
    if hw.barrier_us:
        ranks = ", ".join(f"{w} ranks: barrier {hw.barrier_us[w]:.0f} us, loss exchange after work "
                          f"{hw.collective_us[w]:.0f} us, compute {hw.contention[w]:.2f}x slower"
                          + (f" (fitted to a real {hw.contention_fit_us[w] / 1e3:.1f} ms step)"
                             if w in hw.contention_fit_us else "")
                          + (f" ({hw.contention_wide[w]:.2f}x at width {WIDE_WIDTH})"
                             if w in hw.contention_wide else "")
                          + (f", a streamed visit +{hw.visit_us_by_world[w]:.0f} us (fitted to a real "
                             f"{hw.visit_fit_us[w] / 1e3:.1f} ms host step)" if w in hw.visit_us_by_world else "")
                          for w in hw.barrier_us)
        print(f"  between processes: {ranks}")
    return 0


def cmd_plan(a) -> int:
    from distzo2_lab.parallel.layout import parse_layout
    from distzo2_lab.plan.hardware import get_hardware
    from distzo2_lab.plan.memory import IMPLEMENTATIONS, Workload
    from distzo2_lab.plan.planner import format_plan, plan_layout

    if a.implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation={a.implementation!r} is not valid; choose one of "
                          f"{', '.join(IMPLEMENTATIONS)}")
    hw = get_hardware(a.hardware, a.dir)
    import dataclasses

    layout = dataclasses.replace(parse_layout(a.layout), slice=a.slice)
    w = Workload(model=a.model, batch=a.batch, seq=a.seq, precision=PrecisionConfig(a.precision, a.storage, a.master),
                 tier=a.tier, prefetch=a.prefetch, implementation=IMPLEMENTATIONS[a.implementation],
                 directions=a.directions, perturb=a.perturb, optimizer=a.optimizer, estimator=a.estimator)
    p = plan_layout(w, layout, hw, gpus=a.gpus, steps=a.steps)
    p.pop("_simulation")
    print(json.dumps(p, indent=1) if a.json else format_plan(p))
    return 0
