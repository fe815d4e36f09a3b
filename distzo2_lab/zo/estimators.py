"""Gradient estimators of the method family: the scalars a step derives from its losses.

- two-point (MeZO, arXiv 2305.17333): g_j = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps),
  two forwards per direction.
- one-sided (FZOO, arXiv 2506.09034): one unperturbed forward l0 and K >= 2 forwards
  l_j = L(theta + eps z_j); g_j = (l_j - l0) / (eps sigma), sigma the standard deviation (K - 1 in
  the denominator) of l_1..l_K: FZOO's normalised step, large where the losses barely move.
  K + 1 forwards, batched by the engine into one pass per block.
- HiZOO's curvature (arXiv 2402.15173): |l+ + l- - 2 l0| / (2 eps^2), the second difference along z.
"""
from __future__ import annotations

import math

from distzo2_lab.zo.spsa import projected_grad

two_point = projected_grad


def one_sided(losses: list[float], l0: float, eps: float) -> list[float]:
    """FZOO's g_j of each direction; all 0 when the K losses are equal (sigma = 0: no step)."""
    k = len(losses)
    mean = sum(losses) / k
    sigma = math.sqrt(sum((v - mean) ** 2 for v in losses) / (k - 1))
    if sigma == 0.0:
        return [0.0] * k
    return [(v - l0) / (eps * sigma) for v in losses]


def curvature(loss_plus: float, loss_minus: float, loss0: float, eps: float) -> float:
    return abs(loss_plus + loss_minus - 2.0 * loss0) / (2.0 * eps * eps)
