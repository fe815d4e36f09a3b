"""Ctrl-C as a clean stop: every rank ends after the same step, then writes what it has.

A SIGINT from the terminal reaches the parent and every worker of its process group at once,
each at a different point of its step. Raising KeyboardInterrupt there would leave weights
mid-perturbation and ranks blocked in a collective. Instead the handler only records the
request; rank 0 turns it into a stop step (the step after the one it is about to run: no other
rank can be further, since each step's exchange needs rank 0), and every rank stops there.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

_current: Stop | None = None


class Stop:
    """A stop request and the step every rank stops at (shared between processes when given
    multiprocessing Values: `requested` ('b') and `stop_at` ('q', -1 while unset))."""

    def __init__(self, requested=None, stop_at=None, world_size: int = 1):
        self._requested, self._stop_at = requested, stop_at
        self._local_requested, self._local_stop_at = False, -1
        self.world_size = world_size

    @classmethod
    def shared(cls, ctx, world_size: int) -> Stop:
        """A Stop the launcher passes to its workers (values in shared memory)."""
        return cls(ctx.Value("b", 0), ctx.Value("q", -1), world_size)

    def request(self) -> None:
        if self._requested is None:
            self._local_requested = True
        else:
            self._requested.value = 1

    @property
    def requested(self) -> bool:
        return self._local_requested if self._requested is None else bool(self._requested.value)

    def _get_stop_at(self) -> int:
        return self._local_stop_at if self._stop_at is None else self._stop_at.value

    def _set_stop_at(self, step: int) -> None:
        if self._stop_at is None:
            self._local_stop_at = step
        else:
            self._stop_at.value = step

    def should_stop(self, step: int, rank: int = 0) -> bool:
        """True when this rank must not start `step`; rank 0 fixes the stop step on request."""
        if rank == 0 and self.requested and self._get_stop_at() < 0:
            # alone, stop now; with peers, run this step (a peer may already be inside it)
            self._set_stop_at(step if self.world_size == 1 else step + 1)
        at = self._get_stop_at()
        return 0 <= at <= step

    @property
    def stopped_at(self) -> int | None:
        at = self._get_stop_at()
        return None if at < 0 else at

    def __getstate__(self):
        return {"_requested": self._requested, "_stop_at": self._stop_at, "world_size": self.world_size,
                "_local_requested": False, "_local_stop_at": -1}


def current() -> Stop:
    """This process's Stop (a local one unless a launcher installed a shared one)."""
    global _current
    if _current is None:
        _current = Stop()
    return _current


def install(stop: Stop | None) -> None:
    """Make `stop` this process's Stop (None: a fresh local one on next use)."""
    global _current
    _current = stop


@contextmanager
def sigint_requests_stop(stop: Stop):
    """Inside: SIGINT calls stop.request() instead of raising KeyboardInterrupt (main thread only;
    elsewhere, e.g. a notebook's worker thread, nothing changes)."""
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: stop.request())
    except ValueError:  # not the main thread
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def launched() -> Stop | None:
    """The shared Stop a launcher installed in this worker, None elsewhere."""
    return _current if _current is not None and _current._stop_at is not None else None
