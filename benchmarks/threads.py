"""Default threads vs --threads 1 on a loaded machine: `distzo2 train --model tiny --steps N`
with the default thread count and with one thread, interleaved, while another process keeps a
core busy. Prints each time and the ratio default / one thread (the defaults aim at <= 1.5x:
they must not let OpenMP spin-waiting slow a loaded small machine down).

    python benchmarks/threads.py [--steps 20] [--rounds 3] [--results]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from distzo2_lab.bench.results import add_results_option, printed_to_results

EXE = os.path.join(os.path.dirname(sys.executable), "distzo2")


def busy() -> subprocess.Popen:
    """Another process that keeps one core busy for as long as it runs."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed_run(steps: int, extra: list[str], out: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([EXE, "train", "--model", "tiny", "--steps", str(steps), "--no-progress", "--out", out, *extra],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    add_results_option(p)
    a = p.parse_args()
    env_policy = os.environ.get("OMP_WAIT_POLICY")
    times = {"default": [], "--threads 1": []}
    hog = busy()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(a.rounds):  # interleaved, so that both see the same load
                for name, extra in (("default", []), ("--threads 1", ["--threads", "1"])):
                    times[name].append(timed_run(a.steps, extra, os.path.join(tmp, f"{name}-{k}".replace(" ", ""))))
    finally:
        hog.kill()
        hog.wait()
    best = {name: min(ts) for name, ts in times.items()}
    with printed_to_results("threads", a.results):
        _report(best, a, env_policy)


def _report(best: dict, a, env_policy) -> None:
    print(f"{os.cpu_count()} cores, one busy process, OMP_WAIT_POLICY={env_policy or 'unset'}, "
          f"{a.steps} steps, best of {a.rounds} (each includes start-up)")
    for name, t in best.items():
        print(f"  {name:12s} {t:.2f} s")
    print(f"ratio default / --threads 1 = {best['default'] / best['--threads 1']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
