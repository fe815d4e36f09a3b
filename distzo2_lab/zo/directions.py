"""Perturbation kinds: z of any slice of a bucket, from counter-based noise (zo/noise.py).

- dense ('gaussian', 'rademacher'): z[i] of bucket `key` at step seed s is noise(s, key, i).
- 'lowrank:R' (LOZO, arXiv 2410.07698): a weight matrix (m, n) with min(m, n) > R gets
  z = U V^T / sqrt(R), U (m, R) drawn every step, V (n, R) drawn from the seed of the last
  refresh step (every zo.lowrank_interval steps: LOZO's lazy subspace). 1/sqrt(R) gives unit
  variance per element, so g z is LOZO's estimator with its 1/R. Vectors (biases, norms) and
  matrices too thin for rank R get the dense z.
- 'sparse:F' (Sparse-MeZO, arXiv 2402.15751): the dense z masked to |theta| <= h, h per tensor the
  F-quantile of |theta| (the small weights: Sparse-MeZO perturbs those). The mask is read from the
  unperturbed master when z is made, so any slice needs only its master slice and the thresholds.

Every function writes elements [start, start + n) of a bucket's z; the result does not depend on
how the bucket is cut.
"""
from __future__ import annotations

import math

import torch

from distzo2_lab.zo.noise import fill_, noise_key


def dense_(out: torch.Tensor, noise: str, seed: int, key: str, start: int) -> torch.Tensor:
    """z[start : start + n] of bucket `key` at step seed `seed`."""
    return fill_(out, noise, noise_key(seed, key), start)


def is_lowrank(shape, rank: int) -> bool:
    return len(shape) == 2 and min(shape) > rank


def _lowrank_rows(noise: str, seed: int, v_seed: int, key: str, shape, rank: int, r0: int, r1: int):
    """Rows r0..r1 of U V^T / sqrt(R) for one matrix, as rank-1 sums in a fixed order (so any rows
    give the same bits as the whole)."""
    m, n = shape
    u = dense_(torch.empty((r1 - r0) * rank), noise, seed, f"{key}/U", r0 * rank).view(r1 - r0, rank)
    v = dense_(torch.empty(n * rank), noise, v_seed, f"{key}/V", 0).view(n, rank)
    z = torch.zeros(r1 - r0, n)
    for k in range(rank):
        z.add_(u[:, k, None] * v[None, :, k])  # (rows, n)
    return z.mul_(1.0 / math.sqrt(rank)).view(-1)


def lowrank_(out: torch.Tensor, noise: str, seed: int, v_seed: int, bucket, start: int, rank: int) -> torch.Tensor:
    """z[start : start + n] of a bucket under 'lowrank:R'; `v_seed` is the step seed of V's refresh."""
    dense_(out, noise, seed, bucket.key, start)
    stop = start + out.numel()
    for slot in bucket.slots:
        a, b = max(slot.start, start), min(slot.stop, stop)
        if a >= b or not is_lowrank(slot.shape, rank):
            continue
        cols = slot.shape[1]
        r0, r1 = (a - slot.start) // cols, (b - slot.start - 1) // cols + 1
        rows = _lowrank_rows(noise, seed, v_seed, f"{bucket.key}/{slot.name}", slot.shape, rank, r0, r1)
        lo = a - slot.start - r0 * cols
        out[a - start : b - start].copy_(rows.to(out.device)[lo : lo + b - a])
    return out


def sparse_thresholds(bucket, master: torch.Tensor, fraction: float) -> torch.Tensor:
    """h of each slot: the ceil(F n)-th smallest |theta| (so at least F of its entries are perturbed)."""
    hs = []
    for s in bucket.slots:
        w = master[s.start : s.stop].abs()
        k = max(1, math.ceil(fraction * w.numel()))
        hs.append(w.kthvalue(k).values if w.numel() else torch.tensor(0.0))
    return torch.stack(hs).to(torch.float32) if hs else torch.zeros(0)


def sparse_mask_(out: torch.Tensor, master: torch.Tensor, bucket, thresholds: torch.Tensor, start: int) -> torch.Tensor:
    """out *= (|theta| <= h of its slot) on elements [start, start + n); `master` is the same slice."""
    stop = start + out.numel()
    for s, h in zip(bucket.slots, thresholds.tolist()):
        a, b = max(s.start, start), min(s.stop, stop)
        if a < b:
            out[a - start : b - start].mul_((master[a - start : b - start].abs() <= h).to(out.dtype))
    return out


def family_z(out: torch.Tensor, kind: str, arg, noise: str, seed: int, bucket, start: int = 0,
             v_seed: int | None = None, master: torch.Tensor | None = None, thresholds: torch.Tensor | None = None,
             frozen=()) -> torch.Tensor:
    """z[start : start + n] of a bucket under perturbation `kind` ('lowrank' with rank `arg` and V's
    seed `v_seed`; 'sparse' masked by `master` (the same slice) and the bucket's `thresholds`;
    otherwise dense), 0 on the `frozen` spans (bucket coordinates). The eager reference and the
    block engine both make z here."""
    n = out.numel()
    if kind == "lowrank":
        lowrank_(out, noise, seed, v_seed, bucket, start, arg)
    else:
        dense_(out, noise, seed, bucket.key, start)
    if kind == "sparse":
        sparse_mask_(out, master, bucket, thresholds, start)
    for a, b in frozen:
        a, b = max(a - start, 0), min(b - start, n)
        if a < b:
            out[a:b].zero_()
    return out
