"""Model presets: the published OPT shapes with random weights, a tiny OPT, local checkpoints.

Shapes follow the OPT paper (arXiv 2205.01068, Table 1) and the released configs. Building a
preset never touches the network: configs are written out here and weights are random (seeded,
without disturbing the caller's global RNG). A directory is loaded with
``from_pretrained(path, local_files_only=True)``.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from ..config import ConfigError
from ..perturb import chunk_seed

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
PRESETS = ("tiny", "tiny-deep", *OPT_SHAPES)


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


def is_local_dir(model: str) -> bool:
    return model not in PRESETS and (os.sep in model or model.startswith(".") or os.path.exists(model))


def init_group_(modules: list[tuple[str, nn.Module | None]], std: float, seed: int, done: set[int]) -> None:
    """Seeded init of one bucket's modules (OPT's scheme: N(0, std) weights, zero biases, unit
    LayerNorms, zero padding row), from its own generator, so any block can be built alone.
    Parameters in `done` (a tied weight initialised by an earlier bucket) are left alone."""
    gen = torch.Generator().manual_seed(seed)

    def normal_(p: nn.Parameter) -> bool:
        if id(p) in done:
            return False
        done.add(id(p))
        p.normal_(0.0, std, generator=gen)  # in place: no model-sized temporary
        return True

    for _, mod in modules:
        for sub in mod.modules() if mod is not None else ():
            if isinstance(sub, nn.Embedding):
                if normal_(sub.weight) and sub.padding_idx is not None:
                    sub.weight[sub.padding_idx].zero_()
            elif isinstance(sub, nn.Linear):
                normal_(sub.weight)
            elif not isinstance(sub, nn.LayerNorm):
                continue
            if isinstance(sub, nn.LayerNorm) and sub.weight is not None:
                sub.weight.fill_(1.0)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()


@torch.no_grad()
def build_model(model: str, seed: int = 0, device: str | torch.device = "cpu",
                blocks: bool = True) -> OPTForCausalLM:
    """A preset with seeded random weights, or a checkpoint directory loaded offline.

    `device="meta"` gives shapes only. `blocks=False` (presets) materialises the resident
    modules and block 0 (the shell an offloaded adapter runs every block through) and leaves
    blocks 1.. on the meta device: their values come from a store.
    """
    if is_local_dir(model):
        if not os.path.isdir(model):
            raise ConfigError(f"model={model!r}: checkpoint directory does not exist")
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ConfigError(f"model={model!r}: directory has no config.json (not a checkpoint)")
        m = OPTForCausalLM.from_pretrained(model, local_files_only=True, dtype=torch.float32,
                                           attn_implementation="sdpa")
        return m.to(device).eval()
    cfg = opt_config(model)
    with torch.device("meta"):
        m = OPTForCausalLM(cfg)
    if torch.device(device).type == "meta":
        return m.eval()
    from .opt import opt_groups  # the bucket plan decides the init seeds

    groups = [(k, mods) for k, mods in opt_groups(m) if blocks or not k.startswith("block.") or k == "block.0"]
    for _, modules in groups:  # allocate everything first: to_empty on a tied module rewrites the shared weight
        for _, mod in modules:
            if mod is not None:
                mod.to_empty(device="cpu", recurse=True)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.decoder.embed_tokens.weight
    done: set[int] = set()
    for key, modules in groups:
        init_group_(modules, cfg.init_std, chunk_seed(seed, "init", key), done)
    return m.to(device).eval() if blocks else m.eval()


def count_parameters(model: str) -> int:
    """Unique parameters of a preset, counted on the meta device (nothing allocated)."""
    m = build_model(model, device="meta")
    return sum(p.numel() for p in m.parameters())
