// The counter-based noise's CPU passes (fill and fused visit), written out in C++ for the compiler's
// auto-vectoriser. Same definition and the same fp32 operations in the same order as noise.py, so the
// same bits; what differs from the torch definition Inductor compiles is only how the integer steps
// are spelled: unsigned 32-bit words with logical shifts (one instruction where int32 needs a shift
// and a mask) and ln's exponent read from the float's bits (where Inductor needs a five-step search).
//
// Built by noise_cpu.py once per variant, selected by these macros:
//   LAYOUT  0 gaussian element by element, 1 rademacher, 2 gaussian pairs (two regions a partner apart)
//   NTERMS  update terms applied (0..4);  NOISY  1: the outs are m +- eps z(cur), 0: plain copies of m
//   PLUS, MINUS  the outs' dtype: 0 none, 1 fp32, 2 bf16 (round to nearest even, as torch's .to())
//   the fp32 constants SQRT2 LN2 LN_C0..3 COS_C0..4 SIN_C0..4 (noise_constants.py)
// Compiled with -ffp-contract=off (no fused multiply-add) and -fno-math-errno (sqrt is the
// instruction, correctly rounded).
#include <cmath>
#include <cstdint>
#include <cstring>

typedef uint32_t u32;
typedef uint16_t u16;

static inline u32 lowbias32(u32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

static inline float as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline u32 as_bits(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }

// ln(u1), u1 = (a + 1) / 2**24: x = a + 1 = m 2**e with m in [sqrt(1/2), sqrt(2)), by the atanh series
static inline float ln_uniform(u32 a) {
    u32 bits = as_bits((float)(int)(a + 1));  // exact: a + 1 <= 2**24
    int e = (int)(bits >> 23) - 127;
    float m = as_float((bits & 0x7FFFFFu) | 0x3F800000u);  // in [1, 2)
    bool hi = m >= SQRT2;
    m = hi ? m * 0.5f : m;
    e = hi ? e + (1 - 24) : e - 24;
    float f = m - 1.0f;
    float s = f / (f + 2.0f);
    float s2 = s * s;
    float p = ((s2 * LN_C3 + LN_C2) * s2 + LN_C1) * s2 + LN_C0;
    float lnm = s * 2.0f + (s * s2) * p;
    return (float)e * LN2 + lnm;
}

// cos and sin of 2 pi b / 2**24: quadrant from the top bits, one polynomial pair on [-pi/4, pi/4)
static inline void cos_sin_turn(u32 b, float &cos_out, float &sin_out) {
    u32 t = (b + (1u << 21)) & 0xFFFFFFu;
    u32 q = t >> 22;
    float f = (float)((int)(t & 0x3FFFFFu) - (1 << 21)) * (1.0f / 4194304.0f);  // exact
    float f2 = f * f;
    float c = (((f2 * COS_C4 + COS_C3) * f2 + COS_C2) * f2 + COS_C1) * f2 + COS_C0;
    float s = ((((f2 * SIN_C4 + SIN_C3) * f2 + SIN_C2) * f2 + SIN_C1) * f2 + SIN_C0) * f;
    bool odd = q & 1u;
    float cv = odd ? s : c, sv = odd ? c : s;
    cos_out = ((q + 1) >> 1) & 1u ? -cv : cv;
    sin_out = (q >> 1) & 1u ? -sv : sv;
}

struct Key { u32 k0, k1, k2; };

static inline u32 word1(u32 i, Key k) { return lowbias32(lowbias32(i ^ k.k0) + k.k1); }

// both values of gaussian pair j: r cos and r sin of one Box-Muller draw
static inline void gaussian_pair(u32 j, Key k, float &za, float &zb) {
    u32 w1 = word1(j, k), w2 = lowbias32(w1 ^ k.k2);
    float r = std::sqrt(ln_uniform(w1 >> 8) * -2.0f);
    float c, s;
    cos_sin_turn(w2 >> 8, c, s);
    za = r * c;
    zb = r * s;
}

static inline u32 pair_of(u32 i) { return ((i >> 20) << 19) | (i & ((1u << 19) - 1)); }

// z of element i alone
static inline float noise_at(u32 i, Key k) {
#if LAYOUT == 1
    return 1.0f - (float)(word1(i, k) >> 31) * 2.0f;
#else
    u32 w1 = word1(pair_of(i), k), w2 = lowbias32(w1 ^ k.k2);
    u32 turn = ((w2 >> 8) - (((i >> 19) & 1u) << 22)) & 0xFFFFFFu;  // the second: a quarter turn back
    float c, s;
    cos_sin_turn(turn, c, s);
    return std::sqrt(ln_uniform(w1 >> 8) * -2.0f) * c;
#endif
}

static inline u16 to_bf16(float f) {
    u32 u = as_bits(f);
    u16 r = (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (u16)0x7FC0u : r;  // a NaN becomes torch's NaN (a select, not a branch: it vectorises)
}

#if PLUS == 1
typedef float plus_t;
#define PUT_PLUS(o, i, v) ((plus_t *)(o))[i] = (v)
#elif PLUS == 2
#define PUT_PLUS(o, i, v) ((u16 *)(o))[i] = to_bf16(v)
#else
#define PUT_PLUS(o, i, v) (void)0
#endif
#if MINUS == 1
#define PUT_MINUS(o, i, v) ((float *)(o))[i] = (v)
#elif MINUS == 2
#define PUT_MINUS(o, i, v) ((u16 *)(o))[i] = to_bf16(v)
#else
#define PUT_MINUS(o, i, v) (void)0
#endif

static const long CHUNK = 1 << 14;  // elements a thread takes at a time

// body(i) for every i < n: chunks shared out over the threads, each chunk one SIMD loop
template <class F> static inline void each(long n, int threads, F body) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long c = 0; c < n; c += CHUNK) {
        long stop = c + CHUNK < n ? c + CHUNK : n;
#pragma omp simd
        for (long i = c; i < stop; i++) body(i);
    }
}

// a visit's keys (cur, then one per update term) and scalars (keep, eps, then each term's alpha)
struct Terms {
    Key keys[NTERMS + 1];
    float alpha[NTERMS + 1], keep, eps;
    Terms(const u32 *w, const float *p) : keep(p[0]), eps(p[1]) {
        for (int t = 0; t <= NTERMS; t++) keys[t] = Key{w[3 * t], w[3 * t + 1], w[3 * t + 2]};
        for (int t = 0; t < NTERMS; t++) alpha[t] = p[2 + t];
    }
};

// the outs of element i from m and eps z(cur): m + e and m - e, or plain copies of m
static inline void put(void *plus, void *minus, long i, float m, float e) {
#if NOISY
    PUT_PLUS(plus, i, m + e);
    PUT_MINUS(minus, i, m - e);
#else
    (void)e;
    PUT_PLUS(plus, i, m);
    PUT_MINUS(minus, i, m);
#endif
}

extern "C" void fill(float *out, long n, u32 start, const u32 *w, int threads) {
    const Key k{w[0], w[1], w[2]};
    each(n, threads, [&](long i) { out[i] = noise_at(start + (u32)i, k); });
}

// first[t], second[t]: elements start + t and start + t + 2**19 of the bucket, t < n
extern "C" void fill_pairs(float *first, float *second, long n, u32 start, const u32 *w, int threads) {
    const Key k{w[0], w[1], w[2]};
    each(n, threads, [&](long i) { gaussian_pair(pair_of(start + (u32)i), k, first[i], second[i]); });
}

// m = master * keep + sum_t alpha_t z_t;  master = m;  outs m +- eps z(cur) (or m)
extern "C" void visit(float *master, long n, u32 start, const u32 *w, const float *p, void *plus, void *minus,
                      int threads) {
    const Terms T(w, p);
    each(n, threads, [&](long i) {
        u32 idx = start + (u32)i;
        float m = master[i] * T.keep;
        for (int t = 0; t < NTERMS; t++) m = m + T.alpha[t] * noise_at(idx, T.keys[1 + t]);
        master[i] = m;
        put(plus, minus, i, m, NOISY ? T.eps * noise_at(idx, T.keys[0]) : 0.0f);
    });
}

// visit for gaussian pairs: ma, pa, na hold elements start + t; mb, pb, nb their partners (+ 2**19)
extern "C" void visit_pairs(float *ma, float *mb, long n, u32 start, const u32 *w, const float *p, void *pa,
                            void *pb, void *na, void *nb, int threads) {
    const Terms T(w, p);
    each(n, threads, [&](long i) {
        u32 j = pair_of(start + (u32)i);
        float a = ma[i] * T.keep, b = mb[i] * T.keep, za = 0.0f, zb = 0.0f;
        for (int t = 0; t < NTERMS; t++) {
            gaussian_pair(j, T.keys[1 + t], za, zb);
            a = a + T.alpha[t] * za;
            b = b + T.alpha[t] * zb;
        }
        ma[i] = a;
        mb[i] = b;
        if (NOISY) gaussian_pair(j, T.keys[0], za, zb);
        put(pa, na, i, a, T.eps * za);
        put(pb, nb, i, b, T.eps * zb);
    });
}
