"""The streamer: upload, compute and offload lanes over the blocks of a store.

ZO2 (arXiv 2503.12668, Sec. 3.3) overlaps the upload of block i+1, the compute of block i and
the offload of block i-1 on three CUDA streams. Here every consumer walks the blocks in order
(a *sweep*: a training step, a flush, an evaluation), and the streamer serves visits:
- the upload lane runs up to `depth` visits ahead of compute (prefetch depth), into a pool of
  depth + 2 working buffers (so at most depth + 2 blocks are in working memory at once), and
  never reads a block whose previous write-back is still in flight;
- the offload lane writes blocks back in order and returns their buffers to the pool; a block's
  fixed spans (zo.freeze, a LoRA model's base) never change, so only its other spans go back.
On CPU the lanes are worker threads (copies and file I/O release the GIL). On CUDA each lane
also has its own stream; hand-offs are CUDA events (record / wait), buffers used across streams
are marked with ``record_stream``, and host memory is pinned. An optional *simulated* link
stretches each transfer to bytes / bandwidth, so a machine without a GPU can show a slow link.
With a slicer (parallel/slicer.py) a visit moves this rank's shard only: of the master, and of each
optimiser state section a method-family slot [master | state_0 | state_1 ...] holds (`sections`).
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from distzo2_lab.observe.events import Recorder
from distzo2_lab.offload.store import complement


class Streamer:
    """Serves block visits in sweep order with transfers overlapped with compute."""

    def __init__(self, store, device: str | torch.device = "cpu", depth: int = 1, recorder: Recorder | None = None,
                 link_gbps: float | None = None, slicer=None, spare: int = 1,
                 fixed: dict[str, list[tuple[int, int]]] | None = None, sections: int = 1):
        """`spare`: pool buffers beyond the prefetch window and the visit at hand. 1 lets a block's
        write-back run while the next upload fills another buffer, and the lane prefetch the next
        sweep's first blocks; 0 (lean runs) makes that upload wait for the write-back, for one block
        buffer less, and keeps the lane inside the announced sweep, so between sweeps no block
        buffer is held. `fixed`: {block key: [start, stop) spans} that no visit changes (z is 0
        there): kept out of the write-backs, which the store must allow (every slot holds their
        start values). `sections`: equal sections of each block's slot (1 + the method family's
        state tensors, zo/family_engine.py); with a slicer each is cut into shards on its own, and
        a working buffer holds each section padded to whole shards, so that each can be gathered."""
        if depth < 0:
            raise ValueError(f"depth={depth} is not valid; it must be >= 0")
        if spare not in (0, 1):
            raise ValueError(f"spare={spare!r} is not valid; choose 0 or 1")
        self.store, self.device = store, torch.device(device)
        # Prefetching a whole sweep ahead would read a block before its last write-back.
        self.depth = min(depth, len(store.numels) - 1)
        self.recorder = recorder or Recorder(enabled=False)
        self.link_gbps = link_gbps
        if link_gbps:
            self.recorder.meta["simulated_link_gbps"] = link_gbps
        self.n = len(store.numels)
        self.moving = [complement((fixed or {}).get(k, []), n) for k, n in zip(store.keys, store.numels)]
        self.cuda = self.device.type == "cuda"
        # With a slicer each visit moves only this rank's shard of each section; buffers hold every
        # section padded to whole shards.
        self.slicer, self.sections = slicer, sections
        if any(n % sections for n in store.numels):
            raise ValueError(f"sections={sections}: every slot of the store must hold that many equal sections")
        self.width = width = max(self.buffer_numel(i) for i in range(len(store.numels)))
        self.pool: queue.Queue = queue.Queue()  # None = a buffer not allocated (yet, or after trim())
        for _ in range(min(depth, len(store.numels) - 1) + 1 + spare):
            self.pool.put(None)
        self.buffers_allocated = self.depth + 1 + spare
        self._sweep_end = None if spare else 0  # lean: the lane uploads no visit at or past this one
        self.in_use = self.peak_in_use = 0  # working buffers out of the pool (checked by tests)
        self.bytes_up = self.bytes_down = 0  # bytes the blocks moved each way (uploads, write-backs)
        self._up_by_sweep: dict[int, int] = {}  # sweep index -> bytes its visits' uploads moved
        if self.cuda:
            self.up_stream, self.off_stream = torch.cuda.Stream(), torch.cuda.Stream()
            # disk -> pinned staging -> device; a store with a compute-dtype base stages its own reads
            disk = store.tier == "disk" and store.base is None
            self.staging = torch.empty(width, dtype=torch.float32).pin_memory() if disk else None
        self._cv = threading.Condition()
        self._requested = -1  # the latest visit compute asked for
        self._uploaded: dict[int, tuple[torch.Tensor, object]] = {}
        self._next_upload = 0
        self._written = [threading.Event() for _ in range(self.n)]
        for e in self._written:
            e.set()
        self._offq: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._stop = False
        self.step = 0  # label for the spans of the current sweep (set by the engine)
        self._sweep_steps: dict[int, int] = {}  # sweep index -> step label, once announced
        self._threads = [threading.Thread(target=self._guard(self._upload_loop), name="zo2-upload", daemon=True),
                         threading.Thread(target=self._guard(self._offload_loop), name="zo2-offload", daemon=True)]
        for t in self._threads:
            t.start()

    # -- lanes ---------------------------------------------------------------------------
    def _guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as e:  # surfaces in the compute thread at the next call
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
        return run

    def _wait_for(self, get):
        """Poll a blocking call so that close() is never stuck behind it; None once stopped."""
        while not self._stop:
            try:
                got = get()
            except queue.Empty:
                continue
            if got is not None:
                return got
        return None

    def _simulate(self, nbytes: int, t0: int) -> None:
        if self.link_gbps:
            rest = nbytes / (self.link_gbps * 1e9) - (time.perf_counter_ns() - t0) / 1e9
            if rest > 0:
                time.sleep(rest)

    def _upload_loop(self) -> None:
        # One visit per call: a parked lane holds no reference to a buffer (see trim()).
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._next_upload <= self._ahead())
                if self._stop:
                    return
                v = self._next_upload
                self._next_upload += 1
            if not self._upload_one(v):
                return

    def _upload_one(self, v: int) -> bool:
        i = v % self.n
        got = self._wait_for(lambda: [self.pool.get(timeout=0.05)])
        if got is None:
            return False
        buf = got[0]
        if buf is None:
            buf = torch.empty(self.width, dtype=self.store.dtype, device=self.device)
        with self._cv:
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        # the previous sweep's write-back of this block has landed
        if self._wait_for(lambda: self._written[i].wait(0.05) or None) is None:
            return False
        pieces = self._pieces(i)
        nbytes = self._upload_bytes(i, pieces)
        self.bytes_up += nbytes
        self._up_by_sweep[v // self.n] = self._up_by_sweep.get(v // self.n, 0) + nbytes
        t0 = time.perf_counter_ns()
        event = None
        # a visit uploaded before its sweep was announced is a prefetch for the next step
        label = self._sweep_steps.get(v // self.n, self.step + 1)
        if self.cuda:  # the span is the copy on the upload stream, timed by CUDA events
            if self.staging is not None:  # disk -> pinned staging -> device, the pieces side by side
                off = 0
                for _, start, n in pieces:
                    self.store.read_into(i, self.staging[off : off + n], start=start)
                    off += n
            with torch.cuda.stream(self.up_stream), \
                    self.recorder.cuda_span("upload", "upload", label, i, nbytes, stream=self.up_stream):
                off = 0
                for at, start, n in pieces:
                    if self.staging is not None:
                        buf[at : at + n].copy_(self.staging[off : off + n], non_blocking=True)
                        off += n
                    else:
                        self.store.upload_into(i, buf[at : at + n], non_blocking=True, start=start)
            event = torch.cuda.Event()
            event.record(self.up_stream)
            event.synchronize()  # the staging buffer is reused by the next upload
            self._simulate(nbytes, t0)
        else:
            with self.recorder.span("upload", "upload", label, i, nbytes):
                for at, start, n in pieces:
                    self.store.upload_into(i, buf[at : at + n], start=start)
                self._simulate(nbytes, t0)
        with self._cv:
            self._uploaded[v] = (buf, event)
            self._cv.notify_all()
        return True

    def _offload_loop(self) -> None:
        # One job per call: a parked lane holds no reference to a buffer (or a queued tensor).
        while (job := self._offq.get()) is not None:
            self._offload_one(*job)
            del job

    def _offload_one(self, kind: str, payload) -> None:
        if kind == "call":
            payload()
            return
        i, buf, write, event, step = payload
        if write:
            # per piece: the moving spans inside it (slot coordinates), and the view of the buffer
            # whose element k is the slot's element k there (a section starts further on in a
            # buffer padded to whole shards)
            parts = [(buf[at - start :], _clip(self.moving[i], start, start + n)) for at, start, n in self._pieces(i)]
            nbytes = sum(b - a for _, spans in parts for a, b in spans) * self.store.dtype.itemsize
            self.bytes_down += nbytes
            t0 = time.perf_counter_ns()
            if self.cuda:  # the span is the copy on the offload stream, timed by CUDA events
                self.off_stream.wait_event(event)
                with torch.cuda.stream(self.off_stream), \
                        self.recorder.cuda_span("offload", "offload", step, i, nbytes, stream=self.off_stream):
                    for view, spans in parts:
                        self.store.write_spans(i, view, spans, non_blocking=self.store.tier == "host")
                self.off_stream.synchronize()
                self._simulate(nbytes, t0)
            else:
                with self.recorder.span("offload", "offload", step, i, nbytes):
                    for view, spans in parts:
                        self.store.write_spans(i, view, spans)
                    self._simulate(nbytes, t0)
            self._written[i].set()
        elif event is not None:
            event.synchronize()
        with self._cv:
            self.in_use -= 1
        self.pool.put(buf)

    def buffer_numel(self, i: int) -> int:
        """Elements of block i's working buffer: its slot, or each section padded to whole shards."""
        n = self.store.numels[i]
        return n if self.slicer is None else self.slicer.padded(n // self.sections) * self.sections

    def _pieces(self, i: int) -> list[tuple[int, int, int]]:
        """(buffer start, slot start, length) of what this rank moves of block i: the whole slot, or
        its shard of each section."""
        if self.slicer is None:
            return [(0, 0, self.store.numels[i])]
        n = self.store.numels[i] // self.sections
        width, (a, b) = self.slicer.padded(n), self.slicer.bounds(n)
        return [(j * width + a, j * n + a, b - a) for j in range(self.sections)]

    def _upload_bytes(self, i: int, pieces: list[tuple[int, int, int]]) -> int:
        if self.slicer is None:
            return self.store.nbytes(i)  # a store may move some spans in the compute dtype
        return sum(n for _, _, n in pieces) * self.store.dtype.itemsize

    # -- the compute side ----------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError("a streamer lane failed") from self._error

    def _ahead(self) -> int:
        """The last visit the upload lane may serve now."""
        last = self._requested + self.depth
        return last if self._sweep_end is None else min(last, self._sweep_end - 1)

    def bytes_up_of_announced_sweeps(self) -> int:
        """Upload bytes of the sweeps begun so far: a prefetch into a sweep no step has begun (the
        lane running ahead of the last step) is not counted until that sweep begins."""
        return sum(n for sweep, n in list(self._up_by_sweep.items()) if sweep in self._sweep_steps)

    def begin_sweep(self, first_visit: int, step: int) -> None:
        """Label the sweep starting at visit `first_visit` with `step` (span labels); a lean
        streamer's lane may now upload its visits."""
        self.step = step
        self._sweep_steps[first_visit // self.n] = step
        if self._sweep_end is not None:
            with self._cv:
                self._sweep_end = first_visit + self.n
                self._cv.notify_all()

    def acquire(self, v: int) -> torch.Tensor:
        """The working buffer of visit `v` (block v % N) once its upload has landed."""
        with self._cv:
            self._requested = max(self._requested, v)
            self._cv.notify_all()
            self._cv.wait_for(lambda: v in self._uploaded or self._error is not None)
            self._check()
            buf, event = self._uploaded.pop(v)
        if self.cuda:
            torch.cuda.current_stream().wait_event(event)
            buf.record_stream(torch.cuda.current_stream())
        return buf[: self.buffer_numel(v % self.n)]

    def release(self, v: int, buf: torch.Tensor, write: bool = True) -> None:
        """Hand visit `v`'s buffer to the offload lane (written back when `write`)."""
        self._check()
        i = v % self.n
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
            buf.record_stream(self.off_stream)
        if write:
            self._written[i].clear()
        base = buf if buf._base is None else buf._base
        self._offq.put(("block", (i, base, write, event, self.step)))

    def on_offload_lane(self, fn) -> None:
        """Run `fn` on the offload lane after every write queued so far (commits)."""
        self._offq.put(("call", fn))

    def drain(self) -> None:
        """Wait until every queued write-back (and call) has finished."""
        done = threading.Event()
        self.on_offload_lane(done.set)
        while not done.wait(0.05):
            self._check()
        self._check()

    def settle(self, timeout: float = 10.0) -> None:
        """drain(), then wait until the uploads the lane may run ahead (the next sweep's first
        `depth` visits) have landed: the lanes are idle until compute asks for more."""
        self.drain()
        with self._cv:
            ahead = range(self._requested + 1, self._ahead() + 1)
            self._cv.wait_for(lambda: self._error is not None or all(v in self._uploaded for v in ahead),
                              timeout=timeout)
        self._check()

    def trim(self) -> None:
        """Free the idle working buffers (after a sweep); they are allocated again on demand.
        Lean runs trade these allocations for memory while the embeddings are loaded."""
        self.drain()
        idle = []
        while True:
            try:
                idle.append(self.pool.get_nowait())
            except queue.Empty:
                break
        for _ in idle:
            self.pool.put(None)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._offq.put(None)
        for t in self._threads:
            t.join(timeout=10)


def _clip(spans: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """The parts of `spans` inside [a, b)."""
    return [(max(x, a), min(y, b)) for x, y in spans if x < b and y > a]
