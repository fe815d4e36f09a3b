"""Triton kernels of the counter-based noise (``noise.py`` holds the definition; these compute the
same bits: uint32 arithmetic, IEEE div_rn / sqrt_rn, launched with enable_fp_fusion=False so no
multiply-add is contracted). Run on CUDA; under TRITON_INTERPRET=1 they run on CPU tensors too.
Importing this module without triton works; ``require()`` raises ImportError then."""
from __future__ import annotations

import torch

from distzo2_lab.zo import noise_constants as D  # the definition's constants

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # the package imports without triton; the kernels need it
    triton = None
    _IMPORT_ERROR = _exc
else:
    _IMPORT_ERROR = None

BLOCK = 1024


def require() -> None:
    if triton is None:
        raise ImportError(f"triton is not installed ({_IMPORT_ERROR})")


if triton is not None:
    _M1 = tl.constexpr(D.M1)
    _M2 = tl.constexpr(D.M2)
    _LN2 = tl.constexpr(D.LN2)
    _SQRT2 = tl.constexpr(D.SQRT2)
    _L0, _L1, _L2, _L3 = (tl.constexpr(c) for c in D.LN_C)
    _C0, _C1, _C2, _C3, _C4 = (tl.constexpr(c) for c in D.COS_C)
    _S0, _S1, _S2, _S3, _S4 = (tl.constexpr(c) for c in D.SIN_C)
    _TWO_M22 = tl.constexpr(D.TWO_M22)
    _PS = tl.constexpr(D.PAIR_SHIFT)
    _PS1 = tl.constexpr(D.PAIR_SHIFT + 1)
    _PMASK = tl.constexpr((1 << D.PAIR_SHIFT) - 1)
    _PAIR = tl.constexpr(1 << D.PAIR_SHIFT)

    @triton.jit
    def _lowbias32(x):
        x = x ^ (x >> 16)
        x = x * tl.full(x.shape, _M1, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full(x.shape, _M2, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _msb_step(y, e, scale, SH: tl.constexpr, INV: tl.constexpr):
        big = (y >> SH) != 0
        return tl.where(big, y >> SH, y), tl.where(big, e + SH, e), tl.where(big, scale * INV, scale)

    @triton.jit
    def _ln_uniform(a):  # a: int32 in [0, 2**24)
        x = a + 1
        y = x
        e = x * 0  # int32 zeros (a builtin: stays interpretable however triton was first imported)
        scale = tl.full(x.shape, 1.0, tl.float32)
        y, e, scale = _msb_step(y, e, scale, 16, 1.52587890625e-05)  # scale *= 2**-sh, exact
        y, e, scale = _msb_step(y, e, scale, 8, 0.00390625)
        y, e, scale = _msb_step(y, e, scale, 4, 0.0625)
        y, e, scale = _msb_step(y, e, scale, 2, 0.25)
        y, e, scale = _msb_step(y, e, scale, 1, 0.5)
        m = x.to(tl.float32) * scale
        hi = m >= _SQRT2
        m = tl.where(hi, m * 0.5, m)
        e = tl.where(hi, e + (1 - 24), e - 24)
        f = m - 1.0
        s = tl.math.div_rn(f, f + 2.0)
        s2 = s * s
        p = ((s2 * _L3 + _L2) * s2 + _L1) * s2 + _L0
        lnm = s * 2.0 + (s * s2) * p
        return e.to(tl.float32) * _LN2 + lnm

    @triton.jit
    def _cos_turn(b):  # b: int32 in [0, 2**24)
        return _cos_sin_turn(b)[0]

    @triton.jit
    def _noise(idx, k0, k1, k2, GAUSS: tl.constexpr):  # idx uint32; k* int32 (the words' bits)
        if GAUSS:  # element idx of its pair j (noise.pair_of): the second turns a quarter back
            j = ((idx >> _PS1) << _PS) | (idx & _PMASK)
            second = ((idx >> _PS) & 1).to(tl.int32)
            h = _lowbias32(j ^ k0.to(tl.uint32, bitcast=True))
            w1 = _lowbias32(h + k1.to(tl.uint32, bitcast=True))
            w2 = _lowbias32(w1 ^ k2.to(tl.uint32, bitcast=True))
            r = tl.math.sqrt_rn(_ln_uniform((w1 >> 8).to(tl.int32)) * -2.0)
            return r * _cos_turn(((w2 >> 8).to(tl.int32) - (second << 22)) & 0xFFFFFF)
        else:
            h = _lowbias32(idx ^ k0.to(tl.uint32, bitcast=True))
            w1 = _lowbias32(h + k1.to(tl.uint32, bitcast=True))
            return 1.0 - (w1 >> 31).to(tl.float32) * 2.0

    @triton.jit
    def _cos_sin_turn(b):  # (cos, sin) of 2 pi b / 2**24 from one pair of polynomials (noise.cos_sin_turn)
        t = (b + (1 << 21)) & 0xFFFFFF
        q = t >> 22
        f = ((t & 0x3FFFFF) - (1 << 21)).to(tl.float32) * _TWO_M22
        f2 = f * f
        c = (((f2 * _C4 + _C3) * f2 + _C2) * f2 + _C1) * f2 + _C0
        s = ((((f2 * _S4 + _S3) * f2 + _S2) * f2 + _S1) * f2 + _S0) * f
        odd = (q & 1) == 1
        cv = tl.where(odd, s, c)
        sv = tl.where(odd, c, s)
        return tl.where((((q + 1) >> 1) & 1) == 1, -cv, cv), tl.where(((q >> 1) & 1) == 1, -sv, sv)

    @triton.jit
    def _pair(j, k0, k1, k2):  # both values of pairs j (noise.gaussian_pair)
        h = _lowbias32(j ^ k0.to(tl.uint32, bitcast=True))
        w1 = _lowbias32(h + k1.to(tl.uint32, bitcast=True))
        w2 = _lowbias32(w1 ^ k2.to(tl.uint32, bitcast=True))
        r = tl.math.sqrt_rn(_ln_uniform((w1 >> 8).to(tl.int32)) * -2.0)
        c, s = _cos_sin_turn((w2 >> 8).to(tl.int32))
        return r * c, r * s

    @triton.jit
    def _index(start, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        idx = ((offs + start) & 0xFFFFFFFF).to(tl.uint32)
        return offs, offs < n, idx

    @triton.jit
    def _out(x, dtype: tl.constexpr):  # fp32 -> out dtype, rounded to nearest even as torch's .to
        if dtype == tl.float32:
            return x
        elif dtype == tl.bfloat16:  # by integer ops: the interpreter's bf16 cast truncates
            b = x.to(tl.uint32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.uint16)
            r = tl.where(x != x, tl.full(x.shape, 0x7FC0, tl.uint16), r)  # NaN as torch writes it
            return r.to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _round_bf16(m, idx, r0, r1, r2):  # stochastic rounding to bf16 (noise.round_bf16), as bf16
        h = _lowbias32(idx ^ r0.to(tl.uint32, bitcast=True))
        w1 = _lowbias32(h + r1.to(tl.uint32, bitcast=True))
        b = m.to(tl.uint32, bitcast=True) + (w1 >> 16)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit(do_not_specialize=["start", "k0", "k1", "k2"])  # a key word of 1 stays a value
    def _fill_kernel(out_ptr, n, start, k0, k1, k2, GAUSS: tl.constexpr, BLOCK: tl.constexpr):
        offs, mask, idx = _index(start, n, BLOCK)
        tl.store(out_ptr + offs, _noise(idx, k0, k1, k2, GAUSS), mask=mask)

    @triton.jit(do_not_specialize=["start", "c0", "c1", "c2", "t00", "t01", "t02", "t10", "t11", "t12",
                                   "t20", "t21", "t22", "t30", "t31", "t32", "r0", "r1", "r2"])
    def _visit_kernel(m_ptr, plus_ptr, minus_ptr, n, start, keep, eps, c0, c1, c2,
                      a0, a1, a2, a3, t00, t01, t02, t10, t11, t12, t20, t21, t22, t30, t31, t32, r0, r1, r2,
                      NT: tl.constexpr, NOISY: tl.constexpr, PLUS: tl.constexpr, MINUS: tl.constexpr,
                      GAUSS: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        offs, mask, idx = _index(start, n, BLOCK)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32) * keep
        if NT > 0:
            m = m + a0 * _noise(idx, t00, t01, t02, GAUSS)
        if NT > 1:
            m = m + a1 * _noise(idx, t10, t11, t12, GAUSS)
        if NT > 2:
            m = m + a2 * _noise(idx, t20, t21, t22, GAUSS)
        if NT > 3:
            m = m + a3 * _noise(idx, t30, t31, t32, GAUSS)
        if ROUND:  # a bf16 master: written back stochastically rounded, the copies made from it
            mb = _round_bf16(m, idx, r0, r1, r2)
            tl.store(m_ptr + offs, mb, mask=mask)
            m = mb.to(tl.float32)
        else:
            tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        if NOISY:
            e = eps * _noise(idx, c0, c1, c2, GAUSS)
            if PLUS:
                tl.store(plus_ptr + offs, _out(m + e, plus_ptr.dtype.element_ty), mask=mask)
            if MINUS:
                tl.store(minus_ptr + offs, _out(m - e, minus_ptr.dtype.element_ty), mask=mask)
        else:
            if PLUS:
                tl.store(plus_ptr + offs, _out(m, plus_ptr.dtype.element_ty), mask=mask)
            if MINUS:
                tl.store(minus_ptr + offs, _out(m, minus_ptr.dtype.element_ty), mask=mask)


    @triton.jit(do_not_specialize=["start", "c0", "c1", "c2", "t00", "t01", "t02", "t10", "t11", "t12",
                                   "t20", "t21", "t22", "t30", "t31", "t32", "r0", "r1", "r2"])
    def _visit_pairs_kernel(m_ptr, plus_ptr, minus_ptr, n, start, keep, eps, c0, c1, c2,
                            a0, a1, a2, a3, t00, t01, t02, t10, t11, t12, t20, t21, t22, t30, t31, t32, r0, r1, r2,
                            NT: tl.constexpr, NOISY: tl.constexpr, PLUS: tl.constexpr, MINUS: tl.constexpr,
                            ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """n pairs of whole gaussian pairs: pair p's first element at offset ((p >> PS) << (PS + 1)) +
        (p & PMASK) of the pointers (element index start + that), its second PAIR further; one draw
        per pair and term gives both (the elementwise kernel's arithmetic, in its order)."""
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = p < n
        oa = ((p >> _PS) << _PS1) + (p & _PMASK)
        ob = oa + _PAIR
        ia = ((oa + start) & 0xFFFFFFFF).to(tl.uint32)
        j = ((ia >> _PS1) << _PS) | (ia & _PMASK)
        ma = tl.load(m_ptr + oa, mask=mask).to(tl.float32) * keep
        mb = tl.load(m_ptr + ob, mask=mask).to(tl.float32) * keep
        if NT > 0:
            za, zb = _pair(j, t00, t01, t02)
            ma, mb = ma + a0 * za, mb + a0 * zb
        if NT > 1:
            za, zb = _pair(j, t10, t11, t12)
            ma, mb = ma + a1 * za, mb + a1 * zb
        if NT > 2:
            za, zb = _pair(j, t20, t21, t22)
            ma, mb = ma + a2 * za, mb + a2 * zb
        if NT > 3:
            za, zb = _pair(j, t30, t31, t32)
            ma, mb = ma + a3 * za, mb + a3 * zb
        if ROUND:
            ra = _round_bf16(ma, ia, r0, r1, r2)
            rb = _round_bf16(mb, ia + _PAIR, r0, r1, r2)
            tl.store(m_ptr + oa, ra, mask=mask)
            tl.store(m_ptr + ob, rb, mask=mask)
            ma, mb = ra.to(tl.float32), rb.to(tl.float32)
        else:
            tl.store(m_ptr + oa, ma.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(m_ptr + ob, mb.to(m_ptr.dtype.element_ty), mask=mask)
        if NOISY:
            za, zb = _pair(j, c0, c1, c2)
            ea, eb = eps * za, eps * zb
            if PLUS:
                tl.store(plus_ptr + oa, _out(ma + ea, plus_ptr.dtype.element_ty), mask=mask)
                tl.store(plus_ptr + ob, _out(mb + eb, plus_ptr.dtype.element_ty), mask=mask)
            if MINUS:
                tl.store(minus_ptr + oa, _out(ma - ea, minus_ptr.dtype.element_ty), mask=mask)
                tl.store(minus_ptr + ob, _out(mb - eb, minus_ptr.dtype.element_ty), mask=mask)
        else:
            if PLUS:
                tl.store(plus_ptr + oa, _out(ma, plus_ptr.dtype.element_ty), mask=mask)
                tl.store(plus_ptr + ob, _out(mb, plus_ptr.dtype.element_ty), mask=mask)
            if MINUS:
                tl.store(minus_ptr + oa, _out(ma, minus_ptr.dtype.element_ty), mask=mask)
                tl.store(minus_ptr + ob, _out(mb, minus_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["start", "k0", "k1", "k2"])
    def _fill_pairs_kernel(out_ptr, n, start, k0, k1, k2, BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = p < n
        oa = ((p >> _PS) << _PS1) + (p & _PMASK)
        ia = ((oa + start) & 0xFFFFFFFF).to(tl.uint32)
        za, zb = _pair(((ia >> _PS1) << _PS) | (ia & _PMASK), k0, k1, k2)
        tl.store(out_ptr + oa, za, mask=mask)
        tl.store(out_ptr + oa + _PAIR, zb, mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def fill_(out: torch.Tensor, kind: str, key_words, start: int) -> None:
    require()
    n = out.numel()
    k0, k1, k2 = (D._i32(k) for k in key_words)
    _fill_kernel[_grid(n)](out, n, start, k0, k1, k2, GAUSS=kind == "gaussian", BLOCK=BLOCK,
                           enable_fp_fusion=False)


def fill_pairs_(out: torch.Tensor, pairs: int, key_words, start: int) -> None:
    """Whole gaussian pairs: `pairs` of them from out[0] (element index start), laid out as
    visit_pairs_ says."""
    require()
    k0, k1, k2 = (D._i32(k) for k in key_words)
    _fill_pairs_kernel[_grid(pairs)](out, pairs, start, k0, k1, k2, BLOCK=BLOCK, enable_fp_fusion=False)


def _launch(kernel, n, master, start, updates, keep, cur, eps, plus, minus, noisy, round_words, **const) -> None:
    terms = [(tuple(D._i32(k) for k in key), D.f32(a)) for key, a in updates]
    pad = terms + [((0, 0, 0), 0.0)] * (4 - len(terms))
    alphas = [a for _, a in pad]
    words = [k for key, _ in pad for k in key]
    kernel[_grid(n)](master, master if plus is None else plus, master if minus is None else minus,
                     n, start, D.f32(keep), D.f32(eps), *cur, *alphas, *words, *(round_words or (0, 0, 0)),
                     NT=len(terms), ROUND=round_words is not None, NOISY=bool(noisy),
                     PLUS=plus is not None, MINUS=minus is not None, BLOCK=BLOCK, enable_fp_fusion=False, **const)


def visit_(master, start, kind, updates, keep, cur, eps, plus, minus, noisy, round_words=None) -> None:
    """One pass of at most 4 update terms (noise.visit_ splits and checks); cur: int32 words;
    round_words: the int32 key words that round a bf16 master (None: written as computed)."""
    require()
    _launch(_visit_kernel, master.numel(), master, start, updates, keep, cur, eps, plus, minus, noisy, round_words,
            GAUSS=kind == "gaussian")


def visit_pairs_(master, pairs, start, updates, keep, cur, eps, plus, minus, noisy, round_words=None) -> None:
    """visit_ over `pairs` whole gaussian pairs from master[0] (element index start): pair p's first
    element at ((p >> PAIR_SHIFT) << (PAIR_SHIFT + 1)) + (p mod 2**PAIR_SHIFT), its second 2**PAIR_SHIFT
    further, so one launch covers a run of aligned blocks of 2**(PAIR_SHIFT + 1) (or part of one)."""
    require()
    _launch(_visit_pairs_kernel, pairs, master, start, updates, keep, cur, eps, plus, minus, noisy, round_words)
