"""Prefix tuning through ``peft``: N trained key/value positions in front of every attention layer.

``peft``'s prefix tuning (Li & Liang 2021; one of MeZO's PEFT methods, arXiv 2305.17333, Sec. 3)
keeps one table, ``prompt_encoder.default.embedding.weight`` of shape (N, layers * 2 * H_kv * D)
(H_kv: key/value heads, so a grouped-query model's prefix is narrower than its hidden size),
outside the blocks, and hands the model all layers' prefixes as a KV cache. Here the table joins
the resident-in bucket (perturbed and updated with the embeddings, the base frozen), ``embed``
copies the table as the pass sees it into the block context (each perturbed pass has its own), and
each block's forward receives its own layer's slice through a one-layer cache, with positions
(learned or rotary) and the attention mask running N further, as ``peft`` and the Hugging Face
model do in a whole-model forward. The decoder families (OPT, GPT-2, LLaMA, Qwen2) take a prefix.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from distzo2_lab.config import ConfigError, parse_peft
from distzo2_lab.models.base import TABLE, BlockAdapter  # noqa: F401 (TABLE: the table's name in the PeftModel)
from distzo2_lab.seeds import derive_seed


def prefix_embedding(wrapper: nn.Module | None) -> nn.Embedding | None:
    """The prefix table's module of a ``peft`` prefix-tuned model (None for any other model).

    ``prefix_projection=True`` is refused: its table is N token vectors through an MLP
    (``prompt_encoder.default.transform``) whose parameters would train beside it, and the
    offloaded tiers' seeded rebuild and the saved ``prompt_embeddings`` know the table alone."""
    encoders = getattr(wrapper, "prompt_encoder", None) if wrapper is not None else None
    if not encoders:
        return None
    if getattr(encoders["default"], "transform", None) is not None:
        raise ConfigError("a peft prefix-tuned model with prefix_projection=True: its prefix comes out of an MLP "
                          "(prompt_encoder.default.transform) that is not trained here; "
                          "use PrefixTuningConfig(prefix_projection=False), the table itself")
    return encoders["default"].embedding


@torch.no_grad()
def init_prefix_(weight: torch.Tensor, seed: int) -> None:
    """``peft``'s init of the table (N(0, 1), as nn.Embedding), drawn from its own generator."""
    weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(derive_seed(seed, "prefix", 0)))


def _adapter_classes() -> dict[str, type[BlockAdapter]]:
    """family -> adapter class (every adapter class is defined once the models package is imported,
    which importing this module does)."""
    out, todo = {}, list(BlockAdapter.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if getattr(cls, "family", None):
            out[cls.family] = cls
    return out


def prefix_families() -> tuple[str, ...]:
    """The families whose adapters pass each layer's slice of a prefix table to its block."""
    return tuple(sorted(f for f, cls in _adapter_classes().items() if cls.takes_prefix))


def no_prefix_reason(family: str) -> str:
    """Why `family` takes no prefix, then where prefix tuning runs: the tail of a refusal line."""
    cls = _adapter_classes().get(family)
    why = f"{cls.no_prefix}; " if cls is not None and cls.no_prefix else ""
    return f"{why}prefix tuning runs with model_type {', '.join(map(repr, prefix_families()))}"


def wrap_prefix(model: nn.Module, spec: str, seed: int) -> nn.Module:
    """`model` wrapped by ``peft`` with a prefix of N virtual tokens ('prefix:N') per attention
    layer, no projection MLP (the table is the prefix itself), its values seeded by `seed`."""
    from peft import PrefixTuningConfig, get_peft_model

    family = model.config.model_type
    if family not in prefix_families():
        raise ConfigError(f"peft={spec!r} with model_type={family!r}: {no_prefix_reason(family)}; "
                          "choose peft='lora:R' for this model")
    _, n = parse_peft(spec)
    wrapper = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    init_prefix_(prefix_embedding(wrapper).weight, seed)
    return wrapper


def layer_prefix(table: torch.Tensor, i: int, batch: int, heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Layer i's (key, value), each (B, H, N, D) and expanded over the batch without a copy, from
    a table (N, layers * 2 * H * D) laid out as ``peft``'s get_prompt reads it: per virtual token,
    layer-major, key before value."""
    kv = table.view(table.shape[0], -1, heads, head_dim)  # (N, 2L, H, D)
    return tuple(kv[:, 2 * i + j].transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1) for j in (0, 1))


def layer_cache(table: torch.Tensor, i: int, batch: int, heads: int, head_dim: int, layer_idx: int) -> DynamicCache:
    """A cache holding layer i's prefix at `layer_idx` (the attention module's own index, which the
    shell of an offloaded model keeps at 0): the layer appends its keys and values after it, as it
    does to the all-layer cache ``peft`` builds (keys unrotated: a rotary layer rotates its own)."""
    cache = DynamicCache()
    cache.update(*layer_prefix(table, i, batch, heads, head_dim), layer_idx)
    return cache


def block_cache(adapter: BlockAdapter, table: torch.Tensor, i: int, batch: int) -> DynamicCache:
    """Block i's prefix cache: layer i's slice of `table`, at the layer index of the block's
    attention module (`adapter.attention`; the shell of an offloaded model keeps 0)."""
    attn = getattr(adapter.layers[i], adapter.attention)
    return layer_cache(table, i, batch, *adapter.prefix_heads(), attn.layer_idx)


def cache_argument(layer_class: type) -> str:
    """The name a decoder layer takes its KV cache under: 'cache' from transformers 5.24,
    'past_key_values' before."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def prefix_positions(seq: int, n: int, device: torch.device) -> torch.Tensor:
    """Positions (1, T) of the tokens behind an N-position prefix, as a Hugging Face model counts
    them from its cache's length when no position_ids are given (``peft`` gives none)."""
    return (torch.arange(seq, device=device) + n).unsqueeze(0)


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The attention mask with N leading ones for the prefix, made as ``peft`` makes it."""
    if mask is None:
        return None
    return torch.cat((torch.ones(mask.shape[0], n).to(mask.device), mask), dim=1)  # (B, N + T)
