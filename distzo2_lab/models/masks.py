"""Attention masks from transformers' masking utilities, across the 5.x releases.

transformers 5.24 renamed the mask builders' required ``past_key_values`` argument to ``cache``
(the old name is deprecated until 5.40); the blocks here use a KV cache only for a prefix (prefix
tuning), so these wrappers pass "no cache", or the prefix's, under whichever name the installed
release expects.
"""
from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

_CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def causal_mask(cache=None, **kw):
    """``create_causal_mask`` without a KV cache, or with `cache` (a prefix the queries follow)."""
    return create_causal_mask(**kw, **{_CACHE: cache})


def sliding_window_causal_mask(cache=None, **kw):
    """``create_sliding_window_causal_mask`` without a KV cache, or with `cache` (a prefix)."""
    return create_sliding_window_causal_mask(**kw, **{_CACHE: cache})
