"""The method family on the block engine: each visit applies the method's deferred update, then the passes.

ZO2's schedule (arXiv 2503.12668, Sec. 3.2) with the family's rules (zo/methods.py). The passes read
out-of-place copies theta + scale * p (p = z, or z / sqrt(H) for HiZOO), so the master stays theta_t
through the step, as in the eager reference (zo/family_reference.py). A visit of a bucket:
1. the pending update of the previous step lands with the method's rule, on the master and on the
   optimiser state kept beside it (m, v or h), from the z of that step (its directions, its V seed
   for lowrank:R, its sparse thresholds) and the scalars it recorded (g_j, lr, Adam's t, HiZOO's
   curvature, ZO-SGD-Cons's accept flag);
2. sparse:F thresholds are refreshed from theta_t when the schedule says so;
3. every pass of the step runs through it: l0 on theta_t (one-sided, hizoo, conservative), then
   theta + eps p_j and, two-point, theta - eps p_j for each direction j.
ZO-SGD-Cons then sweeps once more through the candidate theta_t - lr g z made out of place, and
records whether its loss is not above l0. Same elementwise arithmetic in the same order as the
eager reference, so losses, g and (after a flush) weights and state are bit-identical.

Where the state lives: resident buckets keep it in working memory beside their masters; a streamed
block carries it in its own store slot, [master | state_0 | state_1 ...], each one block long, so
the upload lane brings it with the master and the offload lane writes it back, overlapped with
compute like the master (a state table kept apart on the host would need its own synchronous
transfers on every visit, since the rule updates master and state together).

Sliced (parallel/slicer.py, DistZO2 Sec. 3.3): each section of the slot is cut into one shard per rank
and a rank moves only its shard of each. The pending update lands on its master shard and state
shards, with z of the shard alone (family_z at the shard's start: dense and lowrank:R regenerate any
slice, sparse:F masks with the master slice and the bucket's thresholds); then the ranks all-gather
the master, which every pass reads whole, and HiZOO's h, which its directions z / sqrt(h) read
whole. The other state stays sharded: the rule alone reads it, elementwise. Sparse thresholds are
refreshed from the gathered theta_t; ZO-SGD-Cons's trial sweep gathers the master once more on every
rank (its candidate keeps no state). Each rank's store is current on its own shards, so the state is
read for a checkpoint by a gather too (Slicer.whole).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from distzo2_lab.config import ConfigError, PrecisionConfig, ZOConfig, parse_perturbation
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.models.buckets import DTYPES, ParamBucket
from distzo2_lab.zo import directions as dirs
from distzo2_lab.zo.engine import ResidentSet, ZO2Engine
from distzo2_lab.zo.estimators import curvature, one_sided, two_point
from distzo2_lab.zo.methods import METHODS, Method, Scalars, apply_, hizoo_direction
from distzo2_lab.zo.spsa import StepResult, compute_context, count_tokens, direction_seed, split_micro


def slot_numel(method: Method, numel: int) -> int:
    """Elements of a streamed block's store slot: the master and each state tensor, one block each."""
    return numel * (1 + method.floats_per_param)


@dataclass(frozen=True)
class FamilyUpdate:
    """A decided step of the family not yet applied to every bucket: what its rule needs on the next visit."""

    step: int
    seed: int
    grad: float
    """The mean of the g_j (what the seed log shows)."""
    lr: float
    terms: tuple
    """(seed_j, g_j) of every direction."""
    t: int = 1
    """Updates so far, this one included (Adam's bias correction)."""
    accept: bool = True
    """conservative: the candidate's loss was not above l0."""
    curvature: float = 0.0
    """hizoo: |l+ + l- - 2 l0| / (2 eps^2) of the step."""
    v_seed: int | None = None
    """lowrank:R: the step seed V was drawn from in that step."""

    def scalars(self, zo: ZOConfig, g: float) -> Scalars:
        return Scalars.of(zo, g=g, lr=self.lr, t=self.t, accept=self.accept, curvature=self.curvature)

    def to_dict(self) -> dict:
        return asdict(self)


class FamilyResident(ResidentSet):
    """The resident buckets (embeddings; final norm and head): their update and refresh at the start of
    a step, then the embedding under every pass; the head under every pass at the end, with the copies
    made again (the masters do not change within a step, so they are the same bits)."""

    def __init__(self, engine: FamilyEngine, buckets: list[ParamBucket] | None = None):
        a = engine.adapter
        self.engine, self.adapter = engine, a
        self.buckets = [a.bucket_in, a.bucket_out] if buckets is None else buckets
        self.pairs = [(b, None) for b in self.buckets]  # ResidentSet.flush: (bucket, scratch)
        self.out = [torch.empty_like(b.working) for b in self.buckets]  # the copy each pass reads

    def begin(self, micro: list) -> dict:
        """Deferred update and refresh, then embed each micro-batch (ids, mask) under every pass;
        returns {pass: [[h, ctx]]}."""
        e, hs = self.engine, {}
        for b in self.buckets:
            e.visit_update(b)

        def embed(key):
            with e.span("embed"):
                hs[key] = [list(self.adapter.embed(ids, mask)) for ids, mask in micro]

        e.each_pass(self.buckets, self.out, embed)
        return hs

    def end(self, hs: dict, labels: list, counts: list[int]) -> dict:
        """The head under every pass; returns {pass: loss}."""
        e, out = self.engine, {}

        def head(key):
            with e.span("head"):
                rows = hs[key]
                out[key] = self.losses([h for h, _ in rows], labels, counts, [c for _, c in rows])

        e.each_pass(self.buckets, self.out, head)
        return out

    def trial_loss(self, micro: list, labels: list, counts: list[int], update: FamilyUpdate, blocks) -> float:
        """ZO-SGD-Cons: the loss at the candidate theta_t + update, made out of place in every bucket;
        `blocks(hs)` runs the blocks' part of the forward."""
        e, a = self.engine, self.adapter
        for b, out in zip(self.buckets, self.out):
            e.candidate(b, out, update)
        hs = [list(a.embed(ids, mask)) for ids, mask in micro]
        self.unbind_copies()
        blocks(hs)
        for b, out in zip(self.buckets, self.out):  # the candidate copies are still in their buffers
            b.bind(out[: b.numel])
        loss = self.losses([h for h, _ in hs], labels, counts, [c for _, c in hs])
        self.unbind_copies()
        return loss

    def unbind_copies(self) -> None:
        for b in self.buckets:
            b.bind(b.working)


class FamilyEngine(ZO2Engine):
    """The block engine stepping zo.optimizer / .perturbation / .estimator; resident, host or disk tier; one
    rank or a layout's (the passes dealt out over the pert group, the losses exchanged)."""

    def __init__(self, adapter: BlockAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1,
                 pert: tuple[int, int] = (0, 1), **options):
        """`options`: ZO2Engine's streamer, recorder, micro_batches, start_step, exchange. Under a
        layout, `pert` = (this rank's index in its pert group, the group's size): the step's passes
        are dealt out round-robin over the group (see `passes`) and `exchange` (parallel.exchange.
        LossExchange) gives every rank every pass's loss, combined over the pert and dp groups.
        `slicer` (parallel.slicer.Slicer, with a streamer built with the same one): each rank moves
        and updates its shard of every streamed block's master and state. No node shares, lean
        keeper nor pending MeZO update."""
        unsupported = [k for k in ("noise_share", "copy_share", "master_share", "resident", "directions",
                                   "pending", "perturber") if options.get(k) is not None]
        if options.get("signs", (True, True)) != (True, True):
            unsupported.append("signs")
        if options.get("trim_buffers"):
            unsupported.append("trim_buffers")
        if unsupported:
            raise ConfigError(f"the method family's block engine keeps its own master and state, not lean; "
                              f"{', '.join(unsupported)} are not supported (choose zo.optimizer='sgd', "
                              "zo.perturbation='dense', zo.estimator='two-point' for them)")
        options.pop("resident", None)  # None here: the family keeps its own resident buckets
        super().__init__(adapter, zo, precision, threads, resident=FamilyResident, **options)
        self.pert_index, self.pert_size = pert
        if not 0 <= self.pert_index < self.pert_size:
            raise ValueError(f"pert={pert}: the rank's index must lie in [0, group size)")
        if self.pert_size > 1 and self.exchange is None:
            raise ValueError("a rank that runs only some of the passes needs exchange= to combine the losses")
        self.method = METHODS[zo.optimizer]
        self.kind, self.arg = parse_perturbation(zo.perturbation)
        if self.kind == "dense":
            self.kind = zo.noise
        if not self.copies:
            raise ConfigError("the method family perturbs out of place; choose zo.perturb='copy' or 'auto'")
        held = adapter.buckets if self.streamer is None else [adapter.bucket_in, adapter.bucket_out]
        self.state = {b.key: self.method.init_state(b.numel, self.device) for b in held}
        if self.streamer is not None:
            want = [slot_numel(self.method, b.numel) for b in adapter.blocks]
            if list(self.streamer.store.numels) != want:
                raise ConfigError(f"zo.optimizer={zo.optimizer!r} keeps its state in each block's store slot: "
                                  "build the tier with Offload(..., state=METHODS[zo.optimizer].state)")
        self._block_state: dict[str, torch.Tensor] = {}  # the visited streamed block's state views
        self._buf = torch.empty(self._width, dtype=DTYPES[precision.storage], device=self.device)
        self.thresholds: dict[str, torch.Tensor] = {}  # sparse:F, per bucket: one h per slot
        self.v_seed: int | None = None  # lowrank:R, the step seed V was last drawn from
        self.updates = 0  # updates decided (Adam's t)
        self.last: dict = {}  # l0, trial loss, acceptance, curvature of the last step
        self._refresh_due = False
        self._seeds: list[int] = []

    # -- state and z ---------------------------------------------------------------------------
    def _section(self, b: ParamBucket) -> int:
        """Elements between the starts of two sections of a streamed block's working buffer: the
        block, or (sliced) the block padded to whole shards (Streamer.buffer_numel)."""
        return b.numel if self.slicer is None else self.slicer.padded(b.numel)

    def _attach(self, b: ParamBucket, buf: torch.Tensor) -> None:
        super()._attach(b, buf)
        n, w = b.numel, self._section(b)
        self._block_state = {name: buf[w * (1 + j) : w * (1 + j) + n] for j, (name, _) in enumerate(self.method.state)}

    def _assemble(self, buf: torch.Tensor, b: ParamBucket, i: int) -> None:
        """Sliced visit: the pending update on this rank's shard of the master and of each state
        section, then the all-gather of the master (and of HiZOO's h, read whole by its directions)."""
        w, (start, stop) = self._section(b), self.slicer.bounds(b.numel)
        if self.pending is not None and stop > start:
            state = {name: buf[w * (1 + j) + start : w * (1 + j) + stop]
                     for j, (name, _) in enumerate(self.method.state)}
            with self.span("update", i):
                self._update(b, buf[start:stop], state, self.pending, start)
        whole = 2 if self.method.name == "hizoo" else 1  # sections gathered: the master, and h (every sweep alike)
        for j in range(whole):
            self.slicer.assemble(buf[w * j : w * (j + 1)], b.numel, self.step_count, i)
        self._skip_pending = True

    def state_of(self, b: ParamBucket) -> dict[str, torch.Tensor]:
        return self.state[b.key] if b.key in self.state else self._block_state

    def z(self, b: ParamBucket, seed: int, v_seed: int | None, theta: torch.Tensor | None = None,
          start: int = 0) -> torch.Tensor:
        """z at direction seed `seed` (V of lowrank:R from `v_seed`) of the elements of bucket `b` that
        `theta` holds, from `start` on (default: the whole master); sparse:F masks with `theta`."""
        theta = b.master if theta is None else theta
        out = torch.empty(theta.numel(), dtype=torch.float32, device=self.device)
        sparse = self.kind == "sparse"
        return dirs.family_z(out, self.kind, self.arg, self.zo.noise, seed, b, start, v_seed,
                             theta if sparse else None, self.thresholds[b.key] if sparse else None,
                             self.perturber.frozen.get(b.key, ()))

    def _direction(self, b: ParamBucket, seed: int) -> torch.Tensor:
        z = self.z(b, seed, self.v_seed)
        return hizoo_direction(z, self.state_of(b)) if self.method.name == "hizoo" else z

    # -- the update ----------------------------------------------------------------------------
    def _update(self, b: ParamBucket, theta: torch.Tensor, state: dict, u: FamilyUpdate, start: int = 0) -> None:
        """theta (the master, a candidate, or a shard of the master from element `start`) and `state`
        (the same elements) after update `u`: the rule on g * d, z made before theta changes."""
        terms = u.terms
        if len(terms) == 1:
            d, g = self.z(b, terms[0][0], u.v_seed, theta, start), terms[0][1]
        else:
            d, g = torch.zeros(theta.numel(), dtype=torch.float32, device=self.device), 1.0
            for s, gj in terms:
                d.add_(self.z(b, s, u.v_seed, theta, start), alpha=gj / len(terms))
        apply_(self.method, theta, d, state, u.scalars(self.zo, g), self.zo.weight_decay,
               self.perturber.decay_spans(b), start)

    def apply_pending(self, bucket: ParamBucket, scratch=None, block: int = -1) -> None:
        """The pending update on one bucket's master and state (`scratch` unused: z is made per bucket);
        block >= 0: a streamed block, whose shard a sliced visit has updated already (_assemble)."""
        if self.pending is None or (self._skip_pending and block >= 0):
            return
        with self.span("update", block):
            self._update(bucket, bucket.master, self.state_of(bucket), self.pending)

    def visit_update(self, b: ParamBucket, block: int = -1) -> None:
        """A visit's first work: the pending update, then the sparse thresholds when due (from theta_t)."""
        self.apply_pending(b, None, block)
        b.sync()
        if self._refresh_due:
            self.thresholds[b.key] = dirs.sparse_thresholds(b, b.master, self.arg)

    def candidate(self, b: ParamBucket, out: torch.Tensor, u: FamilyUpdate) -> None:
        """Bind `b` to theta_t after update `u` made out of place in `out` (ZO-SGD-Cons's trial)."""
        trial = b.master.clone()
        self._update(b, trial, {}, u)
        b.bind(out[: b.numel].copy_(trial))

    # -- the passes ----------------------------------------------------------------------------
    def passes(self) -> list:
        """The step's passes in order: 'l0' (theta_t; one-sided, hizoo, conservative), then (j, +eps)
        and, two-point, (j, -eps) for each direction j. Under PertP pass k is run by the pert group's
        rank k mod size (with one direction and two signs: +eps on the first rank, -eps on the second,
        as the plain engine splits them); ZO-SGD-Cons's trial by rank len(passes) mod size."""
        eps = self.zo.eps
        scales = (eps,) if self.zo.estimator == "one-sided" else (eps, -eps)
        return (["l0"] if self._need_l0 else []) + [(j, s) for j in range(self.zo.directions) for s in scales]

    def _mine(self, k: int) -> bool:
        return k % self.pert_size == self.pert_index

    def each_pass(self, buckets: list[ParamBucket], outs: list[torch.Tensor], fn) -> None:
        """fn(pass) for every pass of the step this rank runs, with `buckets` bound to what it reads:
        'l0' theta_t, (j, scale) the copy theta_t + scale p_j made in `outs` (p_j made once for both signs)."""
        mine = [key for k, key in enumerate(self.passes()) if self._mine(k)]
        if "l0" in mine:
            fn("l0")
        for j, s in enumerate(self._seeds):
            scales = [key[1] for key in mine if key != "l0" and key[0] == j]
            if not scales:
                continue
            ps = [self._direction(b, s) for b in buckets]
            for scale in scales:
                for b, out, p in zip(buckets, outs, ps):
                    b.bind(torch.add(b.master, p, alpha=scale, out=out[: b.numel]))  # theta + scale p
                fn((j, scale))
            for b in buckets:
                b.bind(b.working)

    def _exchange(self, values: list, tokens: int) -> list[float]:
        """Every pass's loss on every rank: this rank's values (None where another rank ran the pass),
        combined over the pert and dp groups (one row a pass: PertP keeps the one value, DDP takes the
        token-weighted mean). Without an exchange (one rank) the values as they are."""
        if self.exchange is None:
            return values
        with self.span("exchange"):
            return [lp for lp, _ in self.exchange([(v, v) for v in values], tokens, self.step_count)]

    @property
    def _need_l0(self) -> bool:
        return self.zo.estimator == "one-sided" or self.method.name in ("hizoo", "conservative")

    def _schedule(self, seed: int) -> None:
        """Per-step schedules: LOZO's V every zo.lowrank_interval steps; Sparse-MeZO's thresholds at the
        first step (or after a load without them) and every zo.sparse_refresh steps."""
        t, every = self.step_count, self.zo.sparse_refresh
        if self.kind == "lowrank" and (self.v_seed is None or t % self.zo.lowrank_interval == 0):
            self.v_seed = seed
        self._refresh_due = self.kind == "sparse" and (not self.thresholds or bool(every and t % every == 0))
        self._seeds = [direction_seed(seed, j) for j in range(self.zo.directions)]

    def _losses(self, micro, labels, counts) -> dict:
        """One sweep: every bucket's deferred update, then every pass; returns {pass: loss}."""
        a = self.adapter
        hs = self.resident.begin([(ids, mask) for ids, _, mask in micro])

        def visit(i: int, b: ParamBucket) -> None:
            self.visit_update(b, i)

            def forward(key):
                with self.span("forward", i):
                    for h in hs[key]:
                        h[0] = a.run_block(i, h[0], h[1])

            self.each_pass([b], [self._buf], forward)

        self._sweep(visit)
        return self.resident.end(hs, labels, counts)

    def _trial(self, micro, labels, counts, u: FamilyUpdate) -> float:
        """ZO-SGD-Cons: one more sweep, through the candidate (nothing written back)."""
        a = self.adapter

        def blocks(hs):
            def visit(i: int, b: ParamBucket) -> None:
                self.candidate(b, self._buf, u)
                with self.span("forward", i):
                    for h in hs:
                        h[0] = a.run_block(i, h[0], h[1])
                b.bind(b.working)

            self._sweep(visit, write=False)

        return self.resident.trial_loss([(ids, mask) for ids, _, mask in micro], labels, counts, u, blocks)

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None, step: int | None = None) -> StepResult:
        """One step of the configured method; its update stays pending until the next visit or a flush."""
        if step is not None:
            self.step_count = step
        micro = split_micro(batch, self.micro_batches)
        for ids, _, _ in micro:
            self.adapter.check_batch(ids)
        labels = [y for _, y, _ in micro]
        counts = [count_tokens(y) for y in labels]
        lr, eps, q = self.zo.lr if lr is None else lr, self.zo.eps, self.zo.directions
        self._schedule(seed)
        with compute_context(self.precision.compute, self.device):
            got = self._losses(micro, labels, counts)
        self.pending = None  # the sweep has applied it to every bucket
        self._refresh_due = False
        keys = self.passes()
        got = dict(zip(keys, self._exchange([got.get(k) for k in keys], sum(counts))))
        l0, seeds = got.get("l0"), self._seeds
        plus = [got[j, eps] for j in range(q)]
        if self.zo.estimator == "one-sided":
            loss_plus, loss_minus, terms = sum(plus) / q, l0, list(zip(seeds, one_sided(plus, l0, eps)))
        else:
            minus = [got[j, -eps] for j in range(q)]
            terms = [(s, two_point(p, m, eps)) for s, p, m in zip(seeds, plus, minus)]
            loss_plus, loss_minus = sum(plus) / q, sum(minus) / q
        grad = sum(g for _, g in terms) / len(terms)
        u = FamilyUpdate(self.step_count, seed, grad, lr, tuple(terms), self.updates + 1, v_seed=self.v_seed)
        if self.method.name == "hizoo":
            u = replace(u, curvature=curvature(loss_plus, loss_minus, l0, eps))
        self.last = {"lr": lr, "t": u.t, "l0": l0}
        if self.method.name == "hizoo":
            self.last["curvature"] = u.curvature
        if self.method.name == "conservative":  # try the candidate out of place on the same batch
            loss_trial = None
            if self._mine(len(keys)):
                with compute_context(self.precision.compute, self.device):
                    loss_trial = self._trial(micro, labels, counts, u)
            elif self.slicer is not None:  # the trial's gathers span every rank: take part in them
                self._sweep(lambda i, b: None, write=False)
            loss_trial = self._exchange([loss_trial], sum(counts))[0]
            u = replace(u, accept=loss_trial <= l0)
            self.last.update(trial=loss_trial, accept=u.accept)
        self.pending = u
        self.updates += 1
        self.step_count += 1
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr, sum(counts),
                          tuple(terms) if len(terms) > 1 else ())

    # -- checkpoints ---------------------------------------------------------------------------
    def _stored(self) -> list[tuple[int, ParamBucket]]:
        return [] if self.streamer is None else list(enumerate(self.adapter.blocks))

    def state_dict(self) -> dict:
        """Optimiser state of every bucket (streamed blocks' read from their store slots), the schedules'
        scalars and the pending update (None after a flush), for a checkpoint."""
        state = {k: {n: t.clone() for n, t in v.items()} for k, v in self.state.items()}
        if self._stored():
            self.streamer.drain()
        for i, b in self._stored():
            state[b.key] = {name: self._read_section(i, b, 1 + j) for j, (name, _) in enumerate(self.method.state)}
        return {"state": state, "thresholds": {k: t.clone() for k, t in self.thresholds.items()},
                "v_seed": self.v_seed, "updates": self.updates, "step": self.step_count,
                "pending": None if self.pending is None else self.pending.to_dict()}

    def _read_section(self, i: int, b: ParamBucket, j: int) -> torch.Tensor:
        """Section j of block i's store slot (a sliced rank's store is current on its shard only)."""
        store, at = self.streamer.store, b.numel * j

        def read(dst: torch.Tensor, start: int) -> None:
            store.read_into(i, dst, start=at + start)

        if self.slicer is not None:
            return self.slicer.whole(read, b.numel, i)
        out = torch.empty(b.numel)
        read(out, 0)
        return out

    def load_state_dict(self, sd: dict) -> None:
        if self._stored() and self.streamer.store.tier == "disk":  # a write would start a slot of a new step
            raise ValueError("a disk store resumes from its committed step (Offload.keep_method_state), not from "
                             "a state_dict")
        stored = {b.key: (i, b) for i, b in self._stored()}
        if stored:
            self.streamer.drain()
        for k, v in sd["state"].items():
            for j, (name, _) in enumerate(self.method.state):
                if k in stored:
                    i, b = stored[k]
                    self.streamer.store.write_from(i, v[name], start=b.numel * (1 + j))
                else:
                    self.state[k][name].copy_(v[name])
        self.thresholds = {k: t.clone().to(self.device) for k, t in sd["thresholds"].items()}
        self.v_seed, self.updates, self.step_count = sd["v_seed"], sd["updates"], sd["step"]
        p = sd.get("pending")
        self.pending = None if p is None else FamilyUpdate(**{**p, "terms": tuple(map(tuple, p["terms"]))})

    def run_state(self) -> dict:
        """What a disk store commits with each step beside its slots (JSON): the update count (Adam's
        t), the lowrank:R V seed and the sparse:F thresholds; the state tensors are in the slots."""
        return {"updates": self.updates, "v_seed": self.v_seed,
                "thresholds": {k: t.tolist() for k, t in self.thresholds.items()}}

    def resume(self, run_state: dict, record: dict) -> None:
        """Continue from a disk store's committed step: its run_state(), and the update it owes from the
        seed log's record of that step (each direction's (seed, g), lr, the method scalars it logged)."""
        self.updates, self.v_seed = run_state["updates"], run_state["v_seed"]
        self.thresholds = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                           for k, v in run_state["thresholds"].items()}
        m, seed = record["method"], record["seed"]
        terms = tuple(map(tuple, record.get("terms", ()))) or ((direction_seed(seed, 0), record["grad"]),)
        self.pending = FamilyUpdate(record["step"], seed, record["grad"], record["lr"], terms, m["t"],
                                    m.get("accept", True), m.get("curvature", 0.0), self.v_seed)
