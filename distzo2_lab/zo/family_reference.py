"""Eager reference of the ZO method family: every optimiser x perturbation x estimator, resident.

The oracle the block engine will be checked against, as EagerMeZO is for ZO-SGD. Every pass reads
an out-of-place copy theta + scale * p (p = z, or z / sqrt(H) for HiZOO), so the master stays
theta_t until the step's update: the sparse mask, the unperturbed forward l0 and the deferred
update all see the same theta_t. Then, per bucket, the estimate g * d (d = z for one direction,
(1/q) sum_j g_j z_j otherwise) goes through the method's rule (zo/methods.py), whose state lives
beside the bucket's master. ZO-SGD-Cons tries the candidate in copies first and keeps it only if
its loss on the same batch is not above l0 (4 forwards a step).
"""
from __future__ import annotations

import torch

from distzo2_lab.config import PrecisionConfig, ZOConfig, parse_perturbation
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.zo import directions as dirs
from distzo2_lab.zo.eager import EagerResident
from distzo2_lab.zo.estimators import curvature, one_sided, two_point
from distzo2_lab.zo.methods import METHODS, Scalars, apply_, hizoo_direction
from distzo2_lab.zo.spsa import StepResult, count_tokens, direction_seed


def replay_scalars(engine) -> dict | None:
    """The method scalars of an engine's last step that a seed-log replay needs (None for plain
    ZO-SGD engines): Adam's update count t, HiZOO's curvature, ZO-SGD-Cons's accept flag."""
    last = getattr(engine, "last", None)
    if not last:
        return None
    return {k: last[k] for k in ("t", "curvature", "accept") if k in last}


class EagerFamily(EagerResident):
    """A resident model stepped by zo.optimizer / zo.perturbation / zo.estimator, updates at once."""

    def __init__(self, adapter: BlockAdapter, zo: ZOConfig = ZOConfig(),
                 precision: PrecisionConfig = PrecisionConfig(), threads: int = 1, micro_batches: int = 1):
        super().__init__(adapter, zo, precision, micro_batches)
        self.method = METHODS[zo.optimizer]
        self.kind, self.arg = parse_perturbation(zo.perturbation)
        if self.kind == "dense":
            self.kind = zo.noise
        self.state = {b.key: self.method.init_state(b.numel, self.device) for b in adapter.buckets}
        self.thresholds: dict[str, torch.Tensor] = {}  # sparse:F, per bucket: one h per slot
        self.v_seed: int | None = None  # lowrank:R, the step seed V was last drawn from
        self.updates = 0  # updates applied (Adam's t)
        self.last: dict = {}  # l0, trial loss, acceptance, curvature of the last step

    # -- z ------------------------------------------------------------------------------------
    def z(self, bucket, seed: int, start: int = 0, n: int | None = None) -> torch.Tensor:
        """z of elements [start, start + n) of `bucket` at direction seed `seed` (frozen spans 0)."""
        n = bucket.numel - start if n is None else n
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        sparse = self.kind == "sparse"
        return dirs.family_z(out, self.kind, self.arg, self.zo.noise, seed, bucket, start, self.v_seed,
                             bucket.master[start : start + n] if sparse else None,
                             self.thresholds[bucket.key] if sparse else None, self.perturber.frozen.get(bucket.key, ()))

    def _direction(self, bucket, seed: int) -> torch.Tensor:
        z = self.z(bucket, seed)
        return hizoo_direction(z, self.state[bucket.key]) if self.method.name == "hizoo" else z

    def _refresh(self, seed: int) -> None:
        """Per-step schedules: LOZO's V every zo.lowrank_interval steps, Sparse-MeZO's thresholds at
        step 0 (or on resume) and every zo.sparse_refresh steps."""
        t = self.step_count
        if self.kind == "lowrank" and (self.v_seed is None or t % self.zo.lowrank_interval == 0):
            self.v_seed = seed  # V is keyed ".../V": never the same noise as U
        every = self.zo.sparse_refresh
        if self.kind == "sparse" and (not self.thresholds or (every and t % every == 0)):
            self.thresholds = {b.key: dirs.sparse_thresholds(b, b.master, self.arg) for b in self.adapter.buckets}

    # -- passes -------------------------------------------------------------------------------
    def _loss_at(self, micro, flats: list[torch.Tensor]) -> float:
        """The loss with every bucket's parameters bound to `flats` (fp32, cast to the storage dtype)."""
        for b, f, out in zip(self.adapter.buckets, flats, self._copies):
            b.bind(out.copy_(f))
        loss = self._batch_loss(micro)
        for b in self.adapter.buckets:
            b.bind(b.working)
        return loss

    def _perturbed_loss(self, micro, seed: int, scale: float) -> float:
        for b, out in zip(self.adapter.buckets, self._copies):
            b.bind(torch.add(b.master, self._direction(b, seed), alpha=scale, out=out))  # theta + scale z
        loss = self._batch_loss(micro)
        for b in self.adapter.buckets:
            b.bind(b.working)
        return loss

    # -- the step -----------------------------------------------------------------------------
    def _estimate(self, micro, seed: int) -> tuple[float, float, list[tuple[int, float]], float | None]:
        """(loss_plus, loss_minus, [(seed_j, g_j)], l0): two-point or one-sided over q directions."""
        eps, q = self.zo.eps, self.zo.directions
        need_l0 = self.zo.estimator == "one-sided" or self.method.name in ("hizoo", "conservative")
        l0 = self._batch_loss(micro) if need_l0 else None
        seeds = [direction_seed(seed, j) for j in range(q)]
        plus = [self._perturbed_loss(micro, s, eps) for s in seeds]
        if self.zo.estimator == "one-sided":
            return sum(plus) / q, l0, list(zip(seeds, one_sided(plus, l0, eps))), l0
        minus = [self._perturbed_loss(micro, s, -eps) for s in seeds]
        terms = [(s, two_point(p, m, eps)) for s, p, m in zip(seeds, plus, minus)]
        return sum(plus) / q, sum(minus) / q, terms, l0

    def _estimate_direction(self, bucket, terms) -> tuple[torch.Tensor, float]:
        """(d, g) with g * d the bucket's gradient estimate."""
        if len(terms) == 1:
            return self.z(bucket, terms[0][0]), terms[0][1]
        d = torch.zeros(bucket.numel, dtype=torch.float32, device=self.device)
        for s, g in terms:
            d.add_(self.z(bucket, s), alpha=g / len(terms))
        return d, 1.0

    def _update(self, masters: list[torch.Tensor], terms, scalars: dict, states: list[dict]) -> None:
        for b, theta, state in zip(self.adapter.buckets, masters, states):
            d, g = self._estimate_direction(b, terms)
            s = Scalars.of(self.zo, g=g, **scalars)
            apply_(self.method, theta, d, state, s, self.zo.weight_decay, self.perturber.decay_spans(b))

    @torch.no_grad()
    def step(self, batch: dict, seed: int, lr: float | None = None, step: int | None = None) -> StepResult:
        """One step of the configured method (`step`: its index, default the step after the last)."""
        micro, lr = self._begin(batch, lr, step)
        self._copies = [torch.empty_like(b.working) for b in self.adapter.buckets]
        self._refresh(seed)
        loss_plus, loss_minus, terms, l0 = self._estimate(micro, seed)
        scalars = {"lr": lr, "t": self.updates + 1}
        if self.method.name == "hizoo":
            scalars["curvature"] = curvature(loss_plus, loss_minus, l0, self.zo.eps)
        self.last = dict(scalars, l0=l0)
        buckets = self.adapter.buckets
        if self.method.name == "conservative":  # try the candidate out of place on the same batch
            trial = [b.master.clone() for b in buckets]
            self._update(trial, terms, scalars, [{} for _ in buckets])
            loss_trial = self._loss_at(micro, trial)
            scalars["accept"] = loss_trial <= l0
            self.last.update(trial=loss_trial, accept=scalars["accept"])
        self._update([b.master for b in buckets], terms, scalars, [self.state[b.key] for b in buckets])
        for b in buckets:
            b.sync()
        self._copies = None
        self.updates += 1
        self.step_count += 1
        grad = sum(g for _, g in terms) / len(terms)
        return StepResult(self.step_count - 1, seed, loss_plus, loss_minus, grad, lr,
                          sum(count_tokens(m[1]) for m in micro), tuple(terms) if len(terms) > 1 else ())

    # -- seed-log replay -----------------------------------------------------------------------
    @torch.no_grad()
    def replay_step(self, record: dict) -> None:
        """Apply one logged step (run/checkpoint.SeedLog record) as training did: the schedules at
        its step, then the method's update from its directions' (seed, g), its lr and the method
        scalars it logged; the state evolves as in training, so the weights come out bit for bit."""
        seed, method = record["seed"], record.get("method")
        if method is None:
            raise ValueError(f"step {record['step']} of this seed log has no method record (accept, curvature, t): "
                             "it was not written by a run of the method family")
        self.step_count = record["step"]
        self._refresh(seed)
        terms = [tuple(t) for t in record.get("terms", ())] or [(direction_seed(seed, 0), record["grad"])]
        scalars = {"lr": record["lr"], **method}
        buckets = self.adapter.buckets
        self._update([b.master for b in buckets], terms, scalars, [self.state[b.key] for b in buckets])
        for b in buckets:
            b.sync()
        self.updates = method["t"]
        self.step_count += 1

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimiser state beside the masters, and the schedules' scalars (for a checkpoint)."""
        return {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in self.state.items()},
                "thresholds": {k: t.clone() for k, t in self.thresholds.items()},
                "v_seed": self.v_seed, "updates": self.updates, "step": self.step_count}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd["state"].items():
            for n, t in v.items():
                self.state[k][n].copy_(t)
        self.thresholds = {k: t.clone() for k, t in sd["thresholds"].items()}
        self.v_seed, self.updates, self.step_count = sd["v_seed"], sd["updates"], sd["step"]
