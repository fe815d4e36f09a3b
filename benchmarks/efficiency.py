"""Step cost relative to two forward passes, eager MeZO vs the ZO2 engine, fp32 and bf16.

    python benchmarks/efficiency.py [--model opt-125m --batch 8 --seq 128 --threads 2 --repeats 3]

Everything is measured side by side in this one process; the ratio step / (2 x forward) is the
figure of merit (1.0 = the step costs exactly its two forwards). Prints a table and JSON lines.
"""
from __future__ import annotations

import argparse
import json

from distzo2_lab.bench.efficiency import efficiency
from distzo2_lab.bench.results import add_results_option, printed_to_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    add_results_option(p)
    a = p.parse_args()
    with printed_to_results("efficiency", a.results):
        rows = [efficiency(a.model, a.batch, a.seq, prec, a.threads, a.repeats) for prec in a.precision]
        print(f"{'precision':>9} {'forward s':>10} {'eager s':>8} {'engine s':>9} {'eager ratio':>12} "
              f"{'engine ratio':>13}")
        for r in rows:
            print(f"{r['precision']:>9} {r['forward_s']:>10.3f} {r['eager_step_s']:>8.3f} {r['engine_step_s']:>9.3f} "
                  f"{r['eager_ratio']:>12.3f} {r['engine_ratio']:>13.3f}")
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
