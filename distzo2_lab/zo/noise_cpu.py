"""The noise's CPU passes as compiled C++ (noise_kernels.cpp), one small shared library per variant.

Inductor compiles the torch definition in noise.py into a vectorised loop, but that definition is
spelled in what torch offers: int32 words, whose logical shift costs a shift and a mask, and no
vectorised bitcast, so ln's exponent takes a five-step binary search. The same definition written in
C++ with unsigned words and the float's exponent bits has the same fp32 operations in the same order
(hence the same bits; tests/test_noise.py checks every variant against the eager definition) and
about half the vector instructions once the compiler's auto-vectoriser has made it a SIMD loop
(docs/results.md, section noise, times both). Each variant (layout, term count, noisy or plain outs,
the outs' dtypes) is a small library built once by the system's C++ compiler (the one torch.compile
uses), cached by a hash of the source, the flags, the compiler and the CPU, and called through
ctypes, which releases the interpreter lock for the call (the
streamer's lanes keep running).

Variants it does not cover (a bf16 master, fp16 outs) and machines without a compiler use the
Inductor path in noise.py; ``backend`` chooses for tests and benchmarks.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import torch

from distzo2_lab.zo.noise_constants import COS_C, LN2, LN_C, SIN_C, SQRT2

SOURCE = os.path.join(os.path.dirname(__file__), "noise_kernels.cpp")
LAYOUTS = {"gaussian": 0, "rademacher": 1, "pairs": 2}
OUT_DTYPES = {None: 0, torch.float32: 1, torch.bfloat16: 2}
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
         "-shared", "-fPIC", "-std=c++17"]

backend = "c"
"""'c' (these kernels where they cover the variant, else Inductor), 'inductor' or 'eager' (noise.py)."""
BACKENDS = ("c", "inductor", "eager")
_libs: dict = {}
failed: str | None = None  # why the kernels cannot be built here (then noise.py runs Inductor)


def _constants() -> list[str]:
    def lit(x: float) -> str:
        return f"{float(x)!r}f"  # the fp32-rounded value; repr is exact and a float literal rounds to it
    named = {"SQRT2": SQRT2, "LN2": LN2, **{f"LN_C{i}": c for i, c in enumerate(LN_C)},
             **{f"COS_C{i}": c for i, c in enumerate(COS_C)}, **{f"SIN_C{i}": c for i, c in enumerate(SIN_C)}}
    return [f"-D{k}={lit(v)}" for k, v in named.items()]


def compiler() -> str | None:
    """The C++ compiler: $CXX, else g++, c++ or clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> str:
    """$DISTZO2_CACHE, else $XDG_CACHE_HOME or ~/.cache, /distzo2_lab/noise_kernels; where that cannot
    be written (a read-only home), a folder of this user's under the temporary directory."""
    base = os.environ.get("DISTZO2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "distzo2_lab")
    path = os.path.join(base, "noise_kernels")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), f"distzo2_lab-{os.getuid()}", "noise_kernels")


def _cpu() -> str:
    """The CPU's model and flags: -march=native code built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build(defines: list[str]) -> str:
    """The shared library of one variant: built once, found by its hash afterwards. Written under a
    temporary name and renamed, so ranks building the same variant at once never read half a file."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler on the PATH (set CXX)")
    with open(SOURCE, "rb") as f:
        src = f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    tag = hashlib.sha256(src + " ".join([version, _cpu()] + FLAGS + defines).encode()).hexdigest()[:20]
    folder = cache_dir()
    path = os.path.join(folder, f"noise_{tag}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *FLAGS, *defines, SOURCE, "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{os.path.basename(cxx)} failed: {done.stderr.strip()[-400:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def library(layout: str, nterms: int = 0, noisy: bool = False, plus=None, minus=None):
    """The ctypes library of one variant (None where these kernels do not cover it or cannot be built)."""
    global failed
    if backend != "c" or failed is not None or plus not in OUT_DTYPES or minus not in OUT_DTYPES:
        return None
    key = (layout, nterms, noisy, plus, minus)
    lib = _libs.get(key)
    if lib is None:
        defines = [f"-DLAYOUT={LAYOUTS[layout]}", f"-DNTERMS={nterms}", f"-DNOISY={int(noisy)}",
                   f"-DPLUS={OUT_DTYPES[plus]}", f"-DMINUS={OUT_DTYPES[minus]}"] + _constants()
        try:
            lib = ctypes.CDLL(_build(defines))
        except (OSError, RuntimeError) as exc:
            failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"noise: the C kernels cannot be built ({failed}); running the compiled torch "
                          "definition (same values, slower)", RuntimeWarning, stacklevel=3)
            return None
        u32p, f32p, vp, i64, u32 = (ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                    ctypes.c_long, ctypes.c_uint32)
        lib.fill.argtypes = [vp, i64, u32, u32p, ctypes.c_int]
        lib.fill_pairs.argtypes = [vp, vp, i64, u32, u32p, ctypes.c_int]
        lib.visit.argtypes = [vp, i64, u32, u32p, f32p, vp, vp, ctypes.c_int]
        lib.visit_pairs.argtypes = [vp, vp, i64, u32, u32p, f32p, vp, vp, vp, vp, ctypes.c_int]
        _libs[key] = lib
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _words(words) -> ctypes.Array:
    return (ctypes.c_uint32 * len(words))(*[w & 0xFFFFFFFF for w in words])


def fill(lib, out: torch.Tensor, start: int, key) -> None:
    lib.fill(_ptr(out), out.numel(), start & 0xFFFFFFFF, _words(key), torch.get_num_threads())


def fill_pairs(lib, first: torch.Tensor, second: torch.Tensor, start: int, key) -> None:
    lib.fill_pairs(_ptr(first), _ptr(second), first.numel(), start & 0xFFFFFFFF, _words(key), torch.get_num_threads())


def visit(lib, master, start: int, words, params, plus, minus) -> None:
    """words: cur key, then each term's key; params: keep, eps, then each term's alpha."""
    p = (ctypes.c_float * len(params))(*params)
    lib.visit(_ptr(master), master.numel(), start & 0xFFFFFFFF, _words(words), p, _ptr(plus), _ptr(minus),
              torch.get_num_threads())


def visit_pairs(lib, ma, mb, start: int, words, params, pa, pb, na, nb) -> None:
    p = (ctypes.c_float * len(params))(*params)
    lib.visit_pairs(_ptr(ma), _ptr(mb), ma.numel(), start & 0xFFFFFFFF, _words(words), p, _ptr(pa), _ptr(pb),
                    _ptr(na), _ptr(nb), torch.get_num_threads())
