"""The SST-2 benchmark's side-by-side table: full-parameter ZO beside ZO on ``peft`` LoRA adapters.

Both methods start from the same head and weights and see the same batches and step seeds; only
what they perturb differs (every parameter but the frozen globs, or the LoRA adapters alone, the
base held fixed; MeZO, arXiv 2305.17333, Sec. 3 runs both). Each row carries its dev accuracy,
McNemar's paired test against the start (and LoRA's against full ZO), the seconds spent in ZO
steps, the training phase's peak RSS and the bytes the engine's spans moved per step.
"""
from __future__ import annotations

from distzo2_lab.observe.events import overlap_metrics


def bytes_per_step(recorder, steps: int) -> float:
    """Bytes the recorded transfer spans (upload, offload) moved per step: 0 on the resident tier."""
    moved = overlap_metrics(recorder.spans).get("bytes", {}) if recorder.spans else {}
    return sum(moved.values()) / max(1, steps)


def _test(c: dict | None) -> str:
    return "" if c is None else f"+{c['gained']} / -{c['lost']}, p = {c['p_value']:.2g}"


def _steps(m: dict) -> str:
    chosen = m.get("selected_step", m["steps"])
    return str(m["steps"]) if chosen == m["steps"] else f"{chosen} of {m['steps']}"


def method_rows(r: dict) -> list[dict]:
    """One dict per method of a run() result that trained ZO both ways (r["zo"] and r["lora"])."""
    rows = []
    for key, name in (("zo", "full ZO"), ("lora", f"LoRA rank {r['lora']['rank']}" if "lora" in r else "")):
        m = r.get(key)
        if m is None:
            continue
        rows.append({"method": name, "accuracy": m["accuracy"], "vs_start": _test(r.get(f"{key}_vs_start")),
                     "vs_full": _test(r.get("lora_vs_zo")) if key == "lora" else "", "steps": _steps(m),
                     "lr": m["lr"], "trained": m["trained_params"], "seconds": m["seconds"],
                     "peak_mb": m["memory"]["peak_mb"], "added_mb": m["memory"]["added_mb"],
                     "bytes": m["bytes_per_step"]})
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
