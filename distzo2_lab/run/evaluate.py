"""`distzo2 eval`: a checkpoint's score on a split of a task of MeZO's suite.

A checkpoint (see :mod:`distzo2_lab.run.checkpoint`) holds the flushed fp32 weights and the run
config. We rebuild the base model, load the weights, rebuild the tokenizer the run trained with
(the checkpoint's own, or the local BPE of the run's training file) and count correct argmax
predictions: over the label words for a causal LM (MeZO's prompt), over the classes for an
encoder with a classification head (SST-2). COPA picks the likelier candidate; SQuAD is scored by
exact match and F1 of greedy answers (:mod:`distzo2_lab.data.scoring`).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from distzo2_lab.config import SUITE_TASKS, ConfigError, TrainConfig


def load_checkpoint(path: str, device: str = "cpu"):
    """(adapter with the checkpoint's weights, its state.json)."""
    from distzo2_lab.run.checkpoint import load_weights, read_state
    from distzo2_lab.run.train import build_adapter

    state = read_state(path)
    adapter = build_adapter(state["base"], "fp32", device)
    load_weights(adapter, os.path.join(path, "model.safetensors"))
    return adapter, state


def run_config(state: dict) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (nested dataclasses rebuilt)."""
    from distzo2_lab.config import OffloadConfig, PrecisionConfig, ZOConfig

    c = dict(state["config"])
    nested = {"zo": ZOConfig, "precision": PrecisionConfig, "offload": OffloadConfig}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, cls in nested.items():
        if k in c:
            fields = {f.name for f in dataclasses.fields(cls)}
            c[k] = cls(**{n: v for n, v in c[k].items() if n in fields})
    return TrainConfig(**{k: v for k, v in c.items() if k in known})


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, data: str, split: str = "dev", task: str = "sst2",
                        limit: int | None = None, batch_size: int = 64, threads: int = 2) -> dict:
    """`checkpoint`'s metric on `split` of the directory `data` (all of it, or `limit` examples):
    accuracy, or exact match and F1 for squad."""
    if task not in SUITE_TASKS:
        raise ConfigError(f"task={task!r} is not valid for eval; choose one of {', '.join(SUITE_TASKS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} is not valid; it must be a positive integer")
    torch.set_num_threads(threads)
    adapter, state = load_checkpoint(checkpoint)
    cfg = run_config(state)
    if cfg.task != task:
        raise ConfigError(f"checkpoint {checkpoint!r} was trained on task={cfg.task!r}, not task={task!r}; "
                          f"evaluate it with task={cfg.task!r}")
    eval_cfg = dataclasses.replace(cfg, data=data)
    if task == "sst2":
        from distzo2_lab.data.sst2 import accuracy, task_for

        t = task_for(eval_cfg, adapter, data_dir=cfg.data)  # the tokenizer of the training run
        r = accuracy(adapter, t, t.examples(split, limit), batch_size)
    else:
        from distzo2_lab.data.scoring import evaluate
        from distzo2_lab.data.suite import task_for

        t = task_for(eval_cfg, adapter, data_dir=cfg.data)
        r = evaluate(adapter, t, t.examples(split, limit), batch_size)
    return {"checkpoint": checkpoint, "task": task, "data": data, "split": split, "step": state.get("step"),
            "model": cfg.model, **r}


def result_line(r: dict) -> str:
    """One line for `distzo2 eval`: accuracy, or exact match and F1 (squad)."""
    if "f1" in r:
        return f"{r['split']}: F1 {r['f1']:.4f}, exact match {r['exact_match']:.4f} ({r['examples']} examples)"
    return f"{r['split']}: accuracy {r['accuracy']:.4f} ({r['correct']} of {r['examples']} examples)"
