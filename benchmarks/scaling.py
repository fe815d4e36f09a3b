"""Tokens/s of real multi-process runs at world sizes 1, 2, 4 (PertP, DDP, 2D) at equal total CPU threads.

    python benchmarks/scaling.py [--model opt-125m --batch 8 --seq 128 --steps 3 --threads 2 --repeats 2]
                                 [--no-share-noise] [--perturb auto|in-place|copy] [--json]

Each (layout, world) runs in fresh gloo worker processes; only the steps after a warm-up step and a
barrier are timed (the slowest rank counts). The ideal is world-1 tokens/s scaled by the measured
concurrency gain of single-threaded forwards (see distzo2_lab.bench.scaling). World sizes above
--threads oversubscribe the CPU and are flagged. Prints a table, then the JSON.
"""
from __future__ import annotations

import argparse

from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.bench.scaling import format_scaling, scaling, to_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2, help="total CPU threads shared by the ranks")
    p.add_argument("--repeats", type=int, default=2, help="round-robin rounds; each layout keeps its best")
    p.add_argument("--no-share-noise", action="store_true", help="every rank draws all of z (for comparison)")
    p.add_argument("--perturb", default="auto", help="zo.perturb of every world: auto, in-place or copy")
    p.add_argument("--json", action="store_true", help="print only the JSON")
    add_results_option(p)
    a = p.parse_args()
    with printed_to_results("scaling", a.results):
        r = scaling(a.model, a.batch, a.seq, a.steps, a.threads, repeats=a.repeats, share_noise=not a.no_share_noise,
                    perturb=a.perturb, progress=None if a.json else print)
        if not a.json:
            print(format_scaling(r))
        print(to_json(r))


if __name__ == "__main__":
    main()
