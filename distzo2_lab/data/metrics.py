"""The suite's metrics: SQuAD's token F1 and exact match, and a continuation's mean log-likelihood.

SQuAD v1.1's official evaluation normalises both strings (lower case, punctuation and the
articles a / an / the removed, whitespace collapsed), then scores exact match and the F1 of the
bag of tokens, taking the best over the gold answers; MeZO reports F1 (arXiv 2305.17333,
Table 1). Multiple-choice tasks (COPA) pick the candidate whose tokens have the highest mean
log-likelihood under the model, as MeZO's evaluation does.
"""
from __future__ import annotations

import re
import string
from collections import Counter

import torch
import torch.nn.functional as F

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised token bags (0 when they share nothing)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: tuple[str, ...] | list[str]) -> dict:
    """{'exact_match', 'f1'} of one prediction: the best over the gold answers."""
    return {"exact_match": max(exact_match(prediction, g) for g in golds),
            "f1": max(token_f1(prediction, g) for g in golds)}


def mean_loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean log-probability of each row's labelled tokens (label -100 ignored), in fp32.

    logits (B, T, V) at position t predict token t + 1, as in the causal-LM loss."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nxt = labels[:, 1:]  # (B, T-1)
    keep = nxt != -100
    picked = logp.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * keep).sum(1) / keep.sum(1).clamp(min=1)
