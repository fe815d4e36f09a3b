"""The update rules of the ZO method family: what a step does with its gradient estimate g * d.

Every rule updates a flat fp32 master slice in place from the matching slice d of the estimate's
direction (z for one direction; (1/q) sum_j g_j z_j with g = 1 for several), its state slices and
a few scalars. Rules are elementwise, so the engine may apply them to any slice of a bucket at any
offset (a block visit, a slicer's shard) and get the bits of the whole. Weight decay is decoupled
and applied first, on the decay spans only (MeZO: no decay of biases and norms).

- sgd: theta <- theta - lr g d (MeZO, arXiv 2305.17333).
- momentum: m <- beta m + g d; theta <- theta - lr m (ZO-SGD-MMT, ZO-Bench arXiv 2402.11592).
- adam: Adam's moments of g d with bias correction (ZO-Adam, ZO-Bench).
- sign: theta <- theta - lr sign(g d) (ZO-SGD-Sign, ZO-Bench).
- conservative: the sgd step, kept only if the loss at the candidate does not exceed the loss at
  theta on the same batch (ZO-SGD-Cons, ZO-Bench); a rejected step changes nothing.
- hizoo: perturbation along z / sqrt(H); theta <- theta - lr g z / sqrt(H); then
  H <- H (1 - alpha + alpha c z^2), c = |l+ + l- - 2 l0| / (2 eps^2) (HiZOO, arXiv 2402.15173).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from distzo2_lab.config import ZOConfig


@dataclass(frozen=True)
class Scalars:
    """What a rule needs besides tensors: the step's scalars and the method's hyper-parameters."""

    g: float
    """The estimate is g * d (one direction: the projected gradient; several: 1)."""
    lr: float
    t: int = 1
    """Updates applied so far, this one included (Adam's bias correction)."""
    accept: bool = True
    """conservative: the trial loss did not exceed the loss at theta."""
    curvature: float = 0.0
    """hizoo: |l+ + l- - 2 l0| / (2 eps^2)."""
    beta: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    smooth: float = 1e-8

    @classmethod
    def of(cls, zo: ZOConfig, **step) -> Scalars:
        return cls(beta=zo.momentum, beta1=zo.adam_beta1, beta2=zo.adam_beta2, adam_eps=zo.adam_eps,
                   smooth=zo.hessian_smooth, **step)


def sgd_(theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars) -> None:
    theta.add_(d, alpha=-s.lr * s.g)


def momentum_(theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars) -> None:
    m = state["m"]
    m.mul_(s.beta).add_(d, alpha=s.g)
    theta.add_(m, alpha=-s.lr)


def adam_(theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars) -> None:
    m, v = state["m"], state["v"]
    m.mul_(s.beta1).add_(d, alpha=(1 - s.beta1) * s.g)
    v.mul_(s.beta2).addcmul_(d, d, value=(1 - s.beta2) * s.g * s.g)
    denom = (v.sqrt() / math.sqrt(1 - s.beta2 ** s.t)).add_(s.adam_eps)
    theta.addcdiv_(m, denom, value=-s.lr / (1 - s.beta1 ** s.t))


def sign_(theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars) -> None:
    theta.add_(d.sign(), alpha=-s.lr * math.copysign(1.0, s.g) if s.g else 0.0)


def conservative_(theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars) -> None:
    if s.accept:
        sgd_(theta, d, state, s)


def hizoo_(theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars) -> None:
    h = state["h"]
    theta.addcdiv_(d, h.sqrt(), value=-s.lr * s.g)  # the step uses H_{t-1}, the H of the passes
    h.mul_(d.square().mul_(s.smooth * s.curvature).add_(1 - s.smooth))


def hizoo_direction(z: torch.Tensor, state: dict) -> torch.Tensor:
    """The direction HiZOO perturbs along: z / sqrt(H) (Sigma^(1/2) z with Sigma = H^-1)."""
    return z / state["h"].sqrt()


@dataclass(frozen=True)
class Method:
    """An optimiser of the family: its rule and the per-parameter state it keeps beside the master."""

    name: str
    rule: Callable[[torch.Tensor, torch.Tensor, dict, Scalars], None]
    state: tuple[tuple[str, float], ...] = ()
    """(name, initial value) of each fp32 state tensor, one float per parameter each."""
    replayable: bool = True
    """The state is a function of the seed log's (seed, g) history (and, for hizoo, its curvatures),
    so a replay could rebuild it; the reference checkpoints it instead (replay costs a pass over
    the whole history)."""

    @property
    def floats_per_param(self) -> int:
        return len(self.state)

    def init_state(self, numel: int, device) -> dict[str, torch.Tensor]:
        return {k: torch.full((numel,), v, dtype=torch.float32, device=device) for k, v in self.state}


METHODS = {m.name: m for m in (
    Method("sgd", sgd_),
    Method("momentum", momentum_, (("m", 0.0),)),
    Method("adam", adam_, (("m", 0.0), ("v", 0.0))),
    Method("sign", sign_),
    Method("conservative", conservative_),
    Method("hizoo", hizoo_, (("h", 1.0),)),
)}


def decay_(theta: torch.Tensor, keep: float, spans: list[tuple[int, int]], offset: int = 0) -> None:
    """theta *= keep on the decay spans (bucket coordinates); `theta` starts at element `offset`."""
    if keep == 1.0:
        return
    for a, b in spans:
        a, b = max(a - offset, 0), min(b - offset, theta.numel())
        if a < b:
            theta[a:b].mul_(keep)


def apply_(method: Method, theta: torch.Tensor, d: torch.Tensor, state: dict, s: Scalars,
           weight_decay: float = 0.0, decay_spans: list[tuple[int, int]] = (), offset: int = 0) -> None:
    """One update of a master slice (elements [offset, offset + n) of its bucket): decoupled decay
    theta *= 1 - lr wd on the decay spans, then the method's rule. A rejected conservative step
    changes nothing."""
    if method.name == "conservative" and not s.accept:
        return
    decay_(theta, 1.0 - s.lr * weight_decay, decay_spans, offset)
    method.rule(theta, d, state, s)
