"""Span events: one schema for everything that takes time, and the sinks that read it.

A span is (rank, lane, phase, step, block, start, end, bytes) with start/end in nanoseconds on
one clock per run (``time.perf_counter_ns`` minus the recorder's origin). Every view reads the
same list: JSONL per rank, a Chrome trace (``ph: "X"``, pid = rank, tid = lane) that opens in
Perfetto, the overlap metrics below, and the live view (a recorder's `listener` sees every span as
it is recorded; :class:`SpanBatcher` sends them on in batches). On CUDA, device spans are timed
with CUDA events and resolved onto the same clock when the recorder is flushed. With
`ranges=True` every :meth:`Recorder.span` also opens a ``torch.profiler`` range named
``distzo2::<lane>::<phase>`` (and an NVTX range on CUDA), so the phases appear in profiler
traces. ZO2 (arXiv 2503.12668, Sec. 3.3) and DistZO2 (arXiv 2507.03211, Sec. 4) show this picture as Nsight traces.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass

LANES = ("upload", "compute", "offload", "exchange")
TRANSFER_LANES = ("upload", "offload")
RANGE_PREFIX = "distzo2::"  # profiler / NVTX range names: distzo2::<lane>::<phase>


@dataclass(frozen=True)
class Span:
    rank: int
    lane: str
    phase: str
    step: int
    block: int  # -1 for work that belongs to no block (embeddings, head, commit)
    start: int  # ns since the recorder's origin
    end: int
    bytes: int = 0

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e9


class Recorder:
    """Collects spans from any thread (list.append is atomic); `enabled=False` records nothing.

    `listener(span)` is called with every new span, on the thread that recorded it (live views);
    `ranges=True` opens a profiler range (and NVTX on CUDA) around every :meth:`span`."""

    def __init__(self, rank: int = 0, enabled: bool = True, origin_ns: int | None = None, listener=None,
                 ranges: bool = False):
        self.rank, self.enabled = rank, enabled
        self.origin = time.perf_counter_ns() if origin_ns is None else origin_ns
        self.spans: list[Span] = []
        self.meta: dict = {}
        self.listener, self.ranges = listener, ranges
        self._cuda: list[tuple] = []  # (lane, phase, step, block, bytes, start_event, end_event)
        self._cuda_base = None
        self._lock = threading.Lock()

    def _emit(self, span: Span) -> None:
        self.spans.append(span)
        if self.listener is not None:
            self.listener(span)

    def now(self) -> int:
        return time.perf_counter_ns() - self.origin

    def add(self, lane: str, phase: str, step: int, block: int, start: int, end: int, nbytes: int = 0) -> None:
        if self.enabled:
            self._emit(Span(self.rank, lane, phase, step, block, start, end, nbytes))

    @contextlib.contextmanager
    def span(self, lane: str, phase: str, step: int, block: int = -1, nbytes: int = 0):
        if not self.enabled:
            yield
            return
        with _profiler_range(f"{RANGE_PREFIX}{lane}::{phase}") if self.ranges else contextlib.nullcontext():
            t0 = time.perf_counter_ns()
            try:
                yield
            finally:
                self._emit(Span(self.rank, lane, phase, step, block, t0 - self.origin,
                                time.perf_counter_ns() - self.origin, nbytes))

    @contextlib.contextmanager
    def cuda_span(self, lane: str, phase: str, step: int, block: int = -1, nbytes: int = 0, stream=None):
        """Time device work on `stream` with CUDA events; resolved in :meth:`flush_cuda`."""
        if not self.enabled:
            yield
            return
        import torch

        with self._lock:
            if self._cuda_base is None:
                self._cuda_base = (torch.cuda.Event(enable_timing=True), None)
                self._cuda_base[0].record()
                torch.cuda.synchronize()
                self._cuda_base = (self._cuda_base[0], self.now())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with _profiler_range(f"{RANGE_PREFIX}{lane}::{phase}") if self.ranges else contextlib.nullcontext():
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._cuda.append((lane, phase, step, block, nbytes, start, end))

    def flush_cuda(self) -> None:
        """Turn pending CUDA-event spans into spans on the host clock (synchronises)."""
        if not self._cuda:
            return
        import torch

        torch.cuda.synchronize()
        base_event, base_ns = self._cuda_base
        pending, self._cuda = self._cuda, []
        for lane, phase, step, block, nbytes, s, e in pending:
            start = base_ns + int(base_event.elapsed_time(s) * 1e6)
            self.add(lane, phase, step, block, start, start + int(s.elapsed_time(e) * 1e6), nbytes)

    def clear(self) -> None:
        """Forget every span, the CUDA-event spans not yet flushed too."""
        self.spans, self._cuda = [], []


@contextlib.contextmanager
def _profiler_range(name: str):
    """A torch.profiler user annotation, plus an NVTX range when CUDA is present (Nsight)."""
    import torch

    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class SpanBatcher:
    """A recorder listener that hands spans on in batches: `send(rows)` with rows in
    :class:`Span` field order, at most every `every_s` seconds or when `max_spans` are waiting
    (a worker forwards them through the launcher's queue; one message per span would cost more
    than the work it times). Call :meth:`flush` at the end of a step or run."""

    def __init__(self, send, every_s: float = 0.1, max_spans: int = 512):
        self.send, self.every_s, self.max_spans = send, every_s, max_spans
        self._rows: list[tuple] = []
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, s: Span) -> None:
        with self._lock:
            self._rows.append((s.rank, s.lane, s.phase, s.step, s.block, s.start, s.end, s.bytes))
            due = len(self._rows) >= self.max_spans or time.monotonic() - self._last >= self.every_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            self._last = time.monotonic()
        if rows:
            self.send(rows)


def spans_from_rows(rows) -> list[Span]:
    """Rows sent by :class:`SpanBatcher` -> spans."""
    return [Span(*r) for r in rows]


# -- sinks ------------------------------------------------------------------------------------
def write_jsonl(spans: list[Span], path: str) -> None:
    with open(path, "w") as f:
        for s in spans:
            f.write(json.dumps(asdict(s)) + "\n")


def read_jsonl(path: str) -> list[Span]:
    with open(path) as f:
        return [Span(**json.loads(line)) for line in f if line.strip()]


def chrome_trace(spans: list[Span], meta: dict | None = None) -> dict:
    """Chrome trace-event JSON: complete events, pid = rank, tid = lane (opens in Perfetto)."""
    events = []
    for rank in sorted({s.rank for s in spans}):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for i, lane in enumerate(LANES):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": i, "args": {"name": lane}})
    for s in spans:
        events.append({"name": s.phase, "cat": s.lane, "ph": "X", "pid": s.rank, "tid": LANES.index(s.lane),
                       "ts": s.start / 1e3, "dur": (s.end - s.start) / 1e3,
                       "args": {"step": s.step, "block": s.block, "bytes": s.bytes}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta or {}}


def write_trace(recorder: Recorder, directory: str) -> dict[str, str]:
    """Write rank<R>.jsonl and rank<R>.trace.json into `directory`; returns their paths."""
    recorder.flush_cuda()
    os.makedirs(directory, exist_ok=True)
    jsonl = os.path.join(directory, f"rank{recorder.rank}.jsonl")
    trace = os.path.join(directory, f"rank{recorder.rank}.trace.json")
    write_jsonl(recorder.spans, jsonl)
    with open(trace, "w") as f:
        json.dump(chrome_trace(recorder.spans, recorder.meta), f)
    return {"jsonl": jsonl, "chrome": trace}


# -- overlap metrics --------------------------------------------------------------------------
def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[int, int]], y: list[tuple[int, int]]) -> int:
    i = j = total = 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def lane_busy(spans: list[Span], lane: str) -> tuple[float, int]:
    """(busy seconds = length of the union of the lane's spans, bytes the lane moved)."""
    mine = [s for s in spans if s.lane == lane]
    return _length(_union([(s.start, s.end) for s in mine])) / 1e9, sum(s.bytes for s in mine)


def overlap_metrics(spans: list[Span], rank: int | None = None) -> dict:
    """Per-lane busy fraction of the run's window, and the share of transfer time hidden under
    compute (transfer time that coincides with some compute span, over all transfer time)."""
    sel = [s for s in spans if rank is None or s.rank == rank]
    if not sel:
        return {"window_s": 0.0, "busy": {}, "hidden_fraction": None, "transfer_s": 0.0}
    t0, t1 = min(s.start for s in sel), max(s.end for s in sel)
    lanes = {lane: _union([(s.start, s.end) for s in sel if s.lane == lane]) for lane in LANES}
    transfer = _union([iv for lane in TRANSFER_LANES for iv in lanes[lane]])
    transfer_ns = _length(transfer)
    return {
        "window_s": (t1 - t0) / 1e9,
        "busy": {lane: _length(iv) / (t1 - t0) for lane, iv in lanes.items() if iv},
        "transfer_s": transfer_ns / 1e9,
        "hidden_fraction": _intersection(transfer, lanes["compute"]) / transfer_ns if transfer_ns else None,
        "bytes": {lane: sum(s.bytes for s in sel if s.lane == lane) for lane in TRANSFER_LANES},
    }
