"""Overlap metrics per rank and lane, read from span events (the numbers beside every timeline).

* busy fraction: length of the union of a lane's spans over the rank's window;
* hidden fraction: the share of transfer time (upload, offload) that coincides with compute;
* bubble: per block, the time compute sat idle waiting for that block's data (its upload, and
  its all-gather when sliced) - the stall that prefetching exists to remove;
* bytes per lane per step, and tokens/s from per-step records.
ZO2 (arXiv 2503.12668, Sec. 3.3) and DistZO2 (arXiv 2507.03211, Sec. 4) read the same quantities
off Nsight traces; here they come from :mod:`distzo2_lab.observe.events`, so live, report and profiler
views agree.
"""
from __future__ import annotations

import bisect

from distzo2_lab.observe.events import LANES, TRANSFER_LANES, Span, _intersection, _length, _union


def _ranks(spans: list[Span]) -> list[int]:
    return sorted({s.rank for s in spans})


def bubbles(spans: list[Span]) -> dict[int, float]:
    """Seconds compute waited for each block's data, summed over steps: for every (step, block)
    with an upload, the part of the idle gap before the block's first compute span that lies
    before its data was ready (upload end, or all-gather end when sliced). One rank's spans."""
    compute = sorted((s for s in spans if s.lane == "compute"), key=lambda s: s.start)
    if not compute:
        return {}
    ready: dict[tuple[int, int], int] = {}
    for s in spans:
        if s.block >= 0 and (s.lane == "upload" or (s.lane == "exchange" and s.phase == "allgather")):
            key = (s.step, s.block)
            ready[key] = max(ready.get(key, 0), s.end)
    first: dict[tuple[int, int], Span] = {}
    for s in compute:
        if s.block >= 0:
            first.setdefault((s.step, s.block), s)
    ends = sorted(s.end for s in compute)
    out: dict[int, float] = {}
    for key, c in first.items():
        if key not in ready:
            continue
        k = bisect.bisect_right(ends, c.start)  # compute spans that ended before this block began
        prev_end = ends[k - 1] if k else c.start
        waited = max(0, min(c.start, ready[key]) - prev_end)
        out[key[1]] = out.get(key[1], 0.0) + waited / 1e9
    return dict(sorted(out.items()))


def rank_metrics(spans: list[Span], rank: int) -> dict:
    """Busy fraction per lane, hidden fraction, bubbles, bytes per lane per step for one rank."""
    sel = [s for s in spans if s.rank == rank]
    t0, t1 = min(s.start for s in sel), max(s.end for s in sel)
    window = max(1, t1 - t0)
    lanes = {lane: _union([(s.start, s.end) for s in sel if s.lane == lane]) for lane in LANES}
    transfer = _union([iv for lane in TRANSFER_LANES for iv in lanes[lane]])
    # training steps run the perturbed forwards ("forward" spans); the evaluation sweeps record none
    steps = max(1, len({s.step for s in sel if s.phase == "forward"} or {s.step for s in sel if s.lane == "compute"}))
    b = bubbles(sel)
    return {
        "window_s": window / 1e9,
        "busy": {lane: _length(iv) / window for lane, iv in lanes.items() if iv},
        "busy_s": {lane: _length(iv) / 1e9 for lane, iv in lanes.items() if iv},
        "transfer_s": _length(transfer) / 1e9,
        "hidden_fraction": _intersection(transfer, lanes["compute"]) / _length(transfer) if transfer else None,
        "bubble_s": sum(b.values()),
        "bubble_per_block_s": b,
        "bytes_per_step": {lane: sum(s.bytes for s in sel if s.lane == lane) / steps
                           for lane in LANES if lane != "compute" and any(s.lane == lane for s in sel)},
        "steps": steps,
    }


def run_metrics(spans: list[Span], step_records: list[dict] | None = None,
                tokens_per_s: float | None = None) -> dict:
    """{rank: rank_metrics} plus tokens/s (given, or from step records holding 't' and 'tokens')."""
    out = {"ranks": {r: rank_metrics(spans, r) for r in _ranks(spans)}, "tokens_per_s": tokens_per_s}
    if tokens_per_s is None and step_records:
        out["tokens_per_s"] = tokens_rate(step_records)
    return out


def tokens_rate(step_records: list[dict]) -> float | None:
    """Tokens per second over per-step records {'t': seconds at the step's end, 'tokens': n}:
    tokens of every step after the first over the time since the first ended."""
    recs = sorted((r for r in step_records if "t" in r and "tokens" in r), key=lambda r: r["t"])
    if len(recs) < 2 or recs[-1]["t"] <= recs[0]["t"]:
        return None
    return sum(r["tokens"] for r in recs[1:]) / (recs[-1]["t"] - recs[0]["t"])


def metrics_rows(runs: dict[str, list[Span]], tokens: dict[str, float | None] | None = None
                 ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a table: one row per run and rank."""
    per = {name: run_metrics(spans) for name, spans in runs.items() if spans}
    lanes = [lane for lane in LANES if any(lane in m["busy"] for r in per.values() for m in r["ranks"].values())]
    header = ["run", "rank", "window s", *[f"busy {lane}" for lane in lanes], "hidden", "bubble ms",
              *[f"{lane} MB/step" for lane in TRANSFER_LANES], "tokens/s"]
    rows = []
    for name, r in per.items():
        for rank, m in r["ranks"].items():
            hidden = m["hidden_fraction"]
            rate = (tokens or {}).get(name)
            rows.append([name, str(rank), f"{m['window_s']:.3f}",
                         *[f"{m['busy'].get(lane, 0.0):.0%}" for lane in lanes],
                         "—" if hidden is None else f"{hidden:.0%}", f"{m['bubble_s'] * 1e3:.1f}",
                         *[f"{m['bytes_per_step'].get(lane, 0) / 1e6:.2f}" for lane in TRANSFER_LANES],
                         "—" if rate is None else f"{rate:,.0f}"])
    return header, rows
