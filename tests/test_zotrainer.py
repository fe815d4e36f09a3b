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
