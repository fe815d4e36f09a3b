"""A tokenizer built on this machine for random-init models: byte-level BPE trained on the train split.

A random-init preset has no tokenizer of its own and nothing may be downloaded, so we train a
small byte-level BPE with the Hugging Face ``tokenizers`` library on the sentences of the task's
training file and cache it (keyed by the file's bytes and the vocabulary size). Special tokens
sit where OPT keeps them (<s>=0, <pad>=1, </s>=2, <unk>=3); every sequence starts with </s> as
OPT's does. The label words of the SST-2 prompt are added as whole tokens so that each one is a
single id, as it is in OPT's and GPT-2's own vocabularies.
"""
from __future__ import annotations

import hashlib
import os

from distzo2_lab.config import ConfigError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
FORMAT = 1  # bump when the recipe below changes: cached files of another recipe are not reused


def cache_dir() -> str:
    """$DISTZO2_CACHE, else $XDG_CACHE_HOME/distzo2_lab, else ~/.cache/distzo2_lab."""
    if os.environ.get("DISTZO2_CACHE"):
        return os.environ["DISTZO2_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distzo2_lab")


def _train(sentences: list[str], vocab_size: int, whole_words: tuple[str, ...]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # byte alphabet (256) + specials + whole words must fit; the rest of the budget goes to merges
    n_merged = vocab_size - len(whole_words)
    trainer = trainers.BpeTrainer(vocab_size=n_merged, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer)
    tok.add_tokens([AddedToken(w, normalized=False) for w in whole_words])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return tok


def local_tokenizer(sentences: list[str], vocab_size: int, whole_words: tuple[str, ...] = ()):
    """A ``PreTrainedTokenizerFast`` trained on `sentences`, at most `vocab_size` ids.

    The trained tokenizer is cached under :func:`cache_dir`; a second call reads the cache."""
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIALS) + len(whole_words) + 16
    if vocab_size < min_vocab:
        raise ConfigError(f"a local byte-level BPE needs vocab_size >= {min_vocab}; the model has {vocab_size}")
    text = "\n".join(sentences).encode()
    key = hashlib.sha256(text + repr((FORMAT, vocab_size, whole_words)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), "tokenizers", f"bpe-{vocab_size}-{key}.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
    else:
        tok = _train(list(sentences), vocab_size, whole_words)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        tok.save(tmp)
        os.replace(tmp, path)  # atomic: two processes building at once both end with one whole file
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")
