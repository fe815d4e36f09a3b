"""Distributed ZO through the project's launcher: real gloo process groups on CPU."""
import dataclasses
import os
import signal

import pytest

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.parallel.launch import WorkerError, launch
from distzo2_lab.parallel.layout import Layout, parse_layout, validate_layout
from distzo2_lab.run.train import train
from distzo2_lab.run.worker import train_worker

CFG = TrainConfig(model="tiny", steps=3, batch_size=4, seq_len=12, threads=1, zo=ZOConfig())


def run_layout(layout: Layout, cfg: TrainConfig = CFG, tmp_path=None) -> dict:
    h = launch(train_worker, layout.world_size, args=(cfg, layout, str(tmp_path / "out") if tmp_path else None),
               timeout=240)
    return h.wait()


@pytest.fixture(scope="module")
def single():
    return train(CFG, progress=False)


@pytest.mark.parametrize("tier", ["resident", "host"])
def test_pertp_is_bit_exact_with_the_single_rank_engine(single, tier):
    cfg = dataclasses.replace(CFG, offload=OffloadConfig(tier=tier))
    results = run_layout(Layout(dp=1, pert=2), cfg)
    assert {r["digest"] for r in results.values()} == {single["digest"]}  # every rank, bit for bit
    assert results[0]["steps"] == single["steps"]  # l+, l-, g per step
    assert results[0]["exchange_bytes"] == 32  # four float64 scalars per step, nothing else


def test_world_size_one_equals_train():
    results = run_layout(Layout(dp=1, pert=1))
    assert results[0]["digest"] == train(CFG, progress=False)["digest"]


def test_ddp_and_2d_match_the_single_rank_run_within_float_order(single):
    ddp, two_d = run_layout(Layout(dp=2, pert=1)), run_layout(Layout(dp=2, pert=2))
    for results in (ddp, two_d):
        assert len({r["digest"] for r in results.values()}) == 1  # identical weights on every rank
    # Splitting the signs over a pert pair changes no arithmetic: 2D equals DDP bit for bit.
    assert two_d[0]["steps"] == ddp[0]["steps"] and two_d[0]["digest"] == ddp[0]["digest"]
    # DDP: a token-weighted mean of micro-batch means (each micro-batch its own matmul shapes) vs
    # one full-batch mean. Measured here: l+- differ by ~1 ulp at step 0 and ~2e-6 relative by
    # step 2; g (= dl / 2 eps, which amplifies) by 1e-4 .. 1.3e-3.
    for mine, ref in zip(ddp[0]["steps"], single["steps"]):
        assert mine["loss_plus"] == pytest.approx(ref["loss_plus"], rel=1e-5)
        assert mine["loss_minus"] == pytest.approx(ref["loss_minus"], rel=1e-5)
        assert mine["projected_grad"] == pytest.approx(ref["projected_grad"], abs=5e-3)


def test_layout_validation_names_the_problem():
    with pytest.raises(ConfigError, match="world_size=3 is not dp x pert = 2 x 2 = 4"):
        validate_layout(Layout(2, 2), 3, 8)
    with pytest.raises(ConfigError, match="pert=3 is not valid; choose pert=1"):
        validate_layout(Layout(1, 3), 3, 8)
    with pytest.raises(ConfigError, match="batch_size=3 cannot be split over dp=2"):
        validate_layout(Layout(2, 1), 2, 3)
    with pytest.raises(ConfigError, match="backend='nccl' needs one GPU per rank: 2 ranks, 0 GPUs"):
        validate_layout(Layout(2, 1), 2, 4, backend="nccl", gpus=0)
    with pytest.raises(ConfigError, match="write it as dp=D,pert=P"):
        parse_layout("dp=2;pert=2")
    assert parse_layout("dp=2,pert=2") == Layout(2, 2) and Layout(2, 2).signs(1) == (False, True)


def boom_worker(rank, world_size, q, fail_rank):
    import time

    if rank == fail_rank:
        raise ValueError(f"boom from rank {rank}")
    time.sleep(60)


def killed_worker(rank, world_size, q):
    import time

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_a_raising_rank_stops_every_rank_and_surfaces_its_traceback():
    h = launch(boom_worker, 2, args=(1,), timeout=60)
    with pytest.raises(WorkerError, match="(?s)rank 1 failed.*ValueError: boom from rank 1"):
        h.wait()
    assert not h.alive()


def test_a_killed_rank_stops_every_rank():
    h = launch(killed_worker, 2, timeout=60)
    with pytest.raises(WorkerError, match="rank 1 died with exit code -9"):
        h.wait()
    assert not h.alive()


def test_launcher_refuses_a_main_module_function():
    def local(rank, world_size, q):
        return rank

    local.__module__ = "__main__"
    with pytest.raises(ConfigError, match="defined in __main__.*Put the worker in a module"):
        launch(local, 2)


def test_killing_a_training_rank_mid_run_stops_every_rank():
    cfg = dataclasses.replace(CFG, steps=500)
    h = launch(train_worker, 2, args=(cfg, Layout(dp=1, pert=2), None), timeout=120)
    while not any("step" in ev for _, ev in h.events):  # rank 0 reports a step: training is under way
        h.poll(block=0.1)
        assert h.alive()
    os.kill(h.procs[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match="rank 1 died with exit code -9"):
        h.wait()
    assert not h.alive() and all(code is not None for code in h.exitcodes)


def test_cli_layout_dry_run_and_terminal_run(tmp_path, capsys, single):
    from distzo2_lab.cli.main import main

    assert main(["train", "--layout", "dp=2,pert=2", "--batch-size", "4", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "rank 3: dp 1, pert 1: batch rows 2..3, runs -eps" in plan
    assert main(["train", "--layout", "dp=2", "--world-size", "3", "--dry-run"]) == 2
    assert "world_size=3 is not dp x pert = 2 x 1 = 2" in capsys.readouterr().err
    args = ["train", "--steps", "3", "--batch-size", "4", "--seq-len", "12", "--threads", "1",
            "--no-progress", "--out", str(tmp_path / "o")]
    assert main([*args, "--layout", "dp=1,pert=2"]) == 0
    import json

    s = json.load(open(tmp_path / "o" / "summary.json"))
    assert s["digest"] == single["digest"] and s["layout"] == {"dp": 1, "pert": 2}
    assert s["steps"] == single["steps"] and s["exchange_bytes_per_step"] == 32


def test_torchrun_standalone_runs_the_same_workers(tmp_path, single):
    import json
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "distzo2_lab", "--layout", "dp=1,pert=2",
           "--steps", "3", "--batch-size", "4", "--seq-len", "12", "--threads", "1",
           "--no-progress", "--out", str(tmp_path / "o")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(tmp_path / "o" / "summary.json"))["digest"] == single["digest"]


@pytest.mark.parametrize("layout", [Layout(dp=1, pert=2, slice=True), Layout(dp=2, pert=1, slice=True),
                                    Layout(dp=2, pert=2, slice=True)])
def test_slicing_changes_no_number(layout, tmp_path):
    cfg = dataclasses.replace(CFG, offload=OffloadConfig(tier="host"))
    naive = run_layout(dataclasses.replace(layout, slice=False), cfg)
    sliced = launch(train_worker, layout.world_size, args=(cfg, layout, None, str(tmp_path / "t")), timeout=240).wait()
    assert sliced[0]["steps"] == naive[0]["steps"]
    assert {r["digest"] for r in sliced.values()} == {naive[0]["digest"]}
    # each rank moved only its shard over the host link: about 1/world of the naive bytes
    from distzo2_lab.observe.events import read_jsonl

    spans = read_jsonl(str(tmp_path / "t" / "rank0.jsonl"))
    up = sum(s.bytes for s in spans if s.lane == "upload")
    gathered = [s for s in spans if s.phase == "allgather"]
    assert gathered and up > 0
    from distzo2_lab.parallel.slicer import Slicer

    start, stop = Slicer(0, layout.world_size).bounds(49984)  # a tiny block's shard
    visits = len([s for s in spans if s.lane == "upload"])
    assert up == visits * (stop - start) * 4 and stop - start < 49984 * 0.75


def test_nspsa_layouts_equal_the_single_rank_engine():
    """pert = 2q: one (direction, sign) per rank; pert = 2 with q = 2: each rank runs one sign of both
    directions, sliced over a shared host store. Out-of-place perturbation: bit-exact."""
    cfg = dataclasses.replace(CFG, zo=ZOConfig(directions=2))
    single = train(cfg, progress=False)
    assert single["steps"] != train(CFG, progress=False)["steps"]
    per_rank = run_layout(Layout(dp=1, pert=4), cfg)
    assert {r["digest"] for r in per_rank.values()} == {single["digest"]}
    assert per_rank[0]["steps"] == single["steps"] and per_rank[0]["exchange_bytes"] == 2 * 32
    sliced = run_layout(Layout(dp=1, pert=2, slice=True), dataclasses.replace(cfg, offload=OffloadConfig(tier="host")))
    assert {r["digest"] for r in sliced.values()} == {single["digest"]} and sliced[0]["steps"] == single["steps"]


def test_copy_perturbation_layouts_equal_the_single_rank_engine(monkeypatch):
    """zo.perturb='copy': a PertP rank copies theta + eps z or theta - eps z only (never the round
    trip). PertP(2) equals the single rank bit for bit; 2D(2x2) sliced over the host store equals
    DDP(2) bit for bit, and both the single rank within float order (as in place). On the resident
    tier the machine's ranks hold the masters once and make every update and copy once between
    them (master_share.MasterShare); sliced over a host store, the ranks of the same one sign make
    each block's copy once (copy_share.CopyShare). Both are bit for bit what each rank makes alone."""
    monkeypatch.setenv("DISTZO2_SHARE_GRAIN", "4096")  # a tiny block (49,984 elements) is 13 grains to split
    cfg = dataclasses.replace(CFG, zo=ZOConfig(perturb="copy"))
    single = train(cfg, progress=False)
    in_place = train(dataclasses.replace(CFG, zo=ZOConfig(perturb="in-place")), progress=False)
    assert single["config"]["zo"]["perturb"] == "copy" and single["digest"] != in_place["digest"]
    pertp = run_layout(Layout(dp=1, pert=2), cfg)
    assert {r["digest"] for r in pertp.values()} == {single["digest"]} and pertp[0]["steps"] == single["steps"]
    ddp = run_layout(Layout(dp=2, pert=1), cfg)
    two_d = run_layout(Layout(dp=2, pert=2, slice=True), dataclasses.replace(cfg, offload=OffloadConfig(tier="host")))
    assert {r["digest"] for r in two_d.values()} == {ddp[0]["digest"]} == {r["digest"] for r in ddp.values()}
    assert two_d[0]["steps"] == ddp[0]["steps"]
    alone = run_layout(Layout(dp=2, pert=1, share_noise=False), cfg)  # every rank draws and copies alone
    assert {r["digest"] for r in alone.values()} == {ddp[0]["digest"]} and alone[0]["steps"] == ddp[0]["steps"]
    # resident: the masters are shared (no copy share); alone: nothing is shared
    assert {r["copy_share"]["ranks"] for r in [*alone.values(), *pertp.values(), *ddp.values()]} == {1}
    assert {r["master_share"]["ranks"] for r in [*alone.values(), *two_d.values()]} == {1}
    for shared in (pertp, ddp):  # every update and copy made once by the node: the ranks' parts add up to one
        reports = [r["master_share"] for r in shared.values()]
        assert {m["ranks"] for m in reports} == {2} and {tuple(m["signs"]) for m in reports} == {(True, True)}
        assert len({m["served_elements"] for m in reports}) == 1
        assert sum(m["computed_elements"] for m in reports) == reports[0]["served_elements"]
        assert all(m["computed_elements"] > 0 for m in reports)
    for shared, group in ((two_d, 2),):  # 2D: the two ranks of each sign
        reports = [r["copy_share"] for r in shared.values()]
        assert {c["ranks"] for c in reports} == {group}
        assert sum(c["computed_elements"] for c in reports) == sum(c["served_elements"] for c in reports) / group
    for mine, ref in zip(ddp[0]["steps"], single["steps"]):
        assert mine["loss_plus"] == pytest.approx(ref["loss_plus"], rel=1e-5)
        assert mine["projected_grad"] == pytest.approx(ref["projected_grad"], abs=5e-3)


def lagging_resume_worker(rank: int, world_size: int, q, cfg: TrainConfig, lag: float) -> str:
    """A PertP rank that reopens its disk store, flushes the update the store owes, and (rank 0)
    lags behind before training on, so the other rank's next step visits every block first."""
    import time

    import torch.distributed as dist

    from distzo2_lab.run.train import Run, make_task, to_device
    from distzo2_lab.seeds import step_seed

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    run = Run(cfg, layout=Layout(1, 2), rank=rank)
    try:
        task = make_task(cfg, run.adapter)
        run.engine.flush()
        if rank == 0:
            time.sleep(lag)
        for t in range(run.start, cfg.steps):
            r = run.engine.step(to_device(task.batch(t), cfg.device), step_seed(cfg.seed, t), step=t)
            run.log.append(r.step, r.seed, r.grad, r.lr, r.terms)
            run.offload.commit(t)
        run.engine.flush()
        return run.digest()
    finally:
        run.close()
        dist.destroy_process_group()


def test_a_flush_on_a_shared_disk_store_leaves_the_next_in_place_step_its_own_slot(tmp_path):
    """In place, a step's write-back of a block differs from what it read (the +eps, -2 eps, +eps
    round trip). After a flush the next step must still read a slot no rank writes in that step."""
    cfg = dataclasses.replace(CFG, steps=6, zo=ZOConfig(perturb="in-place"))
    single = train(cfg, progress=False)
    disk = dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=str(tmp_path / "store")))
    run_layout(Layout(dp=1, pert=2), dataclasses.replace(disk, steps=3))
    got = launch(lagging_resume_worker, 2, args=(disk, 2.0), timeout=240).wait()
    assert set(got.values()) == {single["digest"]}
    import json

    manifest = json.load(open(tmp_path / "store" / "manifest.json"))
    assert manifest["committed"] == 5 and manifest["flushed"]  # the last flush committed: nothing owed
    longer = train(dataclasses.replace(cfg, steps=8), progress=False)
    more = run_layout(Layout(dp=1, pert=2), dataclasses.replace(disk, steps=8))  # reopens the flushed store
    assert {r["digest"] for r in more.values()} == {longer["digest"]} and more[0]["steps"] == longer["steps"][6:]


def test_stores_shared_by_the_ranks_of_a_node(single, tmp_path):
    """Host tier: one /dev/shm copy per node (unlinked once mapped); disk tier: one store directory
    for every rank, the leader commits. Both give the single-rank numbers."""
    from distzo2_lab.run.worker import node_memory

    host = run_layout(Layout(dp=1, pert=2), dataclasses.replace(CFG, offload=OffloadConfig(tier="host")))
    assert {r["digest"] for r in host.values()} == {single["digest"]}
    disk_cfg = dataclasses.replace(CFG, offload=OffloadConfig(tier="disk", store=str(tmp_path / "store")))
    disk = run_layout(Layout(dp=1, pert=2, slice=True), disk_cfg)
    assert {r["digest"] for r in disk.values()} == {single["digest"]} and disk[0]["steps"] == single["steps"]
    import json

    assert json.load(open(tmp_path / "store" / "manifest.json"))["committed"] == CFG.steps - 1
    assert len(open(tmp_path / "store" / "seedlog.jsonl").readlines()) == CFG.steps + 1  # one writer
    two_d = run_layout(Layout(dp=2, pert=2, slice=True), dataclasses.replace(CFG, offload=OffloadConfig(tier="host")))
    (node,) = node_memory(two_d).values()
    # sliced: one slot, one copy of the 2 tiny blocks (2 x 49984 fp32) for the node's 4 ranks
    assert node["ranks"] == 4 and node["shared_store_mb"] == pytest.approx(2 * 49984 * 4 / 2**20)
    assert node["copy_per_rank_mb"] - node["total_mb"] == pytest.approx(3 * node["shared_store_mb"])
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("distzo2-")]  # nothing left behind


def test_gradient_accumulation_across_dp_groups():
    """DDP(2) x 2 micro-batches each = one rank x 4 micro-batches (token-weighted, float order aside)."""
    one = train(dataclasses.replace(CFG, micro_batches=4), progress=False)
    ddp = run_layout(Layout(dp=2, pert=1), dataclasses.replace(CFG, micro_batches=2))
    assert len({r["digest"] for r in ddp.values()}) == 1
    for mine, ref in zip(ddp[0]["steps"], one["steps"]):
        assert mine["loss_plus"] == pytest.approx(ref["loss_plus"], rel=1e-5)
        assert mine["projected_grad"] == pytest.approx(ref["projected_grad"], abs=5e-3)
    with pytest.raises(ConfigError, match="micro_batches=4 does not divide the 2 rows of each of dp=2 groups"):
        validate_layout(Layout(2, 1), 2, 4, micro_batches=4)


def test_nspsa_layout_validation_and_plan(capsys):
    with pytest.raises(ConfigError, match="pert=4 does not fit zo.directions=1.*choose pert in 1, 2"):
        validate_layout(Layout(1, 4), 4, 8)
    with pytest.raises(ConfigError, match="pert=4 does not fit zo.directions=3"):
        validate_layout(Layout(1, 4), 4, 8, directions=3)
    assert Layout(1, 4).directions(2, 2) == [1] and Layout(1, 2).directions(1, 2) == [0, 1]
    from distzo2_lab.cli.main import main

    assert main(["train", "--layout", "dp=1,pert=4", "--batch-size", "4", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "rank 3: dp 0, pert 3: batch rows 0..3, runs -eps of direction 1 (n-SPSA)" in plan
    assert "8 float64 scalars" in plan


def test_backend_choice():
    """nccl with one GPU per local rank; gloo on CPU and when ranks share a GPU."""
    from distzo2_lab.parallel.layout import choose_backend

    assert choose_backend("cpu", 2, 0) == "gloo"
    assert choose_backend("cuda", 2, 2) == "nccl" and choose_backend("cuda", 4, 2) == "gloo"
    with pytest.raises(ConfigError, match="backend='nccl' needs one GPU per rank: 4 ranks, 2 GPUs"):
        validate_layout(Layout(2, 2), 4, 8, backend="nccl", gpus=2)


def test_the_ranks_of_a_node_split_the_noise_draws(monkeypatch):
    """In place (z drawn into memory), shared draws change no number; the ranks of a node that draw
    the same z (all 4 for 2D) draw each chunk of it exactly once between them (who draws which
    depends on who is there first: tests/test_noise_share.py). Copies draw no z at all."""
    from distzo2_lab.parallel.node_share import split_run

    assert [split_run(13, i, 4) for i in range(4)] == [(0, 4), (4, 7), (7, 10), (10, 13)]
    assert [split_run(1, i, 2) for i in range(2)] == [(0, 1), (1, 1)]  # a member may draw nothing
    monkeypatch.setenv("DISTZO2_SHARE_GRAIN", "4096")  # a tiny block (49,984 elements) is 13 grains to split
    layout = Layout(dp=2, pert=2)
    cfg = dataclasses.replace(CFG, zo=ZOConfig(perturb="in-place"))  # in place, z is drawn into memory
    shared = run_layout(layout, cfg)
    alone = run_layout(dataclasses.replace(layout, share_noise=False), cfg)
    assert shared[0]["steps"] == alone[0]["steps"]
    assert {r["digest"] for r in shared.values()} == {alone[0]["digest"]}
    assert {r["noise_share"]["ranks"] for r in alone.values()} == {1}
    fractions = [shared[r]["noise_share"]["drawn_fraction"] for r in sorted(shared)]
    drawn = sum(shared[r]["noise_share"]["drawn_elements"] for r in shared)
    assert drawn == shared[0]["noise_share"]["served_elements"]  # every element once, none twice
    assert sum(fractions) == pytest.approx(1.0) and max(fractions) < 1.0  # the node's ranks shared it
    # block draws are read in their slot (no copy); the resident buckets' kept z is copied out
    report = shared[0]["noise_share"]
    assert 0 < report["copied_elements"] < report["served_elements"]
    nspsa = run_layout(Layout(dp=1, pert=4), dataclasses.replace(CFG, zo=ZOConfig(directions=2)))
    assert {r["noise_share"]["ranks"] for r in nspsa.values()} == {1}  # copies: z is never drawn into memory
    assert {r["copy_share"]["ranks"] for r in nspsa.values()} == {1}  # one sign of one direction per rank
    # the resident buckets' short draws (layer norms, < one chunk) are drawn by each rank alone
    assert all(r["noise_share"]["alone_elements"] > 0 for r in shared.values())
    # the default grain (1M elements): every tiny block fits one, there is nothing to split and no share opens
    monkeypatch.delenv("DISTZO2_SHARE_GRAIN")
    one_chunk = run_layout(Layout(dp=2, pert=1), cfg)
    assert {r["noise_share"]["ranks"] for r in one_chunk.values()} == {1}
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("distzo2-")]  # slots unlinked


def test_cli_no_share_noise_reaches_the_layout(capsys, monkeypatch):
    from distzo2_lab.cli.main import main

    monkeypatch.setenv("DISTZO2_SHARE_GRAIN", "4096")
    assert main(["train", "--layout", "dp=2,pert=1", "--batch-size", "4", "--dry-run"]) == 0
    assert "split every draw of more than one chunk through shared memory" in capsys.readouterr().out
    # the default grain: a tiny block (49,984) is one chunk, nothing to split
    monkeypatch.delenv("DISTZO2_SHARE_GRAIN")
    assert main(["train", "--layout", "dp=2,pert=1", "--batch-size", "4", "--dry-run"]) == 0
    assert "a block (49,984 elements) fits one share chunk (1,048,576)" in capsys.readouterr().out
    assert main(["train", "--layout", "dp=2,pert=1", "--batch-size", "4", "--dry-run", "--no-share-noise"]) == 0
    out = capsys.readouterr().out
    assert "noise drawn by every rank" in out and "noise: every rank draws all of z" in out


@pytest.mark.parametrize("peft", ["lora:4", "prefix:4"])
def test_peft_models_on_pertp_equal_the_single_rank(peft, monkeypatch):
    """A LoRA or prefix model under PertP(2): each rank runs one sign (a prefix pass embeds with its
    own table), the node's ranks hold one master, and both ranks end on the single rank's bits."""
    monkeypatch.setenv("DISTZO2_SHARE_GRAIN", "4096")  # split the tiny blocks: the node's master share
    cfg = dataclasses.replace(CFG, peft=peft)
    single = train(cfg, progress=False)
    pertp = run_layout(Layout(dp=1, pert=2), cfg)
    assert {r["digest"] for r in pertp.values()} == {single["digest"]} and pertp[0]["steps"] == single["steps"]
    assert {r["master_share"]["ranks"] for r in pertp.values()} == {2}
