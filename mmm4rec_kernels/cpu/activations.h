// Activations shared by the native CPU kernels, overflow-free at any input and vectorisable (no branches: both
// sides are computed and one is selected).
#pragma once
#include <cmath>

// exp(s) for s <= 0, 0 below the smallest normal result (s < -87 in fp32, -708 in fp64); NaN stays NaN, -inf gives
// 0: no denormal results.  Not fast there (measured): GCC folds the clamp away (exp(s < lo ? lo : s) becomes
// s < lo ? exp(lo) : exp(s), and the outer select then drops the constant), so libmvec's vector exp still sees those
// lanes and computes them one by one (fmin / fmax clamps stop the vectorisation instead).  Rare for the sigmoid and
// softplus here (|p| > 87); the scan's decays, where it is common, take decay_exp below (inlined).
template <typename T>
inline T exp_nonpos(T s) {
    const T lo = sizeof(T) == 4 ? T(-87) : T(-708);
    const T e = std::exp(s < lo ? lo : s);
    return s < lo ? T(0) : e;
}

// sigmoid s = sigmoid(p) and its complement c = 1 - s: with e = exp(-|p|) in (0, 1],
//   p >= 0: s = 1 / (1 + e), c = e / (1 + e);   p < 0: s = e / (1 + e), c = 1 / (1 + e)
// (exp(-p) itself overflows to inf for p < -88.7 in fp32, and inf * 0 = NaN in a gradient).  p = +-inf / NaN give
// what torch gives.
template <typename T>
inline void sigmoid_pair(T p, T& s, T& c) {
    const T e = exp_nonpos(-std::abs(p));
    const T r = T(1) / (T(1) + e);
    const bool pos = p >= T(0);
    s = pos ? r : e * r;
    c = pos ? e * r : r;
}

template <typename T>
inline T silu_of(T p) {                         // p * sigmoid(p)
    T s, c;
    sigmoid_pair(p, s, c);
    return p * s;
}

template <typename T>
inline T silu_grad(T p) {                       // d SiLU / dp = s (1 + p (1 - s)), s = sigmoid(p)
    T s, c;
    sigmoid_pair(p, s, c);
    return s * (T(1) + p * c);
}

// torch's F.softplus (beta 1, threshold 20): log1p(exp(v)), v past 20, written so that a loop of it vectorises
// (log1p has no vector version): with e = exp(-|v|) in (0, 1],
//   softplus(v) = max(v, 0) + log1p(e),  log1p(e) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...),  s = e / (2 + e) <= 1/3
// (no cancellation anywhere: every term is positive; the terms past s^(2K+1) are below T's rounding: K = 7 for
// float, 17 for double).  Not log(1 + e) with a correction: -fassociative-math would fold (1 + e) - 1 to e.
// NaN stays NaN, -inf gives 0, v > 20 gives v (torch's threshold); below v = -87 (-708 in fp64) 0 where torch
// gives the denormal e^v (exp_nonpos).
template <typename T>
inline T softplus_of(T v) {
    constexpr int K = sizeof(T) == 4 ? 7 : 17;
    const T e = exp_nonpos(-std::abs(v));
    const T s = e / (T(2) + e), s2 = s * s;
    T p = T(1) / T(2 * K + 1);
    for (int k = K - 1; k >= 0; --k) p = p * s2 + T(1) / T(2 * k + 1);
    const T r = (v > T(0) ? v : T(0)) + T(2) * s * p;
    return v > T(20) ? v : r;
}

// ------------------------------------------------------------------------------------------- W lanes at once
// The same functions on W lanes at once (GCC / clang vector extensions: 16 floats / 8 doubles with AVX-512), for
// kernels that keep their running state in registers
// (causal_conv.cpp).  The exp is inlined (range reduction + polynomial) instead of libmvec's call, and the
// sigmoid's 1 / (1 + e) uses the fp32 reciprocal estimate with one Newton step where AVX-512 has it.
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// one vector: 64 bytes with AVX-512, 32 with AVX, else 16 (wider vector types would be split, some operations lane
// by lane)
#if defined(__AVX512F__)
#define MMM4REC_VECTOR_BYTES 64
#elif defined(__AVX__)
#define MMM4REC_VECTOR_BYTES 32
#else
#define MMM4REC_VECTOR_BYTES 16
#endif
template <typename T>
struct lanes;
template <>
struct lanes<float> {
    typedef float v __attribute__((vector_size(MMM4REC_VECTOR_BYTES)));
    typedef int32_t i __attribute__((vector_size(MMM4REC_VECTOR_BYTES)));
    static constexpr int n = MMM4REC_VECTOR_BYTES / 4;
};
template <>
struct lanes<double> {
    typedef double v __attribute__((vector_size(MMM4REC_VECTOR_BYTES)));
    typedef int64_t i __attribute__((vector_size(MMM4REC_VECTOR_BYTES)));
    static constexpr int n = MMM4REC_VECTOR_BYTES / 8;
};

// 8 doubles (the exact sums of fp32 products: weight gradients, the D skip's dD)
typedef double d8 __attribute__((vector_size(64)));

// 8 values of T as 8 doubles (exact): with AVX-512 one vcvtps2pd from memory (GCC's generic conversion splits it
// into halves and reinserts them: 4 instructions)
template <typename T>
inline d8 load8_double(const T* q) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) return (d8)_mm512_cvtps_pd(_mm256_loadu_ps(q));
#endif
    typedef T t8 __attribute__((vector_size(8 * sizeof(T))));
    t8 v;
    std::memcpy(&v, q, sizeof v);
    return __builtin_convertvector(v, d8);
}

// v as the compiler sees it afterwards: a value it cannot look into, so that -fassociative-math does not regroup
// the products or sums it came from with those it goes into (no instruction)
template <typename T>
inline void opaque(typename lanes<T>::v& v) {
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#elif defined(__x86_64__) || defined(__i386__)
    __asm__("" : "+x"(v));
#else
    __asm__("" : "+m"(v));
#endif
}

// Max ? (a > b ? a : b) : (a < b ? a : b), lane by lane: x86's vmaxps / vminps exactly (b where either is NaN), one
// instruction; GCC writes the selects as a compare and a blend (two)
template <typename T, bool Max>
inline typename lanes<T>::v pick_or_second(typename lanes<T>::v a, typename lanes<T>::v b) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        return (typename lanes<T>::v)(Max ? _mm512_max_ps((__m512)a, (__m512)b) : _mm512_min_ps((__m512)a, (__m512)b));
    else
        return (typename lanes<T>::v)(Max ? _mm512_max_pd((__m512d)a, (__m512d)b)
                                          : _mm512_min_pd((__m512d)a, (__m512d)b));
#else
    return Max ? (a > b ? a : b) : (a < b ? a : b);
#endif
}
template <typename T>
inline typename lanes<T>::v min_or_second(typename lanes<T>::v a, typename lanes<T>::v b) {
    return pick_or_second<T, false>(a, b);
}
template <typename T>
inline typename lanes<T>::v max_or_second(typename lanes<T>::v a, typename lanes<T>::v b) {
    return pick_or_second<T, true>(a, b);
}

// Outputs of at least kStreamBytes are written by the kernels past the caches where they can (a non-temporal store:
// the line is not read before it is written, as a plain store to memory not in cache does; an output this large
// would not stay in L2 for its reader anyway; smaller ones, a small batch's, are stored as usual):
// store_past_caches(p, v) for one 64-byte vector v at a 64-byte aligned p with AVX-512 (else a plain store), and
// stream_fence() once at the end of each thread's stores.
constexpr int64_t kStreamBytes = int64_t(1) << 20;

// is an output of `count` values of T written past the caches (kStreamBytes or more)?
template <typename T>
inline bool goes_past_caches(int64_t count) {
    return count * int64_t(sizeof(T)) >= kStreamBytes;
}

template <typename V>
inline void store_past_caches(void* p, V v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64)
        if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
            _mm512_stream_si512(reinterpret_cast<__m512i*>(p), (__m512i)v);
            return;
        }
#endif
    std::memcpy(p, &v, sizeof v);
}

inline void stream_fence() {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

// does p[0..n) hold only finite values?  Read from the bits (exponent all ones: inf / NaN), so one vectorised
// integer pass decides it whatever the floating-point flags (-fassociative-math folds float tricks such as
// "sum of p * 0 is NaN": GCC dropped the vectorised part of that loop)
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
    typedef typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type U;
    constexpr U mask = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
    U bad = 0;
    for (int64_t e = 0; e < n; ++e) {
        U bits;
        std::memcpy(&bits, p + e, sizeof bits);
        bad |= U((bits & mask) == mask);
    }
    return bad == 0;
}

// exp(a) for a <= 0 or NaN (any a with AVX-512: kExpAnySign below), branch-free:
//   a = m ln2 + r with m = round(a / ln2), |r| <= ln2 / 2: r = (a - m ln2_hi) - m ln2_lo, where ln2_hi has few
//   bits (m ln2_hi and the first difference are exact) and ln2_lo = ln2 - ln2_hi;
//   exp(r): float 1 + r q(r), q of degree 4 fitted for the least relative error (9e-8, 1.7e-7 evaluated in fp32;
//   the degree-7 Taylor sum it replaced cost 2 more FMAs: the conv forward measured 0.91x with it); double the
//   Taylor sum to degree 13 (truncation < 4.3e-18), Horner; the result is within a few ulp;
//   times 2^m: with AVX-512 by vscalef (one rounding, into the subnormal range too; a is first clamped at lo, where
//   2^m exp(r) rounds to exactly 0), otherwise as 2^(m/2) 2^(m - m/2), two normal powers of two built from their
//   bits, so that results in the subnormal range are rounded once (and a < lo selects 0).
// exp(-inf) = 0, exp(NaN) = NaN.  ClampLow false (AVX-512 only): no clamp at lo, for callers that replace every
// lane below lo themselves (the lanes below lo, -inf included, are then garbage).
template <typename T, bool ClampLow = true>
inline typename lanes<T>::v exp_nonpositive(typename lanes<T>::v a) {
    typedef typename lanes<T>::v V;
    constexpr bool f32 = sizeof(T) == 4;
    const T ln2_hi = f32 ? T(0.693359375) : T(0.6931471806019545);
    const T ln2_lo = f32 ? T(-2.12194440e-4) : T(-4.2009150726810846e-11);
    const T log2e = T(1.4426950408889634);
    // r = (a - m ln2_hi) - m ln2_lo: the first difference is made opaque, or -fassociative-math would merge the two
    // products into a - m (ln2_hi + ln2_lo), whose rounded ln2 costs up to ~150 x 2e-9 relative (float)
    auto reduce = [&](V a, V mf) {
        V r = a - mf * ln2_hi;
        opaque<T>(r);
        return r - mf * ln2_lo;
    };
    auto exp_r = [&](V r) {                                   // exp(r), |r| <= ln2 / 2
        if constexpr (f32) {                                  // 1 + r q(r) (exp(0) = 1 exactly)
            V q = V{} + T(0.00829031265202282);
            q = q * r + T(0.04189793029432872);
            q = q * r + T(0.16667636227787938);
            q = q * r + T(0.49999149520259234);
            q = q * r + T(0.9999997071784362);
            return q * r + T(1);
        } else {                                              // sum_{i <= 13} r^i / i!
            constexpr int degree = 13;
            T inv_fact[degree + 1];                           // 1 / i!
            inv_fact[0] = T(1);
            for (int i = 1; i <= degree; ++i) inv_fact[i] = inv_fact[i - 1] / T(i);
            V p = V{} + inv_fact[degree];
            for (int i = degree - 1; i >= 0; --i) p = p * r + inv_fact[i];
            return p;
        }
    };
#if defined(__AVX512F__)
    const T lo = f32 ? T(-110) : T(-760);                    // 2^m exp(r) < 2^-160 / 2^-1090: rounds to 0
    const V ac = ClampLow ? max_or_second<T>(V{} + lo, a) : a;     // lo > a ? lo : a (NaN stays)
    // m = round(a / ln2) by adding 1.5 2^mant: the sum's spacing is 1 there, so it is rounded to an integer (an FMA
    // and a subtraction instead of a multiply and vrndscale: the conv + SiLU kernels 0.97x, A/B calibrated on
    // identical code; the scan unchanged); the sum is made opaque, or -fassociative-math would fold (x + magic) -
    // magic back to x
    const T magic = f32 ? T(12582912.0) : T(6755399441055744.0);        // 1.5 2^23, 1.5 2^52
    V t = ac * log2e + magic;
    opaque<T>(t);
    const V mf = t - magic;
    if constexpr (f32)
        return (V)_mm512_scalef_ps((__m512)exp_r(reduce(ac, mf)), (__m512)mf);
    else
        return (V)_mm512_scalef_pd((__m512d)exp_r(reduce(ac, mf)), (__m512d)mf);
#else
    typedef typename lanes<T>::i I;
    const T lo = f32 ? T(-104) : T(-745.2);                  // exp(lo) < half the smallest subnormal
    const int mant = f32 ? 23 : 52, bias = f32 ? 127 : 1023;
    const I valid = a >= lo;                                  // false for NaN and below lo
    const V ac = valid ? a : V{} + lo;                       // finite, in [lo, 0]
    const I m = __builtin_convertvector(ac * log2e - T(0.5), I);     // trunc(x - 1/2) = round(x) for x <= 0
    const V mf = __builtin_convertvector(m, V);
    const V p = exp_r(reduce(ac, mf));
    const I m1 = m >> 1, m2 = m - m1;                         // m1, m2 >= lo / ln2 / 2 - 1: normal powers
    const V e = (p * (V)((m1 + bias) << mant)) * (V)((m2 + bias) << mant);
    return valid ? e : (a == a ? V{} : a);
#endif
}

// exp_nonpositive is right for a > 0 too (a few ulp, inf past the overflow) where vscalef scales its result
// (AVX-512), up to a / ln2 = 2^22 (fp64 2^51), where adding 1.5 2^mant still rounds it to an integer (callers clamp
// above: sigmoid_pair_v at 87, decay_exp at 100; fp64 700, 750); the other builds' round-and-scale assumes a <= 0
// (its exponent wraps past ~177), so a positive a must be recomputed (std::exp)
#if defined(__AVX512F__)
constexpr bool kExpAnySign = true;
#else
constexpr bool kExpAnySign = false;
#endif

// does a lane of v hold a value > 0?  (one mask compare with AVX-512; a lane-by-lane test costs as much as an exp)
template <typename T>
inline bool any_positive(typename lanes<T>::v v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4)
        return _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), _CMP_GT_OQ) != 0;
    else
        return _mm512_cmp_pd_mask((__m512d)v, _mm512_setzero_pd(), _CMP_GT_OQ) != 0;
#else
    const typename lanes<T>::i m = v > T(0);              // lanes all ones where v > 0
    uint64_t words[sizeof m / 8], any = 0;
    std::memcpy(words, &m, sizeof m);
    for (uint64_t w : words) any |= w;
    return any != 0;
#endif
}

// The SSD's decays e[j] = exp(s[j]) of segment sums, n values (a multiple of lanes<T>::n), inlined: 0 below
// e^-60 (fp64: e^-600), far below the rounding of the terms they would join, while their products would be
// denormals (~100x slower arithmetic); NaN stays NaN.  A positive s (never in the model: a = A delta <= 0, but the
// scan kernels take any log-decay) is right with AVX-512 and recomputed by std::exp elsewhere (kExpAnySign).
template <typename T>
inline void decay_exp(const T* s, int64_t n, T* e) {
    typedef typename lanes<T>::v V;
    constexpr int W = lanes<T>::n;
    const T lo = sizeof(T) == 4 ? T(-60) : T(-600);
    const T hi = sizeof(T) == 4 ? T(100) : T(750);          // exp overflows past 88.7 (709.8): inf from there on
    bool positive = false;
    for (int64_t j = 0; j < n; j += W) {
        V v;
        std::memcpy(&v, s + j, sizeof v);
        // (the lanes below lo: 0 just below; above hi: exp(hi) = inf, where exp_nonpositive's rounding of a / ln2
        // would no longer be exact)
        V r = exp_nonpositive<T, false>(kExpAnySign ? min_or_second<T>(V{} + hi, v) : v);
        r = v < lo ? V{} : r;
        std::memcpy(e + j, &r, sizeof r);
        if (!kExpAnySign) positive |= any_positive<T>(v);
    }
    if (positive)
        for (int64_t j = 0; j < n; ++j)
            if (s[j] > T(0)) e[j] = std::exp(s[j]);
}

// 1 / d for d >= 1 (finite) or NaN (the sigmoid's 1 / (1 + e)): fp32 with AVX-512, the 14-bit estimate and one
// Newton step r (2 - d r) (relative error ~2^-28 before rounding); otherwise a division
template <typename T>
inline typename lanes<T>::v recip_pos(typename lanes<T>::v d) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) {
        const typename lanes<T>::v r = (typename lanes<T>::v)_mm512_maskz_rcp14_ps(__mmask16(0xffff), (__m512)d);
        return r * (T(2) - d * r);
    }
#endif
    return T(1) / d;
}

// sigmoid_pair above, on W lanes.  Where the exp takes either sign (AVX-512: kExpAnySign), with e = exp(p), p
// clamped at 87 (fp64: 700) so that 1 + e stays finite: s = e / (1 + e), c = 1 / (1 + e), right at any p without
// choosing by its sign (for p < 0, e and s fall into the subnormal range as torch's do); past the clamp s = 1 and c
// is set to 0 (its true value is below the smallest normal; and SiLU'(+inf) = 1 + inf * 0 = NaN, as torch gives);
// NaN propagates through p in every use.  Else e = exp(-|p|) in (0, 1] and the pair chosen by the sign of p.
template <typename T>
inline void sigmoid_pair_v(typename lanes<T>::v p, typename lanes<T>::v& s, typename lanes<T>::v& c) {
    typedef typename lanes<T>::v V;
    if constexpr (kExpAnySign) {
        const T hi = sizeof(T) == 4 ? T(87) : T(700);
        const V e = exp_nonpositive<T>(min_or_second<T>(p, V{} + hi));     // (hi for NaN)
        const V r = recip_pos<T>(T(1) + e);
        s = e * r;
        opaque<T>(s);                                           // p s must not become (p e) r: p e overflows
        c = p < hi ? r : V{};                                   // (dropped where c is not used: SiLU itself)
    } else {
        const V e = exp_nonpositive<T>(p < T(0) ? p : -p);      // exp(-|p|); NaN stays NaN
        const V r = recip_pos<T>(T(1) + e);
        const V er = e * r;
        const auto pos = p >= T(0);
        s = pos ? r : er;
        c = pos ? er : r;
    }
}

template <typename T>
inline typename lanes<T>::v silu_of_v(typename lanes<T>::v p) {
    typename lanes<T>::v s, c;
    sigmoid_pair_v<T>(p, s, c);
    return p * s;
}

template <typename T>
inline typename lanes<T>::v silu_grad_v(typename lanes<T>::v p) {
    typename lanes<T>::v s, c;
    sigmoid_pair_v<T>(p, s, c);
    return s * (T(1) + p * c);
}
