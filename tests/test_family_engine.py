"""The method family on the block engine equals the eager reference bit for bit, on every tier it runs."""
import dataclasses
import os

import pytest
import torch
from helpers import batches

from distzo2_lab.config import (
    OPTIMIZERS,
    ConfigError,
    OffloadConfig,
    TrainConfig,
    ZOConfig,
    is_family,
    validate,
    validate_method,
)
from distzo2_lab.models import OPTAdapter, build_model
from distzo2_lab.offload.tiers import Offload
from distzo2_lab.run.train import train
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.family_engine import FamilyEngine
from distzo2_lab.zo.family_reference import EagerFamily
from distzo2_lab.zo.methods import METHODS

PERTURBATIONS = {"gaussian": {}, "rademacher": {"noise": "rademacher"},
                 "lowrank:2": {"lowrank_interval": 2}, "sparse:0.5": {"sparse_refresh": 2}}


def _combos() -> dict[str, ZOConfig]:
    """Every optimiser x perturbation x estimator that validates and is not plain MeZO (the schedules
    refresh within five steps; one-sided runs 3 directions, two-point 1)."""
    out = {}
    for opt in OPTIMIZERS:
        for pert, extra in PERTURBATIONS.items():
            for est in ("two-point", "one-sided"):
                one_sided = est == "one-sided"
                zo = ZOConfig(optimizer=opt, perturbation=pert, estimator=est, directions=3 if one_sided else 1,
                              lr=1e-6 if one_sided else 1e-3, weight_decay=0.05, **extra)
                try:
                    validate_method(zo)
                except ConfigError:
                    continue
                if is_family(zo):
                    out[f"{opt}-{pert}-{est}"] = zo
    return out


COMBOS = _combos()


def _adapter():
    return OPTAdapter(build_model("tiny", seed=7))


def _states_equal(x: dict, y: dict) -> bool:
    same = x["v_seed"] == y["v_seed"] and x["updates"] == y["updates"] and x["step"] == y["step"]
    same &= x["thresholds"].keys() == y["thresholds"].keys()
    same &= all(torch.equal(x["thresholds"][k].cpu(), y["thresholds"][k].cpu()) for k in x["thresholds"])
    same &= x["state"].keys() == y["state"].keys()
    return same and all(torch.equal(x["state"][k][n].cpu(), y["state"][k][n].cpu())
                        for k in x["state"] for n in x["state"][k])


def _steps(engine, bs) -> list:
    return [engine.step(b, step_seed(0, t)) for t, b in enumerate(bs)]


def test_every_valid_combination_is_covered():
    assert len(COMBOS) >= 35 and {zo.optimizer for zo in COMBOS.values()} == set(OPTIMIZERS)


@pytest.mark.parametrize("name", list(COMBOS))
def test_block_engine_matches_the_eager_family_bit_for_bit(name):
    torch.set_num_threads(1)
    zo, bs = COMBOS[name], batches(5, batch=2, seq=8)
    eager, engine = EagerFamily(_adapter(), zo), FamilyEngine(_adapter(), zo)
    for r_ref, r in zip(_steps(eager, bs), _steps(engine, bs)):
        assert (r.loss_plus, r.loss_minus, r.grad, r.terms) == (r_ref.loss_plus, r_ref.loss_minus, r_ref.grad,
                                                                r_ref.terms)
    assert engine.pending is not None  # the last update waits for the next visit
    engine.flush()
    assert all(torch.equal(a.master, b.master) for a, b in zip(eager.adapter.buckets, engine.adapter.buckets))
    assert _states_equal(eager.state_dict(), engine.state_dict())


def test_conservative_rejects_a_step_like_the_reference():
    """A large lr makes some candidates worse than l0: both reject the same steps and keep theta."""
    torch.set_num_threads(1)
    zo, bs = ZOConfig(optimizer="conservative", lr=1.0), batches(5, batch=2, seq=8)
    eager, engine = EagerFamily(_adapter(), zo), FamilyEngine(_adapter(), zo)
    accepted = []
    for t, b in enumerate(bs):
        eager.step(b, step_seed(0, t))
        engine.step(b, step_seed(0, t))
        assert engine.last == eager.last
        accepted.append(engine.last["accept"])
    assert False in accepted
    engine.flush()
    assert all(torch.equal(a.master, b.master) for a, b in zip(eager.adapter.buckets, engine.adapter.buckets))


HOST = ["adam-gaussian-two-point", "hizoo-sparse:0.5-two-point", "momentum-lowrank:2-one-sided",
        "conservative-rademacher-two-point"]


@pytest.mark.parametrize("name", HOST)
def test_host_tier_streams_the_state_and_matches_resident(name):
    torch.set_num_threads(1)
    zo, bs = COMBOS[name], batches(5, batch=2, seq=8)
    resident = FamilyEngine(_adapter(), zo)
    off = Offload({"model": "tiny", "init_seed": 7, "device": "cpu"}, OffloadConfig(tier="host"),
                  state=METHODS[zo.optimizer].state)
    try:
        host = FamilyEngine(off.adapter, zo, **off.engine_options())
        for r_ref, r in zip(_steps(resident, bs), _steps(host, bs)):
            assert (r.loss_plus, r.loss_minus, r.grad) == (r_ref.loss_plus, r_ref.loss_minus, r_ref.grad)
        resident.flush()
        host.flush()
        for a, b in zip(resident.adapter.buckets, host.adapter.buckets):
            values = b.master if b.master is not None else off.block_values(b)
            assert torch.equal(a.master, values)
        assert _states_equal(resident.state_dict(), host.state_dict())  # the blocks' from their host slots
    finally:
        off.close()


def test_host_slot_holds_the_master_then_each_state_tensor():
    off = Offload({"model": "tiny", "init_seed": 7, "device": "cpu"}, OffloadConfig(tier="host"),
                  state=METHODS["hizoo"].state)
    try:
        b = off.adapter.blocks[0]
        slot = off.store.blocks[0]
        assert slot.numel() == 2 * b.numel and (slot[b.numel :] == 1.0).all()  # H starts at 1
    finally:
        off.close()


def test_train_runs_the_family_on_zo2_and_host_like_eager():
    base = TrainConfig(steps=3, batch_size=2, seq_len=8, threads=1, zo=ZOConfig(optimizer="adam", lr=1e-3))
    got = [train(dataclasses.replace(base, **kw), progress=False)
           for kw in ({}, {"offload": OffloadConfig(tier="host")}, {"engine": "eager"})]
    assert got[0]["steps"] == got[1]["steps"] == got[2]["steps"]
    assert got[0]["digest"] == got[1]["digest"] == got[2]["digest"]


def test_resumed_family_run_continues_bit_exactly(tmp_path):
    zo = ZOConfig(optimizer="hizoo", perturbation="sparse:0.5", sparse_refresh=3)
    base = TrainConfig(steps=6, batch_size=2, seq_len=8, threads=1, zo=zo)
    whole = train(base, progress=False)
    train(dataclasses.replace(base, steps=4), progress=False, save=str(tmp_path / "ck"))
    assert os.path.exists(tmp_path / "ck" / "method_state.safetensors")
    rest = train(base, progress=False, resume=str(tmp_path / "ck"))
    assert rest["steps"] == whole["steps"][4:] and rest["digest"] == whole["digest"]


def test_resume_with_another_optimizer_is_refused(tmp_path):
    base = TrainConfig(steps=2, batch_size=2, seq_len=8, threads=1, zo=ZOConfig(optimizer="momentum"))
    train(base, progress=False, save=str(tmp_path / "ck"))
    other = dataclasses.replace(base, steps=4, zo=ZOConfig(optimizer="adam"))
    with pytest.raises(ConfigError, match="zo.optimizer='momentum'"):
        train(other, progress=False, resume=str(tmp_path / "ck"))


def test_lean_disk_tier_is_refused_for_the_family_by_name(tmp_path):
    """The disk tier runs the family (tests/test_family_disk.py); a lean one runs MeZO's in-place step only."""
    cfg = TrainConfig(zo=ZOConfig(optimizer="adam"), offload=OffloadConfig(tier="disk", store=str(tmp_path), lean=True))
    with pytest.raises(ConfigError, match=r"offload.lean=True runs MeZO's in-place step; the method family "
                                          r"\(zo.optimizer='adam'.*Choose offload.lean=False"):
        validate(cfg)


def test_distributed_options_are_refused_by_the_family_engine():
    with pytest.raises(ConfigError, match="signs are not supported"):
        FamilyEngine(_adapter(), ZOConfig(optimizer="adam"), signs=(True, False), exchange=lambda *a: a[0])
