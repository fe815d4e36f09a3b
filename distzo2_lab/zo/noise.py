"""Counter-based noise: z(step seed, bucket key)[i] as a pure function of the element index i.

Nothing is drawn from a generator and nothing is stored: element i of bucket `key` at step seed s
is computed where it is used (the fill, or the fused visit pass that applies the pending update(s)
and writes the two perturbed copies), so any slice at any start regenerates the same bits.

Definition (the same bits on CPU, in torch, and on GPU, in Triton, ``noise_triton.py``):

* ``noise_key(s, key)`` = three 32-bit words (k0, k1, k2) of blake2b(f"{s}/{key}"), once per
  (step, bucket), in Python.
* per element, i < 2**32:  h = H(i ^ k0);  w1 = H(h + k1);  w2 = H(w1 ^ k2)  (mod 2**32), with H
  Wellons' lowbias32 finaliser (a bijection with low bias).
* rademacher: z = +1 if the top bit of w1 is 0, else -1.
* gaussian: Box-Muller on pairs. Element i belongs to pair j = the index i with bit PAIR_SHIFT
  (19) taken out, so elements i and i + 2**19 of each aligned block of 2**20 share j, and
  (w1, w2) = the words of j. r = sqrt(-2 ln u1), u1 = (top 24 bits of w1 + 1) / 2**24 in (0, 1],
  u2 = (top 24 bits of w2) / 2**24 in [0, 1); the first element of the pair is r cos(2 pi u2), the
  second r sin(2 pi u2) = r cos(2 pi (u2 - 1/4)), the 24-bit turn moved back by 2**22 exactly. Box-Muller's
  two outputs are independent standard normals, so a region that holds both elements of its pairs
  (any aligned run of 2**20, e.g. the body of a bucket) gets two values from one hash, one ln, one
  sqrt and one cos/sin polynomial pair (``_visit_pairs``); an element whose partner lies outside the
  region computes its own value alone, with the same operations, so it has the same bits. ln and
  cos are written here with IEEE exact operations only (+ - * / sqrt, integer, compare and select
  operations; no bitcasts, which Inductor does not vectorise), never a library log/cos, whose
  vectorised and scalar versions differ in the last bit (eager CPU torch.sqrt too: see sqrt_rn).
  |z| <= sqrt(48 ln 2) = 5.7683 (u1 >= 2**-24).

On CPU the passes run as compiled C++ (noise_cpu.py, noise_kernels.cpp: the same operations spelled
with unsigned words and ln's exponent read from the float's bits, in fewer vector instructions),
else as this torch definition compiled by Inductor. Integer arithmetic runs in int32 with wraparound
(the low 32 bits of a product are the same for signed and unsigned); a logical right shift is an
arithmetic shift and a mask. No FMA contraction: Inductor's C++ is compiled with -ffp-contract=off;
the Triton kernels launch with enable_fp_fusion=False and use div_rn / sqrt_rn. Scalars (alpha, eps,
keep) are rounded to fp32.
"""
from __future__ import annotations

import hashlib
import math
import struct
import types
import warnings

import torch

from distzo2_lab.zo import noise_cpu
from distzo2_lab.zo.noise_constants import (  # noqa: F401
    COS_C,
    LN2,
    LN_C,
    M1,
    M2,
    PAIR_SHIFT,
    SIN_C,
    SQRT2,
    TWO_M22,
    TWO_M24,
    _i32,
    f32,
)

NOISE_KINDS = ("gaussian", "rademacher")
MAX_BUCKET = 1 << 32
Z_BOUND = math.sqrt(48 * math.log(2))  # largest |z| of the gaussian: u1 >= 2**-24
MAX_TERMS = 4  # update terms applied in one visit pass; more are applied in further passes
PAIR = 1 << PAIR_SHIFT  # gaussian pairs: element i and i + PAIR of each aligned block of 2 * PAIR
MIN_PAIRED = 1 << 12  # a shorter run of pairs is left to the element-wise pass (one call fewer)


def noise_key(step_seed: int, key: str) -> tuple[int, int, int]:
    """The three 32-bit key words of bucket `key` at step seed `step_seed` (unsigned ints)."""
    d = hashlib.blake2b(f"{step_seed}/{key}".encode(), digest_size=12).digest()
    return struct.unpack("<3I", d)


def check_span(start: int, n: int) -> None:
    if start < 0 or n < 0 or start + n > MAX_BUCKET:
        raise ValueError(f"elements [{start}, {start + n}) are outside a bucket's index range [0, 2**32): "
                         f"counter-based noise supports buckets of at most 2**32 elements; split the bucket")


def _check_kind(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind {kind!r} is not valid; choose one of {', '.join(NOISE_KINDS)}")


# ---- the definition in torch ops (int32 with wraparound); traced by torch.compile as it is -----

def _shr(x, s: int):
    return (x >> s) & ((1 << (32 - s)) - 1)


def lowbias32(x):
    x = x ^ _shr(x, 16)
    x = x * _i32(M1)
    x = x ^ _shr(x, 15)
    x = x * _i32(M2)
    return x ^ _shr(x, 16)


def hash_words(idx, k0, k1, k2):
    """(w1, w2) of int32 indices `idx` (k* int32 scalars or 0-d tensors)."""
    h = lowbias32(idx ^ k0)
    w1 = lowbias32(h + k1)
    return w1, lowbias32(w1 ^ k2)


def ln_uniform(a):
    """ln(u1), u1 = (a + 1) / 2**24, for int32 a in [0, 2**24): x = a + 1 = m 2**e with m in
    [sqrt(1/2), sqrt(2)) found by a binary search on the bits (no bitcasts: they do not vectorise
    in Inductor), ln u1 = (e - 24) ln 2 + ln m by the atanh series in s = (m - 1) / (m + 1)."""
    x = a + 1  # in [1, 2**24]
    y, e, scale = x, torch.zeros_like(x), torch.ones_like(x, dtype=torch.float32)
    for sh in (16, 8, 4, 2, 1):
        big = (y >> sh) != 0
        y = torch.where(big, y >> sh, y)
        e = torch.where(big, e + sh, e)
        scale = torch.where(big, scale * 2.0 ** -sh, scale)
    m = x.to(torch.float32) * scale  # exact, in [1, 2)
    hi = m >= SQRT2
    m = torch.where(hi, m * 0.5, m)
    e = torch.where(hi, e + (1 - 24), e - 24)
    f = m - 1.0
    s = f / (f + 2.0)
    s2 = s * s
    p = ((s2 * LN_C[3] + LN_C[2]) * s2 + LN_C[1]) * s2 + LN_C[0]
    lnm = s * 2.0 + (s * s2) * p
    return e.to(torch.float32) * LN2 + lnm


def cos_turn(b):
    """cos(2 pi b / 2**24) for int32 b in [0, 2**24) (see cos_sin_turn)."""
    return cos_sin_turn(b)[0]


def cos_sin_turn(b):
    """(cos, sin) of 2 pi b / 2**24 for int32 b in [0, 2**24): quadrant q from the top bits, then cos
    and sin of (pi/2) f, f = b / 2**22 - q in [-1/2, 1/2), by one pair of polynomials for both; the
    sin has the bits of the cos of (b - 2**22) mod 2**24."""
    t = (b + (1 << 21)) & 0xFFFFFF
    q = t >> 22
    f = ((t & 0x3FFFFF) - (1 << 21)).to(torch.float32) * TWO_M22  # exact
    f2 = f * f
    c = (((f2 * COS_C[4] + COS_C[3]) * f2 + COS_C[2]) * f2 + COS_C[1]) * f2 + COS_C[0]
    s = ((((f2 * SIN_C[4] + SIN_C[3]) * f2 + SIN_C[2]) * f2 + SIN_C[1]) * f2 + SIN_C[0]) * f
    odd = (q & 1) == 1
    cv, sv = torch.where(odd, s, c), torch.where(odd, c, s)
    return torch.where((((q + 1) >> 1) & 1) == 1, -cv, cv), torch.where(((q >> 1) & 1) == 1, -sv, sv)


def pair_of(idx):
    """(j, second) of int32 element indices: the pair index (bit PAIR_SHIFT taken out) and whether
    the element is its pair's second (bit PAIR_SHIFT set)."""
    return (_shr(idx, PAIR_SHIFT + 1) << PAIR_SHIFT) | (idx & (PAIR - 1)), _shr(idx, PAIR_SHIFT) & 1


def gaussian_pair(j, k0, k1, k2):
    """Both values (first, second) of pairs `j`: r cos and r sin of one Box-Muller draw."""
    w1, w2 = hash_words(j, k0, k1, k2)
    r = sqrt_rn(ln_uniform(_shr(w1, 8)) * -2.0)
    c, s = cos_sin_turn(_shr(w2, 8))
    return r * c, r * s


def noise_of(kind: str, idx, k0, k1, k2):
    """z at int32 indices `idx` (fp32), each element alone."""
    if kind == "rademacher":
        w1, _ = hash_words(idx, k0, k1, k2)
        return 1.0 - _shr(w1, 31).to(torch.float32) * 2.0
    j, second = pair_of(idx)
    w1, w2 = hash_words(j, k0, k1, k2)
    turn = (_shr(w2, 8) - (second << 22)) & 0xFFFFFF  # the second of a pair: a quarter turn back
    return sqrt_rn(ln_uniform(_shr(w1, 8)) * -2.0) * cos_turn(turn)


def sqrt_rn(x):
    """The correctly rounded fp32 square root. Inductor's C++ sqrt is (sqrtps / std::sqrt); eager
    CPU torch.sqrt is not (one ulp off at times), so eager goes through fp64, which rounds exactly."""
    if torch.compiler.is_compiling():
        return torch.sqrt(x)
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def noise_reference(kind: str, key_words, start: int, n: int, device="cpu") -> torch.Tensor:
    """z[start : start + n] of the bucket with key words `key_words`, in plain eager torch (the
    oracle of the compiled and Triton kernels)."""
    _check_kind(kind)
    check_span(start, n)
    idx = torch.arange(n, dtype=torch.int32, device=device) + _i32(start)
    k0, k1, k2 = (_i32(k) for k in key_words)
    return noise_of(kind, idx, k0, k1, k2)


# ---- the passes: one function each, run eager, compiled (CPU) or as Triton kernels (CUDA) ------

def _fill_impl(out, words, kind):
    idx = torch.arange(out.numel(), dtype=torch.int32, device=out.device) + words[0]
    out.copy_(noise_of(kind, idx, words[1], words[2], words[3]))


def _fill_pairs_impl(first, second, words):
    """Gaussian pairs: first[t] and second[t] are elements words[0] + t and words[0] + t + PAIR."""
    ia = torch.arange(first.numel(), dtype=torch.int32, device=first.device) + words[0]
    za, zb = gaussian_pair(pair_of(ia)[0], words[1], words[2], words[3])
    first.copy_(za)
    second.copy_(zb)


def round_bf16(m, idx, k0, k1, k2):
    """fp32 `m` stochastically rounded to bf16 (returned as the fp32 value, exact in bf16): a seeded
    16-bit integer r = top 16 bits of w1(idx) is added to the bit pattern and the low 16 bits are
    dropped, so m lands on its upper bf16 neighbour with probability (its distance from the lower
    one) / ulp. Unbiased, reproducible, and the same bits in torch, Inductor and Triton."""
    w1, _ = hash_words(idx, k0, k1, k2)
    bits = m.view(torch.int32) + _shr(w1, 16)
    return (bits & _i32(0xFFFF0000)).view(torch.float32)


def _visit_impl(master, words, params, kind, nterms, noisy, plus, minus, rounded):
    """words: int32 [start, cur k0..k2, term1 k0..k2, ..., round k0..k2]; params: fp32 [keep, eps,
    alpha1, ...]. rounded: the master is bf16, written back stochastically rounded."""
    idx = torch.arange(master.numel(), dtype=torch.int32, device=master.device) + words[0]
    m = master.to(torch.float32) * params[0]
    for t in range(nterms):
        m = m + params[2 + t] * noise_of(kind, idx, words[4 + 3 * t], words[5 + 3 * t], words[6 + 3 * t])
    if rounded:
        r = 4 + 3 * nterms
        m = round_bf16(m, idx, words[r], words[r + 1], words[r + 2])
    master.copy_(m)
    if noisy:
        e = params[1] * noise_of(kind, idx, words[1], words[2], words[3])
        if plus is not None:
            plus.copy_((m + e).to(plus.dtype))
        if minus is not None:
            minus.copy_((m - e).to(minus.dtype))
    else:
        if plus is not None:
            plus.copy_(m.to(plus.dtype))
        if minus is not None:
            minus.copy_(m.to(minus.dtype))


def _visit_pairs_impl(ma, mb, words, params, nterms, noisy, pa, pb, na, nb, rounded):
    """_visit_impl for gaussian pairs: ma, pa, na hold elements words[0] + t, mb, pb, nb their
    partners words[0] + t + PAIR; one draw per pair and term gives both. Same operations, same
    order, per element."""
    ia = torch.arange(ma.numel(), dtype=torch.int32, device=ma.device) + words[0]
    j = pair_of(ia)[0]
    a = ma.to(torch.float32) * params[0]
    b = mb.to(torch.float32) * params[0]
    for t in range(nterms):
        za, zb = gaussian_pair(j, words[4 + 3 * t], words[5 + 3 * t], words[6 + 3 * t])
        a = a + params[2 + t] * za
        b = b + params[2 + t] * zb
    if rounded:
        r = 4 + 3 * nterms
        a = round_bf16(a, ia, words[r], words[r + 1], words[r + 2])
        b = round_bf16(b, ia + PAIR, words[r], words[r + 1], words[r + 2])
    ma.copy_(a)
    mb.copy_(b)
    ea = eb = None
    if noisy:
        za, zb = gaussian_pair(j, words[1], words[2], words[3])
        ea, eb = params[1] * za, params[1] * zb
    for m, e, plus, minus in ((a, ea, pa, na), (b, eb, pb, nb)):
        if plus is not None:
            plus.copy_((m if e is None else m + e).to(plus.dtype))
        if minus is not None:
            minus.copy_((m if e is None else m - e).to(minus.dtype))


def pair_pieces(start: int, n: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Elements [start, start + n) of a bucket cut for the gaussian's pairs: (runs, singles), offsets
    from `start`. A run (a, b, length) holds both elements of `length` pairs, firsts at [a, a + length)
    and seconds at [b, b + length) (b = a + PAIR); singles (offset, length) are the rest, merged
    where they touch (elements whose partner is outside, and runs shorter than MIN_PAIRED)."""
    stop, runs, rest = start + n, [], []
    base = (start >> (PAIR_SHIFT + 1)) << (PAIR_SHIFT + 1)
    while base < stop:
        a0, a1 = max(start, base), min(stop, base + PAIR)
        b0, b1 = max(start, base + PAIR), min(stop, base + 2 * PAIR)
        lo, hi = max(a0 - base, b0 - base - PAIR), min(a1 - base, b1 - base - PAIR)
        if hi - lo >= MIN_PAIRED:
            runs.append((base + lo - start, base + PAIR + lo - start, hi - lo))
            rest += [(a0, base + lo), (base + hi, a1), (b0, base + PAIR + lo), (base + PAIR + hi, b1)]
        else:
            rest += [(a0, a1), (b0, b1)]
        base += 2 * PAIR
    singles: list[tuple[int, int]] = []
    for x, y in sorted((x - start, y - start) for x, y in rest if y > x):
        if singles and singles[-1][0] + singles[-1][1] == x:
            singles[-1] = (singles[-1][0], singles[-1][1] + y - x)
        else:
            singles.append((x, y - x))
    return runs, singles


def pair_launches(start: int, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """pair_pieces for a kernel that indexes pairs itself (Triton): consecutive runs that begin at an
    aligned block of 2 * PAIR, all whole but the last, become one launch (offset, pairs); singles
    as pair_pieces gives them."""
    runs, singles = pair_pieces(start, n)
    launches: list[list] = []  # [offset, pairs, open: every run so far whole and block-aligned]
    for a, _, k in runs:
        aligned = (start + a) % (2 * PAIR) == 0
        last = launches[-1] if launches else None
        if last is not None and last[2] and aligned and a == last[0] + 2 * last[1]:
            last[1] += k
            last[2] = k == PAIR
        else:
            launches.append([a, k, aligned and k == PAIR])
    return [(a, k) for a, k, _ in launches], singles


# The hash reads each intermediate twice (x ^ x >> s): left inlined, Inductor's lowering expands the
# chain exponentially (minutes to compile). Realising every value with more than a few ops keeps it
# linear; the scheduler still fuses them all into one kernel, with no buffer in memory.
# cpp_wrapper: the call into the compiled code is C++ that releases the interpreter lock while the
# kernel runs (Inductor's Python wrapper holds it), so the streamer's lanes keep running Python beside
# a noise pass instead of stalling behind it.
_OPTIONS = {"realize_cpu_opcount_threshold": 4, "max_fusion_size": 1 << 14, "cpp_wrapper": True}
_compiled: dict = {}
_warned: set = set()
compile_enabled = True  # False after a failed compilation (warned once): the eager definition runs


def _warn_once(tag: str, msg: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _compiled_variant(fn, tag: tuple):
    """fn compiled by Inductor for one variant (kind, term count, out dtypes...). Each variant gets
    its own code object, so Dynamo's per-code recompile limit never mixes variants."""
    c = _compiled.get((fn.__name__,) + tag)
    if c is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_compiled)}")
        g = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        c = _compiled[(fn.__name__,) + tag] = torch.compile(g, dynamic=True, fullgraph=True, options=_OPTIONS)
    return c


def _run(fn, tag: tuple, device: torch.device, *args, **kw) -> None:
    global compile_enabled
    compiled = compile_enabled and noise_cpu.backend != "eager"
    if device.type == "cpu" and compiled and args[0].numel() > 1:  # size 1 would recompile
        try:
            return _compiled_variant(fn, tag)(*args, **kw)
        except Exception as exc:  # no compiler, broken toolchain: the eager definition is the same
            compile_enabled = False
            _warn_once("compile", f"noise: torch.compile failed ({type(exc).__name__}: {exc}); "
                                  f"running the eager definition (same values, slower)")
    return fn(*args, **kw)


def _triton():
    try:
        from distzo2_lab.zo import noise_triton
        noise_triton.require()
        return noise_triton
    except ImportError as exc:
        _warn_once("triton", f"noise: Triton is unavailable ({exc}); CUDA noise runs the eager "
                             f"torch definition (slower)")
        return None


def triton_fill(tr, out: torch.Tensor, kind: str, key_words, start: int) -> torch.Tensor:
    """fill_ by the Triton kernels of module `tr`: whole gaussian pairs two at a time, one launch
    per run of aligned blocks (pair_launches), the rest element by element."""
    launches, singles = pair_launches(start, out.numel()) if kind == "gaussian" else ([], [(0, out.numel())])
    for a, pairs in launches:
        tr.fill_pairs_(out[a:], pairs, key_words, start + a)
    for o, k in singles:
        tr.fill_(out[o : o + k], kind, key_words, start + o)
    return out


def triton_visit(tr, master, start, kind, updates, keep, cur, eps, plus, minus, noisy, round_words) -> None:
    """One visit pass (at most MAX_TERMS terms) by the Triton kernels of module `tr`, cut as triton_fill."""
    launches, singles = pair_launches(start, master.numel()) if kind == "gaussian" else ([], [(0, master.numel())])
    cut = lambda t, o, k=None: None if t is None else t[o:] if k is None else t[o : o + k]  # noqa: E731
    for a, pairs in launches:
        tr.visit_pairs_(master[a:], pairs, start + a, updates, keep, cur, eps, cut(plus, a), cut(minus, a), noisy,
                        round_words)
    for o, k in singles:
        tr.visit_(master[o : o + k], start + o, kind, updates, keep, cur, eps, cut(plus, o, k), cut(minus, o, k),
                  noisy, round_words)


def _flat(t: torch.Tensor, what: str) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what} must be a flat contiguous tensor")


def fill_(out: torch.Tensor, kind: str, key_words, start: int) -> torch.Tensor:
    """Write z[start : start + out.numel()] of the bucket with `key_words` into fp32 `out`."""
    _check_kind(kind)
    _flat(out, "out")
    if out.dtype != torch.float32:
        raise ValueError(f"fill_ writes fp32; out is {out.dtype}")
    n = out.numel()
    check_span(start, n)
    if n == 0:
        return out
    if out.is_cuda and (tr := _triton()) is not None:
        return triton_fill(tr, out, kind, key_words, start)
    keys = [_i32(k) for k in key_words]
    runs, singles = pair_pieces(start, n) if kind == "gaussian" else ([], [(0, n)])
    cpu = out.device.type == "cpu"
    for a, b, length in runs:
        if cpu and (lib := noise_cpu.library("pairs")) is not None:
            noise_cpu.fill_pairs(lib, out[a : a + length], out[b : b + length], start + a, keys)
            continue
        words = torch.tensor([_i32(start + a)] + keys, dtype=torch.int32, device=out.device)
        _run(_fill_pairs_impl, ("pairs",), out.device, out[a : a + length], out[b : b + length], words)
    for o, length in singles:
        if cpu and (lib := noise_cpu.library(kind)) is not None:
            noise_cpu.fill(lib, out[o : o + length], start + o, keys)
            continue
        words = torch.tensor([_i32(start + o)] + keys, dtype=torch.int32, device=out.device)
        _run(_fill_impl, (kind,), out.device, out[o : o + length], words, kind)
    return out


def _visit_pieces(master, start, kind, words, params, nterms, noisy, plus, minus, rounded) -> None:
    """One pass of _visit_impl over [start, start + n): the gaussian's whole pairs two at a time
    (_visit_pairs_impl), the rest element by element. words: the int32 key words after the start."""
    dev, n = master.device, master.numel()
    p = torch.tensor(params, dtype=torch.float32, device=dev)
    dtypes = (None if plus is None else plus.dtype, None if minus is None else minus.dtype, master.dtype)
    cut = lambda t, o, k: None if t is None else t[o : o + k]  # noqa: E731
    runs, singles = pair_pieces(start, n) if kind == "gaussian" else ([], [(0, n)])
    c = dev.type == "cpu" and master.dtype == torch.float32 and not rounded
    lib = lambda layout: c and noise_cpu.library(layout, nterms, noisy, *dtypes[:2]) or None  # noqa: E731
    keys = words[: 3 * (1 + nterms)]  # cur, then each term's
    for a, b, k in runs:
        if (cl := lib("pairs")) is not None:
            noise_cpu.visit_pairs(cl, master[a : a + k], master[b : b + k], start + a, keys, params,
                                  cut(plus, a, k), cut(plus, b, k), cut(minus, a, k), cut(minus, b, k))
            continue
        w = torch.tensor([_i32(start + a)] + words, dtype=torch.int32, device=dev)
        _run(_visit_pairs_impl, (nterms, noisy, *dtypes, rounded), dev, master[a : a + k], master[b : b + k],
             w, p, nterms, noisy, cut(plus, a, k), cut(plus, b, k), cut(minus, a, k), cut(minus, b, k), rounded)
    for o, k in singles:
        if (cl := lib(kind)) is not None:
            noise_cpu.visit(cl, master[o : o + k], start + o, keys, params, cut(plus, o, k), cut(minus, o, k))
            continue
        w = torch.tensor([_i32(start + o)] + words, dtype=torch.int32, device=dev)
        _run(_visit_impl, (kind, nterms, noisy, *dtypes, rounded), dev, master[o : o + k], w, p, kind, nterms,
             noisy, cut(plus, o, k), cut(minus, o, k), rounded)


def visit_(master: torch.Tensor, start: int, kind: str, updates, keep: float = 1.0, cur_key=None,
           eps: float = 0.0, out_plus: torch.Tensor | None = None, out_minus: torch.Tensor | None = None,
           round_key=None):
    """One fused pass over a contiguous region holding elements [start, start + n) of its bucket:

        m = master * keep;  for (key_words, alpha) in updates: m = m + alpha * z(key_words)
        master[:] = m;  out_plus = (m + eps * z(cur_key)).to(dtype);  out_minus = (m - eps * z(cur_key))

    (each product and sum rounded to fp32; keep, alpha, eps rounded to fp32 first). With cur_key
    None or eps == 0 the outs are plain copies of m. z is never materialised. A bf16 `master`
    (precision.master='bf16') is computed in fp32 and written back stochastically rounded with the
    noise of `round_key` (:func:`round_bf16`); the outs are made from the rounded value, the weights
    the run holds. A pass that changes nothing (no update, keep 1) leaves it as it is."""
    _check_kind(kind)
    _flat(master, "master")
    if master.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"master must be fp32 or bf16; it is {master.dtype}")
    n = master.numel()
    for o, name in ((out_plus, "out_plus"), (out_minus, "out_minus")):
        if o is not None:
            _flat(o, name)
            if o.numel() != n or o.device != master.device:
                raise ValueError(f"{name} must have master's size ({n}) and device")
    check_span(start, n)
    updates = [(tuple(k), float(a)) for k, a in updates]
    if n == 0:
        return master
    bf16 = master.dtype == torch.bfloat16
    if bf16 and (updates or keep != 1.0) and round_key is None:
        raise ValueError("a bf16 master is written back stochastically rounded: pass round_key")
    noisy = cur_key is not None and eps != 0.0
    cur = [_i32(k) for k in cur_key] if noisy else [0, 0, 0]
    tr = _triton() if master.is_cuda else None
    rk = [_i32(k) for k in round_key] if round_key is not None else [0, 0, 0]
    while True:  # at most MAX_TERMS terms a pass; the outs are written by the last pass
        now, updates = updates[:MAX_TERMS], updates[MAX_TERMS:]
        last = not updates
        rounded = bf16 and (bool(now) or keep != 1.0)
        plus, minus = (out_plus, out_minus) if last else (None, None)
        if tr is not None:
            triton_visit(tr, master, start, kind, now, keep, cur, eps, plus, minus, noisy and last,
                         rk if rounded else None)
        else:
            _visit_pieces(master, start, kind, cur + [_i32(k) for key, _ in now for k in key] + rk,
                          [keep, eps] + [a for _, a in now], len(now), noisy and last, plus, minus, rounded)
        if last:
            return master
        keep = 1.0
        rk[2] = _i32(rk[2] + 0x9E3779B9)  # each further pass rounds with noise of its own
