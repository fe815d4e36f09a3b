"""precision.master='bf16' against the fp32 master: bytes a host-tier step moves, step time, and
how the updates of a small learning rate land.

    python benchmarks/bf16_master.py [--model opt-125m --batch 2 --seq 64 --steps 4 --lr 1e-7] [--results]

Part 1 trains the same host-tier run with an fp32 and a bf16 master (bf16 compute either way) and
prints each run's bytes per parameter per step from its summary and its median step time (the
steps after the first, which pays the compilation). Part 2
runs the resident engine with a bf16 master at `--lr` and, for every block, compares the bf16
master after the steps with the exact fp32 sum of the same updates: the fraction of elements that
moved, and the regression slope of the bf16 move on the exact move (1: every update lands on
average; round to nearest shown beside, which keeps only the updates larger than half an ulp).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.config import OffloadConfig, PrecisionConfig, TrainConfig, ZOConfig
from distzo2_lab.run.train import Run, make_task, train
from distzo2_lab.seeds import step_seed


def transfer_table(a) -> None:
    print(f"host tier, {a.model}, batch {a.batch} x {a.seq}, bf16 compute, {a.steps} steps")
    print(f"{'master':<8} {'bytes/param/step':>17} {'up B/step':>12} {'down B/step':>12} {'s/step':>8}")
    for master in ("fp32", "bf16"):
        cfg = TrainConfig(model=a.model, steps=a.steps, batch_size=a.batch, seq_len=a.seq, threads=a.threads,
                          precision=PrecisionConfig("bf16", "bf16", master), zo=ZOConfig(lr=a.lr),
                          offload=OffloadConfig(tier="host"))
        ends = []
        s = train(cfg, progress=False, on_step=lambda r, ends=ends: ends.append(time.perf_counter()))
        step_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
        print(f"{master:<8} {s['bytes_per_param_per_step']:>17.3f} {s['bytes_up_per_step']:>12.3e} "
              f"{s['bytes_down_per_step']:>12.3e} {step_s:>8.3f}")


def landing_table(a) -> None:
    cfg = TrainConfig(model=a.model, steps=a.steps, batch_size=a.batch, seq_len=a.seq, threads=a.threads,
                      precision=PrecisionConfig("bf16", "bf16", "bf16"), zo=ZOConfig(lr=a.lr))
    run = Run(cfg)
    blocks = run.adapter.blocks
    before = [b.master.clone() for b in blocks]
    task, seeds = make_task(cfg, run.adapter), []
    for t in range(a.steps):
        r = run.engine.step(run.micro_batch(task.batch(t)), step_seed(cfg.seed, t), step=t)
        seeds.append((r.seed, r.grad))
    run.engine.flush()
    moved = n = 0
    sr = [0.0, 0.0]
    rtn = [0.0, 0.0]
    for b, b0 in zip(blocks, before):
        exact = b0.float()
        z = torch.empty(b.numel)
        for seed, grad in seeds:
            exact = exact - a.lr * grad * run.engine.perturber.fill(z, seed, b.key)
        d_exact = (exact - b0.float()).double()
        for acc, after in ((sr, b.master), (rtn, exact.to(torch.bfloat16))):
            d = (after.float() - b0.float()).double()
            acc[0] += float((d * d_exact).sum())
            acc[1] += float((d_exact * d_exact).sum())
        moved += int((b.master != b0).sum())
        n += b.numel
    run.close()
    print(f"\nbf16 master at lr {a.lr:g}, {a.steps} steps, {n} block parameters")
    print(f"{'rounding':<20} {'elements moved':>15} {'slope on exact update':>22}")
    print(f"{'stochastic (run)':<20} {moved / n:>15.4f} {sr[0] / sr[1]:>22.3f}")
    print(f"{'to nearest':<20} {'':>15} {rtn[0] / rtn[1]:>22.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-7)
    ap.add_argument("--threads", type=int, default=2)
    add_results_option(ap)
    a = ap.parse_args()
    with printed_to_results("bf16_master", a.results):
        transfer_table(a)
        landing_table(a)


if __name__ == "__main__":
    main()
