import json
import os

import pytest
import torch

from distzo2_lab.config import ConfigError, TrainConfig, ZOConfig
from distzo2_lab.run.checkpoint import SeedLog, checkpoint_tensors, digest
from distzo2_lab.run.train import rebuild, train

CFG = TrainConfig(steps=6, batch_size=2, seq_len=12, threads=1, zo=ZOConfig(weight_decay=0.05))


def test_seed_log_rebuilds_the_fine_tuned_weights_bit_exactly(tmp_path):
    s = train(CFG, out=str(tmp_path / "run"), progress=False)
    log = SeedLog.read(str(tmp_path / "run" / "seedlog.jsonl"))
    assert [r["seed"] for r in log.records] == [r["seed"] for r in s["steps"]]
    assert log.base == {"model": "tiny", "init_seed": 0, "device": "cpu"}
    assert digest(rebuild(str(tmp_path / "run" / "seedlog.jsonl"))) == s["digest"]
    # a whole run is a few hundred bytes per step, not a copy of the model
    assert os.path.getsize(tmp_path / "run" / "seedlog.jsonl") < 200 * (CFG.steps + 1)


def test_resume_continues_the_uninterrupted_trajectory(tmp_path):
    full = train(CFG, progress=False)
    first = train(TrainConfig(**{**CFG.__dict__, "steps": 3}), save=str(tmp_path / "ck"), progress=False)
    assert json.load(open(tmp_path / "ck" / "state.json"))["step"] == 3
    rest = train(CFG, resume=str(tmp_path / "ck"), out=str(tmp_path / "out"), progress=False)
    assert first["steps"] + rest["steps"] == full["steps"]
    assert rest["digest"] == full["digest"]
    log = SeedLog.read(str(tmp_path / "out" / "seedlog.jsonl"))
    assert len(log.records) == 6 and digest(rebuild(str(tmp_path / "out" / "seedlog.jsonl"))) == full["digest"]


def test_eager_and_zo2_runs_end_on_the_same_digest():
    import dataclasses

    a = train(dataclasses.replace(CFG, engine="eager"), progress=False)
    b = train(CFG, progress=False)
    assert a["digest"] == b["digest"] and a["steps"] == b["steps"]


def test_checkpoint_round_trip_and_bad_paths(tmp_path):
    s = train(CFG, save=str(tmp_path / "ck"), progress=False)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert json.load(open(tmp_path / "ck" / "state.json"))["digest"] == s["digest"]
    with pytest.raises(ConfigError, match="no state.json"):
        train(CFG, resume=str(tmp_path))
    with pytest.raises(ConfigError, match="seed log .* does not exist"):
        rebuild(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="not beyond the step 6 already trained"):
        train(CFG, resume=str(tmp_path / "ck"), progress=False)


def test_resume_with_a_different_update_rule_is_refused(tmp_path):
    import dataclasses

    train(dataclasses.replace(CFG, steps=2), save=str(tmp_path / "ck"), progress=False)
    other = dataclasses.replace(CFG, zo=dataclasses.replace(CFG.zo, noise="rademacher", eps=1e-2))
    with pytest.raises(ConfigError, match=r"different zo.eps, zo.noise \(zo.eps=0.001, zo.noise='gaussian'\)"):
        train(other, resume=str(tmp_path / "ck"), progress=False)
    lr_changed = dataclasses.replace(CFG, zo=dataclasses.replace(CFG.zo, lr=1e-4))
    assert len(train(lr_changed, resume=str(tmp_path / "ck"), progress=False)["steps"]) == 4
    assert torch.get_num_threads() == 1  # train() restores the caller's thread count


def test_engines_refuse_an_adapter_built_for_another_storage():
    from distzo2_lab.config import PrecisionConfig
    from distzo2_lab.models import OPTAdapter, build_model
    from distzo2_lab.zo.engine import ZO2Engine
    from distzo2_lab.zo.reference import EagerMeZO

    adapter = OPTAdapter(build_model("tiny"))  # fp32 buckets
    for cls in (ZO2Engine, EagerMeZO):
        with pytest.raises(ConfigError, match="precision.storage='bf16' but the adapter was built with storage fp32"):
            cls(adapter, ZOConfig(), PrecisionConfig(compute="bf16", storage="bf16"))
        with pytest.raises(ConfigError, match="zo.eps=0"):
            cls(adapter, ZOConfig(eps=0))


def test_checkpoint_tensors_read_a_store_for_the_buckets_it_holds():
    from distzo2_lab.models import adapter_for, build_model

    adapter = adapter_for(build_model("tiny"))
    held = adapter.buckets[1]
    values = held.master.clone() + 1.0  # what a store would hold for that bucket
    expected = {k: v.clone() for k, v in held.state(values).items()}
    held.detach()
    tensors = checkpoint_tensors(adapter, lambda b: values)
    assert sorted(tensors) == sorted(s.name for b in adapter.buckets for s in b.slots)
    for name, v in expected.items():
        assert torch.equal(tensors[name], v)
