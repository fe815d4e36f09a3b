"""Importable builders of ZOTrainer runs (the launcher's spawn needs them outside a test body)."""
from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainingArguments

from distzo2_lab.hf.arguments import ZOArguments
from distzo2_lab.hf.trainer import ZOTrainer


def dataset(n: int = 32, seq: int = 12, seed: int = 0) -> list[dict]:
    """Rows drawn from four fixed sequences: a tiny model learns them within tens of ZO steps."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(4, 512, (4, seq), generator=g)
    return [{"input_ids": patterns[i % 4].clone()} for i in range(n)]


def trainer(out: str, steps: int = 30, zo: ZOArguments = ZOArguments(), save_steps: int = 500, **extra) -> ZOTrainer:
    args = TrainingArguments(output_dir=out, max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, logging_steps=5, save_steps=save_steps,
                             lr_scheduler_type="constant", seed=3, report_to="none", use_cpu=True,
                             disable_tqdm=True, **extra)
    return ZOTrainer(model="tiny", args=args, zo_args=zo, train_dataset=dataset(), eval_dataset=dataset(8, seed=0))


def evaluating_trainer(out: str, steps: int, zo: ZOArguments, eval_steps: int, lag: float = 0.0) -> ZOTrainer:
    """trainer() that evaluates every `eval_steps` steps (each evaluation flushes the pending update).
    `lag`: a launched run's rank 0 pauses this many seconds before each evaluation, so the other
    ranks flush, evaluate and go on into the next step ahead of it (as a rank 0 busy logging or
    saving lets them)."""
    t = trainer(out, steps=steps, zo=zo, eval_strategy="steps", eval_steps=eval_steps)
    if lag:
        t.add_callback(RankZeroLag(eval_steps, lag))
    return t


class RankZeroLag(TrainerCallback):
    """Rank 0 of a launched run sleeps `seconds` at the end of every `every`-th step."""

    def __init__(self, every: int, seconds: float):
        self.every, self.seconds = every, seconds

    def on_step_end(self, args, state, control, **kwargs):
        import time

        import torch.distributed as dist

        if state.global_step % self.every == 0 and dist.is_initialized() and dist.get_rank() == 0:
            time.sleep(self.seconds)
