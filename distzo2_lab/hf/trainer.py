"""ZOTrainer: ``transformers.Trainer`` with the toolkit's ZO engine as its training step.

MeZO (arXiv 2305.17333) needs no backward pass and no torch optimizer, so ``train`` is replaced
whole rather than patched at ``training_step``: each step is one ``engine.step`` on a batch that
is a pure function of (seed, step), the Trainer's callbacks decide when to log, evaluate and
save, evaluation flushes the pending update first, and checkpoints are the toolkit's
(safetensors + seed log, and the method family's state), so ``distzo2 rebuild`` replays them
bit-exactly and a resumed run continues the same trajectory. ZOArguments' optimizer,
perturbation and estimator pick the method (the family's block engine, as ``distzo2 train``
does). A layout ('dp=1,pert=2') runs it as one rank of a launched run.
"""
from __future__ import annotations

import os
from dataclasses import asdict

import torch
from transformers import Trainer
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from distzo2_lab.config import ConfigError, is_family, validate_zo
from distzo2_lab.hf.arguments import ZOArguments, train_config, zo_config
from distzo2_lab.models import build_model
from distzo2_lab.models.lora import is_peft, save_adapters
from distzo2_lab.run.checkpoint import checkpoint_tensors, save_checkpoint, save_method_state
from distzo2_lab.run.train import Run, to_device
from distzo2_lab.seeds import derive_seed, step_seed
from distzo2_lab.zo.spsa import count_tokens


def batch_rows(step: int, rows: int, n: int, seed: int) -> list[int]:
    """Dataset indices of step `step`'s batch: consecutive rows of one seeded permutation per epoch."""
    out = []
    for pos in range(step * rows, (step + 1) * rows):
        epoch, i = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "hf-data", epoch)))
        out.append(int(order[i]))
    return out


class ZOTrainer(Trainer):
    """A Trainer whose step is a ZO method (no backward, no torch optimizer). `model` is a Hugging
    Face model of a supported family, or a preset name / directory; `zo_args` holds the ZO options,
    checked (config.validate_zo) before anything is built."""

    def __init__(self, model=None, args=None, zo_args: ZOArguments | None = None, **kwargs):
        self.zo_args = zo_args or ZOArguments()
        if args is not None:  # a bad method or hyper-parameter is refused before any work
            validate_zo(zo_config(args, self.zo_args))
        self._base_name = model if isinstance(model, str) else self.zo_args.model
        if isinstance(model, str):
            model = build_model(model, seed=args.seed if args is not None else 42)
        if model is not None and is_peft(model):
            raise ConfigError("ZOTrainer wraps the model with peft itself, so its seed log can rebuild it: pass the "
                              "base model and ZOArguments(peft='lora:R' or 'prefix:N')")
        super().__init__(model=model, args=args, **kwargs)
        self.run: Run | None = None
        self.history: list[dict] = []  # one record per ZO step: step, seed, l+, l-, g, lr

    # -- the run ------------------------------------------------------------------------
    def _layout(self):
        """(layout, rank, groups) of a launched rank, or (None, 0, None) alone."""
        if self.zo_args.layout is None:
            return None, 0, None
        import torch.distributed as dist

        from distzo2_lab.parallel.groups import ParallelGroups
        from distzo2_lab.parallel.layout import parse_layout

        if not dist.is_initialized():
            raise ConfigError(f"ZOArguments.layout={self.zo_args.layout!r} runs one rank of a launched run: start "
                              "it with parallel.launch.launch(hf.worker.trainer_worker, ...)")
        layout = parse_layout(self.zo_args.layout)
        return layout, dist.get_rank(), ParallelGroups.build(layout, dist.get_backend(),
                                                            directions=self.zo_args.directions)

    def _base(self, resume: str | None) -> str:
        """The base the seed log names: the given preset / directory, or the starting weights saved
        once to OUTPUT_DIR/base (kept when resuming)."""
        if self._base_name is not None:
            return self._base_name
        path = os.path.abspath(os.path.join(self.args.output_dir, "base"))
        if not (resume and os.path.isdir(path)) and self.is_world_process_zero():
            self.model.save_pretrained(path)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        return path

    def open_run(self, resume: str | None = None) -> Run:
        """The toolkit run behind this trainer (built at train(), or at the first evaluate())."""
        layout, rank, groups = self._layout()
        cfg = train_config(self.args, self.zo_args, self._base(resume), layout.dp if layout else 1)
        self.run = Run(cfg, resume, layout=layout, rank=rank, groups=groups,
                       model=self.model if cfg.offload.tier == "resident" else None)
        if cfg.offload.tier == "resident":
            self.model = self.run.adapter.wrapper or self.run.adapter.model
        return self.run

    # -- training -----------------------------------------------------------------------
    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """No torch optimizer: the update is the engine's (seed, g, lr) record, and the method
        family's state lives in its engine."""

    def _lrs(self, steps: int) -> list[float]:
        """The learning rate of every step under TrainingArguments' schedule (lr_scheduler_type,
        warmup), read from transformers' scheduler on a placeholder parameter."""
        from transformers import get_scheduler

        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.args.learning_rate)
        sched = get_scheduler(self.args.lr_scheduler_type, opt, self.args.get_warmup_steps(steps), steps,
                              scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {})
        lrs = []
        for _ in range(steps):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return lrs

    def _batch(self, step: int, rows: int) -> dict:
        idx = batch_rows(step, rows, len(self.train_dataset), self.args.seed)
        return self.data_collator([self.train_dataset[i] for i in idx])

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """max_steps ZO steps; log / evaluate / save when the Trainer's callbacks say so."""
        resume = resume_from_checkpoint
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)
            if resume is None:
                raise ConfigError(f"resume_from_checkpoint=True: no checkpoint-N in {self.args.output_dir!r}")
        run = self.open_run(resume or None)
        args, cfg = self.args, run.cfg
        self.state = self._start_state(resume, cfg.steps)
        if self.is_world_process_zero():
            run.log.keep_live(os.path.join(args.output_dir, "seedlog.jsonl"))
        lrs, window = self._lrs(cfg.steps), []
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for t in range(run.start, cfg.steps):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            batch = to_device(run.micro_batch(self._batch(t, cfg.batch_size)), cfg.device)
            r = run.engine.step(batch, step_seed(cfg.seed, t), lr=lrs[t], step=t)
            self.history.append(run.record(r))  # seed log, then the disk tier's commit
            window.append((r.loss_plus + r.loss_minus) / 2)
            self.state.global_step = t + 1
            self.state.epoch = (t + 1) * cfg.batch_size / len(self.train_dataset)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._log_evaluate_save(window, r)
            if self.control.should_training_stop:
                break
        run.engine.flush()  # the last deferred update lands before anything reads the weights
        self._finish_offloaded()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        losses = [(h["loss_plus"] + h["loss_minus"]) / 2 for h in self.history]
        return TrainOutput(self.state.global_step, sum(losses) / max(1, len(losses)), {})

    def _start_state(self, resume: str | None, steps: int) -> TrainerState:
        path = os.path.join(resume, "trainer_state.json") if resume else None
        state = TrainerState.load_from_json(path) if path and os.path.isfile(path) else TrainerState()
        state.compute_steps(self.args, steps)
        state.max_steps, state.global_step = steps, self.run.start
        return state

    def _log_evaluate_save(self, window: list[float], r) -> None:
        if self.control.should_log and window:
            self.log({"loss": sum(window) / len(window), "projected_grad": r.grad, "learning_rate": r.lr})
            window.clear()
        if self.control.should_evaluate and self.eval_dataset is not None:
            self.evaluate()
        if self.control.should_save:
            self.save_zo_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _finish_offloaded(self) -> None:
        """An offloaded run trained the store's blocks: the trainer's model receives the result."""
        run = self.run
        if run.offload is not None:
            run.offload.streamer.drain()
            self.model.load_state_dict(checkpoint_tensors(run.adapter, run.values), strict=False)

    # -- checkpoints and evaluation -------------------------------------------------------
    def digest(self) -> str:
        """sha256 of every unique trained parameter (the toolkit's digest)."""
        self.run.engine.flush()
        return self.run.digest()

    def save_zo_checkpoint(self) -> str:
        """OUTPUT_DIR/checkpoint-N: the toolkit's checkpoint (model.safetensors, state.json, seed
        log, and the method family's state: method_state.*, flushed), the Trainer's state, and a
        peft model's adapters the peft way."""
        run = self.run
        run.engine.flush()
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if self.is_world_process_zero():
            state = {"step": self.state.global_step, "config": asdict(run.cfg), "base": run.base,
                     "digest": run.digest()}
            tensors = checkpoint_tensors(run.adapter, run.values)
            save_checkpoint(path, tensors, state, run.log)
            if is_family(run.cfg.zo):  # what a resume loads beside the weights
                save_method_state(path, run.engine.state_dict())
            self.state.save_to_json(os.path.join(path, "trainer_state.json"))
            if run.adapter.wrapper is not None and run.offload is not None:  # values held by the store
                save_adapters(run.adapter.wrapper, tensors, path)
            elif run.adapter.wrapper is not None:
                run.adapter.wrapper.save_pretrained(path)
        return path

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Token-weighted loss over the eval set at the current weights (the pending update is
        flushed first); logged and passed to the callbacks like Trainer.evaluate's."""
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        run = self.run or self.open_run()
        size, total, weight = self.args.per_device_eval_batch_size, 0.0, 0
        for i in range(0, len(data), size):
            batch = to_device(self.data_collator([data[j] for j in range(i, min(i + size, len(data)))]),
                              run.cfg.device)
            n = count_tokens(batch.get("labels", batch["input_ids"]))
            total += run.engine.evaluate(batch) * n
            weight += n
        metrics = {f"{metric_key_prefix}_loss": total / max(1, weight)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
