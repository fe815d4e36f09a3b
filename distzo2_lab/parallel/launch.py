"""Launch real worker processes from a notebook, a script or a test.

Workers start with an explicit ``spawn`` context (a CUDA-safe start method that works from
Jupyter), rendezvous on a free 127.0.0.1 port, and report through one queue: ("event", rank,
payload) for spans / logs / per-step metrics, ("result", rank, value) at the end, ("error",
rank, traceback) on failure. If a rank fails or dies, every rank is stopped and the parent raises
one :class:`WorkerError` naming that rank and its cause, with the rank's traceback attached. A
SIGINT (Ctrl-C) becomes a stop request every rank honours after the same step (see stop.py).
`spawn` cannot pickle a function defined in a notebook, so workers must live in an importable
module; a ``__main__`` function is refused with a sentence saying so.
"""
from __future__ import annotations

import queue
import signal
import socket
import time
import traceback
from contextlib import contextmanager

import torch.multiprocessing as mp

from distzo2_lab.errors import ConfigError, WorkerError
from distzo2_lab.parallel.stop import Stop, install, sigint_requests_stop


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, args: tuple, q, timeout: float, stop: Stop) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), DISTZO2_TIMEOUT=str(timeout))
    install(stop)
    try:
        with sigint_requests_stop(stop):  # Ctrl-C reaches every rank: a stop request, not a traceback
            value = fn(rank, world_size, q, *args)
        q.put(("result", rank, value))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None


class RunHandle:
    """A running group of workers: live events, wait(), stop(), exit codes."""

    def __init__(self, procs, q, timeout: float, stop: Stop | None = None):
        self.procs, self.queue, self.timeout = procs, q, timeout
        self.stop_control = stop or Stop()
        self.results: dict[int, object] = {}
        self.events: list[tuple[int, object]] = []
        self._error: tuple[int, str] | None = None
        self._dead_since: float | None = None  # when a rank was first seen dead without reporting

    def poll(self, block: float = 0.0) -> list[tuple[int, object]]:
        """Drain the queue; returns the new (rank, event) pairs."""
        new = []
        deadline = time.monotonic() + block
        while True:
            try:
                kind, rank, payload = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return new
            if kind == "event":
                new.append((rank, payload))
                self.events.append((rank, payload))
            elif kind == "result":
                self.results[rank] = payload
            elif self._error is None:
                self._error = (rank, payload)
            block = 0.0

    @property
    def exitcodes(self) -> list[int | None]:
        return [p.exitcode for p in self.procs]

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def _close_queue(self) -> None:
        self.queue.close()  # releases the queue's semaphores and feeder thread
        self.queue.join_thread()

    def stop(self) -> None:
        """Terminate every worker still running (then kill after 5 s); nothing is left behind."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()

    def wait(self, on_event=None) -> dict[int, object]:
        """Block until every worker ends; raise WorkerError at the first failure or timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            for rank, ev in self.poll(block=0.05):
                if on_event is not None:
                    on_event(rank, ev)
            if self._error is not None:
                rank, tb = self._error
                time.sleep(0.5)  # a rank that was killed is the cause; let its exit code show
                killed = [(r, p.exitcode) for r, p in enumerate(self.procs) if (p.exitcode or 0) < 0 and r != rank]
                self.stop()
                self._close_queue()
                if killed:
                    r, code = killed[0]
                    raise WorkerError(f"rank {r} died with exit code {code} (killed or crashed); rank {rank} "
                                      f"failed after it:\n{tb}", rank=r, traceback=tb,
                                      cause=f"died with exit code {code} (killed or crashed)")
                raise WorkerError(f"rank {rank} failed:\n{tb}", rank=rank, traceback=tb, cause=last_line(tb))
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)]
            if dead and self._dead_since is None:
                self._dead_since = time.monotonic()
            # A dead rank leaves the others blocked in a collective: stop them after a short grace.
            if dead and (not self.alive() or time.monotonic() - self._dead_since > 2.0):
                self.poll(block=0.2)  # a traceback may still be in flight
                if self._error is None:
                    self.stop()
                    self._close_queue()
                    r, code = dead[0]
                    cause = f"died with exit code {code} (killed or crashed) before reporting"
                    raise WorkerError(f"rank {r} {cause}", rank=r, cause=cause)
                continue
            if not self.alive():
                self.poll(block=0.1)
                for p in self.procs:
                    p.join()
                self._close_queue()
                return self.results
            if time.monotonic() > deadline:
                self.stop()
                self._close_queue()
                cause = f"workers still running after timeout={self.timeout} s; all were stopped"
                raise WorkerError(cause, cause=cause)


def last_line(tb: str) -> str:
    """The exception line of a formatted traceback ('ValueError: ...')."""
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def log(q, rank: int, text: str) -> None:
    """A worker's log line, shown by the parent with a rank prefix (see RunHandle.wait)."""
    if q is not None:
        q.put(("event", rank, {"log": text}))


def format_event(rank: int, event) -> str:
    """One line for the terminal or a notebook: '[rank R] ...'."""
    if isinstance(event, dict) and "log" in event:
        return f"[rank {rank}] {event['log']}"
    if isinstance(event, dict) and "step" in event:
        return (f"[rank {rank}] step {event['step']}: l+ {event['loss_plus']:.4f} l- {event['loss_minus']:.4f} "
                f"g {event['projected_grad']:+.4f}")
    return f"[rank {rank}] {event}"


def launch(fn, world_size: int, args: tuple = (), timeout: float = 300.0) -> RunHandle:
    """Start `world_size` processes running fn(rank, world_size, queue, *args) (spawn context)."""
    if getattr(fn, "__module__", None) == "__main__":
        raise ConfigError(f"launch() cannot start {fn.__name__!r}: it is defined in __main__ (a notebook or "
                          "script), and spawned processes cannot import it. Put the worker in a module and "
                          "import it, or use distzo2_lab.run.worker.train_worker")
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} is not valid; it must be >= 1")
    if timeout <= 0:
        raise ConfigError(f"timeout={timeout} is not valid; it must be > 0 seconds")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = Stop.shared(ctx, world_size)
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, q, timeout, stop), daemon=True)
             for r in range(world_size)]
    with _sigint_ignored():  # a fresh interpreter keeps an ignored SIGINT until _entry handles it
        for p in procs:
            p.start()
    return RunHandle(procs, q, timeout, stop)


@contextmanager
def _sigint_ignored():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (a notebook's helper thread): nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
