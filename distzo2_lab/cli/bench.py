"""`distzo2 bench ...`: the one front-end of each measurement (efficiency, offload, memory, scaling).

Every command prints a table (or one JSON object with --json); with --results it also writes the
table into its section of docs/results.md, under a line naming the machine."""
from __future__ import annotations

import argparse
import json
import sys

from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.config import COMPUTE_DTYPES, PERTURB_MODES


def _efficiency(a) -> None:
    from distzo2_lab.bench.efficiency import efficiency

    rows = [efficiency(a.model, a.batch, a.seq, p, a.threads, a.repeats) for p in a.precision]
    if a.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))
        return
    r = rows[0]
    print(f"{r['model']} batch {r['batch']}x{r['seq']}, {r['threads']} threads on {r['cpu']}; "
          f"{r['repeats']} interleaved rounds, medians (ratios taken within each round); floor = 2 forwards")
    print(f"{'precision':>9} {'forward s':>10} {'eager s':>8} {'engine s':>9} "
          f"{'eager / floor':>14} {'engine / floor':>15}")
    for r in rows:
        print(f"{r['precision']:>9} {r['forward_s']:>10.3f} {r['eager_step_s']:>8.3f} {r['engine_step_s']:>9.3f} "
              f"{r['eager_ratio']:>14.3f} {r['engine_ratio']:>15.3f}")


def _offload(a) -> None:
    from distzo2_lab.bench.offload import format_overhead, format_ratios, offload_ratios, recording_overhead

    r = offload_ratios(a.model, a.batch, a.seq, a.threads, a.steps, a.prefetch)
    o = recording_overhead(a.model, a.batch, a.seq, a.threads, a.steps, "host", a.prefetch)
    text = format_ratios(r) + "\n" + format_overhead(o)
    print(json.dumps({"ratios": r, "recording": o}, indent=1) if a.json else text)


def _memory(a) -> None:
    from distzo2_lab.bench.offload import format_memory, peak_memory_subprocess

    r = peak_memory_subprocess(a.model, tier="disk", store_dir=a.store, prefetch=a.prefetch, lean=not a.no_lean)
    print(json.dumps(r, indent=1) if a.json else format_memory(r))


def _scaling(a) -> None:
    from distzo2_lab.bench.scaling import format_scaling, scaling

    r = scaling(a.model, a.batch, a.seq, a.steps, repeats=a.repeats, share_noise=not a.no_share_noise,
                perturb=a.perturb, progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(json.dumps(r, indent=1) if a.json else format_scaling(r))


def _run(fn):
    def cmd(a) -> int:
        with printed_to_results(a.bench, a.results):
            fn(a)
        return 0

    return cmd


def _parser(bsub, name: str, help_text: str, fn, model: str = "opt-125m") -> argparse.ArgumentParser:
    p = bsub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=model)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_results_option(p)
    p.set_defaults(fn=_run(fn))
    return p


def add_parser(sub) -> None:
    """The `bench` command and its sub-commands."""
    b = sub.add_parser("bench", help="benchmarks: each prints its ratio to the floor beside the reference")
    bsub = b.add_subparsers(dest="bench", required=True)
    e = _parser(bsub, "efficiency", "step / (2 x forward) for eager MeZO and the ZO2 engine", _efficiency)
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--seq", type=int, default=128)
    e.add_argument("--precision", nargs="+", default=["fp32"], choices=COMPUTE_DTYPES)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--repeats", type=int, default=5, help="interleaved rounds of forward / eager / engine")
    o = _parser(bsub, "offload", "host / resident and disk / resident step time, overlap, recording overhead",
                _offload)
    o.add_argument("--batch", type=int, default=8)
    o.add_argument("--seq", type=int, default=128)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--steps", type=int, default=3)
    o.add_argument("--prefetch", type=int, default=1)
    m = _parser(bsub, "memory", "peak RSS / model size of a disk-offloaded run (fresh process)", _memory,
                model="opt-1.3b")
    m.add_argument("--store", default=None, help="parent directory of the temporary disk store")
    m.add_argument("--prefetch", type=int, default=0)
    m.add_argument("--no-lean", action="store_true", help="keep the embeddings resident")
    sc = _parser(bsub, "scaling", "tokens/s at world 1, 2, 4 (PertP, DDP, 2D) at equal total CPU threads", _scaling)
    sc.add_argument("--batch", type=int, default=8)
    sc.add_argument("--seq", type=int, default=128)
    sc.add_argument("--steps", type=int, default=3)
    sc.add_argument("--repeats", type=int, default=2, help="round-robin rounds; each layout keeps its best")
    sc.add_argument("--no-share-noise", action="store_true", help="every rank draws all of z (for comparison)")
    sc.add_argument("--perturb", default="auto", help=f"zo.perturb of every world, one of {', '.join(PERTURB_MODES)}")
