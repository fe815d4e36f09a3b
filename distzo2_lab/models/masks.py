"""Attention masks from transformers' masking utilities, across the 5.x releases.

transformers 5.24 renamed the mask builders' required ``past_key_values`` argument to ``cache``
(the old name is deprecated until 5.40); the blocks here never use a KV cache, so these wrappers
pass "no cache" under whichever name the installed release expects.
"""
from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}


def causal_mask(**kw):
    """``create_causal_mask`` without a KV cache."""
    return create_causal_mask(**kw, **_NO_CACHE)


def sliding_window_causal_mask(**kw):
    """``create_sliding_window_causal_mask`` without a KV cache."""
    return create_sliding_window_causal_mask(**kw, **_NO_CACHE)
