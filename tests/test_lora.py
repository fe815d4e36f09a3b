"""ZO with LoRA through ``peft``: only the adapters move, the engine equals the eager reference,
adapters save and load the peft way, and the CLI / config take 'lora:R'."""
import dataclasses

import pytest
import torch

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.models import adapter_for, build_model
from distzo2_lab.models.lora import frozen_patterns, wrap_lora
from distzo2_lab.run.train import train
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


@pytest.mark.parametrize("spec", ["lora", "lora:0", "lora:x", "ia3:2", "prefix", "prefix:0"])
def test_bad_peft_spec_is_one_clear_error(spec):
    with pytest.raises(ConfigError, match=r"peft=.* is not valid; choose 'lora:R' .* or 'prefix:N'") as e:
        validate(TrainConfig(peft=spec))
    assert "\n" not in str(e.value)


LORA = TrainConfig(model="tiny-deep", steps=4, batch_size=2, seq_len=12, threads=1, peft="lora:4",
                   zo=ZOConfig(weight_decay=0.1))


def _tier(cfg: TrainConfig, tier: str, store) -> TrainConfig:
    return dataclasses.replace(cfg, offload=OffloadConfig(tier=tier, store=str(store) if tier == "disk" else None))


def _block_sizes(cfg: TrainConfig) -> tuple[int, int, int]:
    """(block elements, trainable block elements, all elements) of cfg's LoRA model."""
    from distzo2_lab.run.train import base_of, build_adapter

    a = build_adapter(base_of(cfg))
    lora = sum(s.stop - s.start for b in a.blocks for s in b.slots if ".lora_" in s.name)
    return sum(b.numel for b in a.blocks), lora, sum(b.numel for b in a.buckets)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_lora_on_an_offloaded_tier_equals_the_resident_run_and_writes_back_only_the_adapters(tier, tmp_path):
    """Same losses, digest and adapters as the resident LoRA run; the base leaves the store as it
    went in; each step uploads every block (fp32) and writes back only the adapters' elements."""
    from peft import PeftModel
    from safetensors.torch import load_file

    ref = train(LORA, progress=False, save=str(tmp_path / "ref"))
    got = train(_tier(LORA, tier, tmp_path / "store"), progress=False, save=str(tmp_path / "got"))
    assert got["steps"] == ref["steps"] and got["digest"] == ref["digest"]
    assert got["eval_loss_end"] == ref["eval_loss_end"]
    start = _values(adapter_for(wrap_lora(build_model("tiny-deep", seed=0), "lora:4", 0)))
    trained = load_file(tmp_path / "got" / "model.safetensors")
    assert all(torch.equal(trained[n].flatten(), v) for n, v in start.items() if ".lora_" not in n)  # the base
    assert any(not torch.equal(trained[n].flatten(), v) for n, v in start.items() if ".lora_B" in n)  # trained
    blocks, lora, total = _block_sizes(LORA)
    assert got["bytes_up_per_step"] == 4 * blocks and got["bytes_down_per_step"] == 4 * lora
    assert got["bytes_per_param_per_step"] == pytest.approx(4 * (blocks + lora) / total)
    ids = batches(1, batch=2)[0]["input_ids"]
    ref_model, got_model = (PeftModel.from_pretrained(build_model("tiny-deep", seed=0), tmp_path / d).eval()
                            for d in ("ref", "got"))
    with torch.no_grad():  # the adapters saved the peft way from the store
        assert torch.equal(got_model(input_ids=ids).logits, ref_model(input_ids=ids).logits)


def test_offload_spans_carry_the_bytes_each_way(tmp_path):
    """Upload spans: the whole fp32 block; offload spans: the block's adapter elements only."""
    from distzo2_lab.observe.events import read_jsonl
    from distzo2_lab.run.train import base_of, build_adapter

    got = train(_tier(dataclasses.replace(LORA, steps=2), "host", None), progress=False, trace=str(tmp_path / "t"))
    a = build_adapter(base_of(LORA))
    lora = [sum(s.stop - s.start for s in b.slots if ".lora_" in s.name) for b in a.blocks]
    spans = read_jsonl(got["trace"]["jsonl"])
    up = [s for s in spans if s.lane == "upload"]
    down = [s for s in spans if s.lane == "offload"]
    assert up and all(s.bytes == 4 * a.blocks[s.block].numel for s in up)
    assert down and all(s.bytes == 4 * lora[s.block] for s in down)


def test_the_frozen_base_goes_up_in_the_compute_dtype_and_never_comes_back(tmp_path):
    """bf16 compute on the host tier: every block's frozen base is uploaded in bf16 (2 bytes an
    element; the forwards read bf16 copies of it anyway), its adapters in fp32 (4), and only the
    adapters come back. The run equals the resident bf16 run bit for bit, and the saved base is the
    exact fp32 start."""
    from safetensors.torch import load_file

    from distzo2_lab.config import PrecisionConfig
    from distzo2_lab.observe.events import read_jsonl
    from distzo2_lab.run.train import base_of, build_adapter

    cfg = dataclasses.replace(LORA, steps=3, precision=PrecisionConfig(compute="bf16"))
    ref = train(cfg, progress=False)
    got = train(_tier(cfg, "host", None), progress=False, save=str(tmp_path / "got"), trace=str(tmp_path / "t"))
    assert got["steps"] == ref["steps"] and got["digest"] == ref["digest"]
    blocks, lora, total = _block_sizes(cfg)
    assert got["bytes_up_per_step"] == 2 * (blocks - lora) + 4 * lora and got["bytes_down_per_step"] == 4 * lora
    assert got["bytes_per_param_per_step"] == pytest.approx((2 * (blocks - lora) + 8 * lora) / total)
    a = build_adapter(base_of(cfg))
    lora_of = [sum(s.stop - s.start for s in b.slots if ".lora_" in s.name) for b in a.blocks]
    up = [s for s in read_jsonl(got["trace"]["jsonl"]) if s.lane == "upload"]
    assert up and all(s.bytes == 2 * (a.blocks[s.block].numel - lora_of[s.block]) + 4 * lora_of[s.block]
                      for s in up)
    start = _values(adapter_for(wrap_lora(build_model("tiny-deep", seed=0), "lora:4", 0)))
    trained = load_file(tmp_path / "got" / "model.safetensors")
    assert all(torch.equal(trained[n].flatten(), v) for n, v in start.items() if ".lora_" not in n)
    # fp32 compute: the fp32 masters are what the forwards read, and they travel as they are
    fp32 = train(_tier(dataclasses.replace(LORA, steps=1), "host", None), progress=False)
    assert fp32["bytes_up_per_step"] == 4 * blocks


def test_lora_disk_store_reopens_on_the_same_trajectory(tmp_path):
    ref = train(dataclasses.replace(LORA, steps=5), progress=False)
    cfg = _tier(LORA, "disk", tmp_path / "store")
    first = train(dataclasses.replace(cfg, steps=2), progress=False)
    rest = train(dataclasses.replace(cfg, steps=5), progress=False)
    assert rest["start_step"] == 2 and first["steps"] + rest["steps"] == ref["steps"]
    assert rest["digest"] == ref["digest"]


def test_a_disk_store_is_refused_for_another_adapter_or_a_one_slot_start(tmp_path):
    import json

    from distzo2_lab.run.train import Run

    cfg = _tier(dataclasses.replace(LORA, steps=1), "disk", tmp_path / "store")
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"offload.store=.* holds .*'peft': 'lora:4'"):
        Run(dataclasses.replace(cfg, peft="lora:2", steps=3))
    manifest = tmp_path / "store" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "version": 1}))  # a store whose slot 0 never held the start values
    with pytest.raises(ConfigError, match="keeps the start values in one slot only"):
        Run(dataclasses.replace(cfg, steps=3))


def test_cli_train_takes_peft(tmp_path, capsys):
    from distzo2_lab.cli import main

    assert main(["train", "--steps", "2", "--batch-size", "2", "--seq-len", "8", "--peft", "lora:2",
                 "--out", str(tmp_path / "o")]) in (0, None)
    assert '"peft": "lora:2"' in (tmp_path / "o" / "seedlog.jsonl").read_text().splitlines()[0]
    assert main(["train", "--steps", "2", "--peft", "lora:zero"]) not in (0, None)
    assert "peft='lora:zero' is not valid" in capsys.readouterr().err


def test_sst2_benchmark_trains_lora_beside_full_zo_from_the_same_start(tmp_path):
    """--peft lora:R: a second ZO run from the same start trains only the adapters; the table has
    one row per method, the resident tier moves no bytes, and a bad spec is refused up front."""
    from distzo2_lab.bench.sst2 import Settings, run, write_sample_dir
    from distzo2_lab.bench.sst2_methods import method_table

    data = write_sample_dir(str(tmp_path / "data"), repeats=1)
    s = Settings(data=data, model="tiny-bert", steps=2, eval_every=0, fo_steps=1, eval_examples=8, shots=4,
                 batch_size=4, seq_len=16, threads=1, peft="lora:2", peft_lr=1e-2)
    r = run(s, str(tmp_path / "work"))
    lora, full = r["lora"], r["zo"]
    assert lora["peft"] == "lora:2" and lora["lr"] == 1e-2 and full["peft"] is None
    adapter = adapter_for(wrap_lora(build_model("tiny-bert", seed=0), "lora:2", 0))
    n_lora = sum(s.stop - s.start for b in adapter.buckets for s in b.slots if ".lora_" in s.name)
    assert lora["trained_params"] == n_lora < full["trained_params"]
    assert lora["bytes_per_step"] == full["bytes_per_step"] == 0  # resident tier: nothing streams
    assert {"gained", "lost", "p_value"} <= set(r["lora_vs_zo"])
    assert r["lora_vs_start"]["gain"] == pytest.approx(lora["accuracy"] - r["start_accuracy"])
    table = method_table(r).splitlines()
    assert table[3].startswith("| full ZO |") and table[4].startswith("| LoRA rank 2 |") and len(table) == 5
    with pytest.raises(ConfigError, match="peft='lora:0' is not valid"):
        run(dataclasses.replace(s, peft="lora:0"), str(tmp_path / "unused"))
