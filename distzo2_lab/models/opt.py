"""Adapter presenting a Hugging Face ``OPTForCausalLM`` as ZO2 sees it.

ZO2 (arXiv 2503.12668, Sec. 3.1) splits the model into resident-in modules (token and position
embeddings, project_in), N homogeneous transformer blocks that stream, and resident-out modules
(final LayerNorm, project_out, lm_head). We drive the blocks ourselves with the same calls the
stock ``OPTDecoder.forward`` makes (no monkeypatching), so the block-by-block logits equal the
stock ones. lm_head is tied to embed_tokens: one Parameter, kept in the resident-in bucket only.
With a ``peft`` prefix (models/prefix.py) the calls are those the stock decoder makes when peft
hands it the prefix as a KV cache: positions and the mask run N further, each layer gets its slice.
"""
from __future__ import annotations

import torch
from transformers import OPTForCausalLM
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from distzo2_lab.models.base import BlockAdapter, BlockContext, Groups, unique_params
from distzo2_lab.models.masks import causal_mask
from distzo2_lab.models.prefix import block_cache, cache_argument, extend_mask

__all__ = ["BlockContext", "OPTAdapter", "opt_groups", "unique_params"]

# the decoder layer's cache argument: 'cache' from transformers 5.24, 'past_key_values' before
_CACHE = cache_argument(OPTDecoderLayer)


def opt_groups(model: OPTForCausalLM) -> Groups:
    """The bucket plan: (key, [(parameter-name prefix, module)]) for in, block.0..N-1, out."""
    dec, d = model.model.decoder, "model.decoder."
    return [
        ("in", [(d + "embed_tokens", dec.embed_tokens), (d + "embed_positions", dec.embed_positions),
                (d + "project_in", dec.project_in)]),
        *[(f"block.{i}", [(f"{d}layers.{i}", layer)]) for i, layer in enumerate(dec.layers)],
        ("out", [(d + "final_layer_norm", dec.final_layer_norm), (d + "project_out", dec.project_out),
                 ("lm_head", model.lm_head)]),
    ]


class OPTAdapter(BlockAdapter):
    """resident-in bucket, one bucket per decoder block, resident-out bucket, and the loss."""

    family = "opt"
    model_class = OPTForCausalLM
    takes_prefix = True

    def __init__(self, model: OPTForCausalLM, storage: str = "fp32", prefix=None):
        self.decoder = model.model.decoder
        super().__init__(model, storage, prefix)

    groups = staticmethod(opt_groups)

    @staticmethod
    def block_modules(model: OPTForCausalLM):
        return model.model.decoder.layers

    @staticmethod
    def block_prefix(i: int) -> str:
        return f"model.decoder.layers.{i}"

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Resident-in modules: tokens -> (hidden (B, T, C), BlockContext). Mirrors OPTDecoder; with
        a prefix of N positions, as it runs behind a cache already holding N."""
        dec, table = self.decoder, self.prefix_now()
        n = 0 if table is None else table.shape[0]
        inputs_embeds = dec.embed_tokens(input_ids)  # (B, T, E)
        mask = extend_mask(attention_mask, n)  # (B, N + T) or None
        pos_mask = mask
        if pos_mask is None:
            pos_mask = torch.ones(input_ids.shape[0], n + input_ids.shape[1], device=input_ids.device)
        position_ids = (torch.cumsum(pos_mask, dim=1) * pos_mask - 1).long()[:, n:]  # (B, T)
        past = None if table is None else block_cache(self, table, 0, input_ids.shape[0])  # sizes the mask
        causal = causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=mask, cache=past)
        pos = dec.embed_positions(pos_mask, n, position_ids=position_ids)  # (B, T, C)
        if dec.project_in is not None:
            inputs_embeds = dec.project_in(inputs_embeds)
        return inputs_embeds + pos, BlockContext(causal, position_ids, prefix=table)

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        cache = None if ctx.prefix is None else block_cache(self, ctx.prefix, i, hidden.shape[0])
        return self.layers[i](hidden, attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
                              use_cache=False, **{_CACHE: cache})

    def head(self, hidden: torch.Tensor, ctx=None) -> torch.Tensor:
        """Resident-out modules: hidden (B, T, C) -> logits (B, T, V)."""
        dec = self.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return self.model.lm_head(hidden)
