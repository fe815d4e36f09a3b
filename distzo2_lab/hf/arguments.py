"""ZOArguments: what a ZO run needs beyond ``transformers.TrainingArguments``, and the mapping of
both onto the toolkit's TrainConfig (one validation place: config.validate)."""
from __future__ import annotations

from dataclasses import dataclass

from distzo2_lab.config import (
    ConfigError,
    OffloadConfig,
    TrainConfig,
    ZOConfig,
    validate,
)


@dataclass(frozen=True)
class ZOArguments:
    """ZO-SGD and placement options of a ZOTrainer (lr, weight decay, seed and steps come from
    TrainingArguments)."""

    eps: float = 1e-3
    """Perturbation scale: the two passes see theta + eps z and theta - eps z."""
    directions: int = 1
    """n-SPSA directions per step (MeZO's variant); 1 is MeZO's step."""
    noise: str = "gaussian"
    """Distribution of z: 'gaussian' or 'rademacher'."""
    freeze: tuple[str, ...] = ()
    """Glob patterns of parameter names held fixed (their z is 0)."""
    offload: str = "resident"
    """Where the blocks live: 'resident', 'host' (CPU memory, streamed) or 'disk' (needs store)."""
    prefetch: int = 1
    """Block visits the upload lane runs ahead of compute (offloaded tiers)."""
    store: str | None = None
    """offload='disk': the store directory."""
    layout: str | None = None
    """'dp=D,pert=P': this process is one rank of a launched run (see hf.worker.trainer_worker)."""
    peft: str | None = None
    """'lora:R': train peft LoRA adapters of rank R only; 'prefix:N': train a peft prefix of N
    virtual tokens only (the decoder families: OPT, GPT-2, LLaMA, Qwen2); the base stays fixed."""
    model: str | None = None
    """The preset name or directory the model was built from (the seed log's base); None saves
    the starting weights to OUTPUT_DIR/base so that ``distzo2 rebuild`` can replay onto them."""
    threads: int = 1
    """torch intra-op and noise threads of this process."""


def train_config(args, zo: ZOArguments, model: str, dp: int = 1) -> TrainConfig:
    """The TrainConfig of a ZOTrainer run: max_steps ZO steps of per_device_train_batch_size x
    gradient_accumulation_steps rows per dp group (accumulation runs as micro-batches)."""
    if args.max_steps is None or args.max_steps <= 0:
        raise ConfigError(f"TrainingArguments.max_steps={args.max_steps} is not valid; ZOTrainer counts ZO steps: "
                          "give max_steps > 0")
    micro = args.gradient_accumulation_steps
    return validate(TrainConfig(
        model=model, steps=args.max_steps, seed=args.seed, batch_size=args.per_device_train_batch_size * micro * dp,
        micro_batches=micro, threads=zo.threads, device=args.device.type,
        zo=ZOConfig(lr=args.learning_rate, eps=zo.eps, weight_decay=args.weight_decay, noise=zo.noise,
                    directions=zo.directions, freeze=tuple(zo.freeze)),
        offload=OffloadConfig(tier=zo.offload, prefetch=zo.prefetch, store=zo.store),
        peft=zo.peft,
    ))
