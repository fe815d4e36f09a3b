"""Offloaded runs (host and disk tiers, any prefetch depth) equal the resident engine bit for bit."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from distzo2_lab.config import OffloadConfig, PrecisionConfig, TrainConfig, ZOConfig
from distzo2_lab.observe.events import chrome_trace, overlap_metrics, read_jsonl
from distzo2_lab.offload.store import DiskStore
from distzo2_lab.offload.tiers import Offload, build_offloaded
from distzo2_lab.run.train import build_adapter, train

BASE = TrainConfig(model="tiny-deep", steps=4, batch_size=2, seq_len=12, threads=1,
                   zo=ZOConfig(weight_decay=0.1))


def offloaded(cfg: TrainConfig, tier: str, tmp_path, **kw) -> TrainConfig:
    store = str(tmp_path / f"store-{tier}-{len(os.listdir(tmp_path))}") if tier == "disk" else None
    return dataclasses.replace(cfg, offload=OffloadConfig(tier=tier, store=store, **kw))


PRECISIONS = {"fp32": PrecisionConfig(), "bf16": PrecisionConfig(compute="bf16", storage="bf16"),
              "fp16": PrecisionConfig(compute="fp16", storage="fp16")}


@pytest.mark.parametrize("storage", list(PRECISIONS))
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_every_tier_and_storage_dtype_matches_the_resident_engine(tier, storage, tmp_path):
    cfg = dataclasses.replace(BASE, precision=PRECISIONS[storage])
    ref = train(cfg, progress=False)
    got = train(offloaded(cfg, tier, tmp_path), progress=False)
    assert got["steps"] == ref["steps"]  # loss_plus, loss_minus, projected_grad per step
    assert got["digest"] == ref["digest"] and got["eval_loss_end"] == ref["eval_loss_end"]


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_lean_disk_tier_parks_the_embeddings_and_changes_no_number(storage, tmp_path):
    cfg = dataclasses.replace(BASE, steps=5, precision=PRECISIONS[storage],
                              zo=dataclasses.replace(BASE.zo, perturb="in-place"))  # what a lean tier runs
    ref = train(cfg, progress=False)
    got = train(offloaded(cfg, "disk", tmp_path, lean=True), progress=False)
    assert got["steps"] == ref["steps"] and got["digest"] == ref["digest"]
    from distzo2_lab.run.train import Run

    run = Run(offloaded(cfg, "disk", tmp_path, lean=True))
    emb = run.adapter.model.model.decoder.embed_tokens.weight
    assert run.adapter.bucket_in.master is None and emb.untyped_storage().nbytes() <= 4  # freed
    run.close()


def test_lean_in_place_visit_holds_no_block_of_noise_and_changes_no_number(tmp_path, monkeypatch):
    from distzo2_lab.data.tasks import SyntheticTask
    from distzo2_lab.run.train import Run
    from distzo2_lab.zo import engine

    monkeypatch.setattr(engine, "LEAN_SLAB", 1000)  # many slabs per block, cut across the decay spans
    cfg = dataclasses.replace(BASE, steps=5, zo=dataclasses.replace(BASE.zo, perturb="in-place"))
    ref = train(cfg, progress=False)
    got = train(offloaded(cfg, "disk", tmp_path, lean=True), progress=False)
    assert got["steps"] == ref["steps"] and got["digest"] == ref["digest"]
    assert got["eval_loss_end"] == ref["eval_loss_end"]  # the flush goes slab by slab too
    run = Run(offloaded(cfg, "disk", tmp_path, lean=True))
    task = SyntheticTask(512, 12, 2)
    for t in range(2):
        run.engine.step(task.batch(t), t)
    z = run.engine._z_block  # the only noise buffer of the blocks' visits
    assert z is not None and z.numel() == 1000 < min(b.numel for b in run.adapter.blocks)
    s = run.offload.streamer  # no spare buffer: prefetch + 1 blocks at most, none between sweeps
    assert s.buffers_allocated == run.cfg.offload.prefetch + 1 and s.peak_in_use <= s.buffers_allocated
    s.settle()
    assert s.in_use == 0 and not s._uploaded  # no prefetch into the next sweep
    with pytest.raises(ValueError, match="spare=2 is not valid"):
        type(s)(run.offload.store, spare=2)
    run.close()


@pytest.mark.parametrize("depth", [0, 1, 3, 20])
def test_prefetch_depth_bounds_working_memory_and_changes_no_number(depth, tmp_path):
    ref = train(BASE, progress=False)
    off = Offload({"model": "tiny-deep", "init_seed": 0, "device": "cpu"}, OffloadConfig(tier="host", prefetch=depth))
    assert off.streamer.buffers_allocated == min(depth, 7) + 2  # 8 blocks: at most 7 ahead
    off.close()
    got = train(offloaded(BASE, "host", tmp_path, prefetch=depth), progress=False)
    assert got["digest"] == ref["digest"] and got["steps"] == ref["steps"]
    # the lanes really used the pool: never more than depth + 2 blocks in working memory
    from distzo2_lab.run.train import Run

    run = Run(offloaded(BASE, "host", tmp_path, prefetch=depth))
    from distzo2_lab.data.tasks import SyntheticTask

    task = SyntheticTask(512, 12, 2)
    for t in range(3):
        run.engine.step(task.batch(t), t)
    run.offload.streamer.drain()
    peak = run.offload.streamer.peak_in_use
    run.close()
    assert peak <= min(depth, 7) + 2
    assert peak >= min(depth, 7) + 1  # uploads ran ahead as far as allowed


@pytest.mark.parametrize("defer_resident", [False, True])
def test_disk_store_is_created_block_by_block_and_holds_the_presets_values(defer_resident, tmp_path):
    full = build_adapter({"model": "tiny-deep", "init_seed": 3})
    adapter, values = build_offloaded({"model": "tiny-deep", "init_seed": 3}, defer_resident=defer_resident)
    assert adapter.offloaded and all(b.master is None for b in adapter.blocks)
    store = DiskStore.create(str(tmp_path / "s"), [(b.key, b.numel) for b in adapter.blocks],
                             [("in", adapter.bucket_in.numel), ("out", adapter.bucket_out.numel)], {}, values)
    for i, b in enumerate(full.blocks):
        out = torch.empty(b.numel)
        store.read_into(i, out)
        assert torch.equal(out, b.master)
    assert torch.equal(store.read_resident("in"), full.bucket_in.master)
    assert torch.equal(store.read_resident("out"), full.bucket_out.master)
    store.close()
    reopened = DiskStore(str(tmp_path / "s"))
    assert reopened.committed == -1 and reopened.slot_step("block.0", 1) == -1
    reopened.close()


def test_checkpoint_directory_streams_from_its_safetensors(tmp_path):
    from distzo2_lab.models import build_model

    build_model("tiny-deep", seed=5).save_pretrained(tmp_path / "ck")
    cfg = dataclasses.replace(BASE, model=str(tmp_path / "ck"))
    ref = train(cfg, progress=False)
    got = train(offloaded(cfg, "disk", tmp_path), progress=False)
    assert got["digest"] == ref["digest"] and got["steps"] == ref["steps"]


def test_reopened_disk_store_continues_the_same_trajectory(tmp_path):
    ref = train(dataclasses.replace(BASE, steps=7), progress=False)
    cfg = offloaded(BASE, "disk", tmp_path)
    first = train(dataclasses.replace(cfg, steps=3), progress=False)
    assert json.load(open(os.path.join(cfg.offload.store, "manifest.json")))["committed"] == 2
    rest = train(dataclasses.replace(cfg, steps=7), progress=False)
    assert rest["start_step"] == 3 and first["steps"] + rest["steps"] == ref["steps"]
    assert rest["digest"] == ref["digest"]


def _committed(store: str) -> int:
    try:
        with open(os.path.join(store, "manifest.json")) as f:
            return json.load(f)["committed"]
    except (OSError, ValueError):
        return -2


def test_sigkill_at_random_moments_then_reopen_continues_bit_exactly(tmp_path):
    steps = 40
    cfg = dataclasses.replace(BASE, steps=steps)
    ref = train(cfg, progress=False)
    store = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "distzo2_lab.cli.main", "train", "--model", "tiny-deep", "--steps", str(steps),
           "--batch-size", "2", "--seq-len", "12", "--threads", "1",
           "--weight-decay", "0.1", "--offload", "disk", "--store", store, "--no-progress",
           "--out", str(tmp_path / "out")]
    rng = random.Random(20261125)
    kills = []
    for target in sorted(rng.sample(range(0, steps - 5), 4)):
        if _committed(store) >= target:
            continue
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while _committed(store) < target and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))  # somewhere inside the next step
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append((target, _committed(store), p.returncode))
    assert any(rc == -signal.SIGKILL and 0 <= c < steps - 1 for _, c, rc in kills), kills
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["digest"] == ref["digest"], kills
    assert summary["steps"] == ref["steps"][summary["start_step"]:]


def test_simulated_link_stretches_transfers_and_is_labelled(tmp_path):
    gbps = 0.05  # 50 MB/s: a tiny-deep block (~50k floats, 200 kB) takes ~4 ms
    got = train(offloaded(BASE, "host", tmp_path, link_gbps=gbps), progress=False, trace=str(tmp_path / "t"))
    spans = read_jsonl(got["trace"]["jsonl"])
    transfers = [s for s in spans if s.lane in ("upload", "offload")]
    assert transfers and all(s.seconds >= 0.95 * s.bytes / (gbps * 1e9) for s in transfers)
    trace = json.load(open(got["trace"]["chrome"]))
    assert trace["otherData"]["simulated_link_gbps"] == gbps


def test_trace_files_hold_every_lane_and_parse(tmp_path):
    got = train(offloaded(BASE, "disk", tmp_path), progress=False, trace=str(tmp_path / "t"))
    spans = read_jsonl(got["trace"]["jsonl"])
    assert {s.lane for s in spans} == {"upload", "compute", "offload"}
    assert {"update", "perturb", "forward", "embed", "head"} <= {s.phase for s in spans if s.lane == "compute"}
    assert all(s.end >= s.start >= 0 for s in spans)
    trace = json.load(open(got["trace"]["chrome"]))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(spans) and {e["tid"] for e in xs} == {0, 1, 2} and {e["pid"] for e in xs} == {0}
    assert len(chrome_trace(spans)["traceEvents"]) == len(trace["traceEvents"])
    m = overlap_metrics(spans)
    assert 0 < m["busy"]["compute"] <= 1 and 0 <= m["hidden_fraction"] <= 1
    assert m["bytes"]["upload"] == sum(s.bytes for s in spans if s.lane == "upload") > 0
    assert got["overlap"] == m


def test_overlap_metrics_on_hand_made_spans():
    from distzo2_lab.observe.events import Span

    spans = [Span(0, "compute", "forward", 0, 0, 0, 100), Span(0, "upload", "upload", 0, 1, 50, 150),
             Span(0, "offload", "offload", 0, 0, 150, 200)]
    m = overlap_metrics(spans)
    assert m["window_s"] == 200e-9
    assert m["busy"] == {"compute": 0.5, "upload": 0.5, "offload": 0.25}
    assert m["hidden_fraction"] == pytest.approx(50 / 150)


def test_cli_train_offload_writes_trace(tmp_path, capsys):
    from distzo2_lab.cli.main import main

    rc = main(["train", "--model", "tiny-deep", "--steps", "2", "--batch-size", "2", "--seq-len", "12",
               "--offload", "host", "--prefetch", "2", "--trace", str(tmp_path / "tr"), "--no-progress",
               "--out", str(tmp_path / "o")])
    assert rc == 0 and "transfer hidden under compute" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "tr")) == ["rank0.jsonl", "rank0.trace.json"]


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_summary_reports_the_bytes_the_blocks_moved_per_parameter_and_step(tier, tmp_path):
    """Each step uploads every block's fp32 master and writes it back: 8 bytes per block parameter,
    over every parameter of the model (the resident buckets do not travel); a resident run moves none."""
    got = train(offloaded(BASE, tier, tmp_path), progress=False)
    from distzo2_lab.run.train import Run

    run = Run(BASE)
    buckets = run.adapter.buckets
    blocks, total = sum(b.numel for b in run.adapter.blocks), sum(b.numel for b in buckets)
    run.close()
    assert got["bytes_up_per_step"] == got["bytes_down_per_step"] == 4 * blocks
    assert got["bytes_per_param_per_step"] == pytest.approx(8 * blocks / total)
    assert "bytes_per_param_per_step" not in train(BASE, progress=False)


@pytest.mark.parametrize("rank", [0, 1])
def test_sliced_streamer_moves_its_shard_of_every_section_of_a_slot(rank):
    """A method-family slot [master | m | v] of 3 x 7 elements over 2 ranks: the working buffer holds
    each section padded to 2 x 4, a rank's shard of each section lands at the same place in its padded
    section, and the write-back puts back that shard alone."""
    from distzo2_lab.offload.store import HostStore
    from distzo2_lab.offload.stream import Streamer
    from distzo2_lab.parallel.slicer import Slicer

    store = HostStore(["b"], [21])
    store.blocks[0].copy_(torch.arange(21.0))
    streamer = Streamer(store, slicer=Slicer(rank, 2), sections=3)
    try:
        buf = streamer.acquire(0)
        assert buf.numel() == 24
        a, b = (0, 4) if rank == 0 else (4, 7)
        for j in range(3):
            assert torch.equal(buf[8 * j + a : 8 * j + b], torch.arange(7.0 * j + a, 7.0 * j + b))
            buf[8 * j + a : 8 * j + b] += 100
        streamer.release(0, buf)
        streamer.drain()
        mine = torch.zeros(21, dtype=torch.bool)
        for j in range(3):
            mine[7 * j + a : 7 * j + b] = True
        assert torch.equal(store.blocks[0], torch.arange(21.0) + 100 * mine)
        assert streamer.bytes_up == streamer.bytes_down == 3 * (b - a) * 4
    finally:
        streamer.close()
