"""Cost of watching a run: span recording + batching + live plotting, as % of step time.

    python benchmarks/overhead.py [--model opt-125m --batch 4 --seq 64 --threads 2 --steps 8 --tier host]

One run, one process, steps interleaved off, recorded, watched, off, ...: "off" records nothing;
"recorded" records every span and batches them (events.SpanBatcher, as train_worker does);
"watched" also feeds the batches to a LiveView whose FigureWidget redraws (at most 10 times a
second, at most 1 % of the time) on the training thread itself. Here the plotting
shares the training process and its cores, so this is an upper bound of what a notebook watching
launched workers adds (there the plot runs in the kernel, the recording in the workers). Prints
median step seconds of each and the overheads in percent (target: under 3 %), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.config import OffloadConfig, TrainConfig
from distzo2_lab.observe.events import Recorder, SpanBatcher
from distzo2_lab.observe.live import LiveView
from distzo2_lab.run.train import Run, make_task, to_device
from distzo2_lab.seeds import step_seed


def measure(model: str, batch: int, seq: int, threads: int, steps: int, tier: str) -> dict:
    torch.set_num_threads(threads)
    cfg = TrainConfig(model=model, steps=1 + 3 * steps, batch_size=batch, seq_len=seq, threads=threads,
                      offload=OffloadConfig(tier=tier))
    view = LiveView(title="overhead", widget=True)
    rec = Recorder(enabled=False)
    plot = [False]
    rec.listener = SpanBatcher(lambda rows: plot[0] and view.feed(0, {"spans": rows, "origin_ns": rec.origin}))
    run = Run(cfg, recorder=rec)
    modes = ("off", "recorded", "watched")
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        task = make_task(cfg, run.adapter)
        for t in range(cfg.steps):
            mode = modes[(t - 1) % 3]  # step 0 warms up; then off, recorded, watched, off, ...
            rec.enabled, plot[0] = t > 0 and mode != "off", mode == "watched"
            batch_t = to_device(task.batch(t), cfg.device)
            t0 = time.perf_counter()
            r = run.engine.step(batch_t, step_seed(cfg.seed, t), step=t)
            if rec.enabled:
                rec.listener.flush()
            if plot[0]:
                view.feed(0, {"step": r.step, "loss_plus": r.loss_plus, "loss_minus": r.loss_minus,
                              "projected_grad": r.grad, "tokens": r.tokens, "t": rec.now() / 1e9,
                              "origin_ns": rec.origin})
            dt = time.perf_counter() - t0
            if t > 0:
                times[mode].append(dt)
        if run.offload is not None:
            run.offload.streamer.drain()
    finally:
        run.close()
    off, recd, on = (statistics.median(times[m]) for m in modes)
    return {"model": model, "batch": batch, "seq": seq, "threads": threads, "tier": tier, "steps": steps,
            "off_step_s": off, "recorded_step_s": recd, "on_step_s": on,
            "recording_percent": 100 * (recd / off - 1), "overhead_percent": 100 * (on / off - 1),
            "spans": len(view.spans), "redraws": view.redraws}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps with and without watching (each)")
    p.add_argument("--tier", default="host", choices=("resident", "host", "disk"))
    add_results_option(p)
    a = p.parse_args(argv)
    with printed_to_results("overhead", a.results):
        r = measure(a.model, a.batch, a.seq, a.threads, a.steps, a.tier)
        print(f"{r['model']} batch {r['batch']}x{r['seq']}, {r['tier']} tier, {r['threads']} threads, "
              f"median of {r['steps']} steps each")
        print(f"  not recorded        {r['off_step_s']:.4f} s/step")
        print(f"  recorded + batched  {r['recorded_step_s']:.4f} s/step  ({r['recording_percent']:+.2f} %)")
        print(f"  + live plot         {r['on_step_s']:.4f} s/step  ({r['spans']} spans, {r['redraws']} redraws)")
        print(f"  overhead            {r['overhead_percent']:+.2f} % of step time (target < 3 %)")
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
