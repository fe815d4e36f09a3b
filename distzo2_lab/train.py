"""One-rank training loop: config -> model, engine, task -> steps -> summary, seed log, checkpoint.

This is what ``distzo2 train``, ``distzo2 demo``, the tutorials and the tests all call. Step
seeds and batches are pure functions of (run seed, step), so a resumed run continues the exact
trajectory of an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from .checkpoint import SeedLog, digest, load_weights, read_state, replay, save_checkpoint
from .config import ConfigError, TrainConfig, validate
from .engine import ZO2Engine
from .models import OPTAdapter, build_model
from .models.presets import is_local_dir
from .perturb import step_seed
from .reference import EagerMeZO
from .tasks import SyntheticTask, TextTask, tokenizer_for

EVAL_STEP = 10**9  # batches at this index and above are never trained on


def base_of(cfg: TrainConfig) -> dict:
    """Where the starting weights come from (what a seed log replays onto), and the device type
    whose generators drew z (CPU and CUDA generators give different numbers for one seed)."""
    if is_local_dir(cfg.model):
        return {"model": os.path.abspath(cfg.model), "device": cfg.device}
    return {"model": cfg.model, "init_seed": cfg.seed, "device": cfg.device}


def build_adapter(base: dict, storage: str = "fp32", device: str = "cpu") -> OPTAdapter:
    """The starting model, built on CPU (seeded init is device-independent) then moved."""
    return OPTAdapter(build_model(base["model"], seed=base.get("init_seed", 0)).to(device), storage)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def build_engine(cfg: TrainConfig, adapter: OPTAdapter):
    cls = ZO2Engine if cfg.engine == "zo2" else EagerMeZO
    return cls(adapter, cfg.zo, cfg.precision, threads=cfg.threads)


def make_task(cfg: TrainConfig, adapter: OPTAdapter):
    if cfg.seq_len > adapter.max_positions:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the model's "
                          f"max_position_embeddings={adapter.max_positions}")
    vocab = adapter.config.vocab_size
    if cfg.task == "synthetic":
        return SyntheticTask(vocab, cfg.seq_len, cfg.batch_size, cfg.seed)
    return TextTask(cfg.data, tokenizer_for(cfg.model), cfg.seq_len, cfg.batch_size, cfg.seed, vocab)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rebuild(log_path: str, threads: int = 1, storage: str = "fp32") -> OPTAdapter:
    """Base model + seed log -> the fine-tuned weights, bit-identical to training's.

    Replays on the device type that trained (its generators drew z)."""
    log = SeedLog.read(log_path)
    device = log.base.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"seed log {log_path!r} was made on CUDA and must be replayed there (its noise "
                          "came from CUDA generators); no CUDA device is visible")
    adapter = build_adapter(log.base, storage, device)
    replay(adapter, log, threads)
    return adapter


def train(cfg: TrainConfig, out: str | None = None, save: str | None = None, resume: str | None = None,
          progress: bool = True, on_step=None) -> dict:
    """Run `cfg.steps` ZO steps; write DIR/summary.json and DIR/seedlog.jsonl when `out` is set.

    `on_step(result)` is called after every step (live plots in notebooks).
    """
    validate(cfg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    base = base_of(cfg)
    adapter = build_adapter(base, cfg.precision.storage, cfg.device)
    task = make_task(cfg, adapter)
    log, start = SeedLog(base, cfg.zo), 0
    if resume is not None:
        state = read_state(resume)
        if state["config"]["model"] != cfg.model or state["config"]["seed"] != cfg.seed:
            raise ConfigError(f"resume={resume!r} was trained with model={state['config']['model']!r}, "
                              f"seed={state['config']['seed']}; pass the same model and seed")
        load_weights(adapter, os.path.join(resume, "model.safetensors"))
        log = SeedLog.read(os.path.join(resume, "seedlog.jsonl"))
        # lr is logged per step and may change; the rest shapes z and the update rule.
        if log.base.get("device", "cpu") != cfg.device:
            raise ConfigError(f"resume={resume!r} drew its noise on device={log.base.get('device', 'cpu')!r}; "
                              f"device={cfg.device!r} would draw different z. Resume on the same device type")
        differ = [f"zo.{k}" for k in ("eps", "weight_decay", "noise", "chunk_size")
                  if getattr(log.zo, k) != getattr(cfg.zo, k)]
        if differ:
            raise ConfigError(f"resume={resume!r} was trained with different {', '.join(differ)} "
                              f"({', '.join(f'{k}={getattr(log.zo, k[3:])!r}' for k in differ)}); "
                              "a seed log replays one rule, so pass the same values")
        start = state["step"]
        if start >= cfg.steps:
            raise ConfigError(f"steps={cfg.steps} is not beyond the checkpoint's step {start}")
    engine = build_engine(cfg, adapter)
    try:
        return _run(cfg, adapter, engine, task, log, base, start, out, save, progress, on_step)
    finally:
        engine.perturber.close()
        torch.set_num_threads(threads_before)


def _run(cfg, adapter, engine, task, log, base, start, out, save, progress, on_step) -> dict:
    eval_batch = to_device(task.batch(EVAL_STEP), cfg.device)
    eval_start = engine.evaluate(eval_batch)
    records, tokens = [], 0
    t0 = time.perf_counter()
    for t in tqdm(range(start, cfg.steps), disable=not progress, desc=f"{cfg.engine} {cfg.model}",
                  initial=start, total=cfg.steps):
        engine.step_count = t
        r = engine.step(to_device(task.batch(t), cfg.device), step_seed(cfg.seed, t))
        log.append(r.step, r.seed, r.grad, r.lr)
        tokens += r.tokens
        records.append({"step": r.step, "seed": r.seed, "loss_plus": r.loss_plus,
                        "loss_minus": r.loss_minus, "projected_grad": r.grad, "lr": r.lr})
        if on_step is not None:
            on_step(r)
    elapsed = time.perf_counter() - t0
    engine.flush()  # the last deferred update lands before anything reads the weights
    summary = {
        "config": asdict(cfg),
        "base": base,
        "start_step": start,
        "steps": records,
        "eval_loss_start": eval_start,
        "eval_loss_end": engine.evaluate(eval_batch),
        "digest": digest(adapter),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "peak_rss_mb": peak_rss_mb(),
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log.write(os.path.join(out, "seedlog.jsonl"))
    if save is not None:
        save_checkpoint(save, adapter, {"step": cfg.steps, "config": asdict(cfg), "base": base,
                                        "digest": summary["digest"]}, log)
    return summary
