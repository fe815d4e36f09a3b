"""Prefix tuning through ``peft``: the block-by-block loss is peft's whole-model loss in every
decoder family (OPT, GPT-2, LLaMA, Qwen2), only the prefix table moves, the engine equals the
eager reference, offloaded tiers equal the resident run, the table saves and loads the peft way,
and the CLI / config take 'prefix:N'; BERT and peft's prefix_projection are refused by name."""
import dataclasses

import pytest
import torch

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.models import adapter_for, build_model
from distzo2_lab.models.lora import wrap_peft
from distzo2_lab.models.prefix import TABLE
from distzo2_lab.run.train import train
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO
from tests.helpers import batches, masters_equal, run

DECODERS = ["tiny-deep", "tiny-gpt2", "tiny-llama", "tiny-qwen2"]  # OPT (8 blocks), GPT-2, LLaMA (GQA), Qwen2


def _prefix_adapter(seed: int = 7, model: str = "tiny", n: int = 3):
    return adapter_for(wrap_peft(build_model(model, seed=seed), f"prefix:{n}", seed))


def _values(adapter) -> dict[str, torch.Tensor]:
    return {s.name: b.master[s.start : s.stop].clone() for b in adapter.buckets for s in b.slots}


def _padded(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row: positions and the mask both follow the padding
    return mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("model", DECODERS)
def test_block_by_block_loss_is_the_peft_models_whole_forward_loss(model, padded):
    """Tolerance: the same operations in the same order, so bit for bit (0.0) in fp32: learned
    (OPT, GPT-2) and rotary (LLaMA, Qwen2) positions start at N, GQA prefixes are H_kv heads wide."""
    a = _prefix_adapter(model=model)
    ids = batches(1, batch=3)[0]["input_ids"]
    mask = _padded(ids) if padded else None
    with torch.no_grad():
        ref = a.wrapper(input_ids=ids, attention_mask=mask)
        got = a.forward(ids, mask)
        plain = a.wrapper.get_base_model()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, ref.logits)
    assert float(a.loss(got, ids)) == float(a.loss(ref.logits, ids))
    assert not torch.equal(got, plain)  # the prefix takes part


def test_a_prefix_reaches_qwen2s_sliding_window_layers():
    """A Qwen2 mixing full and sliding-window layers: each layer's mask of its type covers the prefix."""
    from transformers import Qwen2ForCausalLM

    from distzo2_lab.models.presets import preset_config

    cfg = preset_config("tiny-qwen2")
    cfg.use_sliding_window, cfg.sliding_window = True, 5
    cfg.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    a = adapter_for(wrap_peft(Qwen2ForCausalLM(cfg).eval(), "prefix:3", 7))
    ids = batches(1, batch=3)[0]["input_ids"]
    with torch.no_grad():
        for mask in (None, _padded(ids)):
            assert torch.equal(a.forward(ids, mask), a.wrapper(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2", "tiny-llama", "tiny-qwen2"])
def test_the_table_is_resident_and_everything_else_frozen(model):
    a = _prefix_adapter(model=model)
    from distzo2_lab.zo.perturb import frozen_spans

    slot = next(s for s in a.bucket_in.slots if s.name == TABLE)
    c = a.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads  # GQA: peft's table is H_kv wide
    assert slot.shape == (3, c.num_hidden_layers * 2 * kv_heads * (c.hidden_size // c.num_attention_heads))
    assert slot.shape == tuple(a.wrapper.prompt_encoder["default"].embedding.weight.shape)
    spans = frozen_spans(a.buckets, a.frozen)
    frozen = sum(e - s for sp in spans.values() for s, e in sp)
    assert frozen + slot.stop - slot.start == sum(b.numel for b in a.buckets)
    assert all(TABLE not in p for p in a.frozen)


@pytest.mark.parametrize(("model", "options"), [
    *[("tiny", o) for o in ({"perturb": "in-place"}, {"perturb": "copy"}, {"directions": 2})],
    *[(m, {"perturb": "in-place"}) for m in ("tiny-gpt2", "tiny-llama", "tiny-qwen2")]])
def test_prefix_engine_equals_the_eager_reference_and_only_the_table_moves(model, options):
    """MeZO's in-place step, out-of-place copies and n-SPSA: each pass embeds with its own table."""
    a, b = _prefix_adapter(model=model), _prefix_adapter(model=model)
    zo = ZOConfig(lr=1e-2, weight_decay=0.1, freeze=a.frozen, **options)
    eager, engine = EagerMeZO(a, zo), ZO2Engine(b, zo)
    before = _values(b)
    bs = batches(3, batch=4)
    ref, got = run(eager, bs), run(engine, bs)
    engine.flush()
    assert [r.to_dict() for r in ref] == [r.to_dict() for r in got]  # l+, l-, g bit for bit
    assert masters_equal(a, b)
    after = _values(b)
    assert {n for n in after if not torch.equal(after[n], before[n])} == {TABLE}


def test_each_perturbed_pass_reads_its_own_prefix():
    """l+ and l- of a step are the peft model's losses at table +- eps z (the base unperturbed)."""
    a = _prefix_adapter()
    zo = ZOConfig(lr=1e-2, freeze=a.frozen, perturb="in-place")  # the table is perturbed again before the blocks
    engine = ZO2Engine(a, zo)
    batch = batches(1, batch=4)[0]
    start = a.wrapper.prompt_encoder["default"].embedding.weight.detach().clone()
    res = engine.step(batch, 123)
    b = _prefix_adapter()  # the same start: perturb its table by hand with the engine's z
    slot = next(s for s in a.bucket_in.slots if s.name == TABLE)
    z = torch.empty(a.bucket_in.numel)
    engine.draw(z, 123, a.bucket_in.key)
    table = b.wrapper.prompt_encoder["default"].embedding.weight
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            table.copy_(start + sign * zo.eps * z[slot.start : slot.stop].view(slot.shape))
            logits = b.wrapper(input_ids=batch["input_ids"]).logits
        losses.append(float(b.loss(logits, batch["input_ids"])))
    assert losses == pytest.approx([res.loss_plus, res.loss_minus], rel=1e-6, abs=1e-6)
    assert losses[0] != losses[1]


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_cli_train_with_a_prefix_lowers_the_loss_and_keeps_the_base(model, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from distzo2_lab.cli import main

    assert main(["train", "--model", model, "--peft", "prefix:4", "--steps", "20", "--batch-size", "4",
                 "--seq-len", "16", "--lr", "0.1", "--threads", "1", "--out", str(tmp_path / "o"),
                 "--save", str(tmp_path / "ck")]) in (0, None)
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["eval_loss_end"] < s["eval_loss_start"]
    assert '"peft": "prefix:4"' in (tmp_path / "o" / "seedlog.jsonl").read_text().splitlines()[0]
    start = _values(_prefix_adapter(seed=0, model=model, n=4))
    trained = load_file(tmp_path / "ck" / "model.safetensors")
    assert all(torch.equal(trained[n].flatten(), v) for n, v in start.items() if n != TABLE)  # base bit-identical
    assert not torch.equal(trained[TABLE].flatten(), start[TABLE])
    assert (tmp_path / "ck" / "adapter_config.json").exists()


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2", "tiny-llama", "tiny-qwen2"])
def test_a_saved_prefix_loads_with_peft_and_gives_the_same_loss(model, tmp_path):
    from peft import PeftModel

    cfg = TrainConfig(model=model, steps=3, batch_size=4, seq_len=12, threads=1, peft="prefix:3",
                      zo=ZOConfig(lr=0.1))
    s = train(cfg, progress=False, save=str(tmp_path / "ck"))
    loaded = PeftModel.from_pretrained(build_model(model, seed=0), tmp_path / "ck").eval()
    assert loaded.peft_config["default"].num_virtual_tokens == 3
    a = _prefix_adapter(seed=0, model=model)
    from safetensors.torch import load_file

    a.bucket_in.load({**a.bucket_in.state(), TABLE: load_file(tmp_path / "ck" / "model.safetensors")[TABLE]})
    ids = batches(1, batch=2)[0]["input_ids"]
    with torch.no_grad():
        ours = a.forward(ids)
        theirs = loaded(input_ids=ids).logits
    assert torch.equal(ours, theirs) and float(a.loss(ours, ids)) == float(a.loss(theirs, ids))
    assert not torch.equal(loaded.prompt_encoder["default"].embedding.weight,
                           _prefix_adapter(seed=0, model=model).prefix.weight)
    assert s["steps"]


PREFIX = TrainConfig(model="tiny-deep", steps=4, batch_size=2, seq_len=12, threads=1, peft="prefix:3",
                     zo=ZOConfig(lr=0.1, weight_decay=0.1))


@pytest.mark.parametrize(("model", "tier"), [*[("tiny-deep", t) for t in ("host", "disk", "lean")],
                                             ("tiny-gpt2", "host"), ("tiny-llama", "disk"), ("tiny-qwen2", "host")])
def test_prefix_on_an_offloaded_tier_equals_the_resident_run_and_writes_back_nothing(model, tier, tmp_path):
    """Same losses, digest and table as the resident run; the frozen blocks stream one way only
    (lean: the disk tier with the embeddings and the table parked in the store); every block runs
    through one shell layer whose cache holds the visited layer's prefix at index 0."""
    from peft import PeftModel

    base = dataclasses.replace(PREFIX, model=model)
    base = base if tier != "lean" else dataclasses.replace(base, zo=dataclasses.replace(base.zo, perturb="in-place"))
    ref = train(base, progress=False, save=str(tmp_path / "ref"))  # lean runs MeZO's in-place step
    on_disk = tier in ("disk", "lean")
    offload = OffloadConfig(tier="disk" if on_disk else tier, store=str(tmp_path / "s") if on_disk else None,
                            lean=tier == "lean")
    cfg = dataclasses.replace(base, offload=offload)
    got = train(cfg, progress=False, save=str(tmp_path / "got"))
    assert got["steps"] == ref["steps"] and got["digest"] == ref["digest"]
    assert got["eval_loss_end"] == ref["eval_loss_end"]
    assert got["bytes_up_per_step"] > 0 and got["bytes_down_per_step"] == 0
    ids = batches(1, batch=2)[0]["input_ids"]
    models = [PeftModel.from_pretrained(build_model(model, seed=0), tmp_path / d).eval() for d in ("ref", "got")]
    with torch.no_grad():
        assert torch.equal(models[0](input_ids=ids).logits, models[1](input_ids=ids).logits)


BERT_WHY = (r"peft's prefix tuning cannot run a BERT classifier with this transformers \(peft looks for a "
            r"past_key_values argument that BertModel.forward names cache\); prefix tuning runs with model_type "
            r"'gpt2', 'llama', 'opt', 'qwen2'")


def test_peft_itself_cannot_run_a_prefix_tuned_bert_classifier():
    """Why BERT is refused: peft's own forward of a prefix-tuned BertForSequenceClassification raises."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    model = get_peft_model(build_model("tiny-bert", seed=0), config)
    ids = batches(1, batch=2)[0]["input_ids"]
    with pytest.raises(ValueError, match="does not support past key values"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_prefix_tuning_is_refused_for_bert_with_the_reason():
    with pytest.raises(ConfigError, match=rf"^peft='prefix:2' with model_type='bert': {BERT_WHY}; "
                                          r"choose peft='lora:R' for this model$") as e:
        wrap_peft(build_model("tiny-bert", seed=0), "prefix:2", 0)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model_type='bert'"):
        train(dataclasses.replace(PREFIX, model="tiny-bert", steps=1), progress=False)


def test_an_adapter_refuses_a_prefix_model_of_bert():
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    model = get_peft_model(build_model("tiny-bert", seed=0), config)
    with pytest.raises(ConfigError, match=rf"^a peft prefix-tuned model of model_type='bert': {BERT_WHY}; use LoRA"):
        adapter_for(model)


def test_an_adapter_refuses_a_projected_prefix():
    """peft's prefix_projection=True: the prefix is an MLP's output, not a table ZO trains here."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(build_model("tiny-gpt2", seed=0), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=16))
    with pytest.raises(ConfigError, match=r"^a peft prefix-tuned model with prefix_projection=True: its prefix comes "
                                          r"out of an MLP \(prompt_encoder.default.transform\) that is not "
                                          r"trained here; use PrefixTuningConfig\(prefix_projection=False\), "
                                          r"the table itself$"):
        adapter_for(model)


def test_a_table_of_the_wrong_width_and_a_sequence_past_the_positions_are_refused():
    from torch import nn

    from distzo2_lab.models import adapter_class

    model = build_model("tiny-llama", seed=0)
    with pytest.raises(ConfigError, match=r"a prefix table of shape \(3, 256\) does not fit model_type='llama': "
                                          r"each row holds layers \* 2 \* key/value heads \* head_dim = "
                                          r"2 \* 2 \* 2 \* 16 = 128"):
        adapter_class("llama")(model, prefix=nn.Embedding(3, 256))
    a = _prefix_adapter(model="tiny-gpt2", n=3)  # learned positions: 256 of them
    a.check_batch(torch.zeros(1, 253, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"seq_len=254 plus the prefix's 3 positions is longer than the model's "
                                          r"max_position_embeddings=256"):
        a.check_batch(torch.zeros(1, 254, dtype=torch.long))


@pytest.mark.parametrize("offload", ["resident", "host"])
def test_zotrainer_trains_a_prefix_and_saves_it_the_peft_way(offload, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from distzo2_lab import ZOArguments, ZOTrainer
    from tests.hf_workers import dataset

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, learning_rate=0.1, per_device_train_batch_size=4,
                             save_steps=3, lr_scheduler_type="constant", seed=3, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    zo = ZOArguments(peft="prefix:3", offload=offload)
    t = ZOTrainer(model="tiny", args=args, zo_args=zo, train_dataset=dataset())
    t.train()
    ck = tmp_path / "checkpoint-3"
    loaded = PeftModel.from_pretrained(build_model("tiny", seed=3), ck).eval()
    table = load_file(ck / "model.safetensors")[TABLE]
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, table)
    assert not torch.equal(table, _prefix_adapter(seed=3).prefix.weight)


def test_a_prefix_run_rebuilds_from_its_seed_log(tmp_path):
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild

    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, peft="prefix:2", zo=ZOConfig(lr=0.1))
    s = train(cfg, out=str(tmp_path / "out"), progress=False)
    assert digest(rebuild(str(tmp_path / "out" / "seedlog.jsonl"))) == s["digest"]


def test_under_bf16_the_frozen_blocks_go_up_in_bf16_and_never_come_back():
    """A prefix leaves every block element frozen: the host tier uploads each block in the compute
    dtype (2 bytes an element) and writes nothing back, bit for bit the resident bf16 run."""
    from distzo2_lab.config import PrecisionConfig
    from distzo2_lab.run.train import base_of, build_adapter

    cfg = dataclasses.replace(PREFIX, steps=3, precision=PrecisionConfig(compute="bf16"))
    ref = train(cfg, progress=False)
    got = train(dataclasses.replace(cfg, offload=OffloadConfig(tier="host")), progress=False)
    assert got["steps"] == ref["steps"] and got["digest"] == ref["digest"]
    blocks = sum(b.numel for b in build_adapter(base_of(cfg)).blocks)
    assert got["bytes_up_per_step"] == 2 * blocks and got["bytes_down_per_step"] == 0
