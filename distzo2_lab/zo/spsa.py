"""The ZO-SGD arithmetic shared by every way of running a step.

MeZO (arXiv 2305.17333, Alg. 1): theta += eps z; l+ = L(theta); theta -= 2 eps z; l- = L(theta);
theta += eps z; g = (l+ - l-) / (2 eps); theta <- theta - lr (g z + wd theta). ZO2 (arXiv
2503.12668, Sec. 3.2) defers the update of step t to the next visit of each block, so it lives
as an explicit :class:`PendingUpdate` until it is applied or flushed. Both the eager reference
and the block engine call these functions, so the same elementwise arithmetic runs in the same
order and the results are bit-identical.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PendingUpdate:
    """An update that has been decided (g known) but not yet applied to every bucket.

    With q > 1 directions (n-SPSA) `terms` holds (seed_j, g_j) of every direction and the update
    is theta <- theta - (lr / q) sum_j g_j z_j - lr wd theta; `seed` / `grad` are then direction
    0's seed and the mean of the g_j (what a log line shows)."""

    step: int
    seed: int
    grad: float
    lr: float
    terms: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def updates(self, weight_decay: float) -> list[tuple[int, float, float, float]]:
        """(seed, g, lr, wd) of each apply_update_ call, in order: one per direction."""
        if not self.terms:
            return [(self.seed, self.grad, self.lr, weight_decay)]
        q = len(self.terms)
        # decay once (keep = 1 - lr * wd, written with the scaled lr so that lr / q * (wd * q) = lr * wd)
        return [(s, g, self.lr / q, weight_decay * q if j == 0 else 0.0) for j, (s, g) in enumerate(self.terms)]


def update_terms(pending: PendingUpdate | None, weight_decay: float) -> tuple[list[tuple[int, float]], float]:
    """A pending update as the fused visit's arguments: [(seed_j, -lr_j g_j)] and the decay factor
    keep = 1 - lr wd applied once (on the decay spans); ([], 1.0) when nothing is pending."""
    if pending is None:
        return [], 1.0
    terms, keep = [], 1.0
    for seed, grad, lr, wd in pending.updates(weight_decay):
        terms.append((seed, -lr * grad))
        if wd:
            keep = 1.0 - lr * wd
    return terms, keep


def direction_seed(seed: int, j: int) -> int:
    """Seed of perturbation direction j of a step (n-SPSA); direction 0 is the step seed itself."""
    from distzo2_lab.seeds import derive_seed

    return seed if j == 0 else derive_seed(seed, "direction", j)


def split_micro(batch: dict, micro_batches: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(input_ids, labels, attention_mask) of each of `micro_batches` equal row slices."""
    ids, labels, mask = unpack_batch(batch)
    rows = ids.shape[0]
    if micro_batches < 1 or rows % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} does not divide this batch of {rows} rows")
    n = rows // micro_batches
    return [(ids[k : k + n], labels[k : k + n], None if mask is None else mask[k : k + n])
            for k in range(0, rows, n)]


def weighted_loss(losses: list[float | None], counts: list[int]) -> float | None:
    """Token-weighted mean of micro-batch losses (= the loss of their union); one passes through."""
    if losses[0] is None:
        return None
    if len(losses) == 1:
        return losses[0]
    return sum(v * n for v, n in zip(losses, counts)) / sum(counts)


def projected_grad(loss_plus: float, loss_minus: float, eps: float) -> float:
    """The scalar SPSA estimate of the directional derivative along z."""
    return (loss_plus - loss_minus) / (2.0 * eps)


def perturb_(master: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """theta <- theta + scale * z, in place (scale is +eps, -2 eps or +eps)."""
    master.add_(z, alpha=scale)


def apply_update_(
    master: torch.Tensor,
    z: torch.Tensor,
    grad: float,
    lr: float,
    weight_decay: float,
    decay_spans: list[tuple[int, int]],
    offset: int = 0,
) -> None:
    """theta <- theta - lr * (g * z + wd * theta), wd only on `decay_spans` (not bias / norms).

    `master` may be a slice of its bucket starting at element `offset` (a slicer's shard)."""
    if weight_decay:
        keep = 1.0 - lr * weight_decay
        for a, b in decay_spans:
            a, b = max(a - offset, 0), min(b - offset, master.numel())
            if a < b:
                master[a:b].mul_(keep)
    master.add_(z, alpha=-lr * grad)


@dataclass(frozen=True)
class StepResult:
    """What one ZO step decided: the two losses and the projected gradient."""

    step: int
    seed: int
    loss_plus: float
    loss_minus: float
    grad: float
    lr: float
    tokens: int
    terms: tuple = ()
    """n-SPSA: (seed_j, g_j) of every direction; loss_plus / loss_minus / grad are then means."""

    def to_dict(self) -> dict:
        return asdict(self)


def unpack_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, attention_mask) of a batch dict; labels default to input_ids."""
    if "input_ids" not in batch:
        raise ValueError("a batch is a dict with 'input_ids' (and optional 'labels', 'attention_mask')")
    ids = batch["input_ids"]
    return ids, batch.get("labels", ids), batch.get("attention_mask")


def count_tokens(labels: torch.Tensor) -> int:
    """Targets that carry loss: next-token targets that are not -100 for (B, T) labels, examples
    whose label is not -100 for one label per sequence (B,) (a classifier)."""
    if labels.dim() == 1:
        return int((labels != -100).sum())
    return int((labels[:, 1:] != -100).sum())


def compute_context(compute: str, device: torch.device):
    """torch.autocast for bf16 / fp16 compute, else a no-op context."""
    import contextlib

    if compute in ("bf16", "fp16"):
        dtype = torch.bfloat16 if compute == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def hold_masters(adapter, precision) -> None:
    """precision.master='bf16': the resident buckets' masters become bf16 (rounded to nearest once;
    every update after that is rounded stochastically by the fused pass)."""
    if precision.master == "bf16":
        for b in adapter.buckets:
            b.hold_master(torch.bfloat16)


def check_engine_setup(adapter, zo, precision) -> None:
    """Validate the hyper-parameters and that the adapter's buckets use the precision's storage."""
    from distzo2_lab.config import ConfigError, copies_perturbation, validate_precision, validate_zo

    validate_zo(zo)
    validate_precision(precision)
    if precision.master == "bf16" and not copies_perturbation(zo):
        raise ConfigError("precision.master='bf16' with zo.perturb='in-place' would round the master at every "
                          "perturbation; choose zo.perturb='copy' or 'auto', or precision.master='fp32'")
    stored = {b.storage for b in adapter.buckets}
    if stored != {precision.storage}:
        raise ConfigError(f"precision.storage={precision.storage!r} but the adapter was built with storage "
                          f"{', '.join(sorted(stored))}; build the adapter with storage={precision.storage!r}")
