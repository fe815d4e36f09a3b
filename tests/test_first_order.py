"""First-order reference: Adam trains the adapter's own buckets in place; peak memory of a phase."""
import os

import pytest
import torch

from distzo2_lab.bench.first_order import PeakMemory, finetune_first_order
from distzo2_lab.config import ConfigError, TrainConfig


@pytest.fixture
def tiny_bert_task(tmp_path, monkeypatch):
    from distzo2_lab.bench.sst2 import write_sample_dir
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.run.train import build_adapter

    monkeypatch.setenv("DISTZO2_CACHE", str(tmp_path / "cache"))
    data = write_sample_dir(str(tmp_path / "sst2"))
    a = build_adapter({"model": "tiny-bert"})
    return a, task_for(TrainConfig(model="tiny-bert", task="sst2", data=data, shots=16, batch_size=8, seq_len=32), a)


def test_adam_lowers_the_loss_and_writes_the_bucket_masters(tiny_bert_task):
    a, task = tiny_bert_task
    batch = task.encode(task.train)
    before = [b.master.clone() for b in a.buckets]
    with torch.no_grad():
        loss0 = float(a.loss(a.forward(batch["input_ids"], batch["attention_mask"]), batch["labels"]))
    r = finetune_first_order(a, task, steps=30, lr=3e-3)
    with torch.no_grad():
        loss1 = float(a.loss(a.forward(batch["input_ids"], batch["attention_mask"]), batch["labels"]))
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert all(not torch.equal(x, b.master) for x, b in zip(before, a.buckets))  # every bucket trained
    assert not any(p.requires_grad or p.grad is not None for p in a.model.parameters())  # back to inference
    assert len(r["losses"]) == 30 and r["memory"]["peak_mb"] > 0


def test_first_order_refuses_low_precision_storage():
    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny-bert"}, storage="bf16")
    with pytest.raises(ConfigError, match="first-order fine-tuning trains a resident fp32 adapter"):
        finetune_first_order(a, None, steps=1)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the RSS peak")
def test_peak_memory_sees_a_transient_allocation_after_a_reset():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB touched, then freed: an earlier peak
    del big
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu") as busy:
        t = torch.ones(96 * 2**20 // 4)  # 96 MiB touched inside the phase
        del t
    assert quiet.reset and busy.reset
    assert busy.added_mb > 80 and quiet.added_mb < busy.added_mb - 60, (quiet.to_dict(), busy.to_dict())
