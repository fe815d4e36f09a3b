"""ZO with LoRA through ``peft``: only the adapters move, the engine equals the eager reference,
adapters save and load the peft way, and the CLI / config take 'lora:R'."""
import dataclasses

import pytest
import torch

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.models import adapter_for, build_model
from distzo2_lab.models.lora import frozen_patterns, wrap_lora
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO
from tests.helpers import batches, masters_equal, run


def _lora_adapter(seed: int = 7):
    return adapter_for(wrap_lora(build_model("tiny", seed=seed), "lora:4", seed))


def _values(adapter) -> dict[str, torch.Tensor]:
    return {s.name: b.master[s.start : s.stop].clone() for b in adapter.buckets for s in b.slots}


def test_lora_engine_equals_the_eager_reference_and_only_the_adapters_move():
    a, b = _lora_adapter(), _lora_adapter()
    zo = ZOConfig(lr=1e-2, weight_decay=0.1, freeze=a.frozen)
    eager, engine = EagerMeZO(a, zo), ZO2Engine(b, zo)
    before = _values(b)
    bs = batches(3, batch=4)
    ref, got = run(eager, bs), run(engine, bs)
    engine.flush()
    assert [r.to_dict() for r in ref] == [r.to_dict() for r in got]  # l+, l-, g bit for bit
    assert masters_equal(a, b)
    after = _values(b)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    lora = {n for n in after if ".lora_" in n}
    assert lora and moved == lora  # every adapter tensor trained, no base tensor touched


def test_frozen_patterns_cover_exactly_the_base():
    model = wrap_lora(build_model("tiny", seed=0), "lora:2", 0)
    patterns = frozen_patterns(model)
    assert "model.decoder.layers.*.fc1.weight" in patterns  # one pattern per block-invariant name
    from distzo2_lab.zo.perturb import frozen_spans

    adapter = adapter_for(model)
    spans = frozen_spans(adapter.buckets, patterns)
    frozen = sum(b - a for s in spans.values() for a, b in s)
    lora = sum(s.stop - s.start for bk in adapter.buckets for s in bk.slots if ".lora_" in s.name)
    assert frozen + lora == sum(bk.numel for bk in adapter.buckets)


def test_lora_adapters_save_and_load_the_peft_way(tmp_path):
    from peft import PeftModel

    a = _lora_adapter()
    engine = ZO2Engine(a, ZOConfig(lr=1e-2, freeze=a.frozen))
    run(engine, batches(2, batch=4))
    engine.flush()
    a.wrapper.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_model("tiny", seed=7), tmp_path / "adapter").eval()
    ids = batches(1, batch=2)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, a.wrapper(input_ids=ids).logits)
    trained = {n: p for n, p in a.wrapper.named_parameters() if "lora_" in n}
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, trained[n])


def test_train_with_peft_rebuilds_from_its_seed_log(tmp_path):
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild, train

    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, peft="lora:4", zo=ZOConfig())
    s = train(cfg, out=str(tmp_path / "out"), save=str(tmp_path / "ck"), progress=False)
    assert s["steps"][-1]["loss_plus"] != train(dataclasses.replace(cfg, peft=None), progress=False)["steps"][-1][
        "loss_plus"]
    assert digest(rebuild(str(tmp_path / "out" / "seedlog.jsonl"))) == s["digest"]
    assert (tmp_path / "ck" / "adapter_config.json").exists()  # the peft way, next to the full checkpoint


@pytest.mark.parametrize("spec", ["lora", "lora:0", "lora:x", "prefix:8", "ia3:2"])
def test_bad_peft_spec_is_one_clear_error(spec):
    with pytest.raises(ConfigError, match=r"peft=.* is not valid; choose one of lora:R"):
        validate(TrainConfig(peft=spec))


def test_peft_refuses_an_offloaded_tier():
    with pytest.raises(ConfigError, match="offload.tier='resident'"):
        validate(TrainConfig(peft="lora:2", offload=OffloadConfig(tier="host")))


def test_cli_train_takes_peft(tmp_path, capsys):
    from distzo2_lab.cli import main

    assert main(["train", "--steps", "2", "--batch-size", "2", "--seq-len", "8", "--peft", "lora:2",
                 "--out", str(tmp_path / "o")]) in (0, None)
    assert '"peft": "lora:2"' in (tmp_path / "o" / "seedlog.jsonl").read_text().splitlines()[0]
    assert main(["train", "--steps", "2", "--peft", "lora:zero"]) not in (0, None)
    assert "peft='lora:zero' is not valid" in capsys.readouterr().err
