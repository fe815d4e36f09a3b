"""The method family under DistZO2 layouts, through the project's launcher (real gloo groups on CPU).

PertP deals the step's passes out over the pert group (FamilyEngine.passes), each loss is computed
by one rank and the exchange hands every rank every loss, so PertP(2) equals one rank bit for bit;
DDP averages the ranks' losses by tokens, equal to the single rank up to the order of float sums.
"""
import dataclasses
import json

import pytest

from distzo2_lab.config import OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.parallel.launch import launch
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.run.checkpoint import digest
from distzo2_lab.run.train import rebuild, train
from distzo2_lab.run.worker import train_worker

BASE = TrainConfig(model="tiny", steps=4, batch_size=4, seq_len=12, threads=1)
PERTP = {  # one of each optimiser, every perturbation and both estimators among them
    "adam": ZOConfig(optimizer="adam", lr=1e-3, weight_decay=0.05),
    "hizoo-sparse": ZOConfig(optimizer="hizoo", perturbation="sparse:0.5", sparse_refresh=2, lr=1e-3),
    "conservative": ZOConfig(optimizer="conservative", lr=1e-3),
    "sgd-one-sided": ZOConfig(estimator="one-sided", directions=3, lr=1e-6),
    "momentum-lowrank": ZOConfig(optimizer="momentum", perturbation="lowrank:2", lowrank_interval=2, lr=1e-3),
    "sign-rademacher": ZOConfig(optimizer="sign", noise="rademacher", lr=1e-4),
}


def run_layout(layout: Layout, cfg: TrainConfig, out=None) -> dict:
    return launch(train_worker, layout.world_size, args=(cfg, layout, out), timeout=240).wait()


# adam: the host-tier test below; conservative: the four-rank test (its trial on a rank of its own)
@pytest.mark.parametrize("name", ["hizoo-sparse", "momentum-lowrank", "sgd-one-sided", "sign-rademacher"])
def test_pertp_deals_out_the_passes_and_equals_one_rank_bit_for_bit(name):
    cfg = dataclasses.replace(BASE, zo=PERTP[name])
    single = train(cfg, progress=False)
    results = run_layout(Layout(dp=1, pert=2), cfg)
    assert {r["digest"] for r in results.values()} == {single["digest"]}  # weights on every rank
    assert {r["state_digest"] for r in results.values()} == {single["state_digest"]}  # optimiser state too
    assert results[0]["steps"] == results[1]["steps"] == single["steps"]  # losses, g, every method scalar
    zo = cfg.zo
    l0 = zo.estimator == "one-sided" or zo.optimizer in ("hizoo", "conservative")
    losses = l0 + zo.directions * (1 if zo.estimator == "one-sided" else 2) + (zo.optimizer == "conservative")
    assert results[0]["exchange_bytes"] == 32 * losses  # one row of four float64 a loss, nothing else


def test_pertp_over_four_ranks_deals_out_l0_and_the_directions_bit_for_bit():
    cfg = dataclasses.replace(BASE, steps=2, zo=ZOConfig(optimizer="conservative", estimator="one-sided",
                                                         directions=2, lr=1e-3))
    single = train(cfg, progress=False)
    results = run_layout(Layout(dp=1, pert=4), cfg)  # l0, (0,+), (1,+) on ranks 0-2; the trial on rank 3
    assert {(r["digest"], r["state_digest"]) for r in results.values()} == {(single["digest"], single["state_digest"])}
    assert results[0]["steps"] == results[3]["steps"] == single["steps"]


def test_pertp_on_the_host_tier_equals_one_rank():
    cfg = dataclasses.replace(BASE, zo=PERTP["adam"], offload=OffloadConfig(tier="host"))
    single = train(dataclasses.replace(cfg, offload=OffloadConfig()), progress=False)
    results = run_layout(Layout(dp=1, pert=2), cfg)
    assert {r["digest"] for r in results.values()} == {single["digest"]}
    assert results[0]["steps"] == single["steps"]


@pytest.mark.parametrize("name", ["conservative"])  # l0, both signs and the trial loss averaged by tokens
def test_ddp_and_2d_match_one_rank_within_float_order(name):
    cfg = dataclasses.replace(BASE, zo=PERTP[name])
    single = train(cfg, progress=False)
    ddp, two_d = run_layout(Layout(dp=2, pert=1), cfg), run_layout(Layout(dp=2, pert=2), cfg)
    for results in (ddp, two_d):
        assert len({r["digest"] for r in results.values()}) == 1  # identical weights on every rank
    # the pert pairs split the passes and change no arithmetic: 2D equals DDP bit for bit
    assert two_d[0]["steps"] == ddp[0]["steps"] and two_d[0]["digest"] == ddp[0]["digest"]
    # DDP: a token-weighted mean of two half-batch means against one full-batch mean (the
    # tolerance of tests/test_distributed.py's plain-MeZO check)
    for mine, ref in zip(ddp[0]["steps"], single["steps"]):
        assert mine["loss_plus"] == pytest.approx(ref["loss_plus"], rel=1e-5)
        assert mine["loss_minus"] == pytest.approx(ref["loss_minus"], rel=1e-5)
        assert mine["projected_grad"] == pytest.approx(ref["projected_grad"], abs=5e-3)


def test_a_pertp_family_run_rebuilds_from_its_seed_log(tmp_path):
    cfg = dataclasses.replace(BASE, zo=PERTP["hizoo-sparse"])
    results = run_layout(Layout(dp=1, pert=2), cfg, out=str(tmp_path / "out"))
    assert digest(rebuild(str(tmp_path / "out" / "seedlog.jsonl"))) == results[0]["digest"]


# adam: state sharded, decayed; hizoo-sparse: h gathered, thresholds refreshed from the gathered
# master; conservative: the trial's sweep gathers on both ranks (the trial runs on rank 1)
@pytest.mark.parametrize("name", ["adam", "hizoo-sparse", "conservative"])
def test_sliced_pertp_moves_shards_of_master_and_state_and_equals_one_rank_bit_for_bit(name, tmp_path):
    cfg = dataclasses.replace(BASE, steps=3, zo=PERTP[name])
    single = train(cfg, progress=False)
    sliced = dataclasses.replace(cfg, offload=OffloadConfig(tier="host"))
    results = launch(train_worker, 2, args=(sliced, Layout(dp=1, pert=2, slice=True), None, str(tmp_path / "t")),
                     timeout=240).wait()
    assert {(r["digest"], r["state_digest"]) for r in results.values()} == {(single["digest"], single["state_digest"])}
    assert results[0]["steps"] == results[1]["steps"] == single["steps"]
    # every upload of rank 0 moved its shard of the master and of each state tensor, nothing more
    from distzo2_lab.observe.events import read_jsonl
    from distzo2_lab.parallel.slicer import Slicer
    from distzo2_lab.zo.methods import METHODS

    spans = read_jsonl(str(tmp_path / "t" / "rank0.jsonl"))
    start, stop = Slicer(0, 2).bounds(49984)  # a tiny block's shard
    ups = [s.bytes for s in spans if s.lane == "upload"]
    assert ups and set(ups) == {(1 + METHODS[cfg.zo.optimizer].floats_per_param) * (stop - start) * 4}


def test_sliced_pertp_on_one_shared_disk_store_reopens_to_one_rank_bit_for_bit(tmp_path):
    """Each rank writes its shards of every section of the node's [master | state...] slots; the
    leader commits; a second launch continues from the store to one uninterrupted rank's run."""
    cfg = dataclasses.replace(BASE, steps=3, zo=PERTP["adam"])
    single = train(cfg, progress=False)
    disk = dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=str(tmp_path / "s")))
    layout = Layout(dp=1, pert=2, slice=True)
    first = run_layout(layout, dataclasses.replace(disk, steps=2))
    rest = run_layout(layout, disk)
    assert first[0]["steps"] + rest[0]["steps"] == single["steps"]
    assert {(r["digest"], r["state_digest"]) for r in rest.values()} == {(single["digest"], single["state_digest"])}


def test_sliced_ddp_equals_unsliced_ddp_bit_for_bit():
    cfg = dataclasses.replace(BASE, steps=2, zo=PERTP["momentum-lowrank"], offload=OffloadConfig(tier="host"))
    naive, sliced = (run_layout(Layout(dp=2, pert=1, slice=s), cfg) for s in (False, True))
    want = {(naive[0]["digest"], naive[0]["state_digest"])}
    assert {(r["digest"], r["state_digest"]) for r in sliced.values()} == want
    assert sliced[0]["steps"] == naive[0]["steps"]


@pytest.mark.parametrize("name", ["adam", "momentum-lowrank"])
def test_pertp_on_one_shared_disk_store_equals_one_rank_and_reopens_bit_exactly(name, tmp_path):
    """The pair's ranks share the node's store (one [master | state...] slot per block, written
    alike by both, committed once by the leader with the run state); a second launch with more
    steps continues it to the weights and state of one uninterrupted one-rank run."""
    cfg = dataclasses.replace(BASE, steps=3, zo=PERTP[name])
    single = train(cfg, progress=False)
    disk = dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=str(tmp_path / "s")))
    first = run_layout(Layout(dp=1, pert=2), dataclasses.replace(disk, steps=2))
    assert json.load(open(tmp_path / "s" / "manifest.json"))["committed"] == 1
    rest = run_layout(Layout(dp=1, pert=2), disk)
    assert first[0]["steps"] + rest[0]["steps"] == single["steps"]
    assert {(r["digest"], r["state_digest"]) for r in rest.values()} == {(single["digest"], single["state_digest"])}


def test_ddp_on_one_shared_disk_store_matches_one_rank_within_float_order(tmp_path):
    cfg = dataclasses.replace(BASE, steps=2, zo=PERTP["adam"])
    single = train(cfg, progress=False)
    disk = dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=str(tmp_path / "s")))
    results = run_layout(Layout(dp=2, pert=1), disk)
    assert len({(r["digest"], r["state_digest"]) for r in results.values()}) == 1  # one store, one state
    for mine, ref in zip(results[0]["steps"], single["steps"]):
        assert mine["loss_plus"] == pytest.approx(ref["loss_plus"], rel=1e-5)
        assert mine["loss_minus"] == pytest.approx(ref["loss_minus"], rel=1e-5)
        assert mine["projected_grad"] == pytest.approx(ref["projected_grad"], abs=5e-3)


def test_sigkill_of_a_layout_on_a_shared_disk_store_then_reopen_continues_bit_exactly(tmp_path):
    """A kill of every rank inside a step leaves the node's store at its last committed step (one
    manifest for the node); the relaunched layout continues to one rank's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps, store = 8, str(tmp_path / "s")
    single = train(dataclasses.replace(BASE, model="tiny-deep", steps=steps, zo=PERTP["adam"]), progress=False)
    cmd = [sys.executable, "-m", "distzo2_lab.cli.main", "train", "--model", "tiny-deep", "--steps", str(steps),
           "--batch-size", "4", "--seq-len", "12", "--threads", "1", "--optimizer", "adam", "--lr", "1e-3",
           "--weight-decay", "0.05", "--offload", "disk", "--store", store, "--layout", "dp=1,pert=2",
           "--no-progress", "--out", str(tmp_path / "out")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while _committed(store) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and its ranks
    p.wait()
    killed_at = _committed(store)
    assert 0 <= killed_at < steps - 1, killed_at
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["start_step"] == killed_at + 1 and summary["digest"] == single["digest"]


def _committed(store: str) -> int:
    try:
        with open(f"{store}/manifest.json") as f:
            return json.load(f)["committed"]
    except (OSError, ValueError):
        return -2
