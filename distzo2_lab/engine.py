"""The ZO2 step for one rank: dual forward per block and the deferred, fused update.

ZO2 (arXiv 2503.12668, Sec. 3.2-3.3): each transformer block is visited once per step. On the
visit it first receives the pending update of the previous step (z regenerated from that
step's seed), then z of this step is generated *once* and reused for +eps, -2 eps and the +eps
restore while both perturbed activations (h+, h-) pass through it. The update of this step is
only known after the last block, so it becomes an explicit :class:`PendingUpdate`, applied on
the next visit or by :meth:`ZO2Engine.flush` (before evaluation, checkpoints and at the end).
Resident buckets (embeddings, final norm, head) keep a copy of their +eps state so the head can
run both passes after the blocks. With a :class:`~distzo2_lab.stream.Streamer` the blocks live
in a store and every visit is served by the upload / offload lanes; the arithmetic is the same
as the eager reference's either way, so the results are bit-identical.
"""
from __future__ import annotations

import contextlib

import torch

from .config import PrecisionConfig, ZOConfig
from .events import Recorder
from .models.buckets import DTYPES, ParamBucket
from .models.opt import OPTAdapter
from .perturb import Perturber
from .zo import (
    PendingUpdate,
    StepResult,
    apply_update_,
    check_engine_setup,
    compute_context,
    count_tokens,
    perturb_,
    projected_grad,
    unpack_batch,
)


class ResidentSet:
    """The resident buckets (embeddings; final norm and head) held in working memory for the whole
    run, as ZO2 keeps them on the GPU. z of this step is kept for the restore, and the +eps state
    is copied so that the head (tied to the embeddings) can run both passes after the blocks."""

    def __init__(self, engine: ZO2Engine, buckets: list[ParamBucket] | None = None):
        a = engine.adapter
        self.engine, self.adapter = engine, a
        buckets = [a.bucket_in, a.bucket_out] if buckets is None else buckets
        self.pairs = [(b, torch.empty(b.numel, device=engine.device)) for b in buckets]
        # reused buffers: fresh allocations cost page faults every step
        self._plus = [torch.empty_like(b.working) for b, _ in self.pairs]

    # -- the pieces, also used by offload.LeanResident for the buckets it keeps in memory -----
    def flush(self) -> None:
        for b, z in self.pairs:
            self.engine._apply_pending(b, z)
            b.sync()

    def to_plus(self, seed: int) -> None:
        """Deferred update, then +eps z(seed); keep the +eps state."""
        e = self.engine
        for (b, z), state in zip(self.pairs, self._plus):
            e._apply_pending(b, z)
            with e._span("rng"):
                e.perturber.fill(z, seed, b.key)
            perturb_(b.master, z, e.zo.eps)
            b.sync()
            state.copy_(b.working)

    def to_minus(self) -> None:
        for b, z in self.pairs:
            perturb_(b.master, z, -2 * self.engine.zo.eps)
            b.sync()

    def bind_plus(self) -> None:
        for (b, _), state in zip(self.pairs, self._plus):
            b.bind(state)

    def restore(self) -> None:
        for b, z in self.pairs:
            b.bind(b.working)
            perturb_(b.master, z, self.engine.zo.eps)
            b.sync()

    # -- the keeper interface the engine calls --------------------------------------------
    def begin(self, seed: int, ids, mask):
        """Deferred update, +eps, embed (h+), -2 eps, embed (h-); returns (h+, h-, ctx)."""
        e, a = self.engine, self.adapter
        plus, minus = e.signs
        self.to_plus(seed)
        with e._span("embed"):
            h_plus, ctx = a.embed(ids, mask) if plus else (None, None)  # (B, T, C)
            self.to_minus()
            if minus:
                h_minus, ctx = a.embed(ids, mask)  # (B, T, C)
            else:
                h_minus = None
        return h_plus, h_minus, ctx

    def end(self, h_plus, h_minus, labels) -> tuple[float, float]:
        """Head on the -eps state, then on the saved +eps state; restore. Returns (l+, l-)."""
        a = self.adapter
        with self.engine._span("head"):
            loss_minus = float(a.loss(a.head(h_minus), labels)) if h_minus is not None else None
            self.bind_plus()
            loss_plus = float(a.loss(a.head(h_plus), labels)) if h_plus is not None else None
        self.restore()
        return loss_plus, loss_minus

    def embed(self, ids, mask):
        return self.adapter.embed(ids, mask)

    def head_loss(self, h, labels) -> float:
        return float(self.adapter.loss(self.adapter.head(h), labels))


class ZO2Engine:
    """Block-by-block ZO step with two noise generations per parameter per step."""

    def __init__(self, adapter: OPTAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1,
                 streamer=None, recorder: Recorder | None = None, resident=None,
                 signs: tuple[bool, bool] = (True, True), exchange=None, slicer=None):
        check_engine_setup(adapter, zo, precision)
        if adapter.offloaded and streamer is None:
            raise ValueError("this adapter's blocks live in a store: pass streamer=Streamer(store, ...)")
        self.adapter, self.zo, self.precision = adapter, zo, precision
        self.streamer = streamer
        self.recorder = recorder or (streamer.recorder if streamer is not None else Recorder(enabled=False))
        self.perturber = Perturber(zo.noise, zo.chunk_size, threads)
        self.device = torch.device(streamer.device) if streamer is not None else adapter.bucket_in.master.device
        self._width = width = max((b.numel for b in adapter.blocks), default=0)
        self._z_block = torch.empty(width, device=self.device)
        # One low-precision working buffer serves every streamed block (compute is sequential).
        self._cast = (torch.empty(width, dtype=DTYPES[precision.storage], device=self.device)
                      if streamer is not None and precision.storage != "fp32" else None)
        self.pending: PendingUpdate | None = None
        self.step_count = 0
        self._visit = 0  # streamed visits served so far (the streamer's sweep order)
        self.trim_buffers = False  # free idle working buffers after each sweep (lean runs)
        # PertP: which perturbed passes this rank runs (the arithmetic on the weights is always
        # the whole +eps / -2 eps / +eps round trip, so every rank keeps identical weights), and
        # exchange(l+, l-, tokens, step) -> (l+, l-) combining the scalars of all ranks.
        if not any(signs):
            raise ValueError("signs=(False, False): a rank must run at least one perturbed pass")
        self.signs = signs
        self.exchange = exchange
        self.slicer = slicer  # streamed blocks arrive as this rank's shard; see _assemble
        self._skip_pending = False
        # `resident(engine)` builds the keeper of the embeddings / head buckets.
        self.resident = (resident or ResidentSet)(self)

    # -- spans ---------------------------------------------------------------------------
    def _span(self, phase: str, block: int = -1):
        r = self.recorder
        if not r.enabled:
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            return r.cuda_span("compute", phase, self.step_count, block)
        return r.span("compute", phase, self.step_count, block)

    # -- blocks: resident, or streamed through the lanes ---------------------------------
    def _sweep(self, visit, write: bool = True) -> None:
        """Call visit(i, bucket) for every block in order; streamed blocks are attached to
        their working buffer for the visit and handed to the offload lane after it."""
        if self.streamer is None:
            for i, b in enumerate(self.adapter.blocks):
                visit(i, b)
            return
        self.streamer.begin_sweep(self._visit, self.step_count)
        if self._z_block is None:
            self._z_block = torch.empty(self._width, device=self.device)
        for i, b in enumerate(self.adapter.blocks):
            v = self._visit
            self._visit += 1
            buf = self.streamer.acquire(v)
            if self.slicer is not None:
                self._assemble(buf, b, i)
            b.attach(buf[: b.numel], None if self._cast is None else self._cast[: b.numel])
            visit(i, b)
            self._skip_pending = False
            b.detach()
            self.streamer.release(v, buf, write)
            del buf
        if self.trim_buffers:  # between sweeps hold no block-sized memory (lean runs)
            b.unbind()  # the shell still viewed the last buffer
            self._z_block = None
            self.streamer.trim()

    def _assemble(self, buf: torch.Tensor, b: ParamBucket, i: int) -> None:
        """Sliced visit: the pending update lands on this rank's shard only, then the ranks
        all-gather the updated shards into the whole block."""
        p, (start, stop) = self.pending, self.slicer.bounds(b.numel)
        if p is not None and stop > start:
            with self._span("update", i):
                z = self.perturber.fill(self._z_block[: stop - start], p.seed, b.key, start=start, total=b.numel)
                apply_update_(buf[start:stop], z, p.grad, p.lr, self.zo.weight_decay, b.decay_spans, offset=start)
        self.slicer.assemble(buf, b.numel, self.step_count, i)
        self._skip_pending = True

    # -- the deferred update -------------------------------------------------------------
    def _apply_pending(self, bucket: ParamBucket, scratch: torch.Tensor, block: int = -1) -> None:
        p = self.pending
        if p is None or (self._skip_pending and block >= 0):
            return
        with self._span("update", block):
            z = self.perturber.fill(scratch[: bucket.numel], p.seed, bucket.key)
            apply_update_(bucket.master, z, p.grad, p.lr, self.zo.weight_decay, bucket.decay_spans)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every bucket now (evaluation never sees stale weights)."""
        if self.pending is None:
            return
        self.resident.flush()

        def visit(i, b):
            self._apply_pending(b, self._z_block, i)
            b.sync()

        self._sweep(visit)
        self.pending = None

    # -- one step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None) -> StepResult:
        a, eps = self.adapter, self.zo.eps
        ids, labels, mask = unpack_batch(batch)
        a.check_batch(ids)
        lr = self.zo.lr if lr is None else lr
        with compute_context(self.precision.compute, self.device):
            h_plus, h_minus, ctx = self.resident.begin(seed, ids, mask)
            h = [h_plus, h_minus]

            # Blocks: update, perturb, dual forward, restore; z generated once per visit.
            def visit(i: int, b: ParamBucket) -> None:
                self._apply_pending(b, self._z_block, i)
                with self._span("rng", i):
                    zb = self.perturber.fill(self._z_block[: b.numel], seed, b.key)
                perturb_(b.master, zb, eps)
                b.sync()
                if h[0] is not None:
                    with self._span("forward", i):
                        h[0] = a.run_block(i, h[0], ctx)
                perturb_(b.master, zb, -2 * eps)
                b.sync()
                if h[1] is not None:
                    with self._span("forward", i):
                        h[1] = a.run_block(i, h[1], ctx)
                perturb_(b.master, zb, eps)
                b.sync()

            self._sweep(visit)

            loss_plus, loss_minus = self.resident.end(h[0], h[1], labels)
        if self.exchange is not None:
            with self._span("exchange"):
                loss_plus, loss_minus = self.exchange(loss_plus, loss_minus, count_tokens(labels), self.step_count)
        grad = projected_grad(loss_plus, loss_minus, eps)
        self.pending = PendingUpdate(self.step_count, seed, grad, lr)
        self.step_count += 1
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr, count_tokens(labels))

    @torch.no_grad()
    def evaluate(self, batch: dict) -> float:
        """Loss at the current parameters, after flushing the pending update."""
        self.flush()
        a = self.adapter
        ids, labels, mask = unpack_batch(batch)
        a.check_batch(ids)
        with compute_context(self.precision.compute, self.device):
            hidden, ctx = self.resident.embed(ids, mask)
            h = [hidden]

            def visit(i, b):
                h[0] = a.run_block(i, h[0], ctx)

            self._sweep(visit, write=False)
            return self.resident.head_loss(h[0], labels)
