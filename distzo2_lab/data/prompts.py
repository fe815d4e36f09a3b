"""MeZO's prompt templates: each task as a language-modelling prompt and the continuations it scores.

MeZO (arXiv 2305.17333, App. E; its templates.py) casts every task as text for a causal LM. A template
gives the prompt of an example and its candidate continuations; a prompt followed by the gold
continuation is a training sequence whose loss covers the continuation's tokens only.

- classify (one label word per class; argmax over the label words' logits):
  - sst2: ``<sentence> It was`` + `` terrible`` / `` great``
  - rte:  ``<sentence1>\\nDoes this mean that "<sentence2>" is true? Yes or No?\\n`` + ``Yes`` / ``No``
    (GLUE names the premise sentence1 and the hypothesis sentence2)
  - cb:   ``Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\\n`` +
    ``Yes`` / ``No`` / ``Maybe`` (entailment, contradiction, neutral)
  - boolq: ``<passage> <Question>?`` + `` No`` / `` Yes`` (the question capitalised, a '?' added)
  - wic:  ``Does the word "<word>" have the same meaning in these two sentences? Yes, No?\\n``
    ``<sentence1>\\n<sentence2>\\n`` + ``No`` / ``Yes``
- choice (candidates scored by their tokens' mean log-likelihood):
  - copa: ``<premise without its final period> so`` (effect) or `` because`` (cause) + `` <choice>``
    with the choice's first word lower-cased unless it is "I"
- generate (greedy decoding, SQuAD F1 / exact match; trained on the first gold answer):
  - squad: ``Title: <title>\\nContext: <context>\\nQuestion: <question>\\nAnswer:`` + `` <answer>\\n``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from distzo2_lab.data.formats import Record

KINDS = ("classify", "choice", "generate")


@dataclass(frozen=True)
class Template:
    """A task's prompt and continuations. `words`: the label words in class order (classify)."""

    name: str
    kind: str
    prompt: Callable[[Record], str]
    words: tuple[str, ...] = ()
    options: Callable[[Record], tuple[str, ...]] | None = None

    def candidates(self, r: Record) -> tuple[str, ...]:
        """Every continuation scored at evaluation (generate: the gold one, for training)."""
        if self.kind == "classify":
            return self.words
        if self.kind == "choice":
            return self.options(r)
        return (f" {r.answers[0]}\n",)

    def target(self, r: Record) -> str:
        """The gold continuation a training sequence ends with."""
        return self.candidates(r)[max(r.label, 0)]

    def text(self, r: Record) -> str:
        """Prompt and gold continuation: what a training sequence reads."""
        return self.prompt(r) + self.target(r)


def _question(q: str) -> str:
    q = q if q.endswith("?") else q + "?"
    return q[0].upper() + q[1:]


def _copa_prompt(r: Record) -> str:
    premise = r["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    return premise + (" so" if r["question"] == "effect" else " because")


def _lower_first_word(choice: str) -> str:
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _copa_options(r: Record) -> tuple[str, ...]:
    return tuple(" " + _lower_first_word(r[c]) for c in ("choice1", "choice2"))


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("sst2", "classify", lambda r: f"{r['sentence']} It was", (" terrible", " great")),
    Template("rte", "classify",
             lambda r: f"{r['sentence1']}\nDoes this mean that \"{r['sentence2']}\" is true? Yes or No?\n",
             ("Yes", "No")),
    Template("cb", "classify",
             lambda r: f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n",
             ("Yes", "No", "Maybe")),
    Template("boolq", "classify", lambda r: f"{r['passage']} {_question(r['question'])}", (" No", " Yes")),
    Template("wic", "classify",
             lambda r: (f"Does the word \"{r['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                        f"{r['sentence1']}\n{r['sentence2']}\n"),
             ("No", "Yes")),
    Template("copa", "choice", _copa_prompt, options=_copa_options),
    Template("squad", "generate",
             lambda r: f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question']}\nAnswer:"),
)}
