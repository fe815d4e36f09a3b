"""One results page: every benchmark writes its table into its own section of docs/results.md.

A section lies between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; rewriting one
leaves the others as they are. Each section opens with the machine it was measured on (CPU model
and vector flags, cores, torch version, date) and the command that produced it, so a figure is
never separated from where it came from. Docs link to the page instead of quoting figures.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import re
import sys

import torch

RESULTS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "docs", "results.md")
"""docs/results.md of this checkout (the default of ``--results``)."""
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")
"""CPU flags that change matmul and noise speed: the ones the machine line names."""


def _cpu() -> tuple[str, list[str]]:
    """(CPU model name, the SIMD_FLAGS it has) from /proc/cpuinfo; the platform's name elsewhere."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [f for f in SIMD_FLAGS if f in flags]


def machine_line(today: datetime.date | None = None) -> str:
    """One line naming the machine: CPU model and flags, usable cores, torch, GPU if any, date."""
    model, flags = _cpu()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    return (f"Machine: {model} ({', '.join(flags) or 'no listed SIMD flags'}), {cores} cores, "
            f"torch {torch.__version__}, Python {platform.python_version()}{gpu}; {today.isoformat()}")


def write_section(name: str, markdown: str, path: str = RESULTS_PATH, command: str | None = None) -> None:
    """Replace section `name` of the page at `path` (appended if absent; the page created if missing)
    with a machine line, the `command` that produced it, and `markdown`."""
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"results section name {name!r}: use lower-case letters, digits, '-' and '_'")
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    head = [f"_{machine_line()}_"] + ([f"`{command}`"] if command else [])
    block = "\n\n".join([start, *head, markdown.strip()]) + "\n" + end
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def add_results_option(parser: argparse.ArgumentParser) -> None:
    """``--results [PATH]``: also write the printed table into the results page (default off)."""
    parser.add_argument("--results", nargs="?", const=RESULTS_PATH, default=None, metavar="PATH",
                        help=f"write the table into its section of the results page (default {RESULTS_PATH})")


class _Tee(io.TextIOBase):
    def __init__(self, out):
        self.out, self.kept = out, io.StringIO()

    def write(self, s: str) -> int:
        self.kept.write(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def printed_to_results(name: str, path: str | None):
    """Print as usual; when `path` is set, the printed text (JSON lines left out) becomes section
    `name` of the results page, as a fenced block under the command line that ran."""
    if path is None:
        yield
        return
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    lines = [ln for ln in tee.kept.getvalue().splitlines() if not ln.lstrip().startswith("{")]
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    head = prog if prog == "distzo2" else "python " + (os.path.relpath(sys.argv[0]) if sys.argv else "")
    command = " ".join([head, *sys.argv[1:]])
    write_section(name, "```text\n" + "\n".join(lines).strip("\n") + "\n```", path, command)
