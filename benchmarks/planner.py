"""Planner and simulator against reality here, and against the papers.

    python benchmarks/planner.py [--quick] [--nspsa] [--steps 6] [--one-calibration] [--dir runs/plan] [--json]

1. `distzo2 plan calibrate` measures this machine (rates and lanes) into DIR/this-machine.json.
2. Predicted vs measured seconds per step (steady state, after the first step) for the tiny and
   OPT-125m shapes, resident / host / disk tiers, world sizes 1, 2 and 4 (real runs: ``train()`` for
   one rank; for several, the ranks of one world size are launched once and run that size's cases in
   turn, ``check.measure_many``, after an untimed warm-up run; several disk-tier ranks share one
   store directory, the leader commits). One torch thread per rank: world 4 oversubscribes the 2
   cores (the calibration measures that contention), and two-threaded resident runs are erratic
   under load. The tiny shape runs at least 30 steps (MIN_STEPS); every case runs in three rounds of
   the group's cases (REPEATS), OPT-125m's once a round, the tiny shape's three times (PER_ROUND).
   --quick: the tiny shape only, and no multi-process probes. --nspsa: also pert=4 with two n-SPSA
   directions (host tier). The machine is calibrated before each (model, world size) group and after
   each of its rounds (the machine's speed moves between minutes); the row compares the median of
   these calibrations' predictions with the median run (both ranges printed). The start's
   calibration predicts every row too (--one-calibration: only that).
3. Predicted vs measured peak RSS above the process baseline for the host and disk tiers (fresh
   processes, ``bench_offload.peak_memory_subprocess``).
4. The published checks: ZO2 peak GPU memory, DistZO2 trace shares and headline.
On a machine shared with other jobs, the load average printed before and after says when to rerun.
Prints the tables (``--results``: also into docs/results.md), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

from distzo2_lab.bench.calibrate import calibrate
from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.config import PrecisionConfig
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.check import compare, measure_many
from distzo2_lab.plan.memory import Workload, memory_plan
from distzo2_lab.plan.paper import format_paper_checks, headline, trace_shares, zo2_memory_check

SHAPES = {"tiny": (8, 32), "opt-125m": (2, 64)}  # batch per dp group, sequence length
# the tiny shape's steps take milliseconds: 30 of them, so that the median step is not one hiccup
# of the OS scheduler or of other jobs (OPT-125m's take seconds: --steps)
MIN_STEPS = {"tiny": 30}
REPEATS = {"tiny": 3, "opt-125m": 3}
"""Runs per case: on shared cores a step moves from one run to the next by as much as the 15 %
band, so each case runs three times, in three rounds of its group with a calibration between
them, and the table takes the median run (the spread is printed beside it)."""
PER_ROUND = {"tiny": 3}
"""Runs of each case in one round (the group's cases in turn, this many times): two tiny ranks on
shared cores can settle at one of two speeds for a whole run, so the tiny rows take the median of
9 runs; a tiny run is short."""
CASES = [  # (tier, name, layout): every tier at world sizes 1, 2 and 4
    ("resident", "single", Layout()), ("host", "single", Layout()), ("disk", "single", Layout()),
    ("resident", "PertP", Layout(1, 2)), ("host", "PertP", Layout(1, 2)), ("host", "DDP", Layout(2, 1)),
    ("disk", "PertP", Layout(1, 2)),
    ("resident", "2D", Layout(2, 2)), ("host", "2D", Layout(2, 2)), ("host", "2D sliced", Layout(2, 2, True)),
    ("disk", "2D", Layout(2, 2)),
]


NSPSA_CASES = [("host", "n-SPSA q=2", Layout(1, 4))]  # pert = 4: one (direction, sign) per rank (--nspsa)


def timing_rows(hw, models, steps: int, extra: list | None = None, directory: str | None = None,
                beside: bool = True, collectives: bool = True) -> list[dict]:
    """Every case, measured (the ranks of one world size launched once per round for all its cases)
    and simulated.

    Every (model, world size) group runs REPEATS rounds (each case PER_ROUND times per round, the cases
    in turn); a row's measured step is its median run. beside=True: the machine is calibrated before
    the first round and after every round (the single-process rates, and the multi-process probes at
    that world size), and the row's prediction is the median of the predictions from these REPEATS +
    1 calibrations ('ratio'). A shared VM's speed moves by tens of percent from minute to minute, a
    calibration is a few seconds of that (one snapshot caught the noise rate at 0.16 G/s between two
    at 0.25), and a group of OPT-125m cases runs for minutes: the median calibration of the group,
    like the median run, is what the group's minutes were like, not one moment. `hw`, the
    calibration taken at the start, predicts every row too ('ratio_start'). beside=False: only `hw`,
    and the rounds round-robin in one process group."""
    rows = []
    every = CASES + (extra or [])
    for model in models:
        batch, seq = SHAPES[model]
        for world in sorted({layout.world_size for _, _, layout in every}):
            cases = [(tier, name, layout) for tier, name, layout in every if layout.world_size == world]
            items = [(Workload(model=model, batch=batch, seq=seq, precision=PrecisionConfig(), tier=tier, prefetch=1),
                      layout) for tier, _, layout in cases]
            n, reps, k = max(steps, MIN_STEPS.get(model, 0)), REPEATS.get(model, 1), PER_ROUND.get(model, 1)
            if beside:
                cals, rounds = [_calibration(directory, collectives, model, world, "before")], []
                for r in range(reps):
                    rounds.append(measure_many(items * k, n, threads=1))
                    cals.append(_calibration(directory, collectives, model, world, f"after round {r + 1} of"))
            else:
                everything = measure_many(items * k * reps, n, threads=1)  # round-robin
                rounds = [everything[r * len(items) * k:(r + 1) * len(items) * k] for r in range(reps)]
            for i, ((w, layout), (_, name, _)) in enumerate(zip(items, cases)):
                runs = [m for r in range(reps) for m in rounds[r][i::len(items)]]
                m = sorted(runs, key=lambda x: x.steady_step_s)[len(runs) // 2]  # the median run
                r = compare(w, layout, hw, steps=n, threads=1, measured=m)
                r.pop("simulation"), r.pop("measured")
                r["predicted_start_s"], r["ratio_start"] = r["predicted_s"], r["ratio"]
                if beside:  # the median of the group's calibrations' predictions
                    r["predicted_by_calibration_s"] = [compare(w, layout, c, steps=n, threads=1, measured=m)
                                                       ["predicted_s"] for c in cals]
                    r["predicted_s"] = statistics.median(r["predicted_by_calibration_s"])
                    r["ratio"] = r["predicted_s"] / r["measured_s"]
                r["layout"], r["measured_runs_s"] = name, [x.steady_step_s for x in runs]
                rows.append(r)
                print(format_row(r), flush=True)
    return rows


def _calibration(directory: str | None, collectives: bool, model: str, world: int, when: str):
    """A calibration beside a group's runs: the single-process rates, and the W-rank probes."""
    now = calibrate(directory, collectives=collectives and world > 1, worlds=(world,), save=False)
    print(f"  calibration {when} {model} world {world}: {_rates(now)}", flush=True)
    return now


def _rates(hw) -> str:
    text = (f"block forward {hw.rate_by_width[768] * 1e3:.0f} GFLOP/s per thread ({hw.rate_by_width[64] * 1e3:.0f} at "
            f"width 64, {hw.launch_us:.0f} us a pass), noise {hw.rng_gsamples:.3f} G/s, copies {hw.h2d_gbps:.1f} GB/s, "
            f"outside spans: step {hw.step_us:.0f} us, block {hw.block_us:.0f} us, visit +{hw.visit_us:.0f} us")
    if hw.contention:
        text += ", contention " + _per_world({k: v for k, v in hw.contention.items() if int(k) > 1}, "x")
    if hw.contention_fit_us:
        text += " (fitted to real steps of " + _per_world(hw.contention_fit_us, "us") + ")"
    if hw.visit_us_by_world:
        text += ", visit +" + _per_world(hw.visit_us_by_world, "us") + " (fitted to real host steps of " \
            + _per_world(hw.visit_fit_us, "us") + ")"
    if hw.contention_wide:
        text += " (width 768: " + _per_world({k: v for k, v in hw.contention_wide.items() if int(k) > 1}, "x") + ")"
    if hw.collective_us:
        text += ", loss exchange after work " + _per_world(hw.collective_us, "us")
    if hw.share_us:
        text += ", shared noise piece " + _per_world(hw.share_us, "us")
    if hw.peer_gbps_by_world:
        text += ", all-gather " + ", ".join(f"{k}: {v:.2f} GB/s" for k, v in hw.peer_gbps_by_world.items())
    for world, curve in hw.gather_curve.items():
        text += f" ({world}: " + ", ".join(f"{b / 2**20:.0f} MB {t * 1e3:.1f} ms" for b, t in curve) + ")"
    return text


def _per_world(d: dict, unit: str) -> str:
    return ", ".join(f"{k}: {v:.0f} {unit}" if unit == "us" else f"{k}: {v:.2f}{unit}" for k, v in d.items()) or "-"


def format_row(r: dict) -> str:
    ok = "ok" if abs(r["ratio"] - 1) <= 0.15 else "OFF"
    runs = r.get("measured_runs_s", [])
    spread = f"  runs {min(runs):.4f}-{max(runs):.4f}" if len(runs) > 1 else ""
    preds = r.get("predicted_by_calibration_s", [])
    spread += f"  predicted {min(preds):.4f}-{max(preds):.4f}" if len(preds) > 1 else ""
    return (f"{r['model']:>9} {r['tier']:>8} {r['layout']:>10} {r['world']:>5} {r['threads']:>7} "
            f"{r['predicted_s']:>10.4f} {r['measured_s']:>10.4f} {r['ratio']:>6.2f}  {ok:>3} "
            f"{r.get('ratio_start', r['ratio']):>12.2f}{spread}")


def memory_rows(hw, models) -> list[dict]:
    from distzo2_lab.bench.offload import peak_memory_subprocess

    rows = []
    for model in models:
        for tier in ("host", "disk"):
            m = peak_memory_subprocess(model, tier=tier, steps=2, batch=1, seq=32, prefetch=1, lean=False)
            w = Workload(model=model, batch=1, seq=32, precision=PrecisionConfig(), tier=tier, prefetch=1)
            mp = memory_plan(w, Layout(), hw)
            predicted = mp.device_total - mp.device["runtime overhead"] + mp.host.get("blocks (one shared copy)", 0)
            measured = (m["peak_rss_kib"] - m["baseline_rss_kib"]) * 1024
            rows.append({"model": model, "tier": tier, "predicted_mb": predicted / 1e6, "measured_mb": measured / 1e6,
                         "ratio": predicted / measured})
            r = rows[-1]
            print(f"{model:>9} {tier:>5} predicted {r['predicted_mb']:8.1f} MB  measured {r['measured_mb']:8.1f} MB  "
                  f"ratio {r['ratio']:.2f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape only, no gloo probe, no memory runs")
    p.add_argument("--steps", type=int, default=6, help="steps per real run (the first is not timed)")
    p.add_argument("--dir", default=os.path.join("runs", "plan"), help="where the calibration is cached")
    p.add_argument("--json", action="store_true", help="also print every row as one JSON line")
    p.add_argument("--nspsa", action="store_true", help="also run pert=4 with 2 n-SPSA directions (host tier)")
    p.add_argument("--one-calibration", action="store_true",
                   help="predict every row from the calibration at the start (default: calibrate again beside "
                        "each world size's runs)")
    add_results_option(p)
    a = p.parse_args()
    with printed_to_results("planner", a.results):
        load0 = os.getloadavg()[0]
        print(f"load average before: {load0:.2f} on {os.cpu_count()} cores (other jobs share this machine)")
        hw = calibrate(a.dir, collectives=not a.quick)
        print(f"calibrated: {hw.rate_by_width} TFLOP/s per thread by width, noise {hw.rng_gsamples:.3f} G/s, "
              f"copies {hw.h2d_gbps:.1f} GB/s, block pass {hw.launch_us:.0f} us; outside any span: step "
              f"{hw.step_us:.0f} us, block visit {hw.block_us:.0f} us, streamed visit +{hw.visit_us:.0f} us")
        print(f"  between processes (W: value): barrier {_per_world(hw.barrier_us, 'us')}, loss exchange after work "
              f"{_per_world(hw.collective_us, 'us')}, compute contention {_per_world(hw.contention, 'x')} (width 768: "
              f"{_per_world(hw.contention_wide, 'x')}), "
              f"shared noise piece {_per_world(hw.share_us, 'us')}, all-gather "
              + ", ".join(f"{k}: {v:.2f} GB/s" for k, v in hw.peer_gbps_by_world.items()))
        models = ["tiny"] if a.quick else ["tiny", "opt-125m"]
        beside = not a.one_calibration
        print(f"\n{'model':>9} {'tier':>8} {'layout':>10} {'world':>5} {'threads':>7} {'predicted':>10} "
              f"{'measured':>10} {'ratio':>6}  {'':>3} {'ratio start':>12}")
        print("(seconds per step; ok = within 15 %; measured: the median of REPEATS x PER_ROUND runs, their range "
              "after 'runs'; "
              + ("predicted: the median over the calibrations before and after each round of the group, their "
                 "range after 'predicted'; 'ratio start': from the calibration at the start)" if beside else
                 "one calibration, at the start)"))
        rows = timing_rows(hw, models, a.steps, NSPSA_CASES if a.nspsa else None, a.dir, beside, not a.quick)
        within = sum(abs(r["ratio"] - 1) <= 0.15 for r in rows)
        within_start = sum(abs(r["ratio_start"] - 1) <= 0.15 for r in rows)
        print(f"{within} of {len(rows)} within 15 %" + (f" ({within_start} from the calibration at the start)"
                                                         if beside else ""))
        mem = []
        if not a.quick:
            print("\npeak RSS above the process baseline (fresh process, batch 1 x 32):")
            mem = memory_rows(hw, models)
        print()
        checks = zo2_memory_check(), trace_shares(), headline()
        print(format_paper_checks(*checks))
        load1 = os.getloadavg()[0]
        print(f"\nload average after: {load1:.2f}" + ("  (changed a lot: rerun for steadier numbers)"
                                                      if abs(load1 - load0) > 1.5 else ""))
        if a.json:
            print(json.dumps({"hardware": hw.to_dict(), "timing": rows, "memory": mem,
                              "zo2_memory": checks[0], "load": [load0, load1],
                              "trace_shares": [{"case": r["case"], "published": r["published"],
                                                "simulated": r["simulated"]} for r in checks[1]],
                              "headline": {k: checks[2][k] for k in ("published", "speedup", "zo2_step_s",
                                                                      "distzo2_step_s")}}, default=str))


if __name__ == "__main__":
    main()
