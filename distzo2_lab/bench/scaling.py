"""Scaling benchmark: tokens/s of real multi-process runs at world sizes 1, 2 and 4, equal total CPU threads.

Each layout (PertP, DDP, 2D; DistZO2, arXiv 2507.03211, Sec. 3) runs in fresh gloo worker
processes; each rank takes WARMUP warm-up steps, then `steps` timed steps between barriers, and the
slowest rank counts: tokens/s = batch x seq x steps / seconds. `total_threads` are shared out
equally, at least one per rank; more ranks than threads oversubscribe the cores and are flagged.

The ideal is what the forward passes alone allow: world 1's tokens/s scaled by W x T2 / T1c(W),
T2 = one rank's forward of the global batch with every thread, T1c(W) = the same forward by W
single-threaded ranks at once (so they contend as real ranks do). `ideal_layout` uses each
layout's own forwards (a DDP rank runs both signs on its share of the batch), so "% layout" is the
share that the engine's own work (noise, updates, copies, exchange, waits) leaves. By default the
ranks of a node share the work they would repeat (master_share.py: with copies, one master per
node whose updates and copies are each made once; node_share.py: the noise draws of an in-place
run); `share_noise=False` shows what that saves.
Every configuration runs `repeats` times round-robin and keeps its best run. Figures: docs/results.md.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from distzo2_lab.bench.efficiency import median_time
from distzo2_lab.config import ConfigError, TrainConfig, ZOConfig, validate
from distzo2_lab.parallel.groups import ParallelGroups
from distzo2_lab.parallel.launch import launch
from distzo2_lab.parallel.layout import Layout, validate_layout

WORLDS = (1, 2, 4)
WARMUP = 3
"""Untimed steps before the timing: the first step draws no update, the second compiles the fused
visit's update variant and the third its shapes of the node's shared pieces, and the first
touches of every buffer and shared slot land in these (one-time costs, not throughput)."""


def bench_worker(rank: int, world_size: int, q, cfg: TrainConfig, layout: Layout, steps: int,
                 forward_repeats: int = 0) -> dict:
    """One rank: gloo group, its process groups, Run, WARMUP warm-up steps, barrier, `steps` timed steps, barrier.

    Returns {"seconds": timed-step seconds, "forward_s": None}. With `forward_repeats` > 0 the
    rank then also times (after the step timing, all ranks at once behind a barrier) the median
    no-grad forward of the *global* batch on its own weights: the T2 / T1c measurements of the
    ideal, taken in the same processes so no extra start-up is paid."""
    from distzo2_lab.run.train import Run, make_task, to_device
    from distzo2_lab.seeds import step_seed

    validate(cfg)
    validate_layout(layout, world_size, cfg.batch_size)
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        groups = ParallelGroups.build(layout, "gloo", directions=cfg.zo.directions)
        run = Run(cfg, layout=layout, rank=rank, groups=groups)
        try:
            task, engine = make_task(cfg, run.adapter), run.engine

            def step(t: int) -> None:
                engine.step(to_device(run.micro_batch(task.batch(t)), cfg.device), step_seed(cfg.seed, t), step=t)

            for t in range(WARMUP):  # first-touch allocations, compiled variants, the first exchanges
                step(t)
            dist.barrier()
            t0 = time.perf_counter()
            for t in range(WARMUP, WARMUP + steps):
                step(t)
            dist.barrier()
            seconds = time.perf_counter() - t0
            engine.flush()
            forward_s = None
            if forward_repeats > 0:
                forward_s = _time_forward(run.adapter, task.batch(1)["input_ids"], forward_repeats)
            # this rank's own forwards of one step: one per sign it runs, over its micro-batch
            passes = sum(layout.signs(rank)) if world_size > 1 else 2
            step_forward_s = _time_forward(run.adapter, run.micro_batch(task.batch(1))["input_ids"],
                                           max(1, forward_repeats), passes)
            # the node's shared work this rank made: noise draws in place; with copies the updates and
            # copies of the node's one master (or the block copies of ranks of one sign over a store)
            share = engine.master_share or engine.noise_share or engine.copy_share
            made = share.computed / share.served if share is not None and share.served else 1.0
            return {"seconds": seconds, "forward_s": forward_s, "step_forward_s": step_forward_s,
                    "shared_fraction": made}
        finally:
            run.close()
    finally:
        dist.destroy_process_group()


def _time_forward(adapter, ids: torch.Tensor, repeats: int, passes: int = 1) -> float:
    """Median seconds of `passes` no-grad forwards; one warm-up, then every rank of the group starts together."""
    from distzo2_lab.zo.spsa import compute_context

    def forward():
        with torch.no_grad(), compute_context("fp32", ids.device):
            for _ in range(passes):
                adapter.loss(adapter.forward(ids), ids)

    forward()
    dist.barrier()
    seconds = median_time(forward, repeats, warmup=0)
    dist.barrier()
    return seconds


def forward_worker(rank: int, world_size: int, q, model: str, batch: int, seq: int, threads: int,
                   repeats: int, seed: int = 0) -> float:
    """Median seconds of one no-grad forward of a (batch x seq) batch; all ranks start together.

    Used for T1c only when no benchmarked world has `total_threads` single-threaded ranks."""
    from distzo2_lab.models import adapter_for, build_model

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        adapter = adapter_for(build_model(model, seed=seed))
        ids = torch.randint(4, adapter.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        return _time_forward(adapter, ids, repeats)
    finally:
        dist.destroy_process_group()


def layouts_for(world: int, batch: int) -> list[tuple[str, Layout]]:
    """(name, layout) pairs tried at `world` ranks (world 1: one single-rank run)."""
    if world == 1:
        return [("single", Layout(1, 1))]
    cands = [("PertP", Layout(dp=1, pert=world)), ("DDP", Layout(dp=world, pert=1))]
    if world == 4:
        cands.append(("2D", Layout(dp=2, pert=2)))
    return cands


def threads_per_rank(world: int, total_threads: int) -> int:
    return max(1, total_threads // world)


def scaling(model: str = "opt-125m", batch: int = 8, seq: int = 128, steps: int = 3, total_threads: int = 2,
            forward_repeats: int = 2, timeout: float = 900.0, seed: int = 0, repeats: int = 2,
            share_noise: bool = True, perturb: str = "auto", progress=None) -> dict:
    """Tokens/s per (layout, world) at equal total threads, with the forward-limited ideal.

    Every configuration runs `repeats` times, round-robin (a slow spell of a shared machine then
    hits every configuration alike); each row keeps its best run, and the ideal is built from the
    best (shortest) forward times of the same rounds. `share_noise=False` makes every rank draw all
    of z itself (Layout.share_noise). `perturb` is zo.perturb for every world ('copy': a PertP rank
    makes only its own sign's copy of each block). `progress(text)` is called before every launch."""
    if steps < 1 or total_threads < 1 or repeats < 1:
        raise ConfigError(f"steps={steps}, total_threads={total_threads}, repeats={repeats} are not valid; "
                          "each must be >= 1")
    tokens = batch * seq * steps
    plan, skipped = [], []
    t1_worlds = set()  # the first run of each world of >= total_threads one-thread ranks measures T1c(W)
    for world in WORLDS:
        tpr = threads_per_rank(world, total_threads)
        cfg = validate(TrainConfig(model=model, steps=steps + WARMUP, seed=seed, batch_size=batch, seq_len=seq,
                                   threads=tpr, zo=ZOConfig(perturb=perturb)))
        for name, layout in layouts_for(world, batch):
            try:
                validate_layout(layout, world, batch)
            except ConfigError as e:
                skipped.append({"layout": name, "world": world, "reason": str(e)})
                continue
            want_t2 = world == 1
            want_t1 = world >= total_threads and tpr == 1 and world not in t1_worlds
            if want_t1:
                t1_worlds.add(world)
            layout = Layout(layout.dp, layout.pert, share_noise=share_noise)
            plan.append((name, world, tpr, cfg, layout, forward_repeats if want_t2 or want_t1 else 0, want_t2, want_t1))
    runs: dict = {}
    step_fwd: dict = {}  # (layout, world) -> the slowest rank's own forwards of one step, each round
    t2s, t1s = [], {}  # t1s: world -> T1c(W) of each round
    for rep in range(repeats):
        for name, world, _, cfg, layout, reps, want_t2, want_t1 in plan:
            if progress is not None:
                progress(f"round {rep + 1}/{repeats}: {name} world {world}")
            per_rank = launch(bench_worker, world, (cfg, layout, steps, reps), timeout).wait()
            if want_t2:
                t2s.append(per_rank[0]["forward_s"])
            if want_t1:
                t1s.setdefault(world, []).append(statistics.mean(v["forward_s"] for v in per_rank.values()))
            secs = {r: v["seconds"] for r, v in per_rank.items()}
            step_fwd.setdefault((name, world), []).append(max(v["step_forward_s"] for v in per_rank.values()))
            runs.setdefault((name, world), []).append((max(secs.values()), [secs[r] for r in sorted(secs)],
                                                       per_rank[0].get("shared_fraction")))
    if total_threads not in t1s:  # total_threads is not one of WORLDS: measure its concurrent forward apart
        for _ in range(repeats):
            t1 = launch(forward_worker, total_threads, (model, batch, seq, 1, forward_repeats, seed), timeout).wait()
            t1s.setdefault(total_threads, []).append(statistics.mean(t1.values()))
    t2, t1c = min(t2s), min(t1s[total_threads])
    t1w = {w: min(v) for w, v in t1s.items()}
    rows = []
    for name, world, tpr, _, layout, *_ in plan:
        got = runs[(name, world)]
        seconds, rank_seconds, drawn = min(got, key=lambda g: g[0])
        rows.append({"layout": name, "dp": layout.dp, "pert": layout.pert, "world": world,
                     "threads_per_rank": tpr, "oversubscribed": world * tpr > total_threads,
                     "seconds": seconds, "rank_seconds": rank_seconds, "tokens_per_s": tokens / seconds,
                     "tokens_per_s_runs": [tokens / g[0] for g in got], "shared_fraction": drawn})
    base = next(r["tokens_per_s"] for r in rows if r["world"] == 1)
    base_fwd = min(step_fwd[next((r["layout"], 1) for r in rows if r["world"] == 1)])
    for r in rows:
        f = min(step_fwd[(r["layout"], r["world"])])
        r["step_forward_s"] = f
        r["ideal_layout_tokens_per_s"] = base * base_fwd / f
        r["of_ideal_layout"] = r["tokens_per_s"] / r["ideal_layout_tokens_per_s"]
        r["vs_world1"] = r["tokens_per_s"] / base
        w = r["world"]
        r["ideal_two_rank_tokens_per_s"] = base if w == 1 else base * min(w, total_threads) * t2 / t1c
        r["ideal_tokens_per_s"] = base * w * t2 / t1w[w] if w in t1w else r["ideal_two_rank_tokens_per_s"]
        r["of_ideal"] = r["tokens_per_s"] / r["ideal_tokens_per_s"]
        r["of_ideal_two_rank"] = r["tokens_per_s"] / r["ideal_two_rank_tokens_per_s"]
    over = sorted({r["world"] for r in rows if r["oversubscribed"]})
    return {
        "model": model, "batch": batch, "seq": seq, "steps": steps, "total_threads": total_threads,
        "cpu_count": os.cpu_count(), "forward_repeats": forward_repeats, "repeats": repeats,
        "share_noise": share_noise, "perturb": perturb,
        "forward_s_total_threads": t2, "forward_s_single_thread_concurrent": t1c,
        "forward_s_total_threads_runs": t2s, "forward_s_single_thread_concurrent_runs": t1s[total_threads],
        "forward_s_concurrent_by_world": t1w, "forward_s_concurrent_by_world_runs": t1s,
        "concurrency_gain": total_threads * t2 / t1c,
        "rows": rows, "skipped": skipped,
        "notes": [f"world {w}: {w} ranks x {threads_per_rank(w, total_threads)} thread(s) oversubscribe "
                  f"{total_threads} total threads; ranks take turns on the cores" for w in over],
    }


def format_scaling(r: dict) -> str:
    noise = ("the node's work split by its ranks" if r["share_noise"] else "every rank does all of its work")
    lines = [f"{r['model']} global batch {r['batch']}x{r['seq']}, {r['steps']} timed steps, "
             f"{r['total_threads']} total threads (cpu_count {r['cpu_count']}), best of {r['repeats']} "
             f"round-robin rounds; noise: {noise}; perturbation: {r.get('perturb', 'auto')}",
             f"forward: {r['forward_s_total_threads']:.3f} s with {r['total_threads']} threads; "
             f"{r['forward_s_single_thread_concurrent']:.3f} s each on {r['total_threads']} concurrent "
             f"single-threaded ranks -> concurrency gain {r['concurrency_gain']:.2f}x"]
    for w, t in sorted((int(k), v) for k, v in r.get("forward_s_concurrent_by_world", {}).items()):
        if w != r["total_threads"]:
            lines.append(f"forward: {t:.3f} s each on {w} concurrent single-threaded ranks (taking turns on "
                         f"{r['total_threads']} threads) -> ideal gain {w * r['forward_s_total_threads'] / t:.2f}x")
    lines.append(f"{'layout':>7} {'world':>5} {'thr/rank':>8} {'tokens/s':>10} {'vs world-1':>10} {'ideal':>10} "
                 f"{'% ideal':>8} {'% 2-rank':>8} {'% layout':>8} {'made':>8}  runs (tokens/s)")
    for row in r["rows"]:
        flag = "  (oversubscribed)" if row["oversubscribed"] else ""
        drawn = row.get("shared_fraction")
        runs = " ".join(f"{v:.0f}" for v in row.get("tokens_per_s_runs", []))
        two = row.get("of_ideal_two_rank", row["of_ideal"])
        lines.append(f"{row['layout']:>7} {row['world']:>5} {row['threads_per_rank']:>8} {row['tokens_per_s']:>10.1f} "
                     f"{row['vs_world1']:>9.2f}x {row['ideal_tokens_per_s']:>10.1f} {100 * row['of_ideal']:>7.0f}% "
                     f"{100 * two:>7.0f}% {_pct(row.get('of_ideal_layout')):>8} "
                     f"{'-' if drawn is None else f'{100 * drawn:.0f}%':>8}  {runs}{flag}")
    for s in r["skipped"]:
        lines.append(f"skipped {s['layout']} at world {s['world']}: {s['reason']}")
    lines.append("% ideal: of the ideal from this world's own concurrent forwards; % 2-rank: of the ideal "
                 "if taking turns on the cores cost nothing (total_threads ranks' forwards, times min(W, threads)); "
                 "% layout: of the ideal from each rank's own forwards of a step (its signs, its micro-batch)")
    lines.append("made: the share of the node's shared work that rank 0 did itself (with copies: the updates "
                 "and copies of the node's one master; in place: the z draws); the rest came from its node's "
                 "ranks through shared memory, whoever is there first computes; 100%: nothing shared")
    lines.extend(f"note: {n}" for n in r["notes"])
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def to_json(r: dict) -> str:
    return json.dumps(r, indent=1)
