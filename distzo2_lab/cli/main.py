"""`distzo2`: train, demo, bench, rebuild. Every flag maps onto one config field."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from distzo2_lab.cli import bench as bench_cli
from distzo2_lab.cli import plan as plan_cli
from distzo2_lab.config import (
    COMPUTE_DTYPES,
    ENGINES,
    ESTIMATORS,
    MASTER_DTYPES,
    NOISE_KINDS,
    OFFLOAD_TIERS,
    OPTIMIZERS,
    PERTURB_MODES,
    PERTURBATIONS,
    STORAGE_DTYPES,
    SUITE_TASKS,
    TASKS,
    ConfigError,
    OffloadConfig,
    PrecisionConfig,
    TrainConfig,
    ZOConfig,
    validate,
)
from distzo2_lab.plan.planner import plan_text


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d, z = TrainConfig(), ZOConfig()
    p.add_argument("--model", default=d.model, help="preset name or local checkpoint directory")
    p.add_argument("--steps", type=int, default=d.steps, help="number of ZO steps (a resumed run's total)")
    p.add_argument("--seed", type=int, default=d.seed, help="run seed: init, data order and every step seed")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate; default: by --optimizer (sgd: the tiny presets' 3e-3, MeZO's 1e-6 for "
                        "OPT-shaped and local models; see DEFAULT_LR), or the rate a resumed run last used")
    p.add_argument("--eps", type=float, default=z.eps, help="perturbation scale: theta +- eps z")
    p.add_argument("--weight-decay", type=float, default=z.weight_decay, help="decoupled weight decay")
    p.add_argument("--noise", default=None,
                   help=f"one of {', '.join(NOISE_KINDS)} (default: --perturbation's when dense, else {z.noise})")
    p.add_argument("--optimizer", default=z.optimizer, help=f"update rule, one of {', '.join(OPTIMIZERS)}")
    p.add_argument("--perturbation", default=z.perturbation, help=f"z, one of {', '.join(PERTURBATIONS)}")
    p.add_argument("--estimator", default=z.estimator, help=f"one of {', '.join(ESTIMATORS)}")
    p.add_argument("--directions", type=int, default=None,
                   help="n-SPSA: perturbation directions per step (default 1, or pert/2 with --layout)")
    p.add_argument("--perturb", default=z.perturb,
                   help=f"one of {', '.join(PERTURB_MODES)}: MeZO's in-place round trip or out-of-place copies")
    p.add_argument("--freeze", action="append", default=[], metavar="PATTERN",
                   help="hold the parameters matching this glob fixed (repeatable), e.g. '*word_embeddings*'")
    p.add_argument("--peft", default=None, metavar="lora:R|prefix:N",
                   help="train only peft LoRA adapters of rank R, or a peft prefix of N virtual tokens "
                        "(OPT, GPT-2, LLaMA, Qwen2 models); the base model is held fixed")
    p.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="gradient accumulation: micro-batches per step inside every block visit")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--precision", default="fp32", help=f"compute dtype, one of {', '.join(COMPUTE_DTYPES)}")
    p.add_argument("--storage", default="fp32", help=f"parameter dtype, one of {', '.join(STORAGE_DTYPES)}")
    p.add_argument("--master", default="fp32", help=f"master copy, one of {', '.join(MASTER_DTYPES)} (bf16: rounded "
                   "stochastically, needs --storage bf16)")
    p.add_argument("--engine", default=d.engine, help=f"one of {', '.join(ENGINES)}")
    p.add_argument("--task", default=d.task, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data", default=None, help="text or TSV file for --task text; directory for a suite task")
    p.add_argument("--shots", type=int, default=None, help="a suite task: k examples per class (k-shot)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per rank; default: 1 on a machine with <= 2 cores or busy cores, else its free "
                        "cores shared by the ranks (at most 4)")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    o = OffloadConfig()
    p.add_argument("--offload", default=o.tier, help=f"block tier, one of {', '.join(OFFLOAD_TIERS)}")
    p.add_argument("--prefetch", type=int, default=o.prefetch, help="upload lane runs this many blocks ahead")
    p.add_argument("--store", default=None, help="disk tier: store directory (created, or resumed from)")
    p.add_argument("--link-gbps", type=float, default=None, help="simulate a link of this bandwidth (GB/s)")
    p.add_argument("--lean", action="store_true", help="disk tier: park the embeddings in the store too")
    p.add_argument("--trace", default=None, help="write span events (JSONL) and a Chrome trace here")
    p.add_argument("--profile", default=None, help="torch.profiler traces (Perfetto, TensorBoard) into this directory")
    p.add_argument("--layout", default=None, help="distributed layout dp=D,pert=P (DistZO2)")
    p.add_argument("--world-size", type=int, default=None, help="ranks to launch (default: dp x pert)")
    p.add_argument("--slice", action="store_true", help="each rank moves one shard of every block (DistZO2)")
    p.add_argument("--no-share-noise", action="store_true",
                   help="every rank draws all of z itself (default on CPU: the ranks of a node split the draws)")
    p.add_argument("--dry-run", action="store_true", help="print the layout plan and start nothing")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a distributed run is stopped")
    p.add_argument("--out", default=None,
                   help="directory for summary.json and seedlog.jsonl (written as the run goes); "
                        "default: a fresh runs/train/<date>-<time>")
    p.add_argument("--save", default=None, help="write a checkpoint directory here at the end (or at Ctrl-C)")
    p.add_argument("--report", action="store_true", help="also write OUT/report.html (the demo's report)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _default_directions(layout: str | None) -> int:
    """pert = 2q runs q directions (n-SPSA) unless --directions says otherwise."""
    if not layout:
        return 1
    from distzo2_lab.parallel.layout import parse_layout

    return max(1, parse_layout(layout).pert // 2)


DEFAULT_LR = {  # zo.optimizer: (the tiny presets' rate, the scale for a pretrained model)
    "sgd": (3e-3, 1e-6),  # MeZO fine-tunes OPT with 1e-6 / 1e-7
    "momentum": (3e-4, 1e-7),  # m sums about 1 / (1 - beta) = 10 steps of g z: a tenth of sgd's rate
    "adam": (5e-3, 1e-5),  # each element moves about lr a step, whatever the scale of g
    "sign": (1e-2, 1e-6),  # each element moves exactly lr a step
    "conservative": (3e-3, 1e-6),
    "hizoo": (3e-3, 1e-6),
}


def default_lr(model: str, optimizer: str = "sgd") -> tuple[float, str]:
    """(learning rate, why) for a run without --lr, by model and zo.optimizer (DEFAULT_LR): the
    tiny presets keep their own rate; an OPT-shaped preset or a local (pretrained) checkpoint gets
    MeZO's scale (the tiny rate makes a pretrained-size model's loss blow up). Momentum takes a
    tenth of sgd's rate, as its buffer sums about ten steps; adam and sign move each element by
    about lr whatever g's scale, so theirs is set on the element's step."""
    tiny, pretrained = DEFAULT_LR.get(optimizer, DEFAULT_LR["sgd"])
    for_method = "" if optimizer == "sgd" else f" for {optimizer}"
    if model.startswith("tiny"):
        return tiny, f"the tiny presets' rate{for_method}"
    return pretrained, f"MeZO's scale for {model}{for_method}"


def _resumed_lr(a) -> float | None:
    """The rate a resumed run (--resume or an existing --store) last used."""
    from distzo2_lab.run.checkpoint import SeedLog

    for path in (a.resume and os.path.join(a.resume, "seedlog.jsonl"),
                 a.store and os.path.join(a.store, "seedlog.jsonl")):
        if path and os.path.isfile(path):
            log = SeedLog.read(path, torn_tail=True)
            return log.records[-1]["lr"] if log.records else None
    return None


def _noise(a: argparse.Namespace) -> str:
    """--noise, else the dense --perturbation's kind (they must agree), else the default."""
    if a.noise is not None:
        return a.noise
    return a.perturbation if a.perturbation in NOISE_KINDS else ZOConfig().noise


def config_from_args(a: argparse.Namespace, ranks: int = 1) -> TrainConfig:
    """The run config of `distzo2 train`'s flags; fills --lr and --threads when not given and
    prints what it chose."""
    from distzo2_lab.run.threads import default_threads, machine_load

    chosen = []
    lr, threads = a.lr, a.threads
    if lr is None:
        resumed = _resumed_lr(a)
        lr, why = ((resumed, "the resumed run's last rate") if resumed is not None
                   else default_lr(a.model, a.optimizer))
        chosen.append(f"lr {lr:g} ({why}; --lr to change)")
    if threads is None:
        threads = default_threads(ranks)
        cores, load = machine_load()
        chosen.append(f"{threads} thread{'s' if threads > 1 else ''} per rank ({cores} cores, load {load:.1f}; "
                      "--threads to change)")
    cfg = validate(TrainConfig(
        model=a.model, steps=a.steps, seed=a.seed, batch_size=a.batch_size, seq_len=a.seq_len,
        micro_batches=a.micro_batches,
        engine=a.engine, task=a.task, data=a.data, shots=a.shots, threads=threads, device=a.device,
        zo=ZOConfig(lr=lr, eps=a.eps, weight_decay=a.weight_decay, noise=_noise(a),
                    directions=a.directions or _default_directions(a.layout), perturb=a.perturb,
                    freeze=tuple(a.freeze), optimizer=a.optimizer, perturbation=a.perturbation,
                    estimator=a.estimator),
        precision=PrecisionConfig(compute=a.precision, storage=a.storage, master=a.master),
        offload=OffloadConfig(tier=a.offload, prefetch=a.prefetch, store=a.store, link_gbps=a.link_gbps,
                              lean=a.lean),
        peft=a.peft,
    ))
    if chosen and not a.dry_run:
        print("; ".join(chosen), flush=True)
    return cfg


def _print_summary(s: dict, a) -> None:
    if "overlap" in s:
        o = s["overlap"]
        busy = ", ".join(f"{k} {v:.0%}" for k, v in o["busy"].items())
        hidden = "n/a" if o["hidden_fraction"] is None else f"{o['hidden_fraction']:.0%}"
        print(f"lanes busy: {busy}; transfer hidden under compute: {hidden}; trace in {a.trace}")
    if "profile" in s:
        print(f"profiler trace {s['profile']['chrome']} (open in ui.perfetto.dev); "
              f"tensorboard --logdir {s['profile']['tensorboard']}")
    print(f"loss {s['eval_loss_start']:.4f} -> {s['eval_loss_end']:.4f}; digest {s['digest'][:16]}; "
          f"{s['tokens_per_s']:.0f} tokens/s; peak RSS {s['peak_rss_mb']:.0f} MiB; summary in {a.out}/summary.json")


def _resume_hint(a, next_step: int, steps: int) -> str:
    """What an interrupted run prints: where it stopped and the command that continues it."""
    head = f"interrupted: steps {next_step} of {steps} done; summary and seed log in {a.out}"
    if a.offload == "disk":
        return f"{head}; to continue, rerun the same command (the store {a.store} resumes at step {next_step})"
    if a.layout is not None or (a.world_size or 1) > 1:
        return f"{head}; a distributed run resumes from a disk store only (--offload disk --store DIR)"
    if a.save:
        return f"{head}; to continue, add --resume {a.save} to the same command"
    return (f"{head}; to continue: distzo2 rebuild {a.out}/seedlog.jsonl --save CKPT, then the same command "
            "with --resume CKPT")


def _report(a, cfg: TrainConfig, s: dict, spans, layout=None) -> None:
    from distzo2_lab.observe.report import write_run_report

    text = "one rank"
    if layout is not None:
        text = plan_text(layout, cfg.batch_size, cfg.zo.directions, cfg.micro_batches, cfg.device, cfg.model)
    summary = {"model": cfg.model, "layout": layout.describe() if layout is not None else "one rank",
               "tier": cfg.offload.tier, "steps": f"{s['start_step']} -> {s['next_step']} of {cfg.steps}",
               "batch": f"{cfg.batch_size} x {cfg.seq_len}", "lr": f"{cfg.zo.lr:g}", "eps": f"{cfg.zo.eps:g}",
               "eval loss": f"{s['eval_loss_start']:.4f} -> {s['eval_loss_end']:.4f}",
               "tokens/s (rank 0)": f"{s['tokens_per_s']:.0f}", "digest": s["digest"][:16]}
    path = write_run_report(os.path.join(a.out, "report.html"), f"distzo2 train: {cfg.model}", summary, s["steps"],
                            spans, text, s["tokens_per_s"])
    print(f"report: {path}")


def _train_one_rank(a, cfg: TrainConfig) -> int:
    from distzo2_lab.observe.events import Recorder
    from distzo2_lab.run.train import train

    recorder = Recorder(rank=0) if a.report else None  # the report's timeline and bubbles
    s = train(cfg, out=a.out, save=a.save, resume=a.resume, progress=not a.no_progress, trace=a.trace,
              profile=a.profile, recorder=recorder)
    _print_summary(s, a)
    if a.report:
        _report(a, cfg, s, recorder.spans)
    if s.get("interrupted"):
        print(_resume_hint(a, s["next_step"], cfg.steps), file=sys.stderr)
        return 130
    return 0


def _worker_failed(e, out: str) -> int:
    """One line for a failed rank; its whole traceback goes to OUT/error.log."""
    path = os.path.join(out, "error.log")
    try:
        with open(path, "a") as f:
            f.write(f"{e}\n" if not e.traceback else f"rank {e.rank} failed:\n{e.traceback}\n")
        where = f"; traceback in {path}"
    except OSError:
        where = ""
    who = f"rank {e.rank}" if e.rank is not None else "the run"
    print(f"distzo2: error: {who} failed: {e.cause}{where}", file=sys.stderr)
    return 1


def _launch(a, cfg: TrainConfig, layout, world: int) -> int:
    from distzo2_lab.errors import WorkerError
    from distzo2_lab.observe.live import LiveView
    from distzo2_lab.parallel.launch import format_event, launch
    from distzo2_lab.parallel.stop import sigint_requests_stop
    from distzo2_lab.run.worker import node_memory, train_worker

    handle = launch(train_worker, world, args=(cfg, layout, a.out, a.trace, bool(a.report), a.profile),
                    timeout=a.timeout)
    view = LiveView(title=cfg.model, widget=False) if a.report else None

    def on_event(rank: int, ev) -> None:
        if view is not None:
            view.feed(rank, ev)
        if not a.no_progress and isinstance(ev, dict) and ("log" in ev or ("step" in ev and rank == 0)):
            print(format_event(rank, ev), flush=True)

    try:
        with sigint_requests_stop(handle.stop_control):  # Ctrl-C: every rank stops after the same step
            results = handle.wait(on_event=on_event)
    except WorkerError as e:
        return _worker_failed(e, a.out)
    digests = {r["digest"] for r in results.values()}
    print(f"{layout.describe()}: {'identical' if len(digests) == 1 else 'DIFFERENT'} weights on every rank "
          f"(digest {results[0]['digest'][:16]}); {results[0]['exchange_bytes']:.0f} bytes exchanged per rank "
          f"per step; summary in {a.out}/summary.json")
    for node, m in node_memory(results).items():
        print(f"memory on {node}: {m['total_mb']:.0f} MiB = {m['ranks']} ranks' private {m['private_mb']:.0f} MiB "
              f"+ one shared store {m['shared_store_mb']:.0f} MiB (a store per rank: {m['copy_per_rank_mb']:.0f} MiB)")
    if view is not None:
        with open(os.path.join(a.out, "summary.json")) as f:
            _report(a, cfg, json.load(f), view.rank_spans(), layout)
    if results[0].get("interrupted"):
        print(_resume_hint(a, results[0]["next_step"], cfg.steps), file=sys.stderr)
        return 130
    return 0 if len(digests) == 1 else 1


def cmd_train(a) -> int:
    from distzo2_lab.run.outputs import fresh_out
    from distzo2_lab.run.preflight import preflight

    distributed_env = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    one_rank = a.layout is None and a.world_size in (None, 1) and not distributed_env
    layout = world = None
    if not one_rank:
        import dataclasses

        from distzo2_lab.parallel.layout import Layout, parse_layout

        layout = parse_layout(a.layout) if a.layout else Layout(dp=a.world_size or int(os.environ["WORLD_SIZE"]))
        layout = dataclasses.replace(layout, slice=a.slice, share_noise=not a.no_share_noise)
        world = a.world_size or (int(os.environ["WORLD_SIZE"]) if distributed_env else layout.world_size)
    elif a.slice:
        raise ConfigError("--slice cuts blocks into one shard per rank; give --layout dp=D,pert=P too")
    cfg = config_from_args(a, ranks=1 if one_rank or distributed_env else world)
    if one_rank and a.dry_run:
        print(f"single rank: {cfg.engine} engine, {cfg.offload.tier} tier; nothing launched")
        return 0
    if not one_rank:
        from distzo2_lab.parallel.layout import validate_layout

        validate_layout(layout, world, cfg.batch_size, directions=cfg.zo.directions, micro_batches=cfg.micro_batches)
        if a.save or a.resume:
            raise ConfigError("--save / --resume are single-rank for now; a distributed run writes --out "
                              "and resumes from a disk store (--offload disk --store DIR)")
        if a.report and distributed_env:
            raise ConfigError("--report follows the ranks of a launched run; under torchrun use --trace DIR")
        if a.dry_run:
            print(plan_text(layout, cfg.batch_size, cfg.zo.directions, cfg.micro_batches, cfg.device, cfg.model))
            return 0
    a.out = a.out or fresh_out()
    preflight(cfg, layout, a.out, a.save, a.resume)
    if one_rank:
        return _train_one_rank(a, cfg)
    if distributed_env:  # started by torchrun: this process is one rank
        from distzo2_lab.run.worker import train_worker

        rank = int(os.environ["RANK"])
        r = train_worker(rank, world, None, cfg, layout, a.out if rank == 0 else None, a.trace, profile=a.profile)
        if rank == 0:
            print(f"rank 0 of {world}: digest {r['digest'][:16]}; summary in {a.out}/summary.json")
        return 0
    return _launch(a, cfg, layout, world)


def cmd_demo(a) -> int:
    from distzo2_lab.demo import run_demo

    run_demo(a.out, steps=a.steps)
    return 0


def cmd_rebuild(a) -> int:
    from distzo2_lab.run.checkpoint import SeedLog, checkpoint_tensors, digest, save_checkpoint
    from distzo2_lab.run.train import rebuild

    t0 = time.perf_counter()
    adapter = rebuild(a.seedlog, threads=a.threads)
    d = digest(adapter)
    if a.save:
        log = SeedLog.read(a.seedlog)
        tensors = checkpoint_tensors(adapter)
        save_checkpoint(a.save, tensors, {"step": len(log.records), "base": log.base, "digest": d,
                                          "config": {"model": log.base["model"],
                                                     "seed": log.base.get("init_seed", 0)}}, log)
    print(json.dumps({"digest": d, "seconds": time.perf_counter() - t0}) if a.json else f"digest {d}")
    return 0


def cmd_eval(a) -> int:
    from distzo2_lab.run.evaluate import evaluate_checkpoint, result_line

    r = evaluate_checkpoint(a.checkpoint, a.data, a.split, a.task, a.limit, a.batch_size, a.threads)
    print(json.dumps(r, indent=1) if a.json else result_line(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distzo2", description="distributed zeroth-order fine-tuning lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="ZO fine-tuning on one rank or a launched layout",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_train_args(t)
    t.set_defaults(fn=cmd_train)
    d = sub.add_parser("demo", help="the main job on embedded defaults (tiny OPT, synthetic task)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=300)
    d.set_defaults(fn=cmd_demo)
    bench_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    r = sub.add_parser("rebuild", help="base model + seed log -> fine-tuned weights (bit-exact)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("seedlog")
    r.add_argument("--save", default=None, help="write the rebuilt checkpoint here")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_rebuild)
    ev = sub.add_parser("eval", help="a checkpoint's accuracy (squad: F1, exact match) on a split",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (train --save)")
    ev.add_argument("--task", default="sst2", help=f"one of {', '.join(SUITE_TASKS)}")
    ev.add_argument("--data", required=True, help="directory of the task's published files")
    ev.add_argument("--split", default="dev",
                    help="train, validation (samples of the training file), dev (sst2: also test)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of this many examples")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"distzo2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
