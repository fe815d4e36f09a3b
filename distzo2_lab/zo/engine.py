"""The ZO2 step for one rank: dual forward per block and the deferred, fused update.

ZO2 (arXiv 2503.12668, Sec. 3.2-3.3): each transformer block is visited once per step. On the
visit it first receives the pending update of the previous step (z regenerated from that
step's seed), then z of this step is generated *once* and reused for +eps, -2 eps and the +eps
restore while both perturbed activations (h+, h-) pass through it. The update of this step is
only known after the last block, so it becomes an explicit :class:`PendingUpdate`, applied on
the next visit or by :meth:`ZO2Engine.flush` (before evaluation, checkpoints and at the end).
Resident buckets (embeddings, final norm, head) keep a copy of their +eps state so the head can
run both passes after the blocks. With a :class:`~distzo2_lab.offload.stream.Streamer` the blocks live
in a store and every visit is served by the upload / offload lanes; the arithmetic is the same
as the eager reference's either way, so the results are bit-identical.

Two options change the step itself, with the eager reference following the same rule:
`micro_batches` runs each visit's forwards micro-batch by micro-batch (gradient accumulation:
one transfer per block, token-weighted losses), and zo.directions = q > 1 (n-SPSA) perturbs each
visited block out of place for every direction this rank runs, so the masters only ever receive
the averaged update and ranks running different directions keep identical weights.
"""
from __future__ import annotations

import contextlib

import torch

from distzo2_lab.config import PrecisionConfig, ZOConfig, copies_perturbation
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.models.buckets import DTYPES, ParamBucket
from distzo2_lab.observe.events import Recorder
from distzo2_lab.zo.perturb import Perturber
from distzo2_lab.zo.spsa import (
    PendingUpdate,
    StepResult,
    apply_update_,
    check_engine_setup,
    compute_context,
    count_tokens,
    direction_seed,
    hold_masters,
    perturb_,
    projected_grad,
    split_micro,
    unpack_batch,
    update_terms,
    weighted_loss,
)

LEAN_SLAB = 1 << 22  # elements of z a lean run holds at once (16 MiB of fp32)


class ResidentSet:
    """The resident buckets (embeddings; final norm and head) held in working memory for the whole
    run, as ZO2 keeps them on the GPU. In place, z of this step is kept for the restore, and the
    +eps state is copied so that the head (tied to the embeddings) can run both passes after the
    blocks. With copies (zo.perturb copy, n-SPSA) both compute-dtype copies are kept from the
    embedding to the head (made again per direction when there are several), and the masters only
    receive the update."""

    def __init__(self, engine: ZO2Engine, buckets: list[ParamBucket] | None = None):
        a = engine.adapter
        self.engine, self.adapter = engine, a
        buckets = [a.bucket_in, a.bucket_out] if buckets is None else buckets
        # in place: z of this step is kept for the restore (copies keep no z)
        self.pairs = [(b, torch.empty(b.numel if not engine.copies else 0, device=engine.device)) for b in buckets]
        # reused buffers: fresh allocations cost page faults every step
        self._plus = [torch.empty_like(b.working) for b, _ in self.pairs] if not engine.copies else []
        # copies: this rank's buffers, or views of the node's shared slots (engine.master_share)
        shared = engine.master_share is not None
        self._copies = [(None, None) if shared else
                        (torch.empty(b.numel, dtype=engine.copy_dtype, device=engine.device),
                         torch.empty(b.numel, dtype=engine.copy_dtype, device=engine.device))
                        for b, _ in self.pairs] if engine.copies else []

    # -- the pieces, also used by offload.LeanResident for the buckets it keeps in memory -----
    def flush(self) -> None:
        for b, z in self.pairs:
            self.engine.apply_pending(b, z)
            b.sync()

    def to_plus(self, seed: int) -> None:
        """Deferred update, then +eps z(seed); keep the +eps state."""
        e = self.engine
        for (b, z), state in zip(self.pairs, self._plus):
            e.apply_pending(b, z)
            with e.span("rng"):
                e.draw(z, seed, b.key)
            with e.span("embed"):
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
    def begin(self, seed: int, micro: list) -> list:
        """Deferred update, +eps, embed (h+), -2 eps, embed (h-) for each micro-batch (ids, mask);
        returns [[h+, h-, ctx+, ctx-]] (None for a sign this rank does not run). Each pass keeps
        its own context: a prefix table (prefix tuning) is resident, perturbed with the embeddings."""
        e, a = self.engine, self.adapter
        plus, minus = e.signs
        self.to_plus(seed)
        out = []
        with e.span("embed"):
            for ids, mask in micro:
                h_plus, ctx = a.embed(ids, mask) if plus else (None, None)  # (B, T, C)
                out.append([h_plus, None, ctx, None])
            self.to_minus()
            for row, (ids, mask) in zip(out, micro):
                if minus:
                    row[1], row[3] = a.embed(ids, mask)  # (B, T, C)
        return out

    def end(self, hs: list, labels: list, counts: list[int]) -> tuple[float, float]:
        """Head on the -eps state, then on the saved +eps state; restore. Returns (l+, l-)."""
        with self.engine.span("head"):
            loss_minus = self.losses([h[1] for h in hs], labels, counts, [h[3] for h in hs])
            self.bind_plus()
            loss_plus = self.losses([h[0] for h in hs], labels, counts, [h[2] for h in hs])
            self.restore()
        return loss_plus, loss_minus

    def make_copies(self, seed: int, pending: bool) -> None:
        """The compute-dtype copies theta + eps z(seed) and theta - eps z(seed) of every resident bucket
        (the signs this rank runs) in one fused pass, which applies the pending update first when
        `pending` (the first direction of a step); with a node's shared masters, once per node."""
        e = self.engine
        terms, keep = e.pending_terms() if pending else ([], 1.0)
        plus, minus = e.signs
        for k, ((b, _), (cp, cm)) in enumerate(zip(self.pairs, self._copies)):
            with e.span("update" if terms else "perturb"):
                if e.master_share is not None:
                    self._copies[k] = e.master_share.copies(b, terms, keep, seed, e.zo.eps, e.signs)
                else:
                    e.perturber.visit(b, b.master, terms, keep, seed, e.zo.eps, cp if plus else None,
                                      cm if minus else None)
                if terms:
                    b.sync()

    def bind_copy(self, sign: int) -> None:
        """Bind the copy of one sign (0: +eps, 1: -eps) made by the last make_copies."""
        for (b, _), pair in zip(self.pairs, self._copies):
            b.bind(pair[sign])

    def unbind_copies(self) -> None:
        for b, _ in self.pairs:
            b.bind(b.working)

    def begin_directions(self, seeds: list[int], micro: list) -> dict:
        """Copies (zo.perturb copy, n-SPSA): the pending update and the first direction's copies in one
        pass, then embed each micro-batch under every (direction, sign) this rank runs; returns
        {(j, sign): [(h, ctx)]}."""
        e, a = self.engine, self.adapter
        out = {}
        for k, (j, seed) in enumerate(seeds):
            self.make_copies(seed, pending=k == 0)
            with e.span("embed"):
                for sign, _ in self.signed(e.zo.eps):
                    self.bind_copy(sign)
                    out[j, sign] = [list(a.embed(ids, mask)) for ids, mask in micro]
        self.unbind_copies()
        return out

    def end_directions(self, seeds: list[int], hs: dict, labels: list, counts: list[int]) -> dict:
        """Copies: the head under every (direction, sign); returns {(j, sign): loss}. One direction's
        copies are still in their buffers from begin_directions; several directions are made again
        (the master holds the updated values, so the copies are the same bits)."""
        e = self.engine
        out = {}
        for j, seed in seeds:
            if len(seeds) > 1:
                self.make_copies(seed, pending=False)
            with e.span("head"):
                for sign, _ in self.signed(e.zo.eps):
                    self.bind_copy(sign)
                    rows = hs[j, sign]
                    out[j, sign] = self.losses([h for h, _ in rows], labels, counts, [c for _, c in rows])
        self.unbind_copies()
        return out

    def signed(self, eps: float) -> list[tuple[int, float]]:
        plus, minus = self.engine.signs
        return [(0, eps)] * plus + [(1, -eps)] * minus

    def losses(self, hs: list, labels: list, counts: list[int], ctxs: list) -> float | None:
        if hs[0] is None:
            return None
        a = self.adapter
        return weighted_loss([float(a.loss(a.head(h, c), y)) for h, y, c in zip(hs, labels, ctxs)], counts)

    def embed(self, ids, mask):
        return self.adapter.embed(ids, mask)

    def head_loss(self, h, labels, ctx=None) -> float:
        return float(self.adapter.loss(self.adapter.head(h, ctx), labels))


class ZO2Engine:
    """Block-by-block ZO step with two noise generations per parameter per step."""

    def __init__(self, adapter: BlockAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1,
                 streamer=None, recorder: Recorder | None = None, resident=None,
                 signs: tuple[bool, bool] = (True, True), exchange=None, slicer=None,
                 micro_batches: int = 1, directions: list[int] | None = None, perturber: Perturber | None = None,
                 noise_share=None, copy_share=None, trim_buffers: bool = False, start_step: int = 0,
                 pending: PendingUpdate | None = None, master_share=None, after_flush=None):
        """`perturber`: the noise generator (built from zo when None; pass the one `noise_share` draws
        with). `noise_share` (node_share.NoiseShare): the node's ranks split every whole-bucket draw;
        `copy_share` (copy_share.CopyShare): the node's ranks of the same signs make each block copy
        once. `master_share` (master_share.MasterShare): the node's ranks hold the resident masters
        once and make each update and copy once. `trim_buffers`: free idle working buffers after each
        sweep (lean runs). `start_step` and `pending`: where a resumed run continues (its first step
        index, the update it owes). `after_flush(engine)`: called once a flush has updated every
        bucket (offload.tiers.Offload.after_flush: the ranks sharing one store leave it together)."""
        check_engine_setup(adapter, zo, precision)
        hold_masters(adapter, precision)
        if adapter.offloaded and streamer is None:
            raise ValueError("this adapter's blocks live in a store: pass streamer=Streamer(store, ...)")
        self.adapter, self.zo, self.precision = adapter, zo, precision
        self.streamer = streamer
        self.recorder = recorder or (streamer.recorder if streamer is not None else Recorder(enabled=False))
        self.perturber = perturber or Perturber(zo.noise).freeze(adapter.buckets, zo.freeze)
        self.noise_share, self.copy_share, self.master_share = noise_share, copy_share, master_share
        if master_share is not None and (streamer is not None or not copies_perturbation(zo)):
            raise ValueError("master_share= holds resident masters and makes copies: no streamer, zo.perturb='copy'")
        self.device = torch.device(streamer.device) if streamer is not None else adapter.bucket_in.master.device
        self._width = width = max((b.numel for b in adapter.blocks), default=0)
        # in place, z of the visited block is drawn here (the fused copies compute it where it is used);
        # lean runs (trim_buffers) draw it slab by slab into a small buffer instead, regenerated for
        # every pass (counter-based noise: any slice gives the same bits), so no block-sized z exists
        self._slab = LEAN_SLAB if trim_buffers and noise_share is None and not copies_perturbation(zo) else 0
        self._z_block = (torch.empty(min(width, self._slab) if self._slab else width, device=self.device)
                         if not copies_perturbation(zo) else None)
        # One low-precision working buffer serves every streamed block (compute is sequential); a
        # bf16 master is itself what the forward reads
        self._cast = (torch.empty(width, dtype=DTYPES[precision.storage], device=self.device)
                      if streamer is not None and precision.storage != "fp32" and precision.master != "bf16" else None)
        self.pending = pending
        self.step_count = start_step  # the index of the next step (the spans' step)
        self._visit = 0  # streamed visits served so far (the streamer's sweep order)
        self.trim_buffers = trim_buffers
        # PertP: which perturbed passes this rank runs (in place, the arithmetic on the weights is
        # always the whole +eps / -2 eps / +eps round trip, so every rank keeps identical weights;
        # with copies a rank only makes the copies of its own signs), and
        # exchange([(l+, l-) per direction], tokens, step) -> the same list combined over all ranks.
        if not any(signs):
            raise ValueError("signs=(False, False): a rank must run at least one perturbed pass")
        self.signs = signs
        # n-SPSA: the directions (of zo.directions) this rank runs; a single rank runs them all
        self.directions = list(range(zo.directions)) if directions is None else list(directions)
        if exchange is None and (self.directions != list(range(zo.directions)) or not all(signs)):
            raise ValueError("a rank that runs only some signs or directions needs exchange= to combine the losses")
        self.micro_batches = micro_batches
        self.copies = copies_perturbation(zo)  # passes read theta +- eps z copies (zo.perturb)
        self.copy_dtype = DTYPES[precision.compute]  # the forwards read copies in the compute dtype
        self._oop = None  # copies: this rank's (+eps, -eps) copies of the visited block
        self.exchange = exchange
        self.slicer = slicer  # streamed blocks arrive as this rank's shard; see _assemble
        self.after_flush = after_flush
        self._skip_pending = False
        # `resident(engine)` builds the keeper of the embeddings / head buckets.
        self.resident = (resident or ResidentSet)(self)

    # -- spans ---------------------------------------------------------------------------
    def span(self, phase: str, block: int = -1):
        """A compute span of this step (a no-op context when nothing records)."""
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
        if self._z_block is None and not self.copies:
            self._z_block = torch.empty(min(self._width, self._slab) if self._slab else self._width,
                                        device=self.device)
        for i, b in enumerate(self.adapter.blocks):
            v = self._visit
            self._visit += 1
            buf = self.streamer.acquire(v)
            if self.slicer is not None:
                self._assemble(buf, b, i)
            self._attach(b, buf)
            visit(i, b)
            self._skip_pending = False
            b.detach()
            self.streamer.release(v, buf, write)
            del buf
        if self.trim_buffers:  # between sweeps hold no block-sized memory (lean runs)
            b.unbind()  # the shell still viewed the last buffer
            if not self._slab:
                self._z_block = None
            self.streamer.trim()

    def _attach(self, b: ParamBucket, buf: torch.Tensor) -> None:
        """Attach a streamed block to the working buffer its visit received (hook: a subclass may keep
        more than the master in the buffer)."""
        b.attach(buf[: b.numel], None if self._cast is None else self._cast[: b.numel])

    def _assemble(self, buf: torch.Tensor, b: ParamBucket, i: int) -> None:
        """Sliced visit: the pending update lands on this rank's shard only, then the ranks
        all-gather the updated shards into the whole block."""
        p, (start, stop) = self.pending, self.slicer.bounds(b.numel)
        if p is not None and stop > start:
            with self.span("update", i):
                if self.copies:
                    self.perturber.visit(b, buf[start:stop], *self.pending_terms(), start=start)
                for seed, grad, lr, wd in ([] if self.copies else p.updates(self.zo.weight_decay)):
                    z = self.perturber.fill(self._z_block[: stop - start], seed, b.key, start=start)
                    apply_update_(buf[start:stop], z, grad, lr, wd, self.perturber.decay_spans(b), offset=start)
        self.slicer.assemble(buf, b.numel, self.step_count, i)
        self._skip_pending = True

    def draw(self, out: torch.Tensor, seed: int, key: str, keep: bool = True) -> torch.Tensor:
        """z(seed, key) of a whole bucket into `out`: drawn here, or split with the node's ranks
        (every rank makes the same whole-bucket draws in the same order; shard draws stay local).
        keep=False: z is used up before this rank's next draw, so a shared draw may be returned in
        its shared-memory slot instead of copied into `out` (NoiseShare.view)."""
        if self.noise_share is not None:
            share = self.noise_share
            return share.fill(out, seed, key) if keep else share.view(out, seed, key)
        return self.perturber.fill(out, seed, key)

    # -- the deferred update -------------------------------------------------------------
    def apply_pending(self, bucket: ParamBucket, scratch: torch.Tensor, block: int = -1) -> None:
        """The pending update on one bucket (z regenerated into `scratch`); block >= 0: a streamed
        block, whose update a sliced visit has already applied."""
        p = self.pending
        if p is None or (self._skip_pending and block >= 0):
            return
        with self.span("update", block):
            if self.copies:  # the fused pass, z made inside it
                if self.master_share is not None:  # the node's master: updated once per node
                    self.master_share.update(bucket, *self.pending_terms())
                else:
                    self.perturber.visit(bucket, bucket.master, *self.pending_terms())
                return
            spans = self.perturber.decay_spans(bucket)
            for seed, grad, lr, wd in p.updates(self.zo.weight_decay):
                if self._slab:
                    def update(m, z, a, grad=grad, lr=lr, wd=wd):
                        apply_update_(m, z, grad, lr, wd, spans, offset=a)

                    self._by_slab(bucket, seed, update)
                    continue
                z = self.draw(scratch[: bucket.numel], seed, bucket.key, keep=False)
                apply_update_(bucket.master, z, grad, lr, wd, spans)

    def _by_slab(self, bucket: ParamBucket, seed: int, fn) -> None:
        """fn(master slice, z slice, offset) over the bucket slab by slab, z(seed) of each slab
        regenerated into the small buffer (lean runs: the same elementwise arithmetic, the same bits)."""
        self.perturber.by_slab(bucket.master, seed, bucket.key, self._z_block, fn)

    def pending_terms(self) -> tuple[list[tuple[int, float]], float]:
        """The pending update as the fused visit's (terms, keep); ([], 1.0) when none is pending."""
        return update_terms(self.pending, self.zo.weight_decay)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every bucket now (evaluation never sees stale weights); then
        after_flush, where ranks sharing one store meet (a step ends with the loss exchange, a
        flush with nothing of its own)."""
        if self.pending is None:
            return
        self.resident.flush()

        def visit(i, b):
            self.apply_pending(b, self._z_block, i)
            b.sync()

        self._sweep(visit)
        self.pending = None
        if self.after_flush is not None:
            self.after_flush(self)

    # -- one step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None, step: int | None = None) -> StepResult:
        """One ZO step on `batch` with noise from `seed`; `step` is its index (the seed log's and the
        spans'; default: the step after the last one); `lr` overrides zo.lr for this step."""
        a = self.adapter
        if step is not None:
            self.step_count = step
        micro = split_micro(batch, self.micro_batches)
        for ids, _, _ in micro:
            a.check_batch(ids)
        labels = [y for _, y, _ in micro]
        counts = [count_tokens(y) for y in labels]
        lr = self.zo.lr if lr is None else lr
        q = self.zo.directions
        with compute_context(self.precision.compute, self.device):
            if not self.copies:
                losses = [self._in_place(seed, micro, labels, counts)]
            else:
                losses = self._out_of_place(seed, micro, labels, counts)
        if self.exchange is not None:
            with self.span("exchange"):
                losses = self.exchange(losses, sum(counts), self.step_count)
        eps = self.zo.eps
        if q == 1:
            (loss_plus, loss_minus), terms = losses[0], ()
            grad = projected_grad(loss_plus, loss_minus, eps)
        else:
            terms = tuple((direction_seed(seed, j), projected_grad(lp, lm, eps)) for j, (lp, lm) in enumerate(losses))
            loss_plus, loss_minus = sum(lp for lp, _ in losses) / q, sum(lm for _, lm in losses) / q
            grad = sum(g for _, g in terms) / q
        self.pending = PendingUpdate(self.step_count, seed, grad, lr, terms)
        self.step_count += 1
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr, sum(counts), terms)

    def _in_place(self, seed: int, micro, labels, counts) -> tuple[float | None, float | None]:
        """MeZO's step: per block update, +eps, forward h+, -2 eps, forward h-, +eps (z made once)."""
        a, eps = self.adapter, self.zo.eps
        hs = self.resident.begin(seed, [(ids, mask) for ids, _, mask in micro])  # [[h+, h-, ctx+, ctx-]]

        def visit(i: int, b: ParamBucket) -> None:
            self.apply_pending(b, self._z_block, i)
            if self._slab:  # lean: z regenerated slab by slab for each pass
                def perturb(scale):
                    self._by_slab(b, seed, lambda m, z, _: perturb_(m, z, scale))
            else:
                with self.span("rng", i):
                    zb = self.draw(self._z_block[: b.numel], seed, b.key, keep=False)  # used up in this visit

                def perturb(scale):
                    perturb_(b.master, zb, scale)
            for k, scale in ((0, eps), (1, -2 * eps)):
                with self.span("perturb", i):
                    perturb(scale)
                    b.sync()
                if self.signs[k]:  # PertP: only the passes this rank runs
                    with self.span("forward", i):
                        for h in hs:
                            h[k] = a.run_block(i, h[k], h[2 + k])
            with self.span("perturb", i):
                perturb(eps)
                b.sync()

        self._sweep(visit)
        return self.resident.end(hs, labels, counts)

    def _out_of_place(self, seed: int, micro, labels, counts) -> list[tuple[float | None, float | None]]:
        """Copies (zo.perturb copy, n-SPSA): per block one fused pass applies the pending update and
        writes the compute-dtype copies theta +- eps z_j of the first direction this rank runs (only
        the signs it runs), then each further direction's copies; the forwards read the copies, the
        master is never perturbed."""
        a, eps = self.adapter, self.zo.eps
        seeds = [(j, direction_seed(seed, j)) for j in self.directions]
        hs = self.resident.begin_directions(seeds, [(ids, mask) for ids, _, mask in micro])
        signed = self.resident.signed(eps)

        def visit(i: int, b: ParamBucket) -> None:
            for k, (j, s) in enumerate(seeds):
                pending = k == 0 and self.pending is not None and not self._skip_pending
                with self.span("update" if pending else "perturb", i):
                    copies = self._copies(b, s, pending)
                for sign, _ in signed:
                    b.bind(copies[sign])
                    with self.span("forward", i):
                        for h in hs[j, sign]:
                            h[0] = a.run_block(i, h[0], h[1])
            b.bind(b.working)

        self._sweep(visit)
        got = self.resident.end_directions(seeds, hs, labels, counts)
        return [(got.get((j, 0)), got.get((j, 1))) for j in range(self.zo.directions)]

    def _copies(self, b: ParamBucket, seed: int, pending: bool) -> tuple:
        """(theta + eps z, theta - eps z) of a visited block in the compute dtype (None for a sign this
        rank does not run), with the pending update applied to the master first when `pending`: one
        fused pass in this rank's buffers, or the node's shared slots (the ranks running the same
        signs share the work; valid until this rank's next copy)."""
        terms, keep = self.pending_terms() if pending else ([], 1.0)
        plus, minus = self.signs
        eps, n = self.zo.eps, b.numel
        if self.master_share is not None:  # the node's master: update and copies once per node
            out = self.master_share.copies(b, terms, keep, seed, eps, self.signs)
        elif self.copy_share is not None:  # update this rank's master, then share the making of the copies
            if terms:
                self.perturber.visit(b, b.master, terms, keep)
            def part(sign):
                def fill(slot, x, y):
                    out = {"plus": slot[x:y]} if sign == 0 else {"minus": slot[x:y]}
                    self.perturber.visit(b, b.master[x:y], (), 1.0, seed, eps, start=x, **out)
                return self.copy_share.piece(n, fill)
            out = (part(0) if plus else None, part(1) if minus else None)
        else:
            if self._oop is None:  # allocated on first use: ranks that share their copies hold none
                self._oop = [torch.empty(self._width, dtype=self.copy_dtype, device=self.device) for _ in range(2)]
            out = (self._oop[0][:n] if plus else None, self._oop[1][:n] if minus else None)
            self.perturber.visit(b, b.master, terms, keep, seed, eps, *out)
        if terms:
            b.sync()
        return out

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
            return self.resident.head_loss(h[0], labels, ctx)
