"""SST-2 in MeZO's protocol: GLUE-style TSV files, sampled splits, prompt or classifier encodings.

MeZO (arXiv 2305.17333, Sec. 3 and App. E) samples 1,000 training and 500 validation examples
from SST-2's training set (or k examples per class, k = 16 or 512) and casts classification as
language modelling: "<sentence> It was [terrible|great]", the loss being cross-entropy over the
two label words' logits. An encoder (BERT family) instead gets [CLS] sentence [SEP] and a
classification head. As in :mod:`distzo2_lab.data.tasks`, every batch is a pure function of
(run seed, step), so resumed and distributed runs see the data an uninterrupted run would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distzo2_lab.config import ConfigError

LABELS = (0, 1)  # negative, positive
LABEL_WORDS = (" terrible", " great")  # MeZO's SST-2 label words, in label order
TEMPLATE = "{sentence} It was"
SPLITS = ("train", "validation", "dev", "test")
EVAL_STEP = 10**9  # as in train.py: batches from here on come from the validation sample


@dataclass(frozen=True)
class Example:
    sentence: str
    label: int


def read_tsv(path: str) -> list[Example]:
    """`sentence<TAB>label` rows under a header naming both columns; errors name file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}: line 1: empty file (expected a header 'sentence<TAB>label')")
    header = lines[0].rstrip("\r").split("\t")
    if "sentence" not in header or "label" not in header:
        raise ConfigError(f"{path}: line 1: header {lines[0]!r} lacks a 'sentence' and a 'label' column "
                          "(GLUE's test.tsv has no labels: evaluate on dev.tsv)")
    si, li = header.index("sentence"), header.index("label")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ConfigError(f"{path}: line {n}: {len(fields)} tab-separated fields, the header has {len(header)}")
        sentence, label = fields[si].strip(), fields[li].strip()
        if not sentence:
            raise ConfigError(f"{path}: line {n}: empty sentence")
        if label not in {str(v) for v in LABELS}:
            raise ConfigError(f"{path}: line {n}: label {label!r} is not valid; choose one of "
                              f"{', '.join(map(str, LABELS))}")
        out.append(Example(sentence, int(label)))
    if not out:
        raise ConfigError(f"{path}: line {len(lines)}: no examples after the header")
    return out


def split_file(data_dir: str, split: str) -> str:
    """The TSV a split reads: train and validation are samples of train.tsv."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not valid; choose one of {', '.join(SPLITS)}")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data={data_dir!r}: directory does not exist (it must hold train.tsv, dev.tsv, ...)")
    name = {"train": "train.tsv", "validation": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}[split]
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise ConfigError(f"data={data_dir!r} has no {name} (split={split!r} reads it)")
    return path


def _perm(n: int, seed: int, key: str) -> torch.Tensor:
    from distzo2_lab.seeds import derive_seed

    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, key, 0)))


def sample(examples: list[Example], seed: int, n_train: int = 1000, n_val: int = 500,
           shots: int | None = None) -> tuple[list[Example], list[Example]]:
    """Disjoint (train, validation) samples: n_train / n_val examples, or `shots` of each class for both."""
    if shots is None:
        if n_train + n_val > len(examples):
            raise ConfigError(f"{n_train} train + {n_val} validation examples requested, the file has "
                              f"{len(examples)}; a smaller file can be sampled k-shot (shots=K)")
        idx = _perm(len(examples), seed, "sst2-sample").tolist()
        return [examples[i] for i in idx[:n_train]], [examples[i] for i in idx[n_train:n_train + n_val]]
    train, val = [], []
    for c in LABELS:
        pool = [ex for ex in examples if ex.label == c]
        if 2 * shots > len(pool):
            raise ConfigError(f"shots={shots} needs {2 * shots} examples of label {c} (train + validation); "
                              f"the file has {len(pool)}")
        idx = _perm(len(pool), seed, f"sst2-shots-{c}").tolist()
        train += [pool[i] for i in idx[:shots]]
        val += [pool[i] for i in idx[shots:2 * shots]]
    return train, val


# -- encodings ------------------------------------------------------------------------------------
def label_word_ids(tokenizer) -> list[int]:
    """SST-2's label words as token ids."""
    return word_ids(tokenizer, LABEL_WORDS)


def word_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """One token id per label word; a label word that is not a single token is refused."""
    ids = []
    for w in words:
        t = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise ConfigError(f"label word {w!r} is {len(t)} tokens for this tokenizer; the prompt needs one")
        ids.append(t[0])
    return ids


def pad_rows(rows: list[list[int]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    # GPT-2 and LLaMA tokenizers have no pad token: any id will do under a zero attention mask
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T) right-padded
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def encode_prompts(tokenizer, examples: list[Example], seq_len: int, choices: list[int]) -> dict:
    """Causal LM: "<sentence> It was" + label word; labels -100 except the label word's position."""
    suffix = tokenizer(TEMPLATE.format(sentence=""), add_special_tokens=False)["input_ids"]  # " It was"
    rows, where = [], []
    for ex in examples:
        head = tokenizer(ex.sentence, add_special_tokens=True)["input_ids"]
        head = head[: max(1, seq_len - len(suffix) - 1)]  # long sentences lose their end, never the prompt
        rows.append(head + suffix + [choices[ex.label]])
        where.append(len(rows[-1]) - 1)
    ids, mask = pad_rows(rows, tokenizer)
    labels = torch.full_like(ids, -100)  # (B, T)
    for i, (p, ex) in enumerate(zip(where, examples)):
        labels[i, p] = choices[ex.label]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_classify(tokenizer, examples: list[Example], seq_len: int) -> dict:
    """Encoder: [CLS] sentence [SEP] (the tokenizer's own specials), labels (B,) class indices."""
    rows = [tokenizer(ex.sentence, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
            for ex in examples]
    ids, mask = pad_rows(rows, tokenizer)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([ex.label for ex in examples])}


# -- the task -------------------------------------------------------------------------------------
class SST2Task:
    """Sampled train / validation examples of `data_dir` and their batches, for one model kind.

    kind='causal' uses the prompt and sets ``choices`` (the label-word ids); kind='encoder' uses
    the classifier encoding. Training batches walk seeded permutations of the train sample, one
    per epoch, so each example is seen once per epoch and batch(step) is a pure function.
    """

    def __init__(self, data_dir: str, tokenizer, kind: str, seq_len: int, batch_size: int, seed: int = 0,
                 shots: int | None = None, n_train: int = 1000, n_val: int = 500, vocab_size: int | None = None):
        if kind not in ("causal", "encoder"):
            raise ConfigError(f"kind={kind!r} is not valid; choose one of causal, encoder")
        self.data_dir, self.tokenizer, self.kind = data_dir, tokenizer, kind
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train, self.validation = sample(read_tsv(split_file(data_dir, "train")), seed, n_train, n_val, shots)
        self.choices = label_word_ids(tokenizer) if kind == "causal" else None
        self._perms: dict[int, list[int]] = {}
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} ids; the model's vocab_size is {vocab_size}")

    def encode(self, examples: list[Example]) -> dict:
        if self.kind == "causal":
            return encode_prompts(self.tokenizer, examples, self.seq_len, self.choices)
        return encode_classify(self.tokenizer, examples, self.seq_len)

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a batch spans at most two epochs
                self._perms.clear()
            self._perms[epoch] = _perm(len(self.train), self.seed, f"sst2-epoch-{epoch}").tolist()
        return self._perms[epoch]

    def rows(self, step: int) -> list[Example]:
        if step >= EVAL_STEP:  # the train loop's held-out batch
            return self.validation[: self.batch_size]
        n, out = len(self.train), []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self.train[self._epoch(i // n)[i % n]])
        return out

    def batch(self, step: int) -> dict:
        return self.encode(self.rows(step))

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        """A split's examples: the samples for train / validation, the file (or `limit` of it) otherwise."""
        if split == "train":
            exs = self.train
        elif split == "validation":
            exs = self.validation
        else:
            exs = read_tsv(split_file(self.data_dir, split))
        if limit is not None and limit < len(exs):
            exs = [exs[i] for i in _perm(len(exs), self.seed, f"sst2-limit-{split}")[:limit].tolist()]
        return exs


# -- accuracy ------------------------------------------------------------------------------------
def class_scores(logits: torch.Tensor, batch: dict, choices: torch.Tensor | None) -> torch.Tensor:
    """(B, K) scores: classifier logits as they are, or the label words' logits at the position
    that predicts the label word (causal LM)."""
    if choices is None:
        return logits.float()  # (B, K)
    labels = batch["labels"]
    pos = (labels[:, 1:] != -100).float().argmax(dim=1)  # (B,) logit position predicting the label word
    rows = logits[torch.arange(logits.shape[0]), pos]  # (B, V)
    return rows[:, choices].float()  # (B, K)


@torch.no_grad()
def predict(model, batch: dict, choices: torch.Tensor | None) -> torch.Tensor:
    """(B,) predicted class of each row; `model` is an adapter or an engine (flushed first)."""
    engine = model if hasattr(model, "flush") else None
    a = model.adapter if engine is not None else model
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if engine is not None:
        engine.flush()  # a pending ZO2 update lands first: evaluation never runs one update behind
    if getattr(engine, "streamer", None) is None:
        logits = a.forward(ids, mask)
    else:  # blocks live in a store: stream them through the engine's sweep, read-only
        hidden, ctx = engine.resident.embed(ids, mask)
        h = [hidden]

        def visit(i, b):
            h[0] = a.run_block(i, h[0], ctx)

        engine._sweep(visit, write=False)
        logits = a.head(h[0], ctx)
    return class_scores(logits, batch, choices).argmax(dim=1)


def accuracy(model, task: SST2Task, examples: list[Example], batch_size: int = 64, per_example: bool = False) -> dict:
    """Accuracy over `examples` (argmax over the label words or the classifier's classes) of an
    adapter or an engine (then in its compute precision, on its device). per_example=True adds
    "hits": 1 / 0 for every example, in order (for paired comparisons of two models)."""
    from distzo2_lab.zo.spsa import compute_context

    adapter = model.adapter if hasattr(model, "flush") else model
    device = torch.device(getattr(model, "device", None) or adapter.bucket_in.master.device)
    compute = model.precision.compute if hasattr(model, "precision") else "fp32"
    choices = None if task.choices is None else torch.tensor(task.choices, device=device)
    hits: list[int] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) for k, v in task.encode(chunk).items()}
        with compute_context(compute, device):
            pred = predict(model, batch, choices)
        hits += (pred.cpu() == torch.tensor([ex.label for ex in chunk])).int().tolist()
    correct = sum(hits)
    out = {"accuracy": correct / len(examples), "correct": correct, "examples": len(examples)}
    if per_example:
        out["hits"] = hits
    return out


def paired_comparison(before: list[int], after: list[int]) -> dict:
    """Two classifiers on the same examples (per-example hits): the accuracy gain and McNemar's
    exact test, the two-sided binomial p-value of the discordant pairs (examples only one of the
    two gets right) under "neither is better". A small p says the gain is not sampling noise of
    these examples."""
    import math

    if len(before) != len(after) or not before:
        raise ValueError(f"paired comparison needs two equal, non-empty hit lists; got {len(before)} and {len(after)}")
    gained = sum(1 for a, b in zip(before, after) if b and not a)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    n, k = gained + lost, min(gained, lost)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"gain": (sum(after) - sum(before)) / len(before), "gained": gained, "lost": lost, "p_value": p}

# -- wiring: tokenizer and task for a run --------------------------------------------------------
LOCAL_VOCAB_MAX = 8192  # a local BPE for a random-init model needs no more than this on SST-2


def tokenizer_for_model(model: str, data_dir: str, vocab_size: int):
    """The checkpoint's own tokenizer (local directory, no download), else a byte-level BPE
    trained here on `data_dir`/train.tsv with at most the model's vocabulary."""
    from distzo2_lab.models.presets import is_local_dir

    if is_local_dir(model):
        if not any(os.path.exists(os.path.join(model, f)) for f in ("tokenizer_config.json", "tokenizer.json")):
            raise ConfigError(f"model={model!r} has no tokenizer files (tokenizer_config.json / tokenizer.json): "
                              "a checkpoint's ids mean something only with its own tokenizer; copy them beside it")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    from distzo2_lab.data.bpe import local_tokenizer

    sentences = [ex.sentence for ex in read_tsv(split_file(data_dir, "train"))]
    return local_tokenizer(sentences, min(vocab_size, LOCAL_VOCAB_MAX), LABEL_WORDS)


def task_for(cfg, adapter, data_dir: str | None = None) -> SST2Task:
    """The SST-2 task of a run config; a causal LM's loss is switched to the label words.

    `data_dir` overrides where the tokenizer is trained (eval reads the training run's files)."""
    kind = "causal" if getattr(adapter, "causal", True) else "encoder"
    tok = tokenizer_for_model(cfg.model, data_dir or cfg.data, adapter.config.vocab_size)
    task = SST2Task(cfg.data, tok, kind, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.shots,
                    vocab_size=adapter.config.vocab_size)
    if task.choices is not None:
        adapter.choices = torch.tensor(task.choices)  # (K,) the loss becomes CE over these logits
    return task
