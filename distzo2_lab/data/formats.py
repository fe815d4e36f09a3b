"""Readers of the published files of MeZO's task suite: GLUE TSV, SuperGLUE JSONL, SQuAD v1.1 JSON.

MeZO (arXiv 2305.17333, App. E) evaluates on GLUE (SST-2, RTE), SuperGLUE (CB, BoolQ, WiC,
COPA, ...) and SQuAD. Each reader turns one file into :class:`Record` rows (text fields, a class
index, the gold answers) and refuses a missing file, a malformed line, a missing field or an
unknown label with one :class:`ConfigError` naming the file and the line (or the JSON path).
Only the standard library is used: the files are read as published, nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from distzo2_lab.config import ConfigError


@dataclass(frozen=True)
class Record:
    """One example: its text fields by name, its class index (-1 for extractive QA), its answers."""

    fields: dict = field(hash=False)
    label: int = -1
    answers: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> str:
        return self.fields[name]


def _open_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file does not exist")
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _label(value, labels: dict, where: str) -> int:
    """A class index from the file's label value (a JSON boolean reads as 'true' / 'false')."""
    key = json.dumps(value) if isinstance(value, bool) else str(value).strip()
    if key not in labels:
        raise ConfigError(f"{where}: label {key!r} is not valid; choose one of {', '.join(labels)}")
    return labels[key]


def read_tsv(path: str, columns: tuple[str, ...], labels: dict) -> list[Record]:
    """GLUE TSV: a header naming the columns, tab-separated rows (GLUE does not quote fields)."""
    lines = _open_lines(path)
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}: line 1: empty file (expected a header naming {', '.join(columns)}, label)")
    header = lines[0].rstrip("\r").split("\t")
    missing = [c for c in (*columns, "label") if c not in header]
    if missing:
        raise ConfigError(f"{path}: line 1: header {lines[0]!r} lacks the column(s) {', '.join(missing)} "
                          "(GLUE's test.tsv has no labels: evaluate on dev.tsv)")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.rstrip("\r").split("\t")
        if len(cells) != len(header):
            raise ConfigError(f"{path}: line {n}: {len(cells)} tab-separated fields, the header has {len(header)}")
        row = dict(zip(header, cells))
        for c in columns:
            if not row[c].strip():
                raise ConfigError(f"{path}: line {n}: empty {c}")
        out.append(Record({c: row[c].strip() for c in columns}, _label(row["label"], labels, f"{path}: line {n}")))
    if not out:
        raise ConfigError(f"{path}: line {len(lines)}: no examples after the header")
    return out


def read_jsonl(path: str, columns: tuple[str, ...], labels: dict, allowed: dict | None = None) -> list[Record]:
    """SuperGLUE JSONL: one JSON object per line holding the text fields and 'label'; `allowed`
    maps a field to its valid values (COPA's question is 'cause' or 'effect')."""
    out = []
    for n, line in enumerate(_open_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}: line {n}: not a JSON object")
        lacking = [c for c in (*columns, "label") if c not in obj]
        if lacking:
            raise ConfigError(f"{path}: line {n}: missing field(s) {', '.join(lacking)} "
                              "(SuperGLUE's test.jsonl has no labels: evaluate on val.jsonl)")
        bad = [c for c in columns if not isinstance(obj[c], str) or not obj[c].strip()]
        if bad:
            raise ConfigError(f"{path}: line {n}: field {bad[0]!r} must be a non-empty string")
        for c, valid in (allowed or {}).items():
            if obj[c] not in valid:
                raise ConfigError(f"{path}: line {n}: {c} {obj[c]!r} is not valid; choose one of {', '.join(valid)}")
        out.append(Record({c: obj[c].strip() for c in columns}, _label(obj["label"], labels, f"{path}: line {n}")))
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def _need(obj, key: str, kind: type, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ConfigError(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
        raise ConfigError(f"{where}.{key}: expected a JSON {kind.__name__.replace('str', 'string')}")
    return obj[key]


def read_squad(path: str) -> list[Record]:
    """SQuAD v1.1 JSON: data[] -> paragraphs[] -> context, qas[] -> question, id, answers[text, answer_start].

    A record per question, fields title / context / question / id; its answers in file order."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    for i, article in enumerate(_need(doc, "data", list, f"{path}: $")):
        where = f"{path}: $.data[{i}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, par in enumerate(_need(article, "paragraphs", list, where)):
            pw = f"{where}.paragraphs[{j}]"
            context = _need(par, "context", str, pw)
            for k, qa in enumerate(_need(par, "qas", list, pw)):
                qw = f"{pw}.qas[{k}]"
                question, qid = _need(qa, "question", str, qw), _need(qa, "id", str, qw)
                answers = []
                for m, ans in enumerate(_need(qa, "answers", list, qw)):
                    _need(ans, "answer_start", int, f"{qw}.answers[{m}]")
                    answers.append(_need(ans, "text", str, f"{qw}.answers[{m}]").strip())
                if not answers or not all(answers):
                    raise ConfigError(f"{qw}.answers: expected at least one non-empty answer text")
                out.append(Record({"title": str(title).replace("_", " "), "context": context.strip(),
                                   "question": question.strip(), "id": qid}, -1, tuple(answers)))
    if not out:
        raise ConfigError(f"{path}: $.data holds no questions")
    return out
