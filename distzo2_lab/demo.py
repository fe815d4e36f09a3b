"""`distzo2 demo`: the main job on embedded defaults, in well under two minutes on 2 CPU cores.

1. checks that the ZO2 engine reproduces the eager MeZO reference bit for bit (5 steps);
2. ZO fine-tunes the tiny OPT on the synthetic task with the ZO2 engine;
3. rebuilds the fine-tuned weights from base model + seed log and checks the digest;
4. writes summary.json, seedlog.jsonl, a checkpoint and loss.html under `out`.
"""
from __future__ import annotations

import os
import time

import torch

from .checkpoint import digest
from .config import TrainConfig, replace
from .train import rebuild, train
from .viz import loss_figure


def run_demo(out: str = "runs/demo", steps: int = 300) -> dict:
    t0 = time.perf_counter()
    cfg = TrainConfig(steps=steps)
    print(f"distzo2 demo: tiny OPT, synthetic counting task, {steps} ZO steps, batch {cfg.batch_size}x"
          f"{cfg.seq_len}, lr {cfg.zo.lr}, eps {cfg.zo.eps}, {cfg.threads} threads")

    probe = replace(cfg, steps=5)
    eager = train(replace(probe, engine="eager"), progress=False)
    zo2 = train(probe, progress=False)
    same = all(
        (a["loss_plus"], a["loss_minus"], a["projected_grad"]) == (b["loss_plus"], b["loss_minus"], b["projected_grad"])
        for a, b in zip(eager["steps"], zo2["steps"])
    ) and eager["digest"] == zo2["digest"]
    print(f"[1/3] ZO2 engine vs eager MeZO, 5 steps: {'bit-identical' if same else 'MISMATCH'} "
          f"losses, projected gradients and weights")
    if not same:
        raise RuntimeError("the ZO2 engine diverged from the eager reference")

    ckpt = os.path.join(out, "checkpoint")
    s = train(cfg, out=out, save=ckpt)
    print(f"[2/3] trained: eval loss {s['eval_loss_start']:.3f} -> {s['eval_loss_end']:.3f} "
          f"in {s['seconds']:.1f} s ({s['tokens_per_s']:.0f} tokens/s, peak RSS {s['peak_rss_mb']:.0f} MiB)")

    rebuilt = digest(rebuild(os.path.join(out, "seedlog.jsonl"), threads=cfg.threads))
    ok = rebuilt == s["digest"]
    print(f"[3/3] rebuilt from base + seed log ({steps} records): digest {rebuilt[:16]} "
          f"{'matches' if ok else 'DOES NOT MATCH'} training")
    if not ok:
        raise RuntimeError("seed-log rebuild differs from the trained weights")

    html = os.path.join(out, "loss.html")
    loss_figure(s["steps"], f"tiny OPT, ZO2 engine, {steps} steps").write_html(html, include_plotlyjs=True)
    print(f"outputs in {os.path.abspath(out)}: summary.json, seedlog.jsonl, checkpoint/, loss.html "
          f"({time.perf_counter() - t0:.0f} s in all)")
    torch.set_num_threads(cfg.threads)
    return s
