// Inference (no autograd) of one TimeAwareSSD layer on CPU in two calls, for small batches where per-op overhead
// of ~30 torch ops would dominate: modules/infer_cpu.py calls them between in_proj, the causal conv and out_proj.
//
// 1. mmm4rec_time_encoding_fwd: CausalTimeEncoding.forward (eval: no dropout), per sequence b, step i, head h:
//      gap_0 = 0, gap_i = max(t_i - t_{i-1}, 0)  (or the given gaps), float64
//      mu_i = sum_{j<=i} gap_j / (i+1),  m2_i = sum_{j<=i} gap_j^2 / (i+1),  var_i = max(m2_i - mu_i^2, 0)
//      s_i = (gap_i - mu_i) / sqrt(var_i + eps m2_i + 1e-30)                  (float64, then cast to T)
//      D_ih = s_i scale_h + shift_h;  E_ih = D_ih * Tanhshrink(W2 SiLU(W1 D_i + b1) + b2)_h
//      time_scale = SiLU(conv2(SiLU(conv1(E))))   conv: causal depthwise over i, k taps, bias first then taps
// 2. mmm4rec_ssd_infer: from the conv output xBC (x | B | C per row) and the in_proj pieces z, dt:
//      Delta = softplus(dt * time_scale + dt_bias)  (time_scale optional),  a = A Delta
//      y = the quadratic form with the D skip (mmm4rec_ssd_quadratic_fwd, tissd_quadratic.cpp)
//      out = RMSNorm_group(y * SiLU(z)) * w      rows past len[b] are 0
//    Returns 1 without writing `out` when x, B, C, dt or time_scale hold NaN / inf at a valid step: the caller then
//    runs the general path (its NaN-causality rule marks rows from the bad step on).
// Same math as the torch modules; sums run in a different order (rounding only).  T = float or double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "thread_sums.h"

extern "C" {
void mmm4rec_ssd_quadratic_fwd_f32(const float* x, const float* delta, const float* a, const float* B, const float* C,
                                   const int64_t* len, const float* D, int skip_delta, float* y, int64_t nb,
                                   int64_t L, int64_t H, int64_t P, int64_t G, int64_t n, int nthreads);
void mmm4rec_ssd_quadratic_fwd_f64(const double* x, const double* delta, const double* a, const double* B,
                                   const double* C, const int64_t* len, const double* D, int skip_delta, double* y,
                                   int64_t nb, int64_t L, int64_t H, int64_t P, int64_t G, int64_t n, int nthreads);
}

namespace {

inline void scan_fwd(const float* x, const float* delta, const float* a, const float* B, const float* C,
                     const int64_t* len, const float* D, int skip_delta, float* y, int64_t nb, int64_t L, int64_t H,
                     int64_t P, int64_t G, int64_t n, int nthreads) {
    mmm4rec_ssd_quadratic_fwd_f32(x, delta, a, B, C, len, D, skip_delta, y, nb, L, H, P, G, n, nthreads);
}
inline void scan_fwd(const double* x, const double* delta, const double* a, const double* B, const double* C,
                     const int64_t* len, const double* D, int skip_delta, double* y, int64_t nb, int64_t L, int64_t H,
                     int64_t P, int64_t G, int64_t n, int nthreads) {
    mmm4rec_ssd_quadratic_fwd_f64(x, delta, a, B, C, len, D, skip_delta, y, nb, L, H, P, G, n, nthreads);
}

template <typename T>
inline bool finite(T v) { return std::abs(v) <= std::numeric_limits<T>::max(); }   // false for NaN / inf

// causal depthwise conv over the rows of e [L, H] (taps w [H, k], bias [H]) then SiLU, into out [L, H]
template <typename T>
void conv_silu(const T* e, int64_t L, int64_t H, const T* w, const T* bias, int64_t k, T* out) {
    for (int64_t i = 0; i < L; ++i)
        for (int64_t h = 0; h < H; ++h) {
            T acc = bias ? bias[h] : T(0);
            for (int64_t j = 0; j < k; ++j) {
                const int64_t src = i - (k - 1) + j;
                if (src >= 0) acc += w[h * k + j] * e[src * H + h];
            }
            out[i * H + h] = silu_of(acc);
        }
}

template <typename T>
void time_encoding(const double* t, int is_gaps, int64_t nb, int64_t L, int64_t H, int64_t k, const T* scale,
                   const T* shift, const T* w1, const T* b1, const T* w2, const T* b2, const T* cw1, const T* cb1,
                   const T* cw2, const T* cb2, double eps, T* out, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        std::vector<T> E(size_t(L) * H), h1(size_t(L) * H), Dv(H), m1(H);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const double* tb = t + b * L;
            double sum = 0.0, sum_sq = 0.0;
            for (int64_t i = 0; i < L; ++i) {
                double gap;
                if (is_gaps) {
                    gap = tb[i];
                } else {
                    const double d = i ? tb[i] - tb[i - 1] : 0.0;
                    gap = d < 0.0 ? 0.0 : d;                         // NaN stays NaN (as clamp(min=0))
                }
                sum += gap;
                sum_sq += gap * gap;
                const double cnt = double(i + 1), mean = sum / cnt, mean_sq = sum_sq / cnt;
                double var = mean_sq - mean * mean;
                var = var < 0.0 ? 0.0 : var;
                const T s = T((gap - mean) / std::sqrt(var + eps * mean_sq + 1e-30));
                for (int64_t h = 0; h < H; ++h) Dv[h] = s * scale[h] + shift[h];
                for (int64_t o = 0; o < H; ++o) {                    // mix1 then SiLU
                    T acc = T(0);
                    for (int64_t c = 0; c < H; ++c) acc += w1[o * H + c] * Dv[c];
                    m1[o] = silu_of(acc + b1[o]);
                }
                for (int64_t o = 0; o < H; ++o) {                    // mix2, Tanhshrink, times D
                    T acc = T(0);
                    for (int64_t c = 0; c < H; ++c) acc += w2[o * H + c] * m1[c];
                    const T v = acc + b2[o];
                    E[i * H + o] = Dv[o] * (v - std::tanh(v));
                }
            }
            conv_silu(E.data(), L, H, cw1, cb1, k, h1.data());
            conv_silu(h1.data(), L, H, cw2, cb2, k, out + b * L * H);
        }
    }
}

template <typename T>
int ssd_infer(const T* xbc, int64_t s_xbc, const T* z, const T* dt, int64_t s_zdt, const T* ts, const T* dt_bias,
              const T* A, const T* D, int skip_delta, const T* norm_w, int64_t group, double eps, const int64_t* len,
              int64_t nb, int64_t L, int64_t H, int64_t P, int64_t G, int64_t n, T* out, int nthreads) {
    const int64_t d_inner = H * P, gn = G * n;
    std::vector<T> x(size_t(nb) * L * d_inner), Bv(size_t(nb) * L * gn), Cv(size_t(nb) * L * gn);
    std::vector<T> delta(size_t(nb) * L * H), a(size_t(nb) * L * H), y(size_t(nb) * L * d_inner);
    std::vector<int64_t> lens(nb);
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) reduction(| : bad)
    for (int64_t b = 0; b < nb; ++b) {                    // contiguous x / B / C and the step sizes, valid rows only
        const int64_t Lb = std::min<int64_t>(std::max<int64_t>(len ? len[b] : L, 0), L);
        lens[b] = Lb;
        for (int64_t i = 0; i < Lb; ++i) {
            const int64_t r = b * L + i;
            const T* src = xbc + r * s_xbc;
            bool ok = true;
            for (int64_t c = 0; c < d_inner; ++c) { x[r * d_inner + c] = src[c]; ok &= finite(src[c]); }
            for (int64_t c = 0; c < gn; ++c) {
                Bv[r * gn + c] = src[d_inner + c];
                Cv[r * gn + c] = src[d_inner + gn + c];
                ok &= finite(src[d_inner + c]) & finite(src[d_inner + gn + c]);
            }
            const T* dtr = dt + r * s_zdt;
            for (int64_t h = 0; h < H; ++h) {
                T v = dtr[h];
                ok &= finite(v);
                if (ts) { ok &= finite(ts[r * H + h]); v = v * ts[r * H + h]; }
                if (dt_bias) v = v + dt_bias[h];
                delta[r * H + h] = softplus_of(v);
                a[r * H + h] = delta[r * H + h] * A[h];
            }
            bad |= !ok;
        }
    }
    if (bad) return 1;
    std::vector<T> Dhp;
    if (D) {                                              // the scan takes D per channel [H, P]
        Dhp.resize(size_t(d_inner));
        for (int64_t h = 0; h < H; ++h) std::fill(Dhp.begin() + h * P, Dhp.begin() + (h + 1) * P, D[h]);
    }
    scan_fwd(x.data(), delta.data(), a.data(), Bv.data(), Cv.data(), lens.data(), D ? Dhp.data() : nullptr,
             skip_delta, y.data(), nb, L, H, P, G, n, nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        std::vector<T> v(d_inner);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {                // gate, group RMS norm, weight; 0 past the valid rows
            for (int64_t i = 0; i < L; ++i) {
                const int64_t r = b * L + i;
                T* o = out + r * d_inner;
                if (i >= lens[b]) { std::fill(o, o + d_inner, T(0)); continue; }
                const T* zr = z + r * s_zdt;
                const T* yr = y.data() + r * d_inner;
                for (int64_t c = 0; c < d_inner; ++c) v[c] = yr[c] * silu_of(zr[c]);
                for (int64_t g0 = 0; g0 < d_inner; g0 += group) {
                    T ss = T(0);
                    for (int64_t c = g0; c < g0 + group; ++c) ss += v[c] * v[c];
                    const T rstd = T(1) / std::sqrt(ss / T(group) + T(eps));
                    for (int64_t c = g0; c < g0 + group; ++c) o[c] = v[c] * rstd * norm_w[c];
                }
            }
        }
    }
    return 0;
}

}  // namespace

extern "C" {

#define MMM4REC_INFER_ENTRIES(T, SUFFIX)                                                                              \
    void mmm4rec_time_encoding_fwd_##SUFFIX(const double* t, int is_gaps, int64_t nb, int64_t L, int64_t H,         \
                                            int64_t k, const T* scale, const T* shift, const T* w1, const T* b1,     \
                                            const T* w2, const T* b2, const T* cw1, const T* cb1, const T* cw2,      \
                                            const T* cb2, double eps, T* out, int nthreads) {                       \
        time_encoding<T>(t, is_gaps, nb, L, H, k, scale, shift, w1, b1, w2, b2, cw1, cb1, cw2, cb2, eps, out,        \
                         nthreads);                                                                                 \
    }                                                                                                               \
    int mmm4rec_ssd_infer_##SUFFIX(const T* xbc, int64_t s_xbc, const T* z, const T* dt, int64_t s_zdt, const T* ts, \
                                   const T* dt_bias, const T* A, const T* D, int skip_delta, const T* norm_w,       \
                                   int64_t group, double eps, const int64_t* len, int64_t nb, int64_t L, int64_t H, \
                                   int64_t P, int64_t G, int64_t n, T* out, int nthreads) {                         \
        return ssd_infer<T>(xbc, s_xbc, z, dt, s_zdt, ts, dt_bias, A, D, skip_delta, norm_w, group, eps, len, nb, L, \
                            H, P, G, n, out, nthreads);                                                             \
    }

MMM4REC_INFER_ENTRIES(float, f32)
MMM4REC_INFER_ENTRIES(double, f64)

}  // extern "C"
