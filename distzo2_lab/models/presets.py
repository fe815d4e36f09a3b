"""Model presets: the published OPT shapes and small configs of every family with random
weights, and local checkpoints.

OPT shapes follow the OPT paper (arXiv 2205.01068, Table 1) and the released configs; the tiny
GPT-2, LLaMA, Qwen2 and BERT configs exist for tests and tutorials. Building a preset never
touches the network: configs are written out here and weights are random (seeded per bucket,
without disturbing the caller's global RNG). A directory is loaded with
``from_pretrained(path, local_files_only=True)``; weights it lacks (a new classifier head) get
the same seeded init.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, PretrainedConfig, Qwen2Config

from distzo2_lab.config import ConfigError
from distzo2_lab.models.base import init_group_
from distzo2_lab.models.registry import adapter_class
from distzo2_lab.seeds import derive_seed

__all__ = ["NUM_LABELS", "OPT_SHAPES", "PRESETS", "build_model", "checkpoint_config", "count_parameters",
           "init_group_", "init_missing_", "is_local_dir", "opt_config", "preset_config"]

# name: (hidden, layers, heads, ffn, word_embed_proj_dim, layer_norm_before)
OPT_SHAPES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "opt-125m": (768, 12, 12, 3072, 768, True),
    "opt-350m": (1024, 24, 16, 4096, 512, False),
    "opt-1.3b": (2048, 24, 32, 8192, 2048, True),
    "opt-2.7b": (2560, 32, 32, 10240, 2560, True),
    "opt-6.7b": (4096, 32, 32, 16384, 4096, True),
    "opt-13b": (5120, 40, 40, 20480, 5120, True),
    "opt-30b": (7168, 48, 56, 28672, 7168, True),
    "opt-66b": (9216, 64, 72, 36864, 9216, True),
    "opt-175b": (12288, 96, 96, 49152, 12288, True),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
            word_embed_proj_dim=64, vocab_size=512, max_position_embeddings=256)
FAMILY_PRESETS = ("tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-bert")
PRESETS = ("tiny", "tiny-deep", *OPT_SHAPES, *FAMILY_PRESETS)
NUM_LABELS = 2  # classes of a new classification head (SST-2: negative, positive)


def opt_config(name: str) -> OPTConfig:
    """The OPTConfig of a preset (dropout off: both perturbed passes must see one function)."""
    common = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    if name in ("tiny", "tiny-deep"):  # tiny-deep: 8 blocks, for streaming and prefetch tests
        layers = {"tiny": TINY["num_hidden_layers"], "tiny-deep": 8}[name]
        cfg = OPTConfig(**{**TINY, "num_hidden_layers": layers}, do_layer_norm_before=True, **common)
    elif name in OPT_SHAPES:
        h, n, heads, ffn, proj, before = OPT_SHAPES[name]
        cfg = OPTConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, ffn_dim=ffn,
                        word_embed_proj_dim=proj, do_layer_norm_before=before, vocab_size=50272,
                        max_position_embeddings=2048, **common)
    else:
        raise ConfigError(f"model={name!r} is not a preset; choose one of {', '.join(PRESETS)} "
                          "or give a local checkpoint directory")
    cfg._attn_implementation = "sdpa"
    return cfg


def preset_config(name: str) -> PretrainedConfig:
    """The config of any preset: OPT shapes, or a tiny GPT-2 / LLaMA / Qwen2 / BERT (dropout off)."""
    small = dict(vocab_size=512, max_position_embeddings=256, num_hidden_layers=2, num_attention_heads=4)
    if name == "tiny-gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=512, n_positions=256,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                         bos_token_id=2, eos_token_id=2)
    elif name == "tiny-llama":  # grouped-query attention, untied head
        cfg = LlamaConfig(**small, hidden_size=64, intermediate_size=160, num_key_value_heads=2,
                          attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0)
    elif name == "tiny-qwen2":  # q/k/v biases, tied head
        cfg = Qwen2Config(**small, hidden_size=64, intermediate_size=160, num_key_value_heads=2,
                          attention_dropout=0.0, tie_word_embeddings=True, pad_token_id=0)
    elif name == "tiny-bert":  # sequence classification, NUM_LABELS classes
        cfg = BertConfig(**small, hidden_size=64, intermediate_size=256, type_vocab_size=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=NUM_LABELS,
                         pad_token_id=0)
    else:
        return opt_config(name)
    cfg._attn_implementation = "sdpa"
    return cfg


def is_local_dir(model: str) -> bool:
    return model not in PRESETS and (os.sep in model or model.startswith(".") or os.path.exists(model))


def _check_dir(model: str) -> None:
    if not os.path.isdir(model):
        raise ConfigError(f"model={model!r}: checkpoint directory does not exist")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise ConfigError(f"model={model!r}: directory has no config.json (not a checkpoint)")


def checkpoint_config(model: str, num_labels: int = NUM_LABELS) -> PretrainedConfig:
    """A checkpoint directory's config (offline, sdpa attention). An encoder saved without a
    classification head gets one of `num_labels` classes."""
    from transformers import AutoConfig

    _check_dir(model)
    cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    adapter = adapter_class(cfg.model_type)  # unknown family: a clear error before any weight is read
    if not adapter.causal and not any(a.endswith("ForSequenceClassification") for a in cfg.architectures or ()):
        cfg.num_labels = num_labels
    cfg._attn_implementation = "sdpa"
    return cfg


@contextlib.contextmanager
def _quiet_loading():
    """from_pretrained's progress bar and load report say nothing we do not handle ourselves."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def init_missing_(model: nn.Module, missing: set[str], seed: int) -> list[str]:
    """Seeded init (as a preset's, per bucket) of the modules holding a weight the checkpoint
    lacks; returns the keys of the buckets touched."""
    touched = []
    groups = adapter_class(model.config.model_type).groups(model)
    done = {id(p) for _, mods in groups for prefix, m in mods if m is not None
            for n, p in m.named_parameters() if f"{prefix}.{n}" not in missing}
    std = adapter_class(model.config.model_type).init_std(model.config)
    for key, mods in groups:
        hit = [(prefix, m) for prefix, m in mods if m is not None
               and any(f"{prefix}.{n}" in missing for n, _ in m.named_parameters())]
        if hit:
            init_group_(hit, std, derive_seed(seed, "init", key), done)
            touched.append(key)
    return touched


@torch.no_grad()
def build_model(model: str, seed: int = 0, device: str | torch.device = "cpu", blocks: bool = True,
                num_labels: int = NUM_LABELS) -> nn.Module:
    """A preset with seeded random weights, or a checkpoint directory loaded offline.

    `device="meta"` gives shapes only. `blocks=False` (presets) materialises the resident
    modules and block 0 (the shell an offloaded adapter runs every block through) and leaves
    blocks 1.. on the meta device: their values come from a store. An encoder checkpoint without
    a classification head gets a new one of `num_labels` classes, initialised from `seed`.
    """
    if is_local_dir(model):
        cfg = checkpoint_config(model, num_labels)
        cls = adapter_class(cfg.model_type).model_class
        with _quiet_loading(), torch.random.fork_rng(devices=[]):  # its init of missing weights draws
            m, info = cls.from_pretrained(model, config=cfg, local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
        init_missing_(m, set(info["missing_keys"]), seed)
        return m.to(device).eval()
    cfg = preset_config(model)
    family = adapter_class(cfg.model_type)
    with torch.device("meta"):
        m = family.model_class(cfg)
    if torch.device(device).type == "meta":
        return m.eval()
    groups = family.materialise(m, lambda k: blocks or not k.startswith("block.") or k == "block.0")
    done: set[int] = set()
    for key, modules in groups:  # the bucket plan decides the init seeds
        init_group_(modules, family.init_std(cfg), derive_seed(seed, "init", key), done)
    return m.to(device).eval() if blocks else m.eval()


def count_parameters(model: str) -> int:
    """Unique parameters of a preset, counted on the meta device (nothing allocated)."""
    m = build_model(model, device="meta")
    return sum(p.numel() for p in m.parameters())
