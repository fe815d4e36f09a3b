"""Offload benchmarks: what streaming the blocks from host memory or disk costs, and what it saves.

ZO2 (arXiv 2503.12668, Sec. 3.3) hides block transfers under compute. :func:`offload_ratios` runs
the resident, host and disk tiers on the same batches in one process (identical losses required)
and reports each tier's step against resident with the lanes' overlap; :func:`recording_overhead`
interleaves steps with span recording off and on; :func:`peak_memory` runs one model in a fresh
process and reads its resident-set high-water mark (VmHWM; ``ru_maxrss`` would carry the parent's).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from distzo2_lab.bench.procstatus import status_kib
from distzo2_lab.config import OFFLOAD_TIERS, OffloadConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.models.presets import PRESETS
from distzo2_lab.observe.events import Recorder, lane_busy, overlap_metrics
from distzo2_lab.run.train import Run, make_task, to_device
from distzo2_lab.seeds import step_seed


# -- helpers ----------------------------------------------------------------------------------
def _config(model: str, batch: int, seq: int, threads: int, steps: int, tier: str, prefetch: int,
            store: str | None, lean: bool = False) -> TrainConfig:
    return validate(TrainConfig(model=model, steps=steps, batch_size=batch, seq_len=seq, threads=threads,
                                zo=ZOConfig(lr=1e-6, eps=1e-3),
                                offload=OffloadConfig(tier=tier, prefetch=prefetch, store=store, lean=lean)))


def _step(run: Run, task, t: int) -> tuple[float, object]:
    """One training step as train() runs it (step, seed-log record, disk commit); its seconds."""
    cfg = run.cfg
    batch = to_device(task.batch(t), cfg.device)
    seed = step_seed(cfg.seed, t)
    t0 = time.perf_counter()
    r = run.engine.step(batch, seed, step=t)
    run.log.append(r.step, r.seed, r.grad, r.lr)
    if run.offload is not None:
        run.offload.commit(t)  # disk tier: persisted on the offload lane; a no-op on the host tier
    return time.perf_counter() - t0, r


def _sync(device: str) -> None:
    """Wait for the work queued on a CUDA device (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def _settle(run: Run) -> None:
    """Lanes idle and prefetch landed, so byte counters read at two settled points differ by whole sweeps."""
    if run.offload is not None:
        run.offload.streamer.settle()


def _io(run: Run) -> tuple[int, int]:
    store = run.offload.store if run.offload is not None else None
    if store is None or store.tier != "disk":
        return 0, 0
    return store.bytes_read, store.bytes_written


def _gbps(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def _kept_up(m: dict) -> bool | None:
    """The upload lane kept up when it was busy for less of the window than compute was."""
    busy = m.get("busy", {})
    if "upload" not in busy:
        return None
    return busy["upload"] < busy.get("compute", 0.0)


def _rss_kib() -> int | None:
    kib = status_kib("VmRSS")
    if kib is None:
        try:
            import psutil

            kib = psutil.Process().memory_info().rss // 1024
        except Exception:
            return None
    return kib


def _store_parent(store_dir: str | None) -> str | None:
    if store_dir is not None:
        os.makedirs(store_dir, exist_ok=True)
    return store_dir


# -- tiers side by side -----------------------------------------------------------------------
class _Tier:
    """One run (1 warm-up step, then cfg.steps - 1 timed ones), timed one step at a time so that
    tiers can be interleaved; on CUDA each step waits for the device too."""

    def __init__(self, cfg: TrainConfig):
        self.tier, self.cfg = cfg.offload.tier, cfg
        self.rec = Recorder()
        t0 = time.perf_counter()
        self.run = Run(self.cfg, recorder=self.rec)
        self.build_s = time.perf_counter() - t0
        self.task = make_task(self.cfg, self.run.adapter)
        _step(self.run, self.task, 0)  # warm-up: first-touch page faults, allocator, thread pools
        _settle(self.run)
        _sync(cfg.device)
        self.read0, self.written0 = _io(self.run)
        self.rec.clear()
        self.start = self.rec.now()
        self.times, self.losses = [], []

    def step(self, t: int) -> None:
        """Step t, including the wait for its write-backs (so no work spills into the next tier)."""
        t0 = time.perf_counter()
        _, r = _step(self.run, self.task, t)
        _settle(self.run)
        _sync(self.cfg.device)
        self.times.append(time.perf_counter() - t0)
        self.losses.append([r.loss_plus, r.loss_minus])

    def finish(self) -> dict:
        read1, written1 = _io(self.run)
        self.rec.flush_cuda()
        self.spans = spans = [s for s in self.rec.spans if s.end > self.start]  # no stale span from before clear()
        self.run.close()
        m = overlap_metrics(spans)
        up_s, up_bytes = lane_busy(spans, "upload")
        off_s, off_bytes = lane_busy(spans, "offload")
        steps = len(self.times)
        out = {
            "tier": self.tier, "build_s": self.build_s, "step_s": statistics.median(self.times),
            "step_times": self.times, "loop_s": sum(self.times), "losses": self.losses, "overlap": m,
            "kept_up": _kept_up(m), "upload_busy_s": up_s, "offload_busy_s": off_s,
            "upload_gbps": _gbps(up_bytes, up_s), "offload_gbps": _gbps(off_bytes, off_s),
        }
        if self.tier == "disk":
            out.update({
                "disk_read_bytes_per_step": (read1 - self.read0) / steps,
                "disk_written_bytes_per_step": (written1 - self.written0) / steps,
                "disk_read_gbps": _gbps(read1 - self.read0, up_s),
                "disk_write_gbps": _gbps(written1 - self.written0, off_s),
            })
        return out


def offload_ratios(model: str = "opt-125m", batch: int = 8, seq: int = 128, threads: int = 2, steps: int = 3,
                   prefetch: int = 1, store_dir: str | None = None) -> dict:
    """Median step seconds on the resident, host and disk tiers (one process, same model and
    batches, 1 warm-up + `steps` timed steps each, the tiers interleaved step by step) and
    host / resident, disk / resident. A step's time includes waiting for its write-backs.

    The disk store is created in a fresh temporary directory (inside `store_dir` when given, so
    the filesystem can be chosen) and removed afterwards. Overlap metrics cover the timed steps
    (and the drain after them); disk bytes are store counters over the timed steps; disk
    throughput is those bytes over the upload (read) or offload (write) lane's busy seconds.
    ``identical`` is True when every tier gave bit-identical losses on every timed step.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    where = tempfile.mkdtemp(prefix="distzo2-bench-", dir=_store_parent(store_dir))
    try:
        # Interleaved (resident, host, disk, then rotated each step): drift in the machine's speed
        # (2 shared cores) falls on every tier alike instead of on whichever ran last.
        runs = [_Tier(_config(model, batch, seq, threads, 1 + steps, tier, prefetch,
                              os.path.join(where, "store") if tier == "disk" else None)) for tier in OFFLOAD_TIERS]
        for t in range(1, steps + 1):
            for k in range(len(runs)):
                runs[(k + t) % len(runs)].step(t)
        tiers = {r.tier: r.finish() for r in runs}
    finally:
        shutil.rmtree(where, ignore_errors=True)
        torch.set_num_threads(threads_before)
    res, host, disk = (tiers[t] for t in OFFLOAD_TIERS)
    return {
        "model": model, "batch": batch, "seq": seq, "threads": threads, "steps": steps, "prefetch": prefetch,
        "resident_step_s": res["step_s"], "host_step_s": host["step_s"], "disk_step_s": disk["step_s"],
        "host_ratio": host["step_s"] / res["step_s"], "disk_ratio": disk["step_s"] / res["step_s"],
        "identical": host["losses"] == res["losses"] and disk["losses"] == res["losses"],
        "host_hidden_fraction": host["overlap"]["hidden_fraction"],
        "disk_hidden_fraction": disk["overlap"]["hidden_fraction"],
        "disk_read_bytes_per_step": disk["disk_read_bytes_per_step"],
        "disk_written_bytes_per_step": disk["disk_written_bytes_per_step"],
        "disk_read_gbps": disk["disk_read_gbps"], "disk_write_gbps": disk["disk_write_gbps"],
        "disk_kept_up": disk["kept_up"], "host_kept_up": host["kept_up"],
        "tiers": tiers,
    }


# -- cost of recording spans ------------------------------------------------------------------
def recording_overhead(model: str = "opt-125m", batch: int = 8, seq: int = 128, threads: int = 2, steps: int = 3,
                       tier: str = "host", prefetch: int = 1, store_dir: str | None = None) -> dict:
    """Median step seconds with span recording off and on, `steps` of each, interleaved.

    One run serves both: its recorder is switched between ``Recorder(enabled=False)`` behaviour
    and ``Recorder()`` behaviour (the ``enabled`` flag every span site reads) before each step,
    in the order off, on, off, on, ..., so that both sides see the same model, memory and drift.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    where = tempfile.mkdtemp(prefix="distzo2-bench-", dir=_store_parent(store_dir)) if tier == "disk" else None
    cfg = _config(model, batch, seq, threads, 1 + 2 * steps, tier, prefetch,
                  os.path.join(where, "store") if where else None)
    rec = Recorder(enabled=False)
    try:
        run = Run(cfg, recorder=rec)
        try:
            task = make_task(cfg, run.adapter)
            _step(run, task, 0)  # warm-up
            times = {False: [], True: []}
            spans = []
            for t in range(1, 1 + 2 * steps):
                on = t % 2 == 0  # step 1 off, step 2 on, ...
                rec.enabled = on
                dt, _ = _step(run, task, t)
                times[on].append(dt)
                if on:
                    spans.append(len(rec.spans))
                    rec.clear()
            rec.enabled = False
            _settle(run)
        finally:
            run.close()
    finally:
        if where:
            shutil.rmtree(where, ignore_errors=True)
        torch.set_num_threads(threads_before)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {
        "model": model, "batch": batch, "seq": seq, "threads": threads, "steps": steps, "tier": tier,
        "off_step_s": off, "on_step_s": on, "overhead_fraction": on / off - 1.0,
        "off_times": times[False], "on_times": times[True],
        "spans_per_step": statistics.median(spans) if spans else 0,
    }


# -- peak memory (fresh process) --------------------------------------------------------------
def peak_memory(model: str, tier: str = "disk", steps: int = 2, batch: int = 1, seq: int = 32, prefetch: int = 0,
                store_dir: str | None = None, threads: int = 2, lean: bool = True) -> dict:
    """Peak resident memory of one offloaded run against the model's fp32 size.

    Meant for a fresh process (``python -m distzo2_lab.bench.offload peak ...`` or
    :func:`peak_memory_subprocess`): the peak is this process's. The disk store is built (timed)
    in a fresh temporary directory inside `store_dir` (or the system temp dir) and removed
    afterwards. ``baseline_rss_kib`` is the RSS with torch and transformers imported, before
    anything is built.
    """
    import transformers  # noqa: F401  (torch is imported already: the baseline has both loaded)

    baseline = _rss_kib()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    where = tempfile.mkdtemp(prefix="distzo2-peak-", dir=_store_parent(store_dir)) if tier == "disk" else None
    store = os.path.join(where, "store") if where else None
    rec = Recorder()
    try:
        cfg = _config(model, batch, seq, threads, steps, tier, prefetch, store, lean and tier == "disk")
        t0 = time.perf_counter()
        run = Run(cfg, recorder=rec)
        build_s = time.perf_counter() - t0
        hwm_build, rss_build = status_kib("VmHWM"), _rss_kib()
        try:
            numel = sum(b.numel for b in run.adapter.buckets)
            task = make_task(cfg, run.adapter)
            _settle(run)
            read0, written0 = _io(run)
            rec.clear()
            start = rec.now()
            times = []
            t0 = time.perf_counter()
            for t in range(steps):
                dt, _ = _step(run, task, t)
                times.append(dt)
            _settle(run)
            loop_s = time.perf_counter() - t0
            read1, written1 = _io(run)
            spans = [s for s in rec.spans if s.end > start]
        finally:
            run.close()
        store_bytes = _dir_bytes(store) if store else 0
    finally:
        if where:
            shutil.rmtree(where, ignore_errors=True)
        torch.set_num_threads(threads_before)
    if model in PRESETS:
        from distzo2_lab.models import count_parameters

        params = count_parameters(model)
    else:  # a checkpoint directory: count from the bucket plan (count_parameters would load it whole)
        params = numel
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm = status_kib("VmHWM")
    peak = hwm if hwm is not None else maxrss
    model_bytes = 4 * params
    up_s, _ = lane_busy(spans, "upload")
    off_s, _ = lane_busy(spans, "offload")
    m = overlap_metrics(spans)
    return {
        "model": model, "tier": tier, "steps": steps, "batch": batch, "seq": seq, "prefetch": prefetch,
        "threads": threads, "parameters": params, "model_bytes": model_bytes,
        "baseline_rss_kib": baseline, "rss_after_build_kib": rss_build, "peak_rss_after_build_kib": hwm_build,
        "peak_rss_kib": peak, "ru_maxrss_kib": maxrss,
        "rss_model_ratio": peak * 1024 / model_bytes,
        "above_baseline_model_ratio": (peak - baseline) * 1024 / model_bytes if baseline is not None else None,
        "lean": lean and tier == "disk", "store_build_s": build_s, "store_bytes": store_bytes,
        "step_s": statistics.median(times), "step_times": times, "loop_s": loop_s,
        "disk_read_bytes_per_step": (read1 - read0) / steps,
        "disk_written_bytes_per_step": (written1 - written0) / steps,
        "disk_read_gbps": _gbps(read1 - read0, up_s), "disk_write_gbps": _gbps(written1 - written0, off_s),
        "upload_busy_s": up_s, "offload_busy_s": off_s, "overlap": m, "kept_up": _kept_up(m),
    }


def _dir_bytes(path: str) -> int:
    """Bytes the store's files take on disk (allocated blocks, so sparse slots count as written)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def peak_memory_subprocess(model: str, tier: str = "disk", steps: int = 2, batch: int = 1, seq: int = 32,
                           prefetch: int = 0, store_dir: str | None = None, threads: int = 2,
                           timeout: float | None = None, lean: bool = True) -> dict:
    """:func:`peak_memory` in a fresh Python process; its JSON result."""
    cmd = [sys.executable, "-m", "distzo2_lab.bench.offload", "peak", "--model", model, "--tier", tier,
           "--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--prefetch", str(prefetch),
           "--threads", str(threads), "--json"] + ([] if lean else ["--no-lean"])
    if store_dir is not None:
        cmd += ["--store", store_dir]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"peak_memory({model!r}) failed with exit code {p.returncode}:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- text ---------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pct(x) -> str:
    return _fmt(None if x is None else 100 * x, ".0f") + ("%" if x is not None else "")


def format_ratios(r: dict) -> str:
    """A table of :func:`offload_ratios`' result."""
    lines = [f"{r['model']} batch {r['batch']}x{r['seq']} {r['threads']} threads prefetch {r['prefetch']} "
             f"(median of {r['steps']} steps after 1 warm-up); losses identical across tiers: {r['identical']}",
             f"{'tier':>8} {'step s':>8} {'ratio':>6} {'build s':>8} {'compute':>8} {'upload':>7} {'offload':>8} "
             f"{'hidden':>7} {'up GB/s':>8} {'kept up':>8}"]
    for tier in OFFLOAD_TIERS:
        t = r["tiers"][tier]
        busy = t["overlap"].get("busy", {})
        ratio = 1.0 if tier == "resident" else r[f"{tier}_ratio"]
        lines.append(f"{tier:>8} {t['step_s']:>8.3f} {ratio:>6.2f} {t['build_s']:>8.2f} {_pct(busy.get('compute')):>8} "
                     f"{_pct(busy.get('upload')):>7} {_pct(busy.get('offload')):>8} "
                     f"{_pct(t['overlap'].get('hidden_fraction')):>7} {_fmt(t['upload_gbps']):>8} "
                     f"{_fmt(t['kept_up'], '', '-'):>8}")
    lines.append(f"disk: {r['disk_read_bytes_per_step'] / 2**20:.1f} MiB read, "
                 f"{r['disk_written_bytes_per_step'] / 2**20:.1f} MiB written per step; "
                 f"read {_fmt(r['disk_read_gbps'])} GB/s, write {_fmt(r['disk_write_gbps'])} GB/s "
                 "(bytes / lane busy seconds; reads mostly from the page cache)")
    if r["host_ratio"] < 0.9:
        lines.append("note: the host tier beat resident: suspect CPU oversubscription (OpenMP workers spin-waiting "
                     "on busy cores); retry with fewer --threads or OMP_WAIT_POLICY=PASSIVE")
    return "\n".join(lines)


def format_overhead(r: dict) -> str:
    return (f"span recording ({r['tier']} tier, {r['steps']} steps each, interleaved): off {r['off_step_s']:.3f} s, "
            f"on {r['on_step_s']:.3f} s, overhead {100 * r['overhead_fraction']:+.1f}% "
            f"({r['spans_per_step']:.0f} spans per step)")


def format_memory(r: dict) -> str:
    mib = lambda kib: _fmt(None if kib is None else kib / 1024, ".0f")
    return (f"{r['model']} {r['tier']}: peak RSS {mib(r['peak_rss_kib'])} MiB = {r['rss_model_ratio']:.1%} "
            f"of the model ({r['model_bytes'] / 2**20:.0f} MiB fp32); baseline {mib(r['baseline_rss_kib'])} MiB; "
            f"store build {r['store_build_s']:.1f} s; {r['step_s']:.2f} s/step; "
            f"disk {r['disk_read_bytes_per_step'] / 2**20:.0f} MiB read + "
            f"{r['disk_written_bytes_per_step'] / 2**20:.0f} MiB written per step, "
            f"read {_fmt(r['disk_read_gbps'])} GB/s, write {_fmt(r['disk_write_gbps'])} GB/s")


# -- entry point --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distzo2_lab.bench.offload", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("peak", help="peak RSS of one run in this (fresh) process")
    k.add_argument("--model", default="opt-1.3b")
    k.add_argument("--tier", default="disk", choices=OFFLOAD_TIERS)
    k.add_argument("--steps", type=int, default=2)
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--seq", type=int, default=32)
    k.add_argument("--prefetch", type=int, default=0)
    k.add_argument("--no-lean", action="store_true", help="keep the embeddings resident (disk tier)")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--store", default=None, help="parent directory of the temporary disk store")
    for q in sub.choices.values():
        q.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    r = peak_memory(a.model, a.tier, a.steps, a.batch, a.seq, a.prefetch, a.store, a.threads, not a.no_lean)
    print(json.dumps(r) if a.json else format_memory(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
