"""MeZO's task suite from its published files: RTE, CB, BoolQ, WiC, COPA and SQuAD as prompt tasks.

MeZO (arXiv 2305.17333, Sec. 3, App. E) samples 1,000 training and 500 validation examples
from a task's training file (or k per class), evaluates on the published dev / val file and
turns every example into a prompt for a causal LM (:mod:`distzo2_lab.data.prompts`). A
classification task trains on cross-entropy over its label words' logits (the adapter's
``choices``, as SST-2 does); COPA and SQuAD train on the language-modelling loss of the gold
continuation. CB and COPA have fewer than 1,000 training examples: they keep 100 for validation
and train on at most the rest. Every batch is a pure function of (run seed, step). SST-2 keeps
its own module (:mod:`distzo2_lab.data.sst2`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from distzo2_lab.config import ConfigError
from distzo2_lab.data.formats import Record, read_jsonl, read_squad, read_tsv
from distzo2_lab.data.prompts import TEMPLATES, Template
from distzo2_lab.data.sst2 import pad_rows, word_ids

EVAL_STEP = 10**9  # as in train.py: batches from here on come from the validation sample
SPLITS = ("train", "validation", "dev")
_BOOL = {"false": 0, "true": 1}


@dataclass(frozen=True)
class Spec:
    """Where a task's files are, how they read, its classes (None: no classes) and validation size."""

    train: str
    dev: str
    read: Callable[[str], list[Record]]
    classes: tuple[int, ...] | None
    n_val: int = 500


SPECS: dict[str, Spec] = {
    "rte": Spec("train.tsv", "dev.tsv",
                lambda p: read_tsv(p, ("sentence1", "sentence2"), {"entailment": 0, "not_entailment": 1}), (0, 1)),
    "cb": Spec("train.jsonl", "val.jsonl",
               lambda p: read_jsonl(p, ("premise", "hypothesis"), {"entailment": 0, "contradiction": 1, "neutral": 2}),
               (0, 1, 2), n_val=100),
    "boolq": Spec("train.jsonl", "val.jsonl", lambda p: read_jsonl(p, ("question", "passage"), _BOOL), (0, 1)),
    "wic": Spec("train.jsonl", "val.jsonl", lambda p: read_jsonl(p, ("word", "sentence1", "sentence2"), _BOOL), (0, 1)),
    "copa": Spec("train.jsonl", "val.jsonl",
                 lambda p: read_jsonl(p, ("premise", "choice1", "choice2", "question"), {"0": 0, "1": 1},
                                      {"question": ("cause", "effect")}), (0, 1), n_val=100),
    "squad": Spec("train-v1.1.json", "dev-v1.1.json", read_squad, None),
}
NAMES = tuple(SPECS)


def split_file(name: str, data_dir: str, split: str) -> str:
    """The file a split reads: train and validation are samples of the training file."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not valid for task={name!r}; choose one of {', '.join(SPLITS)} "
                          "(the published test files have no labels)")
    spec = SPECS[name]
    file = spec.dev if split == "dev" else spec.train
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data={data_dir!r}: directory does not exist (task={name!r} reads {spec.train}, {spec.dev})")
    path = os.path.join(data_dir, file)
    if not os.path.isfile(path):
        raise ConfigError(f"data={data_dir!r} has no {file} (task={name!r}, split={split!r} reads it)")
    return path


def read_split(name: str, data_dir: str, split: str) -> list[Record]:
    return SPECS[name].read(split_file(name, data_dir, split))


def _perm(n: int, seed: int, key: str) -> list[int]:
    from distzo2_lab.seeds import derive_seed

    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, key, 0))).tolist()


def sample(name: str, records: list[Record], seed: int, n_train: int = 1000, n_val: int | None = None,
           shots: int | None = None) -> tuple[list[Record], list[Record]]:
    """Disjoint (train, validation) samples: n_val for validation and at most n_train of the rest
    for training, or `shots` of each class for both (`shots` examples for a task without classes)."""
    n_val = SPECS[name].n_val if n_val is None else n_val
    if shots is None:
        if n_val >= len(records):
            raise ConfigError(f"{n_val} validation examples and at least one training example requested, the file "
                              f"has {len(records)}; a smaller file can be sampled k-shot (shots=K)")
        idx, n_tr = _perm(len(records), seed, f"{name}-sample"), min(n_train, len(records) - n_val)
        return [records[i] for i in idx[:n_tr]], [records[i] for i in idx[n_tr:n_tr + n_val]]
    train, val = [], []
    for c in SPECS[name].classes or (None,):
        pool = [r for r in records if c is None or r.label == c]
        if 2 * shots > len(pool):
            which = "examples" if c is None else f"examples of label {c}"
            raise ConfigError(f"shots={shots} needs {2 * shots} {which} (train + validation); the file has {len(pool)}")
        idx = _perm(len(pool), seed, f"{name}-shots-{c}")
        train += [pool[i] for i in idx[:shots]]
        val += [pool[i] for i in idx[shots:2 * shots]]
    return train, val


# -- encodings ------------------------------------------------------------------------------------
def fit_prompt(head: list[int], budget: int, specials: set[int]) -> list[int]:
    """The prompt's ids cut from the left to `budget` (a leading special token stays): the question
    and the cue before the answer survive, the start of a long passage goes."""
    if len(head) <= budget:
        return head
    keep = head[:1] if head and head[0] in specials else []
    return keep + head[len(head) - max(1, budget - len(keep)):]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], seq_len: int) -> dict:
    """Rows prompt + continuation, at most seq_len ids; labels -100 except the continuation's ids."""
    specials = set(tokenizer.all_special_ids)
    rows, starts = [], []
    for prompt, cont in pairs:
        tail = tokenizer(cont, add_special_tokens=False)["input_ids"][: seq_len - 1]
        head = fit_prompt(tokenizer(prompt, add_special_tokens=True)["input_ids"], seq_len - len(tail), specials)
        rows.append(head + tail)
        starts.append(len(head))
    ids, mask = pad_rows(rows, tokenizer)  # (B, T)
    labels = torch.full_like(ids, -100)
    for i, (s, r) in enumerate(zip(starts, rows)):
        labels[i, s : len(r)] = ids[i, s : len(r)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- the task -------------------------------------------------------------------------------------
class PromptTask:
    """Sampled train / validation records of one suite task and their batches, for a causal LM.

    ``choices`` holds the label-word ids of a classification task (None otherwise). Training
    batches walk seeded permutations of the train sample, one per epoch, so batch(step) is a
    pure function of (seed, step).
    """

    def __init__(self, name: str, data_dir: str, tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 shots: int | None = None, n_train: int = 1000, n_val: int | None = None,
                 vocab_size: int | None = None):
        if name not in SPECS:
            raise ConfigError(f"task={name!r} is not valid; choose one of {', '.join(NAMES)}")
        self.name, self.template = name, TEMPLATES[name]
        self.data_dir, self.tokenizer, self.seq_len, self.batch_size, self.seed = (
            data_dir, tokenizer, seq_len, batch_size, seed)
        self.train, self.validation = sample(name, read_split(name, data_dir, "train"), seed, n_train, n_val, shots)
        self.choices = word_ids(tokenizer, self.template.words) if self.template.kind == "classify" else None
        self._perms: dict[int, list[int]] = {}
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} ids; the model's vocab_size is {vocab_size}")

    @property
    def kind(self) -> str:
        return self.template.kind

    def encode(self, records: list[Record]) -> dict:
        t = self.template
        return encode_pairs(self.tokenizer, [(t.prompt(r), t.target(r)) for r in records], self.seq_len)

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a batch spans at most two epochs
                self._perms.clear()
            self._perms[epoch] = _perm(len(self.train), self.seed, f"{self.name}-epoch-{epoch}")
        return self._perms[epoch]

    def rows(self, step: int) -> list[Record]:
        if step >= EVAL_STEP:  # the train loop's held-out batch
            return self.validation[: self.batch_size]
        n = len(self.train)
        return [self.train[self._epoch(i // n)[i % n]]
                for i in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def batch(self, step: int) -> dict:
        return self.encode(self.rows(step))

    def examples(self, split: str, limit: int | None = None) -> list[Record]:
        """A split's records: the samples for train / validation, the dev file (or `limit` of it)."""
        recs = {"train": self.train, "validation": self.validation}.get(split)
        if recs is None:
            recs = read_split(self.name, self.data_dir, split)
        if limit is not None and limit < len(recs):
            recs = [recs[i] for i in _perm(len(recs), self.seed, f"{self.name}-limit-{split}")[:limit]]
        return recs


# -- wiring: tokenizer and task for a run --------------------------------------------------------
LOCAL_VOCAB_MAX = 8192


def tokenizer_for_task(model: str, name: str, data_dir: str, vocab_size: int):
    """The checkpoint's own tokenizer (local directory), else a byte-level BPE trained here on the
    training file's prompts with the label words kept whole."""
    from distzo2_lab.models.presets import is_local_dir

    if is_local_dir(model):
        from distzo2_lab.data.sst2 import tokenizer_for_model

        return tokenizer_for_model(model, data_dir, vocab_size)  # a checkpoint's tokenizer reads no data
    from distzo2_lab.data.bpe import local_tokenizer

    t: Template = TEMPLATES[name]
    texts = [t.prompt(r) + "".join(t.candidates(r)) for r in read_split(name, data_dir, "train")]
    return local_tokenizer(texts, min(vocab_size, LOCAL_VOCAB_MAX), t.words)


def task_for(cfg, adapter, data_dir: str | None = None) -> PromptTask:
    """The suite task of a run config; a classification task switches a causal LM's loss to its
    label words, the others to the continuation's language-modelling loss.

    `data_dir` overrides where the tokenizer is trained (eval reads the training run's files)."""
    if not getattr(adapter, "causal", True):
        raise ConfigError(f"task={cfg.task!r} scores prompts with a causal LM; model={cfg.model!r} is an encoder "
                          "(only task='sst2' has a classifier-head encoding)")
    tok = tokenizer_for_task(cfg.model, cfg.task, data_dir or cfg.data, adapter.config.vocab_size)
    task = PromptTask(cfg.task, cfg.data, tok, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.shots,
                      vocab_size=adapter.config.vocab_size)
    adapter.choices = None if task.choices is None else torch.tensor(task.choices)  # (K,)
    return task
