"""How a model is scored on a suite task, by the task's kind (MeZO, arXiv 2305.17333, App. E).

classify: accuracy of the argmax over the label words' logits after the prompt. choice: accuracy
of the candidate whose tokens have the highest mean log-likelihood. generate: greedy decoding
after the prompt up to a newline (at most `max_new` tokens), scored by SQuAD's exact match and
token F1 against the gold answers. `model` is an adapter or an engine (flushed first, then read
in its compute precision, its blocks streamed when they live in a store).
"""
from __future__ import annotations

import torch

from distzo2_lab.data.formats import Record
from distzo2_lab.data.metrics import mean_loglik, squad_scores
from distzo2_lab.data.sst2 import class_scores
from distzo2_lab.data.suite import PromptTask, encode_pairs, fit_prompt

MAX_NEW = 50  # tokens generated per answer at most, as in MeZO's SQuAD evaluation


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, V) logits of an adapter or of an engine's current (flushed) weights."""
    engine = model if hasattr(model, "flush") else None
    a = model.adapter if engine is not None else model
    if engine is not None:
        engine.flush()  # a pending ZO2 update lands first
    if getattr(engine, "streamer", None) is None:
        return a.forward(ids, mask)
    hidden, ctx = engine.resident.embed(ids, mask)
    h = [hidden]

    def visit(i, b):
        h[0] = a.run_block(i, h[0], ctx)

    engine._sweep(visit, write=False)
    return a.head(h[0], ctx)


def _hits_classify(model, task: PromptTask, chunk: list[Record], device) -> list[int]:
    batch = {k: v.to(device) for k, v in task.encode(chunk).items()}
    choices = torch.tensor(task.choices, device=device)
    pred = class_scores(logits_of(model, batch["input_ids"], batch["attention_mask"]), batch, choices).argmax(1)
    return (pred.cpu() == torch.tensor([r.label for r in chunk])).int().tolist()


def choose(model, task: PromptTask, chunk: list[Record], device) -> list[int]:
    """Each record's candidate index with the highest mean log-likelihood after its prompt."""
    t = task.template
    cands = [t.candidates(r) for r in chunk]
    pairs = [(t.prompt(r), c) for r, cs in zip(chunk, cands) for c in cs]
    batch = {k: v.to(device) for k, v in encode_pairs(task.tokenizer, pairs, task.seq_len).items()}
    scores = mean_loglik(logits_of(model, batch["input_ids"], batch["attention_mask"]), batch["labels"]).cpu()
    out, at = [], 0
    for cs in cands:
        out.append(int(scores[at : at + len(cs)].argmax()))
        at += len(cs)
    return out


def generate(model, task: PromptTask, prompt: str, device, max_new: int = MAX_NEW) -> str:
    """Greedy continuation of `prompt` up to its first newline (or end of text, or `max_new` tokens)."""
    tok, adapter = task.tokenizer, (model.adapter if hasattr(model, "flush") else model)
    ids = fit_prompt(tok(prompt, add_special_tokens=True)["input_ids"], task.seq_len - 1, set(tok.all_special_ids))
    new: list[int] = []
    while len(new) < max_new and len(ids) + len(new) < adapter.max_positions:
        x = torch.tensor([ids + new], device=device)  # (1, T)
        nxt = int(logits_of(model, x, torch.ones_like(x))[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        if "\n" in tok.decode(new):
            break
    return tok.decode(new).split("\n")[0].strip()


def evaluate(model, task: PromptTask, records: list[Record], batch_size: int = 64, per_example: bool = False,
             max_new: int = MAX_NEW) -> dict:
    """The task's metric over `records`: accuracy (classify, choice) or exact match and F1 (generate).
    per_example=True adds "hits" (1 / 0 per record; generate: the per-record exact match)."""
    from distzo2_lab.zo.spsa import compute_context

    adapter = model.adapter if hasattr(model, "flush") else model
    device = torch.device(getattr(model, "device", None) or adapter.bucket_in.master.device)
    compute = model.precision.compute if hasattr(model, "precision") else "fp32"
    hits: list[int] = []
    em = f1 = 0.0
    with compute_context(compute, device):
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            if task.kind == "classify":
                hits += _hits_classify(model, task, chunk, device)
            elif task.kind == "choice":
                hits += [int(p == r.label) for p, r in zip(choose(model, task, chunk, device), chunk)]
            else:
                for r in chunk:
                    s = squad_scores(generate(model, task, task.template.prompt(r), device, max_new), r.answers)
                    em, f1 = em + s["exact_match"], f1 + s["f1"]
                    hits.append(int(s["exact_match"]))
    n = len(records)
    out = {"examples": n}
    if task.kind == "generate":
        out.update(exact_match=em / n, f1=f1 / n)
    else:
        out.update(accuracy=sum(hits) / n, correct=sum(hits))
    if per_example:
        out["hits"] = hits
    return out
