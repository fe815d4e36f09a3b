"""Adapter presenting a Hugging Face ``OPTForCausalLM`` as ZO2 sees it.

ZO2 (arXiv 2503.12668, Sec. 3.1) splits the model into resident-in modules (token and position
embeddings, project_in), N homogeneous transformer blocks that stream, and resident-out modules
(final LayerNorm, project_out, lm_head). We drive the blocks ourselves with the same calls the
stock ``OPTDecoder.forward`` makes (no monkeypatching), so the block-by-block logits equal the
stock ones. lm_head is tied to embed_tokens: one Parameter, kept in the resident-in bucket only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTForCausalLM
from transformers.masking_utils import create_causal_mask

from ..config import ConfigError
from .buckets import ParamBucket


def opt_groups(model: OPTForCausalLM) -> list[tuple[str, list[tuple[str, nn.Module | None]]]]:
    """The bucket plan: (key, [(parameter-name prefix, module)]) for in, block.0..N-1, out."""
    dec, d = model.model.decoder, "model.decoder."
    return [
        ("in", [(d + "embed_tokens", dec.embed_tokens), (d + "embed_positions", dec.embed_positions),
                (d + "project_in", dec.project_in)]),
        *[(f"block.{i}", [(f"{d}layers.{i}", layer)]) for i, layer in enumerate(dec.layers)],
        ("out", [(d + "final_layer_norm", dec.final_layer_norm), (d + "project_out", dec.project_out),
                 ("lm_head", model.lm_head)]),
    ]


def unique_params(modules: list[tuple[str, nn.Module | None]], seen: set[int]) -> list[tuple[str, nn.Parameter]]:
    """(full name, parameter) of each parameter not yet in `seen` (a tied weight counts once)."""
    out = []
    for prefix, mod in modules:
        if mod is None:
            continue
        for pname, p in mod.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"{prefix}.{pname}", p))
    return out


@dataclass
class BlockContext:
    """What every block needs besides the hidden states (same for +eps and -eps passes)."""

    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor


class OPTAdapter:
    """resident-in bucket, one bucket per decoder block, resident-out bucket, and the loss."""

    def __init__(self, model: OPTForCausalLM, storage: str = "fp32"):
        model.eval().requires_grad_(False)
        self.model = model
        self.config = model.config
        self.decoder = model.model.decoder
        self.layers = list(self.decoder.layers)
        seen: set[int] = set()
        groups = [(key, unique_params(mods, seen)) for key, mods in opt_groups(model)]
        self.bucket_in = ParamBucket(groups[0][0], groups[0][1], storage)
        self.blocks = [ParamBucket(key, params, storage) for key, params in groups[1:-1]]
        self.bucket_out = ParamBucket(groups[-1][0], groups[-1][1], storage)
        self.offloaded = any(b.master is None for b in self.blocks)
        if self.offloaded:
            # Blocks live in a store (ZO2's offloading): every block runs through one materialised
            # shell module whose parameters are re-pointed at the working buffer of the visit.
            shell = self.layers[0]
            if any(p.is_meta for p in shell.parameters()):
                raise RuntimeError("an offloaded adapter needs layer 0 materialised as the block shell")
            self.layers = [shell] * len(self.layers)
            shell_params = dict(shell.named_parameters())
            for i, b in enumerate(self.blocks):
                b.detach()  # block 0 too: its values come from the store like every other block's
                prefix = f"model.decoder.layers.{i}."
                for slot in b.slots:
                    slot.param = shell_params[slot.name[len(prefix):]]
            self.blocks[0].unbind()  # the shell holds nothing between visits
        n_model = sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
        n_ours = sum(b.numel for b in self.buckets)
        if n_model != n_ours:
            raise RuntimeError(f"adapter covers {n_ours} of {n_model} parameters")

    @property
    def buckets(self) -> list[ParamBucket]:
        """Every bucket in canonical order: in, block.0 ... block.N-1, out."""
        return [self.bucket_in, *self.blocks, self.bucket_out]

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def check_batch(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ConfigError(f"input_ids must be a non-empty (batch, seq) tensor, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_positions:
            raise ConfigError(f"seq_len={input_ids.shape[1]} is longer than the model's "
                              f"max_position_embeddings={self.max_positions}")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Resident-in modules: tokens -> (hidden (B, T, C), BlockContext). Mirrors OPTDecoder."""
        dec = self.decoder
        inputs_embeds = dec.embed_tokens(input_ids)  # (B, T, E)
        pos_mask = attention_mask
        if pos_mask is None:
            pos_mask = torch.ones(input_ids.shape, device=input_ids.device)
        position_ids = (torch.cumsum(pos_mask, dim=1) * pos_mask - 1).long()  # (B, T)
        causal = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                    attention_mask=attention_mask, cache=None)
        pos = dec.embed_positions(pos_mask, 0, position_ids=position_ids)  # (B, T, C)
        if dec.project_in is not None:
            inputs_embeds = dec.project_in(inputs_embeds)
        return inputs_embeds + pos, BlockContext(causal, position_ids)

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self.layers[i](hidden, attention_mask=ctx.attention_mask,
                              position_ids=ctx.position_ids, cache=None, use_cache=False)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Resident-out modules: hidden (B, T, C) -> logits (B, T, V)."""
        dec = self.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return self.model.lm_head(hidden)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32; label -100 is ignored."""
        v = logits.shape[-1]
        shift = logits[:, :-1].reshape(-1, v).float()  # (B*(T-1), V)
        return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block-by-block logits with the current parameters."""
        hidden, ctx = self.embed(input_ids, attention_mask)
        for i in range(len(self.layers)):
            hidden = self.run_block(i, hidden, ctx)
        return self.head(hidden)
