"""The SST-2 benchmark's side-by-side tables: full-parameter ZO beside ZO on ``peft`` LoRA adapters,
and the ZO method family from one start.

Every method starts from the same head and weights and sees the same batches and step seeds; only
what it perturbs (every parameter but the frozen globs, or the LoRA adapters alone; MeZO, arXiv
2305.17333, Sec. 3 runs both) or how it steps (zo.optimizer / zo.perturbation / zo.estimator, the
family of ZO-Bench, arXiv 2402.11592) differs. Each row carries its dev accuracy, McNemar's paired
test against the start (and LoRA's against full ZO), the seconds spent in ZO steps and the
training phase's peak RSS. A family method is named ``NAME[:LR][+PERTURBATION][+ESTIMATOR]``.
"""
from __future__ import annotations

import dataclasses
import math

from distzo2_lab.config import OPTIMIZERS, ConfigError, ZOConfig, validate_zo
from distzo2_lab.observe.events import overlap_metrics

METHOD_SPEC = ("NAME[:LR][+PERTURBATION][+ESTIMATOR], e.g. 'adam:1e-4', 'sgd+lowrank:4', 'sgd+sparse:0.5', "
               "'sgd+one-sided:4'")


def bytes_per_step(recorder, steps: int) -> float:
    """Bytes the recorded transfer spans (upload, offload) moved per step: 0 on the resident tier."""
    moved = overlap_metrics(recorder.spans).get("bytes", {}) if recorder.spans else {}
    return sum(moved.values()) / max(1, steps)


def _lr(spec: str, text: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        lr = math.nan
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optimizer={spec!r}: lr {text!r} is not valid; it must be a positive finite number")
    return lr


def _part(spec: str, part: str) -> dict:
    """The zo fields one '+PART' of a method spec sets: a perturbation or an estimator."""
    kind, _, arg = part.partition(":")
    if kind in ("lowrank", "sparse", "dense") or (kind in ("gaussian", "rademacher") and not arg):
        return {"perturbation": part, **({"noise": kind} if kind in ("gaussian", "rademacher") else {})}
    if kind == "two-point" and not arg:
        return {"estimator": "two-point"}
    if kind == "one-sided" and arg.isdigit():
        return {"estimator": "one-sided", "directions": int(arg)}
    raise ConfigError(f"optimizer={spec!r}: {part!r} is not valid after '+'; choose a perturbation (lowrank:R, "
                      "sparse:F, dense, gaussian, rademacher) or an estimator (two-point, one-sided:K)")


def method_zo(spec: str, base: ZOConfig) -> ZOConfig:
    """`base` stepped as method `spec` (``NAME[:LR][+PERTURBATION][+ESTIMATOR]``), validated; a
    spec without ':LR' keeps base.lr."""
    name, *parts = spec.split("+") if isinstance(spec, str) else [""]
    name, _, lr = name.partition(":")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r} is not valid; choose one of {', '.join(OPTIMIZERS)} "
                          f"(a method is {METHOD_SPEC})")
    fields = {"optimizer": name, **({"lr": _lr(spec, lr)} if lr else {})}
    for part in parts:
        fields.update(_part(spec, part))
    try:
        return validate_zo(dataclasses.replace(base, **fields))
    except ConfigError as e:
        raise ConfigError(f"optimizer={spec!r}: {e}") from e


def method_configs(specs: tuple[str, ...], base: ZOConfig) -> list[tuple[str, ZOConfig, str]]:
    """(spec, zo, engine) of each method, all checked before any training: every method runs on the
    zo2 block engine (the family's FamilyEngine is bit-exact with its eager reference)."""
    if len(set(specs)) != len(specs):
        raise ConfigError(f"optimizer={list(specs)!r} names a method twice; give each method once")
    out = []
    for spec in specs:
        zo = method_zo(spec, base)
        out.append((spec, zo, "zo2"))
    return out


def _test(c: dict | None) -> str:
    return "" if c is None else f"+{c['gained']} / -{c['lost']}, p = {c['p_value']:.2g}"


def _steps(m: dict) -> str:
    chosen = m.get("selected_step", m["steps"])
    return str(m["steps"]) if chosen == m["steps"] else f"{chosen} of {m['steps']}"


def _row(name: str, m: dict, vs_start: dict | None) -> dict:
    return {"method": name, "accuracy": m["accuracy"], "vs_start": _test(vs_start), "steps": _steps(m),
            "lr": m["lr"], "seconds": m["seconds"], "peak_mb": m["memory"]["peak_mb"],
            "added_mb": m["memory"]["added_mb"]}


def method_rows(r: dict) -> list[dict]:
    """One dict per method of a run() result that trained ZO both ways (r["zo"] and r["lora"])."""
    rows = []
    for key, name in (("zo", "full ZO"), ("lora", f"LoRA rank {r['lora']['rank']}" if "lora" in r else "")):
        m = r.get(key)
        if m is None:
            continue
        rows.append({**_row(name, m, r.get(f"{key}_vs_start")),
                     "vs_full": _test(r.get("lora_vs_zo")) if key == "lora" else "",
                     "trained": m["trained_params"], "bytes": m["bytes_per_step"]})
    return rows


def family_rows(r: dict) -> list[dict]:
    """One dict per method of a run() result with ``optimizer`` methods (r["methods"]), then the
    first-order reference when it ran."""
    rows = [{**_row(m["method"], m, m["vs_start"]), "engine": m["engine"], "forwards": m["forwards"]}
            for m in r["methods"]]
    if "first_order" in r:
        rows.append({**_row("first-order AdamW (reference)", r["first_order"], r.get("fo_vs_start")),
                     "engine": "backprop", "forwards": "1 + backward"})
    return rows


def method_table(r: dict) -> str:
    """The markdown table of :func:`method_rows`, the zero-shot start as its first row."""
    head = ("| method | dev accuracy | vs start (McNemar) | vs full ZO (McNemar) | steps (scored) | lr "
            "| trained parameters | ZO wall-clock | peak RSS (added) | bytes moved / step |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|",
             f"| zero-shot start | {r['start_accuracy']:.3f} | | | 0 | | 0 | | | |"]
    for w in method_rows(r):
        lines.append(f"| {w['method']} | {w['accuracy']:.3f} | {w['vs_start']} | {w['vs_full']} | {w['steps']} "
                     f"| {w['lr']:g} | {w['trained']:,} | {w['seconds']:.0f} s | {w['peak_mb']:.0f} MiB "
                     f"(+{w['added_mb']:.0f}) | {w['bytes']:.0f} |")
    return "\n".join(lines)


def family_table(r: dict) -> str:
    """The markdown table of :func:`family_rows`, the start as its first row."""
    head = ("| method | engine | dev accuracy | vs start (McNemar) | steps (scored) | lr | forwards / step "
            "| training wall-clock | peak RSS (added) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|",
             f"| {r['settings']['start']} start | | {r['start_accuracy']:.3f} | | 0 | | | | |"]
    for w in family_rows(r):
        lines.append(f"| {w['method']} | {w['engine']} | {w['accuracy']:.3f} | {w['vs_start']} | {w['steps']} "
                     f"| {w['lr']:g} | {w['forwards']} | {w['seconds']:.0f} s | {w['peak_mb']:.0f} MiB "
                     f"(+{w['added_mb']:.0f}) |")
    return "\n".join(lines)
