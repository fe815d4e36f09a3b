"""Counter-based noise (distzo2_lab/noise.py, noise_triton.py): slices regenerate the same bits,
the fused visit pass equals the unfused arithmetic bit for bit, Triton equals the CPU path, and
the values are good noise."""
import math
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # Triton's interpreter runs the kernels on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from distzo2_lab.zo import noise as N  # noqa: E402
from distzo2_lab.zo import noise_cpu as C  # noqa: E402

KEY = N.noise_key(1234, "decoder.layers.3")
KEY2 = N.noise_key(1233, "decoder.layers.3")
KEY3 = N.noise_key(1234, "decoder.layers.4")
KEY4 = N.noise_key(99, "lm_head")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("kind", N.NOISE_KINDS)
def test_slices_at_any_start_equal_the_whole_fill_and_the_reference(kind):
    n = 5003
    whole = N.fill_(torch.empty(n), kind, KEY, 0)
    assert same(whole, N.noise_reference(kind, KEY, 0, n))
    for start, length in ((0, 17), (1, 4001), (7, 999), (13, 2), (1000, 4003), (4999, 1), (5002, 1)):
        part = N.fill_(torch.empty(length), kind, KEY, start)
        assert same(part, whole[start:start + length]), (start, length)
    far = 3_000_000_001  # an index past 2**31: the counter is unsigned
    assert same(N.fill_(torch.empty(333), kind, KEY, far), N.noise_reference(kind, KEY, far, 333))


def unfused(master, start, kind, updates, keep, cur, eps, dtype):
    """The visit's arithmetic in plain torch ops with materialised z."""
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  scalars are rounded to fp32
    m = master * f(keep)
    for key, alpha in updates:
        m = m + f(alpha) * N.fill_(torch.empty(m.numel()), kind, key, start)
    if cur is None or eps == 0.0:
        return m, m.to(dtype), m.to(dtype)
    e = f(eps) * N.fill_(torch.empty(m.numel()), kind, cur, start)
    return m, (m + e).to(dtype), (m - e).to(dtype)


VISITS = [  # kind, updates, keep, cur key, eps, out dtype
    ("gaussian", [(KEY2, -3e-4)], 0.999, KEY, 1e-3, torch.bfloat16),
    ("gaussian", [(KEY2, -3e-4), (KEY3, 2e-4), (KEY4, 1.5e-4)], 1.0, KEY, 1e-3, torch.float32),
    ("rademacher", [], 1.0, KEY, 1e-2, torch.float32),
    ("rademacher", [(KEY2, 0.1)], 0.9, KEY, 1e-2, torch.bfloat16),
    ("gaussian", [], 1.0, KEY, 0.0, torch.float32),  # eps 0: outs are copies
    ("rademacher", [], 1.0, None, 1e-3, torch.bfloat16),  # frozen region: no cur key
]


@pytest.mark.parametrize("kind, updates, keep, cur, eps, dtype", VISITS)
def test_fused_visit_equals_the_unfused_arithmetic(kind, updates, keep, cur, eps, dtype):
    n, start = 4099, 77
    master = torch.randn(n, generator=torch.Generator().manual_seed(0))
    master[5] = -0.0  # a negative zero stays one in a copy
    want = unfused(master, start, kind, updates, keep, cur, eps, dtype)
    plus, minus = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    N.visit_(master, start, kind, updates, keep, cur, eps, plus, minus)
    assert same(master, want[0]) and same(plus, want[1]) and same(minus, want[2])
    if updates or keep != 1.0:
        assert not same(master, torch.randn(n, generator=torch.Generator().manual_seed(0)))


def test_pair_pieces_cover_every_element_once_and_pair_only_partners():
    P = N.PAIR
    for start, n in ((0, 3 * P + 12345), (P - 5000, 2 * P), (P + 7, P), (2 * P - 10, 3000), (123, 1 << 14),
                     (5 * P + 1, 4 * P - 2), (0, 0)):
        runs, singles = N.pair_pieces(start, n)
        seen = torch.zeros(n, dtype=torch.int32)
        for a, b, k in runs:
            assert k >= N.MIN_PAIRED and b == a + P and ((start + a) >> N.PAIR_SHIFT) % 2 == 0
            seen[a : a + k] += 1
            seen[b : b + k] += 1
        for o, k in singles:
            seen[o : o + k] += 1
        assert bool((seen == 1).all()), (start, n)
        ends = [o + k for o, k in singles]
        assert all(o not in ends for o, _ in singles)  # touching singles are merged: one pass each
    assert N.pair_pieces(0, 2 * P) == ([(0, P, P)], [])


@pytest.mark.parametrize("start, n", [(0, 2 * (1 << 19) + 4099), ((1 << 19) - 5001, (1 << 20) + 10001), (77, 1 << 20)])
def test_regions_holding_whole_pairs_compute_both_at_once_with_the_same_bits(start, n):
    """Two values of one Box-Muller draw (r cos, r sin) for the elements of a pair inside the region;
    the fill and the fused visit equal the element-by-element definition and the unfused arithmetic."""
    assert N.pair_pieces(start, n)[0]  # the region has runs of whole pairs
    ref = N.noise_reference("gaussian", KEY, start, n)
    assert same(N.fill_(torch.empty(n), "gaussian", KEY, start), ref)
    master = torch.randn(n, generator=torch.Generator().manual_seed(3))
    for updates, dtype in (([(KEY2, -3e-4)], torch.bfloat16), ([(KEY2, 1e-3), (KEY3, -2e-3)], torch.float32)):
        want = unfused(master, start, "gaussian", updates, 0.999, KEY, 1e-3, dtype)
        m, plus, minus = master.clone(), torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        N.visit_(m, start, "gaussian", updates, 0.999, KEY, 1e-3, plus, minus)
        assert same(m, want[0]) and same(plus, want[1]) and same(minus, want[2])
    low = master.to(torch.bfloat16)
    want = rounded_unfused(low, start, "gaussian", [(KEY2, -1e-3)], 1.0, KEY, 1e-3, torch.bfloat16)
    plus, minus = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    N.visit_(low, start, "gaussian", [(KEY2, -1e-3)], 1.0, KEY, 1e-3, plus, minus, round_key=RKEY)
    assert same(low, want[0]) and same(plus, want[1]) and same(minus, want[2])


def test_the_second_of_a_pair_is_the_sine_of_the_first_s_draw():
    """z[i + PAIR] / z[i] = tan(2 pi u2): both come from one (r, u2), r cos and r sin."""
    P = N.PAIR
    first = N.noise_reference("gaussian", KEY, 0, 64).double()
    second = N.noise_reference("gaussian", KEY, P, 64).double()
    r = torch.sqrt(first ** 2 + second ** 2)
    w1, w2 = N.hash_words(torch.arange(64, dtype=torch.int32), *(N._i32(k) for k in KEY))
    u1 = (N._shr(w1, 8).double() + 1) / 2 ** 24
    u2 = N._shr(w2, 8).double() / 2 ** 24
    assert torch.allclose(r, torch.sqrt(-2 * torch.log(u1)), rtol=1e-6)
    assert torch.allclose(first, r * torch.cos(2 * math.pi * u2), atol=1e-6)
    assert torch.allclose(second, r * torch.sin(2 * math.pi * u2), atol=1e-6)


def test_visit_of_regions_that_are_views_into_a_bucket_at_odd_offsets():
    bucket = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    before = bucket.clone()
    for a, b in ((0, 4999), (4999, 5000), (5000, 13001), (13001, 20000)):  # regions of one bucket
        plus, minus = torch.empty(b - a, dtype=torch.bfloat16), torch.empty(b - a, dtype=torch.bfloat16)
        want = unfused(before[a:b], a, "rademacher", [(KEY2, 0.1)], 0.9, KEY, 1e-2, torch.bfloat16)
        N.visit_(bucket[a:b], a, "rademacher", [(KEY2, 0.1)], 0.9, KEY, 1e-2, plus, minus)
        assert same(bucket[a:b], want[0]) and same(plus, want[1]) and same(minus, want[2]), (a, b)


def test_more_update_terms_than_one_pass_holds_apply_in_order():
    n, keys = 1500, [N.noise_key(s, "b") for s in range(6)]
    ups = [(k, 1e-3 * (i + 1)) for i, k in enumerate(keys)]
    master = torch.randn(n)
    want = unfused(master, 3, "rademacher", ups, 0.5, KEY, 1e-2, torch.float32)
    plus, minus = torch.empty(n), torch.empty(n)
    N.visit_(master, 3, "rademacher", ups, 0.5, KEY, 1e-2, plus, minus)
    assert same(master, want[0]) and same(plus, want[1]) and same(minus, want[2])


RKEY = N.noise_key(1233, "round/decoder.layers.3")


def rounded_unfused(master_bf16, start, kind, updates, keep, cur, eps, dtype):
    """A bf16 master's visit in plain torch: fp32 arithmetic, then the stochastic rounding by hand
    (add a seeded 16-bit integer to the bit pattern, drop the low 16 bits), copies from the result."""
    m, _, _ = unfused(master_bf16.float(), start, kind, updates, keep, None, 0.0, torch.float32)
    idx = torch.arange(m.numel(), dtype=torch.int64) + start
    k0, k1, _ = (torch.tensor(N._i32(k), dtype=torch.int64) & 0xFFFFFFFF for k in RKEY)
    def h(x):  # lowbias32 on int64 words
        x = x & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * N.M1) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * N.M2) & 0xFFFFFFFF
        return x ^ (x >> 16)
    w1 = h(h(idx ^ k0) + k1)
    b = (m.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) + (w1 >> 16)
    r = ((b & 0xFFFF0000) - ((b & 0x80000000) << 1)).to(torch.int32).view(torch.float32)
    if cur is None or eps == 0.0:
        return r.to(torch.bfloat16), r.to(dtype), r.to(dtype)
    e = torch.tensor(eps, dtype=torch.float32) * N.fill_(torch.empty(m.numel()), kind, cur, start)
    return r.to(torch.bfloat16), (r + e).to(dtype), (r - e).to(dtype)


@pytest.mark.parametrize("kind, updates, keep", [("gaussian", [(KEY2, -3e-4)], 0.999),
                                                  ("rademacher", [(KEY2, 0.1), (KEY3, -0.05)], 1.0)])
def test_a_bf16_master_is_written_back_stochastically_rounded_and_the_copies_come_from_it(kind, updates, keep):
    n, start = 4099, 77
    master = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    master[5] = -0.0
    want = rounded_unfused(master, start, kind, updates, keep, KEY, 1e-3, torch.bfloat16)
    plus, minus = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    N.visit_(master, start, kind, updates, keep, KEY, 1e-3, plus, minus, round_key=RKEY)
    assert same(master, want[0]) and same(plus, want[1]) and same(minus, want[2])
    # no round key, no update: nothing is rounded, the master stays bit for bit
    before = master.clone()
    N.visit_(master, start, kind, [], 1.0, KEY, 1e-3, plus, minus)
    assert same(master, before)
    with pytest.raises(ValueError, match="round_key"):
        N.visit_(master, start, kind, updates, keep, KEY, 1e-3, plus, minus)


def test_stochastic_rounding_lands_updates_far_below_bf16_resolution_on_average():
    """An update of 1/16 ulp vanishes under round-to-nearest; rounded stochastically it moves an
    element by a whole ulp with probability |update| / ulp (1/16 upwards from 1.0, 1/8 downwards,
    where the ulp is half as large), so the mean change equals the update."""
    n = 1 << 16
    master = torch.full((n,), 1.0, dtype=torch.bfloat16)  # ulp above 1.0 is 2**-7
    up = 2.0 ** -7 / 16
    N.visit_(master, 0, "rademacher", [(KEY2, up)], 1.0, round_key=RKEY)  # +-up by the sign of z
    moved = (master.float() != 1.0).float().mean().item()
    z = N.fill_(torch.empty(n), "rademacher", KEY2, 0)
    assert abs(moved - (1 / 16 + 1 / 8) / 2) < 0.01
    assert abs(((master.float() - 1.0) * z).mean().item() - up) < 0.1 * up
    nearest = (torch.ones(n) + up * z).to(torch.bfloat16)
    assert bool((nearest == 1.0).all())


def with_backend(backend: str, fn):
    was = C.backend
    C.backend = backend
    try:
        return fn()
    finally:
        C.backend = was


def visit_all(kind, n, start, nterms, noisy, plus, minus, master_dtype=torch.float32):
    """(master, plus, minus, fill) after one visit_ and one fill_ of a region [start, start + n)."""
    master = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(master_dtype)
    master[3] = -0.0
    outs = [None if d is None else torch.empty(n, dtype=d) for d in (plus, minus)]
    updates = [(N.noise_key(t, "c"), 1e-3 * (t + 1)) for t in range(nterms)]
    N.visit_(master, start, kind, updates, 1.0 - 1e-4, KEY if noisy else None, 1e-3, *outs,
             round_key=RKEY if master_dtype == torch.bfloat16 else None)
    return master, *outs, N.fill_(torch.empty(n), kind, KEY, start)


C_VARIANTS = [  # kind, n, start (pairs need a region of more than 2**19 + MIN_PAIRED), terms, noisy, outs
    ("gaussian", 4099, 77, 1, True, (torch.bfloat16, torch.bfloat16)),
    ("gaussian", 4099, (1 << 19) - 2000, 0, True, (torch.float32, None)),  # crosses the pair bit
    ("gaussian", (1 << 19) + 6000, 3_000_000_001, 4, True, (None, torch.bfloat16)),  # pairs and singles
    ("gaussian", (1 << 19) + 5000, 1 << 20, 5, False, (torch.bfloat16, torch.bfloat16)),  # two passes
    ("gaussian", (1 << 19) + 5000, 0, 2, True, (None, None)),
    ("rademacher", 40_000, 2**31 - 7, 2, True, (torch.bfloat16, torch.float32)),
    ("rademacher", 999, 5, 0, False, (torch.float32, torch.float32)),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind, n, start, nterms, noisy, outs", C_VARIANTS)
def test_the_c_kernels_equal_the_eager_definition_bit_for_bit(kind, n, start, nterms, noisy, outs, threads,
                                                              monkeypatch):
    """noise_kernels.cpp (unsigned words, ln's exponent from the float's bits) against the torch
    definition run eagerly: every layout (element by element, rademacher, pairs), term counts 0-5,
    noisy and plain outs in fp32 / bf16 / none, starts past 2**31, across threads' chunks."""
    if C.library("pairs") is None:
        pytest.skip(f"the C kernels cannot be built here: {C.failed}")
    monkeypatch.setattr(C, "_libs", {})
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = with_backend("c", lambda: visit_all(kind, n, start, nterms, noisy, *outs))
    finally:
        torch.set_num_threads(was)
    want = with_backend("eager", lambda: visit_all(kind, n, start, nterms, noisy, *outs))
    for g, w in zip(got, want):
        assert (g is None and w is None) or same(g, w)
    assert any(k[1:] == (nterms if nterms <= N.MAX_TERMS else 1, noisy) + outs for k in C._libs)  # C ran


def test_a_bf16_master_takes_the_compiled_torch_path_with_the_same_bits():
    got = with_backend("c", lambda: visit_all("gaussian", 5000, 9, 1, True, torch.bfloat16, None, torch.bfloat16))
    want = with_backend("eager", lambda: visit_all("gaussian", 5000, 9, 1, True, torch.bfloat16, None,
                                                   torch.bfloat16))
    assert same(got[0], want[0]) and same(got[1], want[1]) and same(got[3], want[3])


def test_without_a_c_compiler_the_noise_warns_once_and_runs_inductor(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "compiler", lambda: None)
    monkeypatch.setattr(C, "_libs", {})
    monkeypatch.setattr(C, "failed", None)
    monkeypatch.setenv("DISTZO2_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        a = N.fill_(torch.empty(100), "gaussian", KEY, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = N.fill_(torch.empty(100), "rademacher", KEY, 5)
    assert same(a, N.noise_reference("gaussian", KEY, 5, 100))
    assert same(b, N.noise_reference("rademacher", KEY, 5, 100))


def test_the_c_kernels_are_built_once_per_variant_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "_libs", {})
    monkeypatch.setenv("DISTZO2_CACHE", str(tmp_path))
    if C.library("rademacher", 3, True, torch.float32, None) is None:
        pytest.skip(f"the C kernels cannot be built here: {C.failed}")
    built = sorted(os.listdir(tmp_path / "noise_kernels"))
    assert len(built) == 1 and built[0].endswith(".so")
    monkeypatch.setattr(C, "_libs", {})
    C.library("rademacher", 3, True, torch.float32, None)  # found by its hash, not built again
    assert sorted(os.listdir(tmp_path / "noise_kernels")) == built
    monkeypatch.setattr(C, "_libs", {})
    monkeypatch.setattr(C, "_cpu", lambda: "another CPU")
    C.library("rademacher", 3, True, torch.float32, None)  # -march=native code of another CPU is not reused
    assert len(os.listdir(tmp_path / "noise_kernels")) == 2


def test_a_cache_folder_that_cannot_be_made_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # $DISTZO2_CACHE/noise_kernels cannot be made under a file, even by root
    monkeypatch.setenv("DISTZO2_CACHE", str(blocked))
    monkeypatch.setattr(C.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(C, "_libs", {})
    assert C.cache_dir().startswith(str(tmp_path / "tmp"))
    if C.library("rademacher", 1, False, torch.float32, None) is None:
        pytest.skip(f"the C kernels cannot be built here: {C.failed}")
    assert len(os.listdir(C.cache_dir())) == 1


def test_a_failed_compilation_warns_once_and_runs_the_same_definition(monkeypatch):
    def broken(fn, tag):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(C, "backend", "inductor")
    monkeypatch.setattr(N, "_compiled_variant", broken)
    monkeypatch.setattr(N, "compile_enabled", True)
    monkeypatch.setattr(N, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no compiler"):
        a = N.fill_(torch.empty(100), "gaussian", KEY, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = N.fill_(torch.empty(100), "gaussian", KEY, 5)
    assert same(a, N.noise_reference("gaussian", KEY, 5, 100)) and same(a, b)


def test_without_triton_the_package_imports_and_cuda_falls_back_with_one_warning(monkeypatch):
    import importlib.util
    import sys
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.find_spec("distzo2_lab.zo.noise_triton")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ImportError, match="triton"):
        mod.require()
    monkeypatch.setitem(sys.modules, "distzo2_lab.zo.noise_triton", mod)
    monkeypatch.setattr(sys.modules["distzo2_lab"], "noise_triton", mod, raising=False)
    monkeypatch.setattr(N, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton is unavailable"):
        assert N._triton() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert N._triton() is None


def _triton():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton cannot be imported ({exc})")
    from distzo2_lab.zo import noise_triton
    return noise_triton


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter


@pytest.mark.parametrize("kind", N.NOISE_KINDS)
def test_triton_fill_equals_the_cpu_path(kind):
    T = _triton()
    for start, n in ((0, 2500), (13, 1031), (4_294_966_000, 1296), ((1 << 19) - 700, 1400)):  # last: a pair edge
        out = torch.empty(n, device=DEV)
        T.fill_(out, kind, KEY, start)
        assert same(out.cpu(), N.fill_(torch.empty(n), kind, KEY, start)), (start, n)


@pytest.mark.parametrize("kind, updates, keep, cur, eps, dtype", VISITS[:4] + [
    ("gaussian", [(KEY2, 1e-3)], 0.99, KEY, 1e-3, torch.float16)])
def test_triton_visit_equals_the_cpu_path(kind, updates, keep, cur, eps, dtype):
    T = _triton()
    n, start = 1500, 11
    master = torch.randn(n, generator=torch.Generator().manual_seed(1))
    master[[3, 4, 5]] = torch.tensor([1e38, 3.3895314e38, -0.0])  # rounding to the top of bf16 / inf
    want = unfused(master, start, kind, updates, keep, cur, eps, dtype)
    m, plus, minus = master.to(DEV), torch.empty(n, dtype=dtype, device=DEV), torch.empty(n, dtype=dtype, device=DEV)
    T.visit_(m, start, kind, updates, keep, [N._i32(k) for k in cur], eps, plus, minus, True)
    assert same(m.cpu(), want[0]) and same(plus.cpu(), want[1]) and same(minus.cpu(), want[2])


def test_triton_pair_launches_cover_the_region_and_equal_the_cpu_path():
    """Whole pairs in one launch per run of aligned blocks (pair p at ((p >> 19) << 20) + p mod 2**19,
    its partner 2**19 further), the rest element by element: fill and visit equal the CPU path."""
    T = _triton()
    P = N.PAIR
    for start, n in ((0, 2 * P + 3000), (P - 5000, 3 * P)):
        launches, singles = N.pair_launches(start, n)
        seen = torch.zeros(n, dtype=torch.int32)
        for a, pairs in launches:
            p = torch.arange(pairs)
            oa = a + ((p >> N.PAIR_SHIFT) << (N.PAIR_SHIFT + 1)) + (p & (P - 1))
            seen[oa] += 1
            seen[oa + P] += 1
        for o, k in singles:
            seen[o : o + k] += 1
        assert bool((seen == 1).all()) and launches, (start, n)
    start, n = P - 5000, 4 * P + 14000  # a partial run, then a whole block and a partial one in one launch
    assert [k for _, k in N.pair_launches(start, n)[0]] == [5000, P + 9000]
    out = torch.empty(n, device=DEV)
    N.triton_fill(T, out, "gaussian", KEY, start)
    assert same(out.cpu(), N.noise_reference("gaussian", KEY, start, n))
    master = torch.randn(n, generator=torch.Generator().manual_seed(4))
    want = unfused(master, start, "gaussian", [(KEY2, -1e-3)], 0.99, KEY, 1e-3, torch.bfloat16)
    m, plus, minus = master.to(DEV), torch.empty(n, dtype=torch.bfloat16, device=DEV), torch.empty(
        n, dtype=torch.bfloat16, device=DEV)
    N.triton_visit(T, m, start, "gaussian", [(KEY2, -1e-3)], 0.99, [N._i32(k) for k in KEY], 1e-3, plus, minus,
                   True, None)
    assert same(m.cpu(), want[0]) and same(plus.cpu(), want[1]) and same(minus.cpu(), want[2])


def test_triton_bf16_master_visit_equals_the_cpu_path():
    T = _triton()
    n, start = 1500, 11
    master = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = rounded_unfused(master, start, "gaussian", [(KEY2, -1e-3)], 0.99, KEY, 1e-3, torch.bfloat16)
    m, plus, minus = (master.to(DEV), torch.empty(n, dtype=torch.bfloat16, device=DEV),
                      torch.empty(n, dtype=torch.bfloat16, device=DEV))
    T.visit_(m, start, "gaussian", [(KEY2, -1e-3)], 0.99, [N._i32(k) for k in KEY], 1e-3, plus, minus, True,
             [N._i32(k) for k in RKEY])
    assert same(m.cpu(), want[0]) and same(plus.cpu(), want[1]) and same(minus.cpu(), want[2])


def test_gaussian_statistics():
    n = 1 << 21
    z = N.noise_reference("gaussian", KEY, 0, n).double()
    tol = 6 / math.sqrt(n)
    assert abs(z.mean()) < tol
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 6 * math.sqrt(24 / n)
    assert z.abs().max() <= N.Z_BOUND * (1 + 1e-6)
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < tol  # neighbours
    assert abs(torch.corrcoef(torch.stack([z[0::2], z[1::2]]))[0, 1]) < 1.5 * tol
    first, second = z.view(-1, 2, N.PAIR)[:, 0].reshape(-1), z.view(-1, 2, N.PAIR)[:, 1].reshape(-1)
    ptol = 6 / math.sqrt(first.numel())
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < ptol  # the two of a pair
    assert abs(torch.corrcoef(torch.stack([first ** 2, second ** 2]))[0, 1]) < ptol  # independent
    for other in (KEY2, KEY3, N.noise_key(1235, "decoder.layers.3")):  # other seeds and buckets
        y = N.noise_reference("gaussian", other, 0, n).double()
        assert abs(torch.corrcoef(torch.stack([z, y]))[0, 1]) < tol
    assert z.unique().numel() > 0.97 * n  # no short cycles (fp32 rounding makes ~1.5 % ties at this n)


def test_rademacher_is_balanced_and_independent():
    n = 1 << 21
    z = N.noise_reference("rademacher", KEY, 0, n).double()
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    tol = 6 / math.sqrt(n)
    assert abs(z.mean()) < tol
    assert abs((z[:-1] * z[1:]).mean()) < tol
    assert abs((z * N.noise_reference("rademacher", KEY2, 0, n).double()).mean()) < tol


def test_ln_and_cos_match_float64_over_every_input():
    a = torch.arange(1 << 24, dtype=torch.int32)  # every 24-bit input
    u = (a.double() + 1) / 2 ** 24
    ln = N.ln_uniform(a).double()
    err = (ln - torch.log(u)).abs() / torch.log(u).abs().clamp_min(1.0)
    assert err.max() < 5e-7, err.max()
    cos = N.cos_turn(a).double()
    assert (cos - torch.cos(2 * math.pi * a.double() / 2 ** 24)).abs().max() < 2e-7


def test_buckets_past_2_to_the_32_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        N.fill_(torch.empty(10), "gaussian", KEY, (1 << 32) - 5)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        N.noise_reference("gaussian", KEY, 1 << 32, 1)
    with pytest.raises(ValueError, match="not valid"):
        N.fill_(torch.empty(10), "uniform", KEY, 0)


PTX_SCRIPT = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from distzo2_lab.zo import noise_triton as T
ptx = ""
# fp32 masters, and bf16 ones rounded stochastically; the element-wise kernel and the pairs' kernel
for master, rnd, kernel in (("*fp32", False, "_visit_kernel"), ("*bf16", True, "_visit_kernel"),
                            ("*fp32", False, "_visit_pairs_kernel"), ("*bf16", True, "_visit_pairs_kernel")):
    gauss = ("GAUSS",) if kernel == "_visit_kernel" else ()
    sig = {"m_ptr": master, "plus_ptr": "*bf16", "minus_ptr": "*fp16", "n": "i32", "start": "i64",
           "keep": "fp32", "eps": "fp32", "c0": "i32", "c1": "i32", "c2": "i32",
           **{f"a{i}": "fp32" for i in range(4)}, **{f"t{i}{j}": "i32" for i in range(4) for j in range(3)},
           **{f"r{i}": "i32" for i in range(3)},
           **{c: "constexpr" for c in ("NT", "NOISY", "PLUS", "MINUS", *gauss, "ROUND", "BLOCK")}}
    src = ASTSource(getattr(T, kernel), sig, constexprs={"NT": 2, "NOISY": True, "PLUS": True, "MINUS": True,
                                                         **{g: True for g in gauss}, "ROUND": rnd, "BLOCK": 1024})
    try:
        ptx += triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
    except Exception as exc:  # a missing toolchain skips; a kernel that does not compile fails
        if "ptxas" not in str(exc) and "backend" not in str(exc).lower():
            raise
        print("NO-TOOLCHAIN", exc)
        sys.exit(0)
pat = r"\\b(mul|add|sub|fma|div|sqrt)(\\.[a-z0-9.]*)?\\.f32\\b"
print(" ".join(sorted(set(m.group(0) for m in re.finditer(pat, ptx)))))
print("FMA" if "fma" in ptx else "", "APPROX" if "approx" in ptx else "")
"""


def test_triton_kernels_compile_for_a_gpu_with_every_float_op_rounded_and_no_fma():
    """PTX for sm_90, built here without a GPU (in a process without the interpreter): every f32
    op carries .rn (so ptxas may not contract it into an fma), no fma, no approximate div/sqrt."""
    import subprocess
    import sys
    _triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if r.stdout.startswith("NO-TOOLCHAIN"):
        pytest.skip(f"triton cannot build PTX here ({r.stdout.strip()[:200]})")
    ops, flags = r.stdout.splitlines()[:2]
    assert ops and all(".rn." in op for op in ops.split()), ops
    assert "div.rn.f32" in ops and "sqrt.rn.f32" in ops
    assert not flags.strip(), flags
