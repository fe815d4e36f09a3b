"""Adapter presenting a Hugging Face ``GPT2LMHeadModel`` as ZO2 sees it.

Resident-in: token and learned position embeddings (wte, wpe); blocks: ``transformer.h``;
resident-out: final LayerNorm and lm_head. GPT-2's projections are ``Conv1D`` (a Linear with a
transposed (in, out) weight): to a flat bucket it is just another tensor. lm_head is tied to wte:
one Parameter, kept in the resident-in bucket only. The calls mirror ``GPT2Model.forward``
(positions 0..T-1 whatever the padding, as the stock model does without position_ids). With a
``peft`` prefix (models/prefix.py) they are those it makes behind peft's KV cache: positions
N..N+T-1, the mask N longer, each block's attention given its layer's slice.
"""
from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel

from distzo2_lab.models.base import BlockAdapter, BlockContext, Groups
from distzo2_lab.models.masks import causal_mask
from distzo2_lab.models.prefix import block_cache, extend_mask, prefix_positions


class GPT2Adapter(BlockAdapter):
    """wte + wpe | GPT2Block x N | ln_f + lm_head (tied to wte)."""

    family = "gpt2"
    model_class = GPT2LMHeadModel
    takes_prefix = True
    attention = "attn"

    @staticmethod
    def groups(model: GPT2LMHeadModel) -> Groups:
        t, p = model.transformer, "transformer."
        return [
            ("in", [(p + "wte", t.wte), (p + "wpe", t.wpe)]),
            *[(f"block.{i}", [(f"{p}h.{i}", layer)]) for i, layer in enumerate(t.h)],
            ("out", [(p + "ln_f", t.ln_f), ("lm_head", model.lm_head)]),
        ]

    @staticmethod
    def block_modules(model: GPT2LMHeadModel):
        return model.transformer.h

    @staticmethod
    def block_prefix(i: int) -> str:
        return f"transformer.h.{i}"

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        t, table = self.model.transformer, self.prefix_now()
        n = 0 if table is None else table.shape[0]
        inputs_embeds = t.wte(input_ids)  # (B, T, C)
        position_ids = prefix_positions(input_ids.shape[1], n, input_ids.device)  # (1, T)
        hidden = inputs_embeds + t.wpe(position_ids)  # (B, T, C)
        past = None if table is None else block_cache(self, table, 0, input_ids.shape[0])  # sizes the mask
        mask = extend_mask(attention_mask, n)  # (B, N + T) or None
        causal = causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=mask,
                             position_ids=position_ids, cache=past)
        return t.drop(hidden), BlockContext(causal, position_ids, prefix=table)

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        cache = None if ctx.prefix is None else block_cache(self, ctx.prefix, i, hidden.shape[0])
        return self.layers[i](hidden, cache, ctx.attention_mask, None, encoder_attention_mask=None,
                              use_cache=False, position_ids=ctx.position_ids)

    def head(self, hidden: torch.Tensor, ctx=None) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, T, V)."""
        return self.model.lm_head(self.model.transformer.ln_f(hidden))
