"""The frozen base in the compute dtype on the disk store and the node's shared host store: a LoRA
block's base is read at 2 bytes an element beside its adapters' fp32 masters, only the adapters
come back, and the run is the resident one bit for bit."""
import dataclasses
import json
import os

import pytest
import torch

from distzo2_lab.config import OffloadConfig, PrecisionConfig
from distzo2_lab.run.train import train
from tests.test_lora import LORA, _block_sizes, _values

BF16 = dataclasses.replace(LORA, precision=PrecisionConfig(compute="bf16"))


def _disk(cfg, store):
    return dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=str(store)))


def _moved(summary: dict, blocks: int, lora: int, total: int, half: bool) -> None:
    """Bytes each way per step: the base in bf16 (2) or fp32 (4), the adapters in fp32 both ways."""
    up = 2 * (blocks - lora) + 4 * lora if half else 4 * blocks
    assert summary["bytes_up_per_step"] == up and summary["bytes_down_per_step"] == 4 * lora
    assert summary["bytes_per_param_per_step"] == pytest.approx((up + 4 * lora) / total)


def test_the_disk_store_reads_the_frozen_base_in_the_compute_dtype_and_resumes_on_it(tmp_path):
    """The store's compute-dtype file is written once with the store, found again on resume (not
    rewritten), and the resumed run ends on the resident run's bits with the exact base saved."""
    from safetensors.torch import load_file

    from distzo2_lab.models import adapter_for, build_model
    from distzo2_lab.models.lora import wrap_lora

    ref = train(dataclasses.replace(BF16, steps=4), progress=False)
    cfg = _disk(BF16, tmp_path / "store")
    first = train(dataclasses.replace(cfg, steps=2), progress=False)
    blocks, lora, total = _block_sizes(BF16)
    base = tmp_path / "store" / "frozen-base.bin"
    record = json.loads((tmp_path / "store" / "manifest.json").read_text())["frozen_base"]
    assert record["dtype"] == "bfloat16" and os.path.getsize(base) == 2 * (blocks - lora)
    written = os.stat(base).st_mtime_ns
    rest = train(dataclasses.replace(cfg, steps=4), progress=False, save=str(tmp_path / "got"),
                 out=str(tmp_path / "out"))
    assert rest["start_step"] == 2 and first["steps"] + rest["steps"] == ref["steps"]
    assert rest["digest"] == ref["digest"] and os.stat(base).st_mtime_ns == written
    _moved(rest, blocks, lora, total, half=True)
    _moved(json.loads((tmp_path / "out" / "summary.json").read_text()), blocks, lora, total, half=True)
    start = _values(adapter_for(wrap_lora(build_model("tiny-deep", seed=0), "lora:4", 0)))
    trained = load_file(tmp_path / "got" / "model.safetensors")
    assert all(torch.equal(trained[n].flatten(), v) for n, v in start.items() if ".lora_" not in n)


def test_a_disk_store_an_fp32_run_made_gains_its_compute_dtype_base_when_a_bf16_run_reopens_it(tmp_path):
    """fp32 compute moves the fp32 block and writes no compute-dtype file; a bf16 run continuing
    that store builds it from the committed slots and ends on the bits of the same resident pair
    (fp32 step, then bf16 steps from its checkpoint)."""
    fp32, bf16 = dataclasses.replace(LORA, steps=1), dataclasses.replace(BF16, steps=3)
    train(fp32, progress=False, save=str(tmp_path / "ck"))
    ref = train(bf16, progress=False, resume=str(tmp_path / "ck"))
    blocks, lora, total = _block_sizes(LORA)
    first = train(_disk(fp32, tmp_path / "store"), progress=False)
    _moved(first, blocks, lora, total, half=False)
    assert "frozen_base" not in json.loads((tmp_path / "store" / "manifest.json").read_text())
    rest = train(_disk(bf16, tmp_path / "store"), progress=False)
    assert rest["start_step"] == 1 and rest["digest"] == ref["digest"]
    _moved(rest, blocks, lora, total, half=True)
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["frozen_base"]["dtype"] == "bfloat16"


def test_a_recorded_base_is_dropped_for_a_run_that_may_change_it_and_rebuilt_from_the_slots(tmp_path):
    """A run whose fixed spans do not cover the recorded ones (it may train them) drops the record
    first; a run that reads other spans gets a file rebuilt from the store's current values."""
    from distzo2_lab.offload.frozen_base import RECORD, open_disk_base
    from distzo2_lab.offload.store import DiskStore

    train(_disk(dataclasses.replace(BF16, steps=1), tmp_path / "store"), progress=False)
    store = DiskStore(str(tmp_path / "store"))
    manifest = lambda: json.loads((tmp_path / "store" / "manifest.json").read_text())  # noqa: E731
    spans = {store.keys.index(k): [tuple(s) for s in v] for k, v in manifest()[RECORD]["spans"].items()}
    assert open_disk_base(store, spans, None) is None and RECORD in manifest()  # kept fixed: stays valid
    fewer = {i: s[1:] for i, s in spans.items()}
    assert open_disk_base(store, fewer, None) is None and RECORD not in manifest()
    os.truncate(tmp_path / "store" / "frozen-base.bin", 100)  # what a kill in the middle of a build leaves
    base = open_disk_base(store, fewer, torch.float16)
    assert manifest()[RECORD]["dtype"] == "float16"
    for i in range(len(store.numels)):  # the fixed spans in fp16, the rest the fp32 masters
        values, got = torch.empty(store.numels[i]), torch.empty(store.numels[i])
        store.read_into(i, values)
        base.upload(i, got)
        expect = values.clone()
        for a, b in fewer[i]:
            expect[a:b] = values[a:b].half().float()
        assert torch.equal(got, expect) and not torch.equal(got, values)
    store.close()


def test_the_node_stores_send_the_frozen_base_up_in_the_compute_dtype_under_pertp(tmp_path):
    """PertP(2), host tier: the node's ranks map one store and one compute-dtype copy of the base;
    disk tier: the leader writes the store's compute-dtype file, the other rank opens it. Each rank
    uploads the base in bf16 and writes back only the adapters, and both end on the single rank's
    bits (the digest covers the fp32 base the store keeps)."""
    from distzo2_lab.observe.events import read_jsonl
    from distzo2_lab.parallel.launch import launch
    from distzo2_lab.parallel.layout import Layout
    from distzo2_lab.run.train import base_of, build_adapter
    from distzo2_lab.run.worker import train_worker

    cfg = dataclasses.replace(BF16, steps=3, batch_size=4)
    single = train(cfg, progress=False)
    blocks, lora, total = _block_sizes(cfg)
    a = build_adapter(base_of(cfg))
    each = [2 * b.numel + 2 * sum(s.stop - s.start for s in b.slots if ".lora_" in s.name) for b in a.blocks]
    for tier in ("host", "disk"):
        tiered = dataclasses.replace(cfg, offload=OffloadConfig(tier=tier, store=str(tmp_path / "store")
                                                                if tier == "disk" else None))
        out = tmp_path / tier
        got = launch(train_worker, 2, args=(tiered, Layout(dp=1, pert=2), str(out), str(out / "trace")),
                     timeout=240).wait()
        assert {r["digest"] for r in got.values()} == {single["digest"]}
        _moved(json.loads((out / "summary.json").read_text()), blocks, lora, total, half=True)
        for rank in (0, 1):  # every upload of each rank: the base in bf16, the adapters in fp32
            up = [s for s in read_jsonl(str(out / "trace" / f"rank{rank}.jsonl")) if s.lane == "upload"]
            assert up and all(s.bytes == each[s.block] for s in up)
        if tier == "host":  # two fp32 slots of every block, one bf16 copy of the base
            assert got[0]["memory"]["shared_store_mb"] * 2**20 == 2 * 4 * blocks + 2 * (blocks - lora)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("distzo2-")]  # nothing left behind


def test_a_prefix_model_streams_every_block_in_bf16_from_disk(tmp_path):
    """A prefix model's blocks are all frozen: 2 bytes a block element up, nothing down."""
    cfg = dataclasses.replace(BF16, peft="prefix:4", steps=2)
    ref = train(cfg, progress=False)
    got = train(_disk(cfg, tmp_path / "store"), progress=False)
    blocks, _, total = _block_sizes(cfg)
    assert got["digest"] == ref["digest"]
    assert (got["bytes_up_per_step"], got["bytes_down_per_step"]) == (2 * blocks, 0)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_the_shared_host_store_holds_a_compute_dtype_base_only_for_bf16_compute(compute):
    """One leader rank of a node share: under fp32 compute the fp32 block travels as before."""
    from distzo2_lab.offload.tiers import NodeShare, Offload
    from distzo2_lab.run.train import base_of

    cfg = dataclasses.replace(LORA, precision=PrecisionConfig(compute=compute))
    a = Offload(base_of(cfg), OffloadConfig(tier="host"), node=NodeShare(True, lambda: None, f"test-{os.getpid()}"),
                base_dtype=torch.bfloat16 if compute == "bf16" else None)
    try:
        blocks, lora, _ = _block_sizes(cfg)
        assert (a.store.base is not None) == (compute == "bf16")
        assert sum(a.store.nbytes(i) for i in range(len(a.store.numels))) == \
            (2 * (blocks - lora) + 4 * lora if compute == "bf16" else 4 * blocks)
    finally:
        a.close()
