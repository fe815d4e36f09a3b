"""Training data: an embedded synthetic task and causal-LM training on a text or TSV file.

Every batch is a pure function of (run seed, step), so a resumed run and every rank of a
distributed run see exactly the data an uninterrupted single-rank run would see.
"""
from __future__ import annotations

import os

import torch

from distzo2_lab.config import ConfigError


def _generator(seed: int, step: int) -> torch.Generator:
    from distzo2_lab.seeds import derive_seed

    return torch.Generator().manual_seed(derive_seed(seed, "data", step))


class SyntheticTask:
    """Counting sequences over a small alphabet: x[i+1] = offset + (x[i] - offset + 1) mod K.

    The first token of each row is random; everything after it is predictable, so the loss can
    fall from ln(vocab) towards ln(K) / T quickly: a visible signal within a few hundred ZO steps.
    """

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0,
                 alphabet: int = 16, offset: int = 4):
        if offset + alphabet > vocab_size:
            raise ConfigError(f"synthetic task needs vocab_size >= {offset + alphabet}, model has {vocab_size}")
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.alphabet, self.offset = alphabet, offset

    def batch(self, step: int) -> dict:
        g = _generator(self.seed, step)
        start = torch.randint(0, self.alphabet, (self.batch_size, 1), generator=g)  # (B, 1)
        ids = self.offset + (start + torch.arange(self.seq_len)) % self.alphabet  # (B, T)
        return {"input_ids": ids, "labels": ids}


class ByteTokenizer:
    """Bytes 0..255 -> ids 4..259 (ids 0-3 left for OPT's special tokens); no download."""

    offset = 4
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", "replace")


def read_text(path: str) -> str:
    """A .txt file whole, or the first column of a .tsv file (header skipped)."""
    if not os.path.isfile(path):
        raise ConfigError(f"data={path!r}: file does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if path.endswith(".tsv"):
        lines = [ln.split("\t", 1)[0] for ln in lines[1:] if ln.strip()]
    text = "\n".join(lines)
    if not text.strip():
        raise ConfigError(f"data={path!r}: file holds no text")
    return text


class TextTask:
    """Causal LM on one file: the token stream is cut into windows of seq_len tokens."""

    def __init__(self, path: str, tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 vocab_size: int | None = None):
        ids = tokenizer.encode(read_text(path))
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ConfigError(f"data={path!r}: token id {max(ids)} does not fit the model's vocab_size={vocab_size}")
        n_windows = len(ids) // seq_len
        if n_windows < 1:
            raise ConfigError(f"data={path!r}: {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
        self.windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)  # (W, T)
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> dict:
        rows = torch.randint(0, self.windows.shape[0], (self.batch_size,), generator=_generator(self.seed, step))
        ids = self.windows[rows]  # (B, T)
        return {"input_ids": ids, "labels": ids}


def tokenizer_for(model: str):
    """A checkpoint's own tokenizer from its directory, else the byte tokenizer."""
    from distzo2_lab.models.presets import is_local_dir

    if is_local_dir(model) and os.path.exists(os.path.join(model, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    return ByteTokenizer()
