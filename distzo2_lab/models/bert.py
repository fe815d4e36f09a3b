"""Adapter presenting a BERT-family encoder with a classification head
(``BertForSequenceClassification``; e.g. the pretrained all-MiniLM-L6-v2).

Encoder blocks stream exactly like decoder blocks (ZO2, arXiv 2503.12668, Sec. 3.1): the
resident-in bucket is the embeddings (word, position, token type, LayerNorm), the blocks are
``bert.encoder.layer``, the resident-out bucket is the pooler and the classifier. Attention is
bidirectional with the padding mask built as ``BertModel`` builds it; the loss is the mean
cross-entropy against one label per sequence (B,).

What the classifier reads is the config's ``classifier_pooling``:

- ``cls``: the pooler (dense + tanh) at the [CLS] position, as ``BertForSequenceClassification``
  does; the default of a plain BERT checkpoint.
- ``mean``: the mean of the last hidden states over the non-padding tokens.
- ``mean_normalized``: that mean scaled to unit length: a sentence-transformers model's embedding
  (Pooling with mean tokens, then Normalize), e.g. all-MiniLM-L6-v2, which never trained its
  pooler.

Without the field, a sentence-transformers directory (``modules.json``, ``1_Pooling/config.json``)
decides; the adapter writes the choice into the config, so the checkpoints a run saves keep it.
The padding mask reaches the head through the context embed() returned (``head(hidden, ctx)``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification
from transformers.masking_utils import create_bidirectional_mask

from distzo2_lab.config import ConfigError
from distzo2_lab.models.base import BlockAdapter, BlockContext, Groups

POOLINGS = ("cls", "mean", "mean_normalized")


def sentence_transformers_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers model directory declares, or None if it is not one."""
    modules, pool = os.path.join(path, "modules.json"), os.path.join(path, "1_Pooling", "config.json")
    if not (os.path.isfile(modules) and os.path.isfile(pool)):
        return None
    with open(pool) as f:
        p = json.load(f)
    with open(modules) as f:
        normalize = any(m.get("type", "").endswith(".Normalize") for m in json.load(f))
    modes = sorted(k for k, v in p.items() if k.startswith("pooling_mode_") and v)
    if modes == ["pooling_mode_cls_token"]:
        return "cls"  # the token's last hidden state, not the pooler: we know no such model; the pooler is closest
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean_normalized" if normalize else "mean"
    raise ConfigError(f"{pool}: pooling {', '.join(modes) or 'none'} is not supported; "
                      f"classifier_pooling can be one of {', '.join(POOLINGS)}")


def pooling_of(config) -> str:
    """``config.classifier_pooling``, else what its sentence-transformers directory declares, else 'cls'."""
    mode = getattr(config, "classifier_pooling", None)
    if mode is None:
        path = getattr(config, "_name_or_path", "") or ""
        mode = (sentence_transformers_pooling(path) if os.path.isdir(path) else None) or "cls"
    if mode not in POOLINGS:
        raise ConfigError(f"classifier_pooling={mode!r} is not valid; choose one of {', '.join(POOLINGS)}")
    return mode


@dataclass
class BertContext(BlockContext):
    """BlockContext plus the (B, T) padding mask (1 = token) the mean pooling reads."""

    padding: torch.Tensor | None = None


class BertAdapter(BlockAdapter):
    """embeddings | BertLayer x N | pooler + classifier; labels (B,) class indices."""

    family = "bert"
    model_class = BertForSequenceClassification
    causal = False
    # peft hands a prefix to a classifier only through a forward argument named past_key_values,
    # which transformers 5.24 renamed to cache: peft's own forward of such a model raises
    no_prefix = ("peft's prefix tuning cannot run a BERT classifier with this transformers (peft looks for a "
                 "past_key_values argument that BertModel.forward names cache)")

    def __init__(self, model: BertForSequenceClassification, storage: str = "fp32"):
        if model.config.is_decoder:
            raise ConfigError("BertAdapter drives a bidirectional encoder; this config has is_decoder=True")
        if model.bert.pooler is None:
            raise ConfigError("BertAdapter needs the pooler (BertModel(add_pooling_layer=True))")
        self.pooling = pooling_of(model.config)
        model.config.classifier_pooling = self.pooling  # saved with every checkpoint of this model
        super().__init__(model, storage)

    @property
    def num_labels(self) -> int:
        return self.model.classifier.out_features

    @staticmethod
    def groups(model: BertForSequenceClassification) -> Groups:
        b = model.bert
        return [
            ("in", [("bert.embeddings", b.embeddings)]),
            *[(f"block.{i}", [(f"bert.encoder.layer.{i}", layer)]) for i, layer in enumerate(b.encoder.layer)],
            ("out", [("bert.pooler", b.pooler), ("classifier", model.classifier)]),
        ]

    @staticmethod
    def block_modules(model: BertForSequenceClassification):
        return model.bert.encoder.layer

    @staticmethod
    def block_prefix(i: int) -> str:
        return f"bert.encoder.layer.{i}"

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """tokens (B, T) -> (hidden (B, T, C), context with the (B, 1, T, T) padding mask or None)."""
        hidden = self.model.bert.embeddings(input_ids=input_ids)  # (B, T, C); token types all 0
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return hidden, BertContext(mask, padding=attention_mask)

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self.layers[i](hidden, ctx.attention_mask)

    def pool(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        """hidden (B, T, C) of the last block -> (B, C) what the classifier reads; `ctx` (from
        embed) carries the padding mask the mean pooling skips (None: no padding)."""
        if self.pooling == "cls":
            return self.model.bert.pooler(hidden)  # (B, C)
        mask = getattr(ctx, "padding", None)
        if mask is None:
            pooled = hidden.mean(dim=1)  # (B, C) no padding
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # (B, C)
        return F.normalize(pooled, dim=-1) if self.pooling == "mean_normalized" else pooled

    def head(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, K): the pooled vector (see `classifier_pooling`), then the classifier."""
        return self.model.classifier(self.model.dropout(self.pool(hidden, ctx)))  # (B, K)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in fp32 of logits (B, K) against class indices (B,); -100 ignored."""
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ConfigError(f"a sequence classifier takes labels (batch,) of class indices, got shape "
                              f"{tuple(labels.shape)} for logits {tuple(logits.shape)}")
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)
