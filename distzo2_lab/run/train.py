"""One-rank training loop: config -> model, engine, task -> steps -> summary, seed log, checkpoint.

This is what ``distzo2 train``, ``distzo2 demo``, the tutorials and the tests all call. Step
seeds and batches are pure functions of (run seed, step), so a resumed run continues the exact
trajectory of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from distzo2_lab.config import (
    SUITE_TASKS,
    ConfigError,
    PrecisionConfig,
    TrainConfig,
    ZOConfig,
    copies_perturbation,
    is_family,
    resolve_perturb,
    share_grain,
    validate,
)
from distzo2_lab.data.tasks import SyntheticTask, TextTask, tokenizer_for
from distzo2_lab.models import BlockAdapter, adapter_for, build_model
from distzo2_lab.models.lora import is_peft, save_adapters, wrap_peft
from distzo2_lab.models.presets import is_local_dir
from distzo2_lab.observe.events import Recorder, overlap_metrics, write_trace
from distzo2_lab.offload.tiers import Offload, method_of
from distzo2_lab.parallel.stop import Stop, launched, sigint_requests_stop
from distzo2_lab.run.checkpoint import (
    SeedLog,
    checkpoint_tensors,
    digest,
    load_method_state,
    load_weights,
    read_state,
    replay,
    save_checkpoint,
    save_method_state,
)
from distzo2_lab.run.outputs import check_writable, write_json
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.family_engine import FamilyEngine
from distzo2_lab.zo.family_reference import EagerFamily, replay_scalars
from distzo2_lab.zo.methods import METHODS
from distzo2_lab.zo.reference import EagerMeZO
from distzo2_lab.zo.spsa import PendingUpdate, hold_masters

EVAL_STEP = 10**9  # batches at this index and above are never trained on
SUMMARY_EVERY = 25  # steps between two rewrites of DIR/summary.json while a run goes


def base_of(cfg: TrainConfig) -> dict:
    """Where the starting weights come from (what a seed log replays onto), and the device type
    whose generators drew z (CPU and CUDA generators give different numbers for one seed), and a
    bf16 master (precision.master='bf16': the replay rounds each update as training did)."""
    peft = {"peft": cfg.peft, "peft_seed": cfg.seed} if cfg.peft is not None else {}
    if cfg.precision.master == "bf16":
        peft["master"] = "bf16"
    if is_local_dir(cfg.model):
        return {"model": os.path.abspath(cfg.model), "device": cfg.device, **peft}
    return {"model": cfg.model, "init_seed": cfg.seed, "device": cfg.device, **peft}


def start_model(base: dict, model=None):
    """The starting model of `base` on CPU (seeded init is device-independent): built, or `model`
    when the caller holds it already; wrapped with its LoRA adapters when the base names some."""
    if model is None:
        model = build_model(base["model"], seed=base.get("init_seed", 0))
    if base.get("peft") is not None and not is_peft(model):
        model = wrap_peft(model, base["peft"], base.get("peft_seed", 0))
    return model


def build_adapter(base: dict, storage: str = "fp32", device: str = "cpu", model=None) -> BlockAdapter:
    """The starting model (see start_model) moved to `device`; the adapter of its family (OPT,
    GPT-2, LLaMA, Qwen2, BERT)."""
    return adapter_for(start_model(base, model).to(device), storage)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def build_engine(cfg: TrainConfig, adapter: BlockAdapter, recorder: Recorder | None = None, **zo2_options):
    """The engine `cfg.engine` names; `zo2_options` (streamer, signs, exchange, slicer...) go to ZO2Engine."""
    if cfg.engine == "zo2" and is_family(cfg.zo):  # the method family's block engine
        return FamilyEngine(adapter, cfg.zo, cfg.precision, threads=cfg.threads, recorder=recorder, **zo2_options)
    if cfg.engine == "zo2":
        return ZO2Engine(adapter, cfg.zo, cfg.precision, threads=cfg.threads, recorder=recorder, **zo2_options)
    if is_family(cfg.zo):  # another optimiser, perturbation or estimator: the family's eager reference
        return EagerFamily(adapter, cfg.zo, cfg.precision, threads=cfg.threads, micro_batches=cfg.micro_batches)
    return EagerMeZO(adapter, cfg.zo, cfg.precision, threads=cfg.threads, micro_batches=cfg.micro_batches)


def node_share():
    """How this rank shares its node's store: the node's first rank leads, a name common to the run."""
    import uuid

    import torch.distributed as dist

    from distzo2_lab.offload.tiers import NodeShare

    name = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return NodeShare(leader=int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0, barrier=dist.barrier,
                     name=name[0])


def memory_report(run) -> dict:
    """This rank's memory: peak RSS (counts the shared store pages it touched), private (USS) now,
    and the shared store counted once per node (0 without one)."""
    import psutil

    shared = run.offload.shared_bytes() if run.offload is not None else 0
    return {"peak_rss_mb": peak_rss_mb(), "private_mb": psutil.Process().memory_full_info().uss / 2**20,
            "shared_store_mb": shared / 2**20}


def comm_device(device: str) -> str:
    """Where the optimiser's scalars are gathered: the rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    return "cuda" if device == "cuda" and dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def make_task(cfg: TrainConfig, adapter: BlockAdapter):
    if cfg.seq_len > adapter.max_positions:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the model's "
                          f"max_position_embeddings={adapter.max_positions}")
    vocab = adapter.config.vocab_size
    if cfg.task == "synthetic":
        return SyntheticTask(vocab, cfg.seq_len, cfg.batch_size, cfg.seed)
    if cfg.task == "sst2":
        from distzo2_lab.data.sst2 import task_for

        return task_for(cfg, adapter)  # sets adapter.choices for a causal LM (label-word loss)
    if cfg.task in SUITE_TASKS:
        from distzo2_lab.data.suite import task_for as suite_task

        return suite_task(cfg, adapter)  # sets adapter.choices: label words, or None (continuation loss)
    return TextTask(cfg.data, tokenizer_for(cfg.model), cfg.seq_len, cfg.batch_size, cfg.seed, vocab)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rebuild(log_path: str, threads: int = 1, storage: str = "fp32") -> BlockAdapter:
    """Base model + seed log -> the fine-tuned weights, bit-identical to training's.

    Replays on the device type that trained (its generators drew z)."""
    log = SeedLog.read(log_path)
    device = log.base.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"seed log {log_path!r} was made on CUDA and must be replayed there (its updates "
                          "were computed with CUDA's elementwise arithmetic); no CUDA device is visible")
    if log.base.get("master") == "bf16":  # the masters were bf16, each update rounded stochastically
        storage = "bf16"
    adapter = build_adapter(log.base, storage, device)
    if log.base.get("master") == "bf16":
        hold_masters(adapter, PrecisionConfig("bf16", "bf16", "bf16"))
    replay(adapter, log, threads)
    return adapter


def _check_resume(resume: str, cfg: TrainConfig, log: SeedLog) -> None:
    """A run continues only under the rule that made it: same device type and update rule."""
    if log.base.get("device", "cpu") != cfg.device:
        raise ConfigError(f"resume={resume!r} was trained on device={log.base.get('device', 'cpu')!r}; "
                          f"device={cfg.device!r} would round its updates differently. Resume on the same device type")
    if log.base.get("master", "fp32") != cfg.precision.master:
        raise ConfigError(f"resume={resume!r} was trained with precision.master={log.base.get('master', 'fp32')!r}; "
                          f"precision.master={cfg.precision.master!r} would round its updates differently. "
                          "Pass the same")
    # lr is logged per step and may change; the rest shapes z and the update rule.
    differ = [f"zo.{k}" for k in ("eps", "weight_decay", "noise", "perturb")
              if getattr(log.zo, k) != getattr(cfg.zo, k)]
    if differ:
        raise ConfigError(f"resume={resume!r} was trained with different {', '.join(differ)} "
                          f"({', '.join(f'{k}={getattr(log.zo, k[3:])!r}' for k in differ)}); "
                          "a seed log replays one rule, so pass the same values")


def resume_note(path: str, step: int, cfg: TrainConfig, log: SeedLog, old: dict | None = None) -> str:
    """'resuming PATH at step N (lr 1e-4, was 3e-3)': where a run continues and what changed."""
    changed = []
    if log.records and log.records[-1]["lr"] != cfg.zo.lr:
        changed.append(f"lr {cfg.zo.lr:g}, was {log.records[-1]['lr']:g}")
    for k in ("batch_size", "seq_len", "micro_batches", "task", "data", "shots", "engine"):
        if old is not None and k in old and old[k] != getattr(cfg, k):
            changed.append(f"{k} {getattr(cfg, k)!r}, was {old[k]!r}")
    return f"resuming {path} at step {step}" + (f" ({'; '.join(changed)})" if changed else "")


def state_digest(sd: dict) -> str:
    """sha256 of a FamilyEngine's optimiser state (every bucket's tensors, by name) and its schedules."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(sd["state"]):
        for name in sorted(sd["state"][key]):
            h.update(f"{key}.{name}".encode())
            h.update(sd["state"][key][name].detach().float().cpu().contiguous().numpy().tobytes())
    for key in sorted(sd["thresholds"]):
        h.update(key.encode())
        h.update(sd["thresholds"][key].detach().float().cpu().contiguous().numpy().tobytes())
    h.update(repr((sd["v_seed"], sd["updates"], sd["step"], sd["pending"])).encode())
    return h.hexdigest()


class Run:
    """Everything one rank's training holds: adapter, engine, seed log, and the offload tier."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, recorder: Recorder | None = None,
                 layout=None, rank: int = 0, groups=None, model=None):
        """`layout` / `rank`: this process is one rank of a distributed run; `groups`
        (parallel.groups.ParallelGroups) are its process groups, built here when not given.
        `model`: the starting model already built (its weights are the base's), trained in place
        by the resident tier."""
        cfg = resolve_perturb(cfg)
        self.cfg, self.base = cfg, base_of(cfg)
        self.recorder = recorder or Recorder(enabled=False)
        self.layout, self.rank = layout, rank
        distributed = layout is not None and layout.world_size > 1
        if distributed and (cfg.engine != "zo2" or resume is not None):
            raise ConfigError("a distributed layout runs engine='zo2' and resumes from its disk store "
                              "(offload.store), not from resume=")
        if distributed and groups is None:
            from distzo2_lab.parallel.groups import ParallelGroups

            groups = ParallelGroups.build(layout, directions=cfg.zo.directions)
        self.groups = groups
        self.offload = None
        self.log, self.start = SeedLog(self.base, cfg.zo), 0
        self.notes: list[str] = []  # resume messages, printed by rank 0
        self.exchange = self.slicer = None
        extra = {}
        if distributed:
            from distzo2_lab.parallel.exchange import LossExchange

            self.exchange = LossExchange(groups.pert, groups.dp, recorder=self.recorder, device=comm_device(cfg.device))
            extra = {"signs": groups.signs, "exchange": self.exchange, "directions": groups.directions}
            if is_family(cfg.zo):  # the family deals its passes out over the pert group itself
                extra = {"exchange": self.exchange, "pert": (layout.coords(rank)[1], layout.pert)}
        if cfg.engine == "zo2":
            extra["micro_batches"] = cfg.micro_batches
        if layout is not None and layout.slice:
            if cfg.offload.tier == "resident":
                raise ConfigError("layout slice=True moves shards of offloaded blocks: choose offload.tier='host' "
                                  "or 'disk' (offload.tier='resident' moves no shards)")
            from distzo2_lab.parallel.slicer import Slicer

            self.slicer = Slicer(rank, layout.world_size, group=groups and groups.world, recorder=self.recorder)
            extra["slicer"] = self.slicer
        pending = None
        if cfg.offload.tier == "resident":
            self.adapter = build_adapter(self.base, cfg.precision.storage, cfg.device, model)
            cfg = self._hold_frozen()
            if resume is not None:
                self._resume(resume)
        else:
            if resume is not None:
                raise ConfigError("resume= reads a resident checkpoint; an offloaded disk run resumes from "
                                  "its offload.store directory")
            # the method family's ranks each stream their own master and state on the host tier; on
            # disk the node's ranks share one store (their masters and state are bit-identical)
            shared = node_share() if distributed and (not is_family(cfg.zo) or cfg.offload.tier == "disk") else None
            self.offload = Offload(self.base, cfg.offload, cfg.precision.storage, cfg.device, self.recorder,
                                   self.slicer, shared, cfg.precision.master,
                                   cfg.zo.freeze, METHODS[cfg.zo.optimizer].state if is_family(cfg.zo) else (),
                                   self._base_dtype(), method=method_of(cfg.zo))
            self.adapter = self.offload.adapter
            cfg = self._hold_frozen()
            extra.update(self.offload.engine_options())
            if cfg.offload.tier == "disk":
                pending = self._open_disk_log()
        if cfg.engine == "zo2":
            extra.update(start_step=self.start, pending=pending)
            if distributed:
                extra.update(self._node_shares(groups))
        self.engine = build_engine(cfg, self.adapter, self.recorder, **extra)
        if resume is not None and is_family(cfg.zo):  # the optimiser state and schedules beside the weights
            self.engine.load_state_dict(load_method_state(resume))
        if self.offload is not None and is_family(cfg.zo):  # a disk store commits them with every step
            self.offload.keep_method_state(self.engine, self.log.records[-1] if self.start else None)
        if self.start >= cfg.steps:
            raise ConfigError(f"steps={cfg.steps} is not beyond the step {self.start} already trained")

    def _base_dtype(self):
        """The dtype a copies run's forwards read fixed spans in (None: the masters' fp32 travels)."""
        from distzo2_lab.models.buckets import DTYPES

        p = self.cfg.precision
        if p.compute == "fp32" or p.master != "fp32" or not copies_perturbation(self.cfg.zo):
            return None
        return DTYPES[p.compute]

    def _hold_frozen(self) -> TrainConfig:
        """A peft model trains its adapters only: the rest joins zo.freeze (held fixed); the config."""
        if self.adapter.frozen:
            zo = dataclasses.replace(self.cfg.zo, freeze=self.cfg.zo.freeze + self.adapter.frozen)
            self.cfg = dataclasses.replace(self.cfg, zo=zo)
            self.log.zo = zo
        return self.cfg

    def _node_shares(self, groups) -> dict:
        """The engine's noise generator and the node's shares of its masters, draws and copies (CPU
        ranks of one machine). Resident fp32 masters with copies: the machine's ranks hold them once
        and make every update and copy once (master_share.py). Otherwise pieces are at most one
        block wide; a piece of one chunk (config.share_grain()) has nothing to split, so a model
        whose blocks fit one chunk draws everything alone."""
        cfg = self.cfg
        width = max(b.numel for b in self.adapter.blocks)
        if is_family(cfg.zo):  # each rank updates its own master and state; the passes are split instead
            return {}
        if not (self.layout.share_noise and cfg.device == "cpu" and width > share_grain()):
            return {}
        from distzo2_lab.models.buckets import DTYPES
        from distzo2_lab.parallel.copy_share import open_node_copies
        from distzo2_lab.parallel.node_share import open_node_noise
        from distzo2_lab.zo.perturb import Perturber

        perturber = Perturber(cfg.zo.noise).freeze(self.adapter.buckets, cfg.zo.freeze)
        if copies_perturbation(cfg.zo) and self.offload is None and self.slicer is None \
                and cfg.precision.master == "fp32" and not is_family(cfg.zo):
            from distzo2_lab.parallel.master_share import open_node_masters

            # resident masters held once by the machine's ranks: every update and copy made once
            masters = open_node_masters(self.adapter, perturber, groups, DTYPES[cfg.precision.compute])
            if masters is not None:
                return {"perturber": perturber, "master_share": masters}
        if copies_perturbation(cfg.zo):  # the block copies, made once by the ranks of the same one sign
            if all(groups.signs):  # both signs: one fused pass makes both copies, z computed once for the two
                return {}
            copies = open_node_copies(groups, width, DTYPES[cfg.precision.compute])
            return {"perturber": perturber, "copy_share": copies}
        return {"perturber": perturber, "noise_share": open_node_noise(perturber, groups, width)}  # in place: z

    def _open_disk_log(self) -> PendingUpdate | None:
        """A store that holds a run: continue it from its committed step; returns the update it owes."""
        path = os.path.join(self.cfg.offload.store, "seedlog.jsonl")
        committed, pending = self.offload.resumed_step, None
        if committed >= 0:
            self.log = SeedLog.read(path, torn_tail=True)
            _check_resume(self.cfg.offload.store, self.cfg, self.log)
            self.log.records = [r for r in self.log.records if r["step"] <= committed]  # drop uncommitted
            r = self.log.records[-1]
            owed = not self.offload.store.flushed  # a committed flush applied it (Offload.after_flush)
            if owed and not is_family(self.cfg.zo):  # the family's comes with its run state (keep_method_state)
                pending = PendingUpdate(r["step"], r["seed"], r["grad"], r["lr"],
                                        tuple(map(tuple, r.get("terms", ()))))  # n-SPSA: every direction
            self.start = committed + 1
            self.notes.append(resume_note(self.cfg.offload.store, self.start, self.cfg, self.log))
        if self.offload.node is None or self.offload.node.leader:  # one writer of the store's log
            self.log.keep_live(path)
        return pending

    def _resume(self, resume: str) -> None:
        state = read_state(resume)
        held = state["config"].get("zo", {})
        fields = ("optimizer", "perturbation", "estimator", "directions")
        method = {k: held.get(k, getattr(ZOConfig(), k)) for k in fields}
        if method != {k: getattr(self.cfg.zo, k) for k in method}:
            raise ConfigError(f"resume={resume!r} was trained with "
                              f"{', '.join(f'zo.{k}={v!r}' for k, v in method.items())}; "
                              "its optimiser state belongs to that method, so pass the same values")
        if state["config"]["model"] != self.cfg.model or state["config"]["seed"] != self.cfg.seed:
            raise ConfigError(f"resume={resume!r} was trained with model={state['config']['model']!r}, "
                              f"seed={state['config']['seed']}; pass the same model and seed")
        load_weights(self.adapter, os.path.join(resume, "model.safetensors"))
        self.log = SeedLog.read(os.path.join(resume, "seedlog.jsonl"))
        _check_resume(resume, self.cfg, self.log)
        self.start = state["step"]
        self.notes.append(resume_note(resume, self.start, self.cfg, self.log, state["config"]))

    def micro_batch(self, batch: dict) -> dict:
        """This rank's rows of the global batch: dp group d takes the d-th contiguous slice."""
        if self.layout is None or self.layout.dp == 1:
            return batch
        d = self.layout.coords(self.rank)[0]
        n = next(iter(batch.values())).shape[0] // self.layout.dp
        return {k: v[d * n : (d + 1) * n] for k, v in batch.items()}

    def values(self, bucket) -> torch.Tensor:
        return bucket.master if bucket.master is not None else self.offload.block_values(bucket)

    def digest(self) -> str:
        return digest(self.adapter, self.values)

    def record(self, r) -> dict:
        """After engine.step: step result `r` into the seed log (with the method's replay scalars),
        then the disk tier's commit of the step (durable once its record is logged); returns the
        step's per-step record (losses, g, lr) for the summary or the trainer's history."""
        self.log.append(r.step, r.seed, r.grad, r.lr, r.terms, replay_scalars(self.engine))
        if self.offload is not None:
            self.offload.commit(r.step)
        return {"step": r.step, "seed": r.seed, "loss_plus": r.loss_plus, "loss_minus": r.loss_minus,
                "projected_grad": r.grad, "lr": r.lr}

    def close(self) -> None:
        for share in (getattr(self.engine, name, None) for name in ("noise_share", "copy_share", "master_share")):
            if share is not None:
                share.close()
        if self.offload is not None:
            self.offload.close()
        self.log.close()


def train(cfg: TrainConfig, out: str | None = None, save: str | None = None, resume: str | None = None,
          progress: bool = True, on_step=None, trace: str | None = None, layout=None, rank: int = 0,
          recorder: Recorder | None = None, profile=None, groups=None) -> dict:
    """Run `cfg.steps` ZO steps; write DIR/summary.json and DIR/seedlog.jsonl when `out` is set.

    The outputs are written as the run goes: the seed log gets each step's record as it is made,
    the summary is rewritten every SUMMARY_EVERY steps and at the end (``"finished"`` says which),
    and `out` / `save` are checked writable before any work. A SIGINT (Ctrl-C) stops the run
    after a whole step (every rank after the same one); it then flushes, writes its outputs and
    returns a summary with ``"interrupted": True``.

    `on_step(result)` is called after every step (live plots in notebooks); `trace=DIR` records
    span events and writes per-rank JSONL and a Chrome trace there; `recorder` records into a
    given Recorder (live views); `profile=DIR` (or profiling.ProfileOptions) runs the steps under
    torch.profiler. `layout` / `rank` run this process as one rank of a distributed run (the
    process group must exist; see launch.py), over `groups` (parallel.groups.ParallelGroups; built
    from the layout when None).
    """
    validate(cfg)
    for path, name in ((out, "out"), (save, "save")):
        if path is not None:
            check_writable(path, name)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    recorder = recorder or Recorder(rank=rank, enabled=trace is not None or profile is not None)
    profiler = None
    if profile is not None:
        from distzo2_lab.observe.profiling import StepProfiler

        profiler, recorder.ranges = StepProfiler(profile, rank), True
    run = Run(cfg, resume, recorder, layout, rank, groups)
    # one rank alone stops on its own; ranks started by the launcher share one stop step; ranks
    # started by torchrun are stopped by torchrun
    stop = Stop() if layout is None or layout.world_size == 1 else launched()
    try:
        if rank == 0:
            for note in run.notes:
                print(note, file=sys.stderr, flush=True)
        task = make_task(cfg, run.adapter)
        if out is not None:
            run.log.keep_live(os.path.join(out, "seedlog.jsonl"))
        with sigint_requests_stop(stop) if stop is not None else nullcontext():
            if profiler is not None:
                with profiler:
                    summary = _loop(run, task, progress, profiler.wrap(on_step), out, stop)
                summary["profile"] = {"chrome": profiler.chrome, "tensorboard": profiler.tb_dir}
            else:
                summary = _loop(run, task, progress, on_step, out, stop)
        if trace is not None:
            summary["trace"] = write_trace(recorder, trace)
            summary["overlap"] = overlap_metrics(recorder.spans)
        _write_outputs(run, summary, out, save)
        return summary
    finally:
        run.close()
        torch.set_num_threads(threads_before)


def _progress_summary(run: Run, records: list[dict], tokens: int, elapsed: float) -> dict:
    """What a summary holds at any point of the run (the final one adds the end's numbers)."""
    return {"config": asdict(run.cfg), "base": run.base, "start_step": run.start, "steps": records,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "seconds": elapsed, "finished": False}


def _loop(run: Run, task, progress: bool, on_step, out: str | None = None, stop: Stop | None = None) -> dict:
    cfg, engine = run.cfg, run.engine
    eval_batch = to_device(task.batch(EVAL_STEP), cfg.device)
    eval_start = engine.evaluate(eval_batch)
    records, tokens = [], 0
    t0 = time.perf_counter()
    streamer = run.offload.streamer if run.offload is not None else None
    moved0 = (streamer.bytes_up_of_announced_sweeps(), streamer.bytes_down) if streamer is not None else None
    for t in tqdm(range(run.start, cfg.steps), disable=not progress or run.rank != 0,
                  desc=f"{cfg.engine} {cfg.model}",
                  initial=run.start, total=cfg.steps):
        if stop is not None and stop.should_stop(t, run.rank):
            break
        r = engine.step(to_device(run.micro_batch(task.batch(t)), cfg.device), step_seed(cfg.seed, t), step=t)
        records.append(run.record(r))
        tokens += r.tokens
        if on_step is not None:
            on_step(r)
        if out is not None and len(records) % SUMMARY_EVERY == 0:
            summary = _progress_summary(run, records, tokens, time.perf_counter() - t0)
            write_json(os.path.join(out, "summary.json"), {**summary, "eval_loss_start": eval_start})
    moved = None
    if streamer is not None:
        streamer.drain()
        moved = _bytes_moved(run, len(records), moved0)
    elapsed = time.perf_counter() - t0
    engine.flush()  # the last deferred update lands before anything reads the weights
    interrupted = run.start + len(records) < cfg.steps
    return {
        **_progress_summary(run, records, tokens, elapsed),
        "finished": not interrupted,
        "interrupted": interrupted,
        "next_step": run.start + len(records),
        "eval_loss_start": eval_start,
        "eval_loss_end": engine.evaluate(eval_batch),
        "digest": run.digest(),
        **({"state_digest": state_digest(engine.state_dict())} if isinstance(engine, FamilyEngine) else {}),
        "peak_rss_mb": peak_rss_mb(),
        "memory": memory_report(run),
        **(moved or {}),
        **({"layout": {"dp": run.layout.dp, "pert": run.layout.pert}, "rank": run.rank,
            "exchange_bytes_per_step": run.exchange.bytes_sent / max(1, len(records)),
            "sliced": run.slicer is not None, "noise_share": _noise_report(engine.noise_share),
            "copy_share": _copy_report(engine.copy_share), "master_share": _master_report(engine.master_share)}
           if run.exchange is not None else {}),
    }


def _bytes_moved(run: Run, steps: int, before: tuple[int, int]) -> dict:
    """What an offloaded run's blocks moved between their store and working memory during its
    steps (evaluations and the final flush left out), per step: each way, and per parameter of the
    model (the figure the host tier's schemes are compared by)."""
    s, params = run.offload.streamer, sum(b.numel for b in run.adapter.buckets)
    up, down = s.bytes_up_of_announced_sweeps() - before[0], s.bytes_down - before[1]  # not the next prefetch
    steps = max(1, steps)
    return {"bytes_up_per_step": up / steps, "bytes_down_per_step": down / steps,
            "bytes_per_param_per_step": (up + down) / steps / params}


def _copy_report(share) -> dict:
    """How this rank's perturbed block copies were made: alone (ranks 1), or with `ranks` ranks."""
    if share is None:
        return {"ranks": 1}
    return {"ranks": share.size, "computed_elements": share.computed, "served_elements": share.served,
            "computed_fraction": share.computed / max(1, share.served), "alone_elements": share.alone}


def _master_report(share) -> dict:
    """How this rank's masters were held: its own (ranks 1), or once for `ranks` ranks of its node,
    with the share of the node's updates and copies it computed."""
    if share is None:
        return {"ranks": 1}
    return {"ranks": share.blocks.size, "computed_elements": share.computed, "served_elements": share.served,
            "computed_fraction": share.computed / max(1, share.served), "waited_s": share.waited_s,
            "signs": list(share.signs)}


def _noise_report(share) -> dict:
    """How this rank's z was drawn: alone (ranks 1), or split with `ranks` ranks of its node."""
    if share is None:
        return {"ranks": 1}
    return {"ranks": share.size, "drawn_elements": share.drawn, "served_elements": share.served,
            "copied_elements": share.copied, "drawn_fraction": share.drawn / max(1, share.served),
            "alone_elements": share.alone, "waited_s": share.waited_s}


def _write_outputs(run: Run, summary: dict, out: str | None, save: str | None) -> None:
    """The final summary (the seed log is already complete: it was written step by step), and
    the checkpoint at the step the run reached."""
    if out is not None:
        write_json(os.path.join(out, "summary.json"), summary)
    if save is not None:
        tensors = checkpoint_tensors(run.adapter, run.values)
        save_checkpoint(save, tensors, {"step": summary["next_step"], "config": asdict(run.cfg), "base": run.base,
                                        "digest": summary["digest"]}, run.log)
        if is_family(run.cfg.zo):  # flushed: nothing pending
            save_method_state(save, run.engine.state_dict())
        if run.adapter.wrapper is not None and run.offload is not None:  # the blocks' adapters are in the store
            save_adapters(run.adapter.wrapper, tensors, save)
        elif run.adapter.wrapper is not None:  # the adapters alone, loadable with PeftModel.from_pretrained
            run.adapter.wrapper.save_pretrained(save)
