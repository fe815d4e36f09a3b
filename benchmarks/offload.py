"""Offloading cost: host / resident and disk / resident step time, lane overlap, span-recording overhead.

    python benchmarks/offload.py [--model opt-125m --batch 8 --seq 128 --threads 2 --steps 3 --prefetch 1]
                                 [--store DIR] [--overhead-tier host] [--no-overhead]

Everything is measured side by side in this one process: the same model and batches on the
resident, host and disk tiers (1 warm-up + STEPS timed steps each; the losses must be identical),
then span recording off vs on, interleaved step by step. The disk store goes to a temporary
directory (inside --store when given) and is removed afterwards. Prints tables, then JSON lines.
"""
from __future__ import annotations

import argparse
import json

from distzo2_lab.bench.offload import format_overhead, format_ratios, offload_ratios, recording_overhead
from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.config import OFFLOAD_TIERS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Timings are medians; compare ratios, not seconds, across machines.")
    p.add_argument("--model", default="opt-125m", help="preset name or checkpoint directory")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=2, help="torch and noise threads")
    p.add_argument("--steps", type=int, default=3, help="timed steps per tier (after 1 warm-up)")
    p.add_argument("--prefetch", type=int, default=1, help="upload lane runs this many blocks ahead")
    p.add_argument("--store", default=None, help="parent directory of the temporary disk store")
    p.add_argument("--overhead-tier", default="host", choices=OFFLOAD_TIERS, help="tier for the recording-overhead run")
    p.add_argument("--no-overhead", action="store_true", help="skip the recording-overhead measurement")
    add_results_option(p)
    a = p.parse_args()
    with printed_to_results("offload", a.results):
        rows = [offload_ratios(a.model, a.batch, a.seq, a.threads, a.steps, a.prefetch, a.store)]
        print(format_ratios(rows[0]))
        if not a.no_overhead:
            rows.append(recording_overhead(a.model, a.batch, a.seq, a.threads, a.steps, a.overhead_tier, a.prefetch,
                                           a.store))
            print(format_overhead(rows[1]))
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
