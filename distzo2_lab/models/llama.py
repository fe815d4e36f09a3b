"""Adapter presenting a LLaMA-style causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``).

Resident-in: the token embedding; blocks: ``model.layers``; resident-out: the final RMSNorm
and lm_head (tied to the embedding or not, as the config says). The rotary embedding has no
parameters: its (cos, sin) are computed once in ``embed`` from the positions and handed to
every block in the context, as ``LlamaModel.forward`` does. Qwen2 may mix full and
sliding-window layers; each layer gets the mask of its type. With a ``peft`` prefix
(models/prefix.py) the rotary positions of the tokens start at N, the masks cover the N prefix
positions too, and each layer's cache holds its slice of the table (num_key_value_heads wide).
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from distzo2_lab.config import ConfigError
from distzo2_lab.models.base import BlockAdapter, BlockContext, Groups
from distzo2_lab.models.masks import causal_mask, sliding_window_causal_mask
from distzo2_lab.models.prefix import block_cache, cache_argument, extend_mask, prefix_positions

_CACHE = cache_argument(LlamaDecoderLayer)  # Qwen2's decoder layer takes it under the same name


class LlamaAdapter(BlockAdapter):
    """embed_tokens | decoder layer x N | norm + lm_head; rotary (cos, sin) in the context."""

    family = "llama"
    model_class = LlamaForCausalLM
    takes_prefix = True

    @staticmethod
    def groups(model) -> Groups:
        m = model.model
        return [
            ("in", [("model.embed_tokens", m.embed_tokens)]),
            *[(f"block.{i}", [(f"model.layers.{i}", layer)]) for i, layer in enumerate(m.layers)],
            ("out", [("model.norm", m.norm), ("lm_head", model.lm_head)]),
        ]

    @staticmethod
    def block_modules(model):
        return model.model.layers

    @staticmethod
    def block_prefix(i: int) -> str:
        return f"model.layers.{i}"

    def _layer_types(self) -> list[str]:
        return list(getattr(self.config, "layer_types", None) or ["full_attention"] * len(self.layers))

    def check_shell(self) -> None:
        kinds = set(self._layer_types())
        if len(kinds) > 1:
            raise ConfigError(f"{self.family}: layer_types mix {sorted(kinds)}; offloading runs every block "
                              "through one shell layer, so the blocks must be of one attention type")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        m, table = self.model.model, self.prefix_now()
        n = 0 if table is None else table.shape[0]
        inputs_embeds = m.embed_tokens(input_ids)  # (B, T, C)
        position_ids = prefix_positions(input_ids.shape[1], n, input_ids.device)  # (1, T)
        past = None if table is None else block_cache(self, table, 0, input_ids.shape[0])  # sizes the masks
        kw = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=extend_mask(attention_mask, n),
                  position_ids=position_ids, cache=past)
        masks = {"full_attention": causal_mask(**kw)}
        if "sliding_attention" in self._layer_types():
            masks["sliding_attention"] = sliding_window_causal_mask(**kw)
        rotary = m.rotary_emb(inputs_embeds, position_ids=position_ids)  # (cos, sin), each (1, T, D)
        return inputs_embeds, BlockContext(masks["full_attention"], position_ids, rotary, masks, prefix=table)

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        mask = ctx.masks[self._layer_types()[i]]
        cache = None if ctx.prefix is None else block_cache(self, ctx.prefix, i, hidden.shape[0])
        return self.layers[i](hidden, attention_mask=mask, position_embeddings=ctx.position_embeddings,
                              position_ids=ctx.position_ids, use_cache=False, **{_CACHE: cache})

    def head(self, hidden: torch.Tensor, ctx=None) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, T, V)."""
        return self.model.lm_head(self.model.model.norm(hidden))


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: LLaMA's layout with q/k/v biases and optional sliding-window layers."""

    family = "qwen2"
    model_class = Qwen2ForCausalLM
