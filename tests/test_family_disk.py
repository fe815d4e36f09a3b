"""The method family on the disk tier: each block's slot is [master | state...], committed with the
resident buckets' state and the per-run scalars, so it equals the resident engine and resumes bit-exactly."""
import json
import os

import pytest
import torch
from helpers import batches
from test_family_engine import COMBOS, _adapter, _states_equal

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.offload.tiers import Offload, method_of
from distzo2_lab.run.train import train
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.family_engine import FamilyEngine
from distzo2_lab.zo.methods import METHODS

DISK = ["adam-gaussian-two-point", "momentum-lowrank:2-two-point", "hizoo-sparse:0.5-two-point",
        "conservative-gaussian-two-point", "sgd-gaussian-one-sided", "sign-gaussian-two-point"]


@pytest.mark.parametrize("name", DISK)
def test_disk_tier_holds_master_and_state_in_one_slot_and_matches_resident(name, tmp_path):
    torch.set_num_threads(1)
    zo, bs = COMBOS[name], batches(4, batch=2, seq=8)
    resident = FamilyEngine(_adapter(), zo)
    off = Offload({"model": "tiny", "init_seed": 7, "device": "cpu"},
                  OffloadConfig(tier="disk", store=str(tmp_path / "s")), state=METHODS[zo.optimizer].state,
                  method=method_of(zo))
    try:
        disk = FamilyEngine(off.adapter, zo, **off.engine_options())
        off.keep_method_state(disk)
        b0 = off.adapter.blocks[0]
        assert off.store.numels[0] == b0.numel * (1 + len(METHODS[zo.optimizer].state))
        for t, b in enumerate(bs):
            r_ref, r = resident.step(b, step_seed(0, t)), disk.step(b, step_seed(0, t))
            assert (r.loss_plus, r.loss_minus, r.grad, r.terms) == (r_ref.loss_plus, r_ref.loss_minus, r_ref.grad,
                                                                    r_ref.terms)
            off.commit(t)  # the step's slots, resident state and run state, as training commits them
        resident.flush()
        disk.flush()
        for a, b in zip(resident.adapter.buckets, disk.adapter.buckets):
            values = b.master if b.master is not None else off.block_values(b)
            assert torch.equal(a.master, values)
        assert _states_equal(resident.state_dict(), disk.state_dict())  # the blocks' from their disk slots
    finally:
        off.close()
    manifest = json.load(open(tmp_path / "s" / "manifest.json"))
    assert manifest["committed"] == 3 and manifest["method"] == method_of(zo)
    assert manifest["run_state"]["updates"] == 4


def _cfg(zo: ZOConfig, store, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, seq_len=8, threads=1, zo=zo,
                       offload=OffloadConfig(tier="disk", store=str(store)) if store else OffloadConfig())


@pytest.mark.parametrize("zo", [ZOConfig(optimizer="adam", perturbation="sparse:0.5", sparse_refresh=3, lr=1e-3),
                                ZOConfig(optimizer="momentum", perturbation="lowrank:2", lowrank_interval=3,
                                         estimator="one-sided", directions=3, lr=1e-6),
                                ZOConfig(optimizer="hizoo", lr=1e-3), ZOConfig(optimizer="conservative", lr=1.0)],
                         ids=["adam-sparse", "momentum-lowrank-one-sided", "hizoo", "conservative"])
def test_reopened_family_disk_store_continues_bit_exactly(zo, tmp_path):
    whole = train(_cfg(zo, None, 6), progress=False)
    first = train(_cfg(zo, tmp_path / "s", 4), progress=False)
    rest = train(_cfg(zo, tmp_path / "s", 6), progress=False)
    assert rest["start_step"] == 4 and first["steps"] + rest["steps"] == whole["steps"]
    assert rest["digest"] == whole["digest"]


def test_family_store_refuses_another_method_and_sgd_store_refuses_the_family(tmp_path):
    train(_cfg(ZOConfig(optimizer="momentum"), tmp_path / "fam", 2), progress=False)
    with pytest.raises(ConfigError, match=r"holds a run of zo.optimizer='momentum'.*not zo.optimizer='adam'"):
        train(_cfg(ZOConfig(optimizer="adam"), tmp_path / "fam", 4), progress=False)
    with pytest.raises(ConfigError, match=r"holds a run of zo.optimizer='momentum'.*not ZO-SGD"):
        train(_cfg(ZOConfig(), tmp_path / "fam", 4), progress=False)
    train(_cfg(ZOConfig(), tmp_path / "sgd", 2), progress=False)
    with pytest.raises(ConfigError, match=r"holds a run of ZO-SGD.*not zo.optimizer='conservative'"):
        train(_cfg(ZOConfig(optimizer="conservative"), tmp_path / "sgd", 4), progress=False)


def test_family_disk_run_counts_the_state_in_the_bytes_per_parameter(tmp_path):
    """Adam's slot is three blocks long (master, m, v): each step moves three times ZO-SGD's bytes."""
    sgd = train(_cfg(ZOConfig(), tmp_path / "sgd", 2), progress=False)
    adam = train(_cfg(ZOConfig(optimizer="adam"), tmp_path / "adam", 2), progress=False)
    assert adam["bytes_up_per_step"] == 3 * sgd["bytes_up_per_step"]
    assert adam["bytes_per_param_per_step"] == pytest.approx(3 * sgd["bytes_per_param_per_step"])



def test_sigkill_mid_run_then_reopen_continues_the_family_bit_exactly(tmp_path):
    """A kill inside a step leaves the committed [master | state] slots and run state whole."""
    import signal
    import subprocess
    import sys
    import time

    steps, store = 12, str(tmp_path / "s")
    ref = train(TrainConfig(model="tiny-deep", steps=steps, batch_size=2, seq_len=12, threads=1,
                            zo=ZOConfig(optimizer="adam", perturbation="sparse:0.5")), progress=False)
    cmd = [sys.executable, "-m", "distzo2_lab.cli.main", "train", "--model", "tiny-deep", "--steps", str(steps),
           "--batch-size", "2", "--seq-len", "12", "--threads", "1", "--lr", str(ZOConfig().lr), "--optimizer", "adam",
           "--perturbation", "sparse:0.5", "--offload", "disk", "--store", store, "--no-progress",
           "--out", str(tmp_path / "out")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _committed(store) < 5 and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = _committed(store)
    assert p.returncode == -signal.SIGKILL and 0 <= killed_at < steps - 1, (p.returncode, killed_at)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["start_step"] == killed_at + 1
    assert summary["digest"] == ref["digest"] and summary["steps"] == ref["steps"][killed_at + 1:]


def _committed(store: str) -> int:
    try:
        with open(os.path.join(store, "manifest.json")) as f:
            return json.load(f)["committed"]
    except (OSError, ValueError):
        return -2
