// Causal depthwise conv over L on channels-last activations, fused with SiLU: the CPU kernels behind
// mmm4rec_kernels.cpu (loaded with ctypes; no torch headers, so the build takes about a second).
//
//   pre[b, t, c] = bias[c] + sum_{j<k} w[c, j] * x[b, t - (k-1) + j, c]     (x = 0 before t = 0)
//   y = SiLU(pre) (silu != 0) or pre
// Backward, with g = dL/dpre = gy * SiLU'(pre) (pre recomputed from x, never stored):
//   dx[b, s, c] = sum_j w[c, j] * g[b, s + (k-1) - j, c]   (g = 0 past the end)
//   dw[c, j]    = sum_{b,t} g[b, t, c] * x[b, t - (k-1) + j, c],   dbias[c] = sum_{b,t} g[b, t, c]
// The taps come transposed, wt [k, C] (and dw goes out as [k, C]), so every inner loop runs over contiguous channels.
// One pass over memory each way (the torch path needs ~7 forward and ~20 backward passes).  Rows are addressed with
// a row stride (elements between (b, t) and (b, t+1)), so a channel slice of a wider tensor needs no copy; channels
// are contiguous.  Parallel over the batch with OpenMP when built with it; dw / dbias are summed per thread in
// double and then added in a fixed order, so results do not depend on the thread count's timing.
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "thread_sums.h"

namespace {

// sigmoid s = sigmoid(p) and its complement c = 1 - s, overflow-free at any p: with e = exp(-|p|) in (0, 1],
//   p >= 0: s = 1 / (1 + e), c = e / (1 + e);   p < 0: s = e / (1 + e), c = 1 / (1 + e)
// (exp(-p) itself overflows to inf for p < -88.7 in fp32, and inf * 0 = NaN in the gradient).  Both branches are
// computed and one is selected, so the loops stay vectorised.  p = +-inf / NaN give what torch gives.
template <typename T>
inline void sigmoid_pair(T p, T& s, T& c) {
    const T e = std::exp(-std::abs(p));
    const T r = T(1) / (T(1) + e);
    const bool pos = p >= T(0);
    s = pos ? r : e * r;
    c = pos ? e * r : r;
}

template <typename T>
inline T silu_of(T p) {
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

// pre-activation of row t of one sequence into out[0..C)
template <typename T>
inline void pre_row(const T* xs, int64_t sx, int64_t t, int64_t C, const T* wt, int64_t k, const T* bias, T* out) {
    for (int64_t c = 0; c < C; ++c) out[c] = bias ? bias[c] : T(0);
    for (int64_t j = 0; j < k; ++j) {
        int64_t src = t - (k - 1) + j;
        if (src < 0) continue;
        const T* xr = xs + src * sx;
        const T* wj = wt + j * C;
        for (int64_t c = 0; c < C; ++c) out[c] += wj[c] * xr[c];
    }
}

template <typename T>
void forward(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, T* y, int64_t B, int64_t L, int64_t C,
             int64_t k, int silu, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < L; ++t) {
            T* yr = y + (b * L + t) * C;
            pre_row(x + b * sxb, sx, t, C, wt, k, bias, yr);
            if (silu)
                for (int64_t c = 0; c < C; ++c) yr[c] = silu_of(yr[c]);
        }
    }
}

// gy pieces: npieces channel ranges [start, start + size) with their own base pointer and row strides; a null
// pointer is an unused piece (gradient 0).
template <typename T>
void backward(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, int64_t B, int64_t L, int64_t C,
              int64_t k, int silu, int npieces, const T* const* gy, const int64_t* starts, const int64_t* sizes,
              const int64_t* sgb, const int64_t* sg, T* dx, T* dw, T* dbias, int nthreads) {
    int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> dw_acc(size_t(nt) * C * k, 0.0), db_acc(size_t(nt) * C, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        std::vector<T> g(size_t(L) * C), pre(C);
        double* dwt = dw_acc.data() + size_t(tid) * C * k;
        double* dbt = db_acc.data() + size_t(tid) * C;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            const T* xs = x + b * sxb;
            for (int64_t t = 0; t < L; ++t) {                  // g = gy * SiLU'(pre), row by row
                T* gr = g.data() + t * C;
                if (silu) pre_row(xs, sx, t, C, wt, k, bias, pre.data());
                for (int p = 0; p < npieces; ++p) {
                    const T* src = gy[p] ? gy[p] + b * sgb[p] + t * sg[p] : nullptr;
                    for (int64_t c = 0; c < sizes[p]; ++c) {
                        int64_t cc = starts[p] + c;
                        T v = src ? src[c] : T(0);
                        gr[cc] = silu ? v * silu_grad(pre[cc]) : v;
                    }
                }
            }
            for (int64_t s = 0; s < L; ++s) {                  // dx, and dw / dbias from the same rows
                T* dxr = dx + (b * L + s) * C;
                for (int64_t c = 0; c < C; ++c) dxr[c] = T(0);
                for (int64_t j = 0; j < k; ++j) {
                    int64_t t = s + (k - 1) - j;
                    if (t >= L) continue;
                    const T* gr = g.data() + t * C;
                    const T* wj = wt + j * C;
                    for (int64_t c = 0; c < C; ++c) dxr[c] += wj[c] * gr[c];
                }
                const T* gs = g.data() + s * C;
                const T* xr = xs + s * sx;                     // x row s feeds output rows s .. s + k - 1
                for (int64_t j = 0; j < k; ++j) {
                    int64_t t = s + (k - 1) - j;               // output row where x row s meets tap j
                    if (t >= L) continue;
                    const T* gr = g.data() + t * C;
                    double* dwj = dwt + j * C;
                    for (int64_t c = 0; c < C; ++c) dwj[c] += double(gr[c]) * double(xr[c]);
                }
                for (int64_t c = 0; c < C; ++c) dbt[c] += double(gs[c]);
            }
        }
    }
    sum_thread_partials(dw_acc, nt, C * k, dw);
    if (dbias) sum_thread_partials(db_acc, nt, C, dbias);
}

}  // namespace

extern "C" {

int mmm4rec_conv_has_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define MMM4REC_CONV_ENTRIES(T, SUFFIX)                                                                               \
    void mmm4rec_conv_fwd_##SUFFIX(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, T* y, int64_t B, \
                                   int64_t L, int64_t C, int64_t k, int silu, int nthreads) {                       \
        forward<T>(x, sxb, sx, wt, bias, y, B, L, C, k, silu, nthreads);                                           \
    }                                                                                                               \
    void mmm4rec_conv_bwd_##SUFFIX(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, int64_t B,       \
                                   int64_t L, int64_t C, int64_t k, int silu, int npieces, const T* const* gy,      \
                                   const int64_t* starts, const int64_t* sizes, const int64_t* sgb,                 \
                                   const int64_t* sg, T* dx, T* dw, T* dbias, int nthreads) {                       \
        backward<T>(x, sxb, sx, wt, bias, B, L, C, k, silu, npieces, gy, starts, sizes, sgb, sg, dx, dw, dbias,     \
                    nthreads);                                                                                      \
    }

MMM4REC_CONV_ENTRIES(float, f32)
MMM4REC_CONV_ENTRIES(double, f64)

}  // extern "C"
