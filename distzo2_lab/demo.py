"""`distzo2 demo`: a real two-rank DistZO2 run on embedded defaults, and its HTML report.

1. checks that the ZO2 engine reproduces the eager MeZO reference bit for bit (5 steps);
2. ZO fine-tunes the tiny OPT on the synthetic task with PertP over two launched ranks
   (dp=1 x pert=2: one rank runs +eps, the other -eps) and the host tier, every rank
   streaming its blocks through the upload / compute / offload lanes and sending its spans live;
3. checks that both ranks hold the same weights and that base model + seed log rebuild them;
4. writes summary.json, seedlog.jsonl, per-rank traces and ``report.html`` (layout, metrics,
   timeline, loss curve; one self-contained file) under `out`, and prints where it is.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch

from distzo2_lab.config import OffloadConfig, TrainConfig, replace
from distzo2_lab.observe.live import LiveView
from distzo2_lab.observe.metrics import run_metrics
from distzo2_lab.observe.report import write_run_report
from distzo2_lab.observe.viz import loss_figure
from distzo2_lab.parallel.launch import launch
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.run.checkpoint import SeedLog, checkpoint_tensors, digest, save_checkpoint
from distzo2_lab.run.train import rebuild, train
from distzo2_lab.run.worker import train_worker


def _engine_check(cfg: TrainConfig) -> bool:
    probe = replace(cfg, steps=5, offload=OffloadConfig())
    eager = train(replace(probe, engine="eager"), progress=False)
    zo2 = train(probe, progress=False)
    keys = ("loss_plus", "loss_minus", "projected_grad")
    return eager["digest"] == zo2["digest"] and all(
        [a[k] for k in keys] == [b[k] for k in keys] for a, b in zip(eager["steps"], zo2["steps"]))


def run_demo(out: str = "runs/demo", steps: int = 300, layout: Layout | None = None, tier: str = "host",
             timeout: float = 600.0) -> dict:
    t0 = time.perf_counter()
    layout = layout or Layout(dp=1, pert=2)
    cfg = TrainConfig(steps=steps, threads=1, offload=OffloadConfig(tier=tier))
    print(f"distzo2 demo: tiny OPT, synthetic counting task, {steps} ZO steps, batch {cfg.batch_size}x"
          f"{cfg.seq_len}, lr {cfg.zo.lr}, eps {cfg.zo.eps}; layout {layout.describe()}, {tier} tier")

    same = _engine_check(cfg)
    print(f"[1/4] ZO2 engine vs eager MeZO, 5 steps: {'bit-identical' if same else 'MISMATCH'} "
          f"losses, projected gradients and weights")
    if not same:
        raise RuntimeError("the ZO2 engine diverged from the eager reference")

    view = LiveView(title=f"tiny OPT, {layout.describe()}", widget=False)
    trace = os.path.join(out, "trace")
    handle = launch(train_worker, layout.world_size, args=(cfg, layout, out, trace, True), timeout=timeout)
    results = view.watch(handle, display=False)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    print(f"[2/4] trained on {layout.world_size} ranks: eval loss {s['eval_loss_start']:.3f} -> "
          f"{s['eval_loss_end']:.3f} in {s['seconds']:.1f} s ({s['tokens_per_s']:.0f} tokens/s); "
          f"{len(view.spans)} spans arrived live")

    digests = {r["digest"] for r in results.values()}
    adapter = rebuild(os.path.join(out, "seedlog.jsonl"), threads=cfg.threads)
    rebuilt = digest(adapter)
    ok = len(digests) == 1 and rebuilt == s["digest"]
    print(f"[3/4] {'identical' if len(digests) == 1 else 'DIFFERENT'} weights on every rank; rebuilt from base + "
          f"seed log ({steps} records): digest {rebuilt[:16]} "
          f"{'matches training' if rebuilt == s['digest'] else 'DOES NOT MATCH training'}")
    if not ok:
        raise RuntimeError("ranks disagree, or the seed-log rebuild differs from the trained weights")
    log = SeedLog.read(os.path.join(out, "seedlog.jsonl"))
    save_checkpoint(os.path.join(out, "checkpoint"), checkpoint_tensors(adapter),
                    {"step": steps, "config": asdict(cfg), "base": log.base, "digest": rebuilt}, log)
    loss_figure(s["steps"], f"tiny OPT, {layout.describe()}, {steps} steps").write_html(
        os.path.join(out, "loss.html"), include_plotlyjs=True)

    from distzo2_lab.plan.planner import plan_text

    m = run_metrics(view.rank_spans())["ranks"]
    hidden = ", ".join(f"rank {r} {x['hidden_fraction']:.0%}" for r, x in m.items() if x["hidden_fraction"] is not None)
    summary = {"model": cfg.model, "layout": layout.describe(), "tier": tier, "steps": steps,
               "batch": f"{cfg.batch_size} x {cfg.seq_len}", "eval loss": f"{s['eval_loss_start']:.4f} -> "
               f"{s['eval_loss_end']:.4f}", "tokens/s (rank 0)": f"{s['tokens_per_s']:.0f}",
               "transfer hidden under compute": hidden, "digest": s["digest"][:16]}
    html = write_run_report(os.path.join(out, "report.html"), f"distzo2 demo: {layout.describe()}", summary,
                            s["steps"], view.rank_spans(), plan_text(layout, cfg.batch_size, model=cfg.model),
                            s["tokens_per_s"],
                            checks={"ZO2 engine == eager MeZO (5 steps, bit for bit)": same,
                                    "identical weights on every rank": len(digests) == 1,
                                    "base + seed log rebuilds the trained weights": rebuilt == s["digest"]})
    print(f"[4/4] report: {html}")
    print(f"outputs in {os.path.abspath(out)}: report.html, summary.json, seedlog.jsonl, checkpoint/, loss.html, "
          f"trace/ "
          f"({time.perf_counter() - t0:.0f} s in all)")
    torch.set_num_threads(cfg.threads)
    return {**s, "report": html, "ranks": results, "spans": len(view.spans)}
