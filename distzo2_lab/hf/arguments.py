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
    """ZO method and placement options of a ZOTrainer (lr, weight decay, seed and steps come from
    TrainingArguments). The method fields have ZOConfig's names, defaults and meaning."""

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
    optimizer: str = "sgd"
    """The update rule: 'sgd' (MeZO), 'momentum', 'adam', 'sign', 'conservative' or 'hizoo'
    (see ZOConfig.optimizer); other than 'sgd' the step keeps optimiser state, checkpointed."""
    perturbation: str = "dense"
    """What z looks like: 'dense', 'gaussian' / 'rademacher' (= noise), 'lowrank:R' or 'sparse:F'."""
    estimator: str = "two-point"
    """'two-point' (MeZO's) or 'one-sided' (FZOO: directions >= 2 and one unperturbed forward)."""
    momentum: float = 0.9
    """optimizer='momentum': m <- beta m + g z."""
    adam_beta1: float = 0.9
    """optimizer='adam': first-moment decay."""
    adam_beta2: float = 0.999
    """optimizer='adam': second-moment decay."""
    adam_eps: float = 1e-8
    """optimizer='adam': added to sqrt(v_hat)."""
    hessian_smooth: float = 1e-8
    """optimizer='hizoo': smoothing alpha of the diagonal Hessian estimate."""
    lowrank_interval: int = 50
    """perturbation='lowrank:R': V is redrawn every this many steps."""
    sparse_refresh: int = 0
    """perturbation='sparse:F': recompute the |theta| thresholds every this many steps (0: never)."""


METHOD_FIELDS = ("optimizer", "perturbation", "estimator", "momentum", "adam_beta1", "adam_beta2", "adam_eps",
                 "hessian_smooth", "lowrank_interval", "sparse_refresh")
"""ZOArguments fields that ZOConfig takes as they are (the method family's)."""


def zo_config(args, zo: ZOArguments) -> ZOConfig:
    """The ZOConfig of a ZOTrainer run: lr and weight decay from TrainingArguments, the rest from `zo`."""
    return ZOConfig(lr=args.learning_rate, eps=zo.eps, weight_decay=args.weight_decay, noise=zo.noise,
                    directions=zo.directions, freeze=tuple(zo.freeze),
                    **{k: getattr(zo, k) for k in METHOD_FIELDS})


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
        zo=zo_config(args, zo),
        offload=OffloadConfig(tier=zo.offload, prefetch=zo.prefetch, store=zo.store),
        peft=zo.peft,
    ))
