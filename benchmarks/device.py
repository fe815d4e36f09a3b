"""MeZO against ZO2 on one working device (a GPU), with the planner's memory and the simulator's step time beside it.

    python benchmarks/device.py [MODEL ...] [--batch 1 --seq 2048 --steps 3 --compute bf16 --prefetch 1]
                                [--tiers host host-bf16 [disk]] [--hardware h100-sxm [this-machine --plan-dir DIR]]
                                [--device cuda] [--threads 4]
                                [--store DIR] [--json]

MODEL defaults to opt-1.3b, opt-2.7b and opt-6.7b (random weights built from their configs). For each model,
in this one process, one case after another: eager MeZO (all resident), ZO2 resident, ZO2 on each
tier; median step seconds, step / MeZO, losses equal to MeZO's, peak device memory allocated
against the planner's (runtime overhead left out), the lanes' hidden fraction, the upload lane's
GB/s, and the simulator's step time on each --hardware profile (a datasheet profile also with the
links measured here) with its ratio to the measured step.
Under each table, the milliseconds per step each lane:phase takes (span durations; on CUDA, device
time between the span's events). Prints a table per model, then one JSON line per model with --json.
"""
import argparse
import json

from distzo2_lab.bench.device import TIERS, device_cases, format_cases
from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.plan.hardware import names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["opt-1.3b", "opt-2.7b", "opt-6.7b"], help="preset names")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after 1 warm-up)")
    p.add_argument("--compute", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--tiers", nargs="+", default=None, choices=TIERS,
                   help="default: host, and host-bf16 (bf16 masters) under bf16 compute")
    p.add_argument("--hardware", nargs="+", default=["h100-sxm"], choices=names(),
                   help="the simulator's profiles; this-machine: the calibration in --plan-dir")
    p.add_argument("--plan-dir", default=None, help="where `distzo2 plan calibrate --device cuda` wrote this-machine")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--store", default=None, help="parent directory of the temporary disk store")
    p.add_argument("--json", action="store_true", help="also print one JSON line per model")
    add_results_option(p)
    a = p.parse_args()
    with printed_to_results("device", a.results):
        results = []
        tiers = tuple(a.tiers or ["host"] + ["host-bf16"] * (a.compute == "bf16"))
        for model in a.models:
            r = device_cases(model, a.batch, a.seq, a.steps, a.compute, a.prefetch, a.device, a.threads,
                             tiers, tuple(a.hardware), a.store, a.plan_dir)
            print(format_cases(r), flush=True)
            results.append(r)
        if a.json:
            for r in results:
                print(json.dumps(r))


if __name__ == "__main__":
    main()
