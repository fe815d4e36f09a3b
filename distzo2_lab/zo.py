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
    """An update that has been decided (g known) but not yet applied to every bucket."""

    step: int
    seed: int
    grad: float
    lr: float

    def to_dict(self) -> dict:
        return asdict(self)


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

    def to_dict(self) -> dict:
        return asdict(self)


def unpack_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, attention_mask) of a batch dict; labels default to input_ids."""
    if "input_ids" not in batch:
        raise ValueError("a batch is a dict with 'input_ids' (and optional 'labels', 'attention_mask')")
    ids = batch["input_ids"]
    return ids, batch.get("labels", ids), batch.get("attention_mask")


def count_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss (next-token targets that are not -100)."""
    return int((labels[:, 1:] != -100).sum())


def compute_context(compute: str, device: torch.device):
    """torch.autocast for bf16 / fp16 compute, else a no-op context."""
    import contextlib

    if compute in ("bf16", "fp16"):
        dtype = torch.bfloat16 if compute == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def check_engine_setup(adapter, zo, precision) -> None:
    """Validate the hyper-parameters and that the adapter's buckets use the precision's storage."""
    from .config import ConfigError, validate_precision, validate_zo

    validate_zo(zo)
    validate_precision(precision)
    stored = {b.storage for b in adapter.buckets}
    if stored != {precision.storage}:
        raise ConfigError(f"precision.storage={precision.storage!r} but the adapter was built with storage "
                          f"{', '.join(sorted(stored))}; build OPTAdapter(model, storage={precision.storage!r})")
