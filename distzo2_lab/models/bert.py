"""Adapter presenting a BERT-family encoder with a classification head
(``BertForSequenceClassification``; e.g. the pretrained all-MiniLM-L6-v2).

Encoder blocks stream exactly like decoder blocks (ZO2, arXiv 2503.12668, Sec. 3.1): the
resident-in bucket is the embeddings (word, position, token type, LayerNorm), the blocks are
``bert.encoder.layer``, the resident-out bucket is the pooler and the classifier. Attention is
bidirectional with the padding mask built as ``BertModel`` builds it; the head reads the [CLS]
position and gives one row of K logits per sequence; the loss is the mean cross-entropy against
one label per sequence (B,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification
from transformers.masking_utils import create_bidirectional_mask

from ..config import ConfigError
from .base import BlockAdapter, BlockContext, Groups


class BertAdapter(BlockAdapter):
    """embeddings | BertLayer x N | pooler + classifier; labels (B,) class indices."""

    family = "bert"
    model_class = BertForSequenceClassification
    causal = False

    def __init__(self, model: BertForSequenceClassification, storage: str = "fp32"):
        if model.config.is_decoder:
            raise ConfigError("BertAdapter drives a bidirectional encoder; this config has is_decoder=True")
        if model.bert.pooler is None:
            raise ConfigError("BertAdapter needs the pooler (BertModel(add_pooling_layer=True))")
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
        return hidden, BlockContext(mask)

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self.layers[i](hidden, ctx.attention_mask)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, K) from the [CLS] position (pooler, then classifier)."""
        pooled = self.model.bert.pooler(hidden)  # (B, C)
        return self.model.classifier(self.model.dropout(pooled))  # (B, K)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in fp32 of logits (B, K) against class indices (B,); -100 ignored."""
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ConfigError(f"a sequence classifier takes labels (batch,) of class indices, got shape "
                              f"{tuple(labels.shape)} for logits {tuple(logits.shape)}")
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)
