"""Throughput of the counter-based noise (distzo2_lab/zo/noise.py) beside torch's own generator.

    python benchmarks/noise.py [--numel 16777216 --threads 1 --rounds 7 --kind gaussian rademacher] [--results]

Times, in interleaved rounds (each round runs every case once, so drifts hit all alike), the
median G samples/s per core of: torch ``normal_`` (baseline, its own generator), the fill (z into
an fp32 buffer), and the fused visit pass (master * keep + alpha z_old, stored, then m +- eps z_new
written as two outs) with bf16 outs and with fp32 outs, each by the C kernels (noise_cpu.py) and by
Inductor's build of the torch definition; on CUDA also the Triton kernels (per GPU, not per
core). Compile time is paid before the rounds and printed.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.zo import noise as N
from distzo2_lab.zo import noise_cpu


def cpu_line() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("?", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
                                     if x in have)
                    break
    except OSError:
        pass
    return f"CPU: {model} | {flags} | torch {torch.__version__} | {torch.get_num_threads()} thread(s)"


def cases(n: int, device: str, kind: str) -> dict:
    k_new, k_old = N.noise_key(1, "bench"), N.noise_key(0, "bench")
    z = torch.empty(n, device=device)
    master = torch.randn(n, device=device)
    outs = {dt: (torch.empty(n, dtype=dt, device=device), torch.empty(n, dtype=dt, device=device))
            for dt in (torch.bfloat16, torch.float32)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def visit(dt):
        return lambda: N.visit_(master, 0, kind, [(k_old, 1e-7)], 1.0 - 1e-7, k_new, 1e-3, *outs[dt])

    passes = {"fill": lambda: N.fill_(z, kind, k_new, 0),
              "visit 1 update, 2 bf16 outs": visit(torch.bfloat16),
              "visit 1 update, 2 fp32 outs": visit(torch.float32)}
    fns = {"torch normal_": lambda: z.normal_()}
    if device == "cpu":  # the C kernels (noise_kernels.cpp) beside Inductor's build of the torch definition
        for name, fn in passes.items():
            fns[f"{name} (C kernel)"] = on_backend("c", fn)
            fns[f"{name} (Inductor)"] = on_backend("inductor", fn)
    else:
        fns.update(passes)
    return {name: (fn, sync) for name, fn in fns.items()}


def on_backend(backend: str, fn):
    def run():
        was, noise_cpu.backend = noise_cpu.backend, backend
        try:
            fn()
        finally:
            noise_cpu.backend = was
    return run


def measure(n: int, device: str, kind: str, rounds: int) -> dict[str, float]:
    cs = cases(n, device, kind)
    for name, (fn, sync) in cs.items():  # warm-up: compiles
        t = time.perf_counter()
        fn(), sync()
        if name != "torch normal_":
            print(f"  [{device}] first call of {name}: {time.perf_counter() - t:.1f} s (compile)")
    times: dict[str, list[float]] = {name: [] for name in cs}
    for _ in range(rounds):
        for name, (fn, sync) in cs.items():
            sync()
            t = time.perf_counter()
            fn(), sync()
            times[name].append(time.perf_counter() - t)
    per = torch.get_num_threads() if device == "cpu" else 1
    return {name: n / statistics.median(ts) / 1e9 / per for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--kind", nargs="+", choices=N.NOISE_KINDS, default=list(N.NOISE_KINDS))
    add_results_option(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with printed_to_results("noise", a.results):
        _run(a)


def _run(a) -> None:
    print(cpu_line())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for kind in a.kind:
            rates = measure(a.numel, dev, kind, a.rounds)
            unit = f"G samples/s per core ({a.threads} thread{'s' * (a.threads > 1)})" if dev == "cpu" \
                else "G samples/s per GPU (Triton)"
            print(f"{dev}, {kind}, numel {a.numel}: median of {a.rounds} interleaved rounds, {unit}")
            for name, r in rates.items():
                print(f"  {name:42s} {r:8.3f}")


if __name__ == "__main__":
    main()
