"""Peak memory of an offloaded run against the model's fp32 size, one fresh process per model.

    python benchmarks/memory.py [MODEL ...] [--tier disk --steps 2 --batch 1 --seq 32 --prefetch 0]
                                [--store DIR] [--threads 2] [--timeout SECONDS]

MODEL defaults to opt-1.3b (a 5.3 GB fp32 model; its two-slot disk store takes about twice that
on disk, so choose --store on a filesystem with room). Each model runs in its own Python
process, so the peak is that run's alone: building the store (timed), then STEPS steps. Peak
RSS is the process's VmHWM (ru_maxrss is reported in the JSON but carries the parent's
high-water mark across exec). Disk throughput is bytes over the upload / offload lane's busy
seconds; reads are often served by the page cache. Prints a table, then one JSON line per model.
"""
from __future__ import annotations

import argparse
import json

from distzo2_lab.bench.offload import peak_memory_subprocess
from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.config import OFFLOAD_TIERS


def _mib(kib) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["opt-1.3b"], help="preset names or checkpoint directories")
    p.add_argument("--tier", default="disk", choices=OFFLOAD_TIERS, help="where the blocks live")
    p.add_argument("--steps", type=int, default=2, help="steps after building the store")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    p.add_argument("--prefetch", type=int, default=0, help="upload lane runs this many blocks ahead")
    p.add_argument("--threads", type=int, default=2, help="torch and noise threads")
    p.add_argument("--store", default=None, help="parent directory of the temporary disk store")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per model")
    p.add_argument("--no-lean", action="store_true", help="keep the embeddings resident (disk tier)")
    add_results_option(p)
    a = p.parse_args()
    with printed_to_results("memory", a.results):
        rows = [peak_memory_subprocess(m, a.tier, a.steps, a.batch, a.seq, a.prefetch, a.store, a.threads, a.timeout,
                                      not a.no_lean)
                for m in a.models]
        print(f"{'model':>10} {'tier':>5} {'model MiB':>9} {'base MiB':>8} {'peak MiB':>8} {'rss/model':>9} "
              f"{'(peak-base)/model':>17} {'build s':>8} {'s/step':>7} {'read GB/s':>9} {'write GB/s':>10}")
        for r in rows:
            above = "n/a" if r["above_baseline_model_ratio"] is None else f"{r['above_baseline_model_ratio']:.3f}"
            print(f"{r['model']:>10} {r['tier']:>5} {r['model_bytes'] / 2**20:>9.0f} {_mib(r['baseline_rss_kib']):>8} "
                  f"{_mib(r['peak_rss_kib']):>8} {r['rss_model_ratio']:>9.3f} {above:>17} {r['store_build_s']:>8.1f} "
                  f"{r['step_s']:>7.2f} {_g(r['disk_read_gbps']):>9} {_g(r['disk_write_gbps']):>10}")
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
