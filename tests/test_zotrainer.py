"""ZOTrainer: transformers' Trainer driven by the ZO engine; toolkit checkpoints, resume, layouts."""
import dataclasses
import json

import pytest

from distzo2_lab.config import ConfigError
from distzo2_lab.hf.arguments import ZOArguments
from tests.hf_workers import trainer

ZO = ZOArguments()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    t = trainer(str(out), zo=ZO, eval_strategy="steps", eval_steps=15)
    start = t.evaluate()["eval_loss"]
    t.train()
    return t, start, out


def test_zotrainer_lowers_the_loss_and_logs_through_the_callbacks(straight):
    t, start, _ = straight
    assert len(t.history) == 30
    assert t.evaluate()["eval_loss"] < start
    logged = [h for h in t.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [5, 10, 15, 20, 25, 30]
    assert [h["step"] for h in t.state.log_history if "eval_loss" in h][:2] == [15, 30]


def test_zotrainer_resumes_on_the_same_trajectory_and_its_seed_log_rebuilds(straight, tmp_path):
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild

    t, _, _ = straight
    half = trainer(str(tmp_path), steps=15, zo=ZO, save_steps=15)
    half.train()
    assert (tmp_path / "checkpoint-15" / "model.safetensors").exists()
    rest = trainer(str(tmp_path), steps=30, zo=ZO, save_steps=15)
    rest.train(resume_from_checkpoint=True)
    assert half.history + rest.history == t.history  # l+, l-, g, lr of every step, bit for bit
    assert rest.digest() == t.digest()
    state = json.loads((tmp_path / "checkpoint-30" / "state.json").read_text())
    assert digest(rebuild(str(tmp_path / "checkpoint-30" / "seedlog.jsonl"))) == state["digest"] == t.digest()


def test_host_tier_gives_the_resident_result(straight, tmp_path):
    t, _, _ = straight
    host = trainer(str(tmp_path), zo=dataclasses.replace(ZO, offload="host"))
    host.train()
    assert host.history == t.history and host.digest() == t.digest()


def test_pertp_layout_equals_the_single_rank_trainer(straight, tmp_path):
    from distzo2_lab.hf.worker import trainer_worker
    from distzo2_lab.parallel.launch import launch

    t, _, _ = straight
    zo = dataclasses.replace(ZO, layout="dp=1,pert=2")
    results = launch(trainer_worker, 2, args=(trainer, str(tmp_path), 30, zo), timeout=240).wait()
    assert {r["digest"] for r in results.values()} == {t.digest()}
    assert results[0]["steps"] == t.history


def test_zotrainer_with_lora_trains_only_the_adapters(tmp_path):
    from peft import PeftModel

    from distzo2_lab.models import build_model

    t = trainer(str(tmp_path), steps=4, zo=dataclasses.replace(ZO, peft="lora:4"), save_steps=4)
    t.train()
    assert isinstance(t.model, PeftModel)
    assert (tmp_path / "checkpoint-4" / "adapter_config.json").exists()
    base = dict(build_model("tiny", seed=3).named_parameters())
    for n, p in t.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert (p == base[n.replace(".base_layer", "")]).all(), n


def test_zotrainer_refuses_a_layout_outside_a_launched_run_and_no_max_steps(tmp_path):
    with pytest.raises(ConfigError, match="launched run"):
        trainer(str(tmp_path), zo=dataclasses.replace(ZO, layout="dp=1,pert=2")).train()
    with pytest.raises(ConfigError, match="max_steps"):
        trainer(str(tmp_path), steps=-1).train()


def test_the_package_exports_the_trainer_lazily():
    import subprocess
    import sys

    code = ("import sys, distzo2_lab; assert 'transformers' not in sys.modules; "
            "from distzo2_lab import ZOTrainer, ZOArguments; print(ZOTrainer.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Trainer"


# -- the method family through ZOArguments ------------------------------------------------------
ADAM = dataclasses.replace(ZO, optimizer="adam")
FAMILY = {
    "adam": dict(optimizer="adam"),
    "hizoo-sparse": dict(optimizer="hizoo", perturbation="sparse:0.5", sparse_refresh=2),
    "conservative-one-sided-lowrank": dict(optimizer="conservative", estimator="one-sided", directions=2,
                                           perturbation="lowrank:2", lowrank_interval=3),
}


def eager_family(method: dict, steps: int) -> tuple[list[dict], str]:
    """The family's eager reference (zo/family_reference.py) stepped on the ZOTrainer's batches: the
    base the trainer builds (preset 'tiny', seed 3), its rows of each step, its step seeds and lr."""
    import torch

    from distzo2_lab.config import ZOConfig
    from distzo2_lab.hf.trainer import batch_rows
    from distzo2_lab.models import adapter_for, build_model
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.seeds import step_seed
    from distzo2_lab.zo.family_reference import EagerFamily
    from tests.hf_workers import dataset

    rows = dataset()
    adapter = adapter_for(build_model("tiny", seed=3))
    eager = EagerFamily(adapter, ZOConfig(lr=3e-3, eps=1e-3, **method))
    history = []
    for t in range(steps):
        batch = {"input_ids": torch.stack([rows[i]["input_ids"] for i in batch_rows(t, 4, len(rows), 3)])}
        r = eager.step(batch, step_seed(3, t), lr=3e-3, step=t)
        history.append({"step": r.step, "seed": r.seed, "loss_plus": r.loss_plus, "loss_minus": r.loss_minus,
                        "projected_grad": r.grad, "lr": r.lr})
    return history, digest(adapter)


@pytest.fixture(scope="module")
def adam_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("adam")
    t = trainer(str(out), steps=8, zo=ADAM)
    t.train()
    return t


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_family_method_through_zoarguments_equals_the_eager_reference_and_rebuilds(name, tmp_path):
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild
    from distzo2_lab.zo.family_engine import FamilyEngine

    t = trainer(str(tmp_path), steps=6, zo=dataclasses.replace(ZO, **FAMILY[name]))
    t.train()
    assert isinstance(t.run.engine, FamilyEngine)  # the block engine, as distzo2 train picks it
    history, want = eager_family(FAMILY[name], 6)
    assert t.history == history  # l+, l-, g, lr of every step, bit for bit
    assert t.digest() == want
    assert digest(rebuild(str(tmp_path / "seedlog.jsonl"))) == want


def test_a_family_run_resumes_on_the_same_trajectory_and_refuses_another_method(adam_straight, tmp_path):
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild

    half = trainer(str(tmp_path), steps=4, zo=ADAM, save_steps=4)
    half.train()
    assert (tmp_path / "checkpoint-4" / "method_state.safetensors").exists()
    rest = trainer(str(tmp_path), steps=8, zo=ADAM, save_steps=4)
    rest.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert half.history + rest.history == adam_straight.history
    assert rest.digest() == adam_straight.digest()
    state = json.loads((tmp_path / "checkpoint-8" / "state.json").read_text())
    assert digest(rebuild(str(tmp_path / "checkpoint-8" / "seedlog.jsonl"))) == state["digest"] == rest.digest()
    for other in ("momentum", "sgd"):
        with pytest.raises(ConfigError, match="its optimiser state belongs to that method"):
            trainer(str(tmp_path), steps=8, zo=dataclasses.replace(ZO, optimizer=other)).train(
                resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_host_tier_gives_the_resident_result_for_a_family_method(adam_straight, tmp_path):
    host = trainer(str(tmp_path), steps=8, zo=dataclasses.replace(ADAM, offload="host"))
    host.train()
    assert host.history == adam_straight.history and host.digest() == adam_straight.digest()


@pytest.mark.parametrize("tier, zo", [("host", ZO), ("disk", ZO), ("disk", ADAM)],
                         ids=["host-sgd", "disk-sgd", "disk-adam"])
def test_pertp_on_one_shared_store_with_evaluations_equals_the_single_rank_trainer(tier, zo, tmp_path):
    """Two PertP ranks share one store (a node's shared host memory, or one disk store); the
    evaluations after steps 5 and 10 flush the pending update through it in the middle of the run,
    while rank 0 lags behind (RankZeroLag) and the other rank goes on into the next step."""
    from distzo2_lab.hf.worker import trainer_worker
    from distzo2_lab.parallel.launch import launch
    from tests.hf_workers import evaluating_trainer

    single = evaluating_trainer(str(tmp_path / "single"), 10, zo, 5)
    single.train()
    evals = [h["eval_loss"] for h in single.state.log_history if "eval_loss" in h]
    assert len(evals) == 2
    store = {"store": str(tmp_path / "store")} if tier == "disk" else {}
    shared = dataclasses.replace(zo, layout="dp=1,pert=2", offload=tier, **store)
    results = launch(trainer_worker, 2, args=(evaluating_trainer, str(tmp_path / "pertp"), 10, shared, 5, 2.0),
                     timeout=240).wait()
    assert {r["digest"] for r in results.values()} == {single.digest()}
    for r in results.values():
        assert r["steps"] == single.history and r["eval_losses"] == evals
    if tier == "disk":  # every step committed
        assert json.loads((tmp_path / "store" / "manifest.json").read_text())["committed"] == 9


def test_a_family_run_on_the_disk_tier_continues_from_its_store(adam_straight, tmp_path):
    zo = dataclasses.replace(ADAM, offload="disk", store=str(tmp_path / "store"))
    first = trainer(str(tmp_path / "out"), steps=4, zo=zo)
    first.train()
    rest = trainer(str(tmp_path / "out"), steps=8, zo=zo)  # the store holds steps 0..3: it goes on at 4
    rest.train()
    assert first.history + rest.history == adam_straight.history
    assert rest.digest() == adam_straight.digest()


def test_a_bad_method_through_zoarguments_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"^zo\.optimizer='adamw' is not valid; choose one of sgd, momentum, adam, "
                                          r"sign, conservative, hizoo$"):
        trainer(str(tmp_path), zo=dataclasses.replace(ZO, optimizer="adamw"))
    with pytest.raises(ConfigError, match=r"^zo\.adam_beta2=1\.0 is not valid; it must be in \[0, 1\)$"):
        trainer(str(tmp_path), zo=dataclasses.replace(ADAM, adam_beta2=1.0))
    assert not (tmp_path / "seedlog.jsonl").exists()
