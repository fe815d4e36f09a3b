"""No update is silently lost: low-precision storage keeps an fp32 master or is refused."""
import dataclasses

import pytest
import torch
from helpers import batches, engine_pair, run

from distzo2_lab.config import ConfigError, PrecisionConfig, TrainConfig, ZOConfig, validate


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_updates_at_lr_1e7_survive_in_the_fp32_master(storage):
    zo = ZOConfig(lr=1e-7, eps=1e-3)
    _, engine = engine_pair(zo, PrecisionConfig(compute=storage, storage=storage))
    block = engine.adapter.blocks[0]
    m0, w0 = block.master.clone(), block.working.clone()
    steps = run(engine, batches(3))
    engine.flush()
    changed_master = (block.master != m0).float().mean().item()
    # The same three updates applied directly to a low-precision copy (what ZO2's fp16 store does).
    naive = w0.clone()
    z = torch.empty(block.numel)
    for r in steps:
        engine.perturber.fill(z, r.seed, block.key)
        naive.add_(z.to(naive.dtype), alpha=-zo.lr * r.grad)
    changed_naive = (naive != w0).float().mean().item()
    assert changed_master > 0.99
    assert changed_naive < 0.5, changed_naive  # most updates would have been rounded away
    assert block.working.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[storage]
    assert torch.equal(block.working, block.master.to(block.working.dtype))


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_low_precision_storage_without_master_is_refused(storage):
    cfg = TrainConfig(precision=PrecisionConfig(compute=storage, storage=storage, master="none"))
    with pytest.raises(ConfigError, match=f"precision.storage='{storage}' with precision.master='none'"):
        validate(cfg)


def test_storage_and_compute_must_agree():
    with pytest.raises(ConfigError, match="precision.storage='bf16' needs precision.compute='bf16'"):
        validate(TrainConfig(precision=PrecisionConfig(compute="fp32", storage="bf16")))
    validate(TrainConfig(precision=PrecisionConfig(compute="bf16", storage="fp32")))  # autocast on fp32 masters
    validate(dataclasses.replace(TrainConfig(), precision=PrecisionConfig(master="none")))  # fp32 is its own master


def test_bf16_compute_changes_the_losses_but_not_the_masters_dtype():
    _, e32 = engine_pair()
    _, e16 = engine_pair(precision=PrecisionConfig(compute="bf16"))
    bs = batches(1)
    assert run(e32, bs)[0].loss_plus != run(e16, bs)[0].loss_plus
    assert all(b.master.dtype == torch.float32 and b.working is b.master for b in e16.adapter.buckets)
