import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from distzo2_lab.config import ConfigError
from distzo2_lab.models import OPT_SHAPES, PRESETS, OPTAdapter, build_model, count_parameters, opt_config


def _tiny_350m_like():
    # opt-350m's peculiarities: project_in / project_out and LayerNorm after attention.
    cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                    word_embed_proj_dim=32, vocab_size=300, max_position_embeddings=64,
                    do_layer_norm_before=False, dropout=0.0)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [lambda: build_model("tiny", seed=3), _tiny_350m_like])
def test_block_by_block_logits_equal_the_stock_forward(make):
    model = make()
    adapter = OPTAdapter(model)
    ids = torch.randint(4, 300, (3, 17))
    with torch.no_grad():
        assert torch.equal(adapter.forward(ids), model(ids).logits)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0  # left padding
        assert torch.equal(adapter.forward(ids, mask), model(ids, attention_mask=mask).logits)


def test_tied_lm_head_lives_in_exactly_one_bucket():
    model = build_model("tiny")
    adapter = OPTAdapter(model)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    names = [s.name for b in adapter.buckets for s in b.slots]
    assert len(names) == len(set(names))
    assert "model.decoder.embed_tokens.weight" in [s.name for s in adapter.bucket_in.slots]
    assert not any("lm_head" in n for n in names)
    assert sum(b.numel for b in adapter.buckets) == sum(p.numel() for p in model.parameters())
    # parameters are views of the flat masters: writing the master moves the module weight
    adapter.bucket_in.master[0] = 42.0
    assert model.lm_head.weight.view(-1)[0] == 42.0


def test_bucket_layout_and_weight_decay_mask():
    adapter = OPTAdapter(build_model("tiny"))
    assert [b.key for b in adapter.buckets] == ["in", "block.0", "block.1", "out"]
    decay = {s.name: s.decay for b in adapter.buckets for s in b.slots}
    assert decay["model.decoder.layers.0.fc1.weight"] is True
    assert decay["model.decoder.layers.0.fc1.bias"] is False
    assert decay["model.decoder.layers.0.self_attn_layer_norm.weight"] is False
    assert decay["model.decoder.final_layer_norm.weight"] is False


def test_published_opt_shapes_have_their_parameter_counts():
    assert count_parameters("opt-125m") == 125_239_296
    assert count_parameters("opt-350m") == 331_196_416
    counts = {name: count_parameters(name) for name in OPT_SHAPES}
    for name, nominal in [("opt-1.3b", 1.3e9), ("opt-2.7b", 2.7e9), ("opt-6.7b", 6.7e9), ("opt-13b", 13e9),
                          ("opt-30b", 30e9), ("opt-66b", 66e9), ("opt-175b", 175e9)]:
        assert abs(counts[name] / nominal - 1) < 0.05, (name, counts[name])
    assert set(PRESETS) == {"tiny", "tiny-deep", *OPT_SHAPES, "tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-bert"}


def test_presets_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a, b = build_model("tiny", seed=5), build_model("tiny", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_model("tiny", seed=6)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    assert opt_config("tiny").dropout == 0.0


def test_local_checkpoint_directory_loads_offline(tmp_path):
    model = build_model("tiny", seed=2)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_model(str(tmp_path / "ckpt"))
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), loaded.parameters()))


def test_unknown_preset_and_missing_directory_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="model='opt-7b' is not a preset; choose one of tiny, tiny-deep, opt-125m"):
        build_model("opt-7b")
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        build_model(str(tmp_path / "empty"))


def test_sequence_longer_than_positions_is_refused():
    adapter = OPTAdapter(build_model("tiny"))
    with pytest.raises(ConfigError, match="seq_len=300 is longer than the model's max_position_embeddings=256"):
        adapter.check_batch(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ConfigError, match="non-empty"):
        adapter.check_batch(torch.zeros(0, 5, dtype=torch.long))
