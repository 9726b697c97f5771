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
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "thread_sums.h"

namespace {

// Every row is one fused pass over its channels: the k taps are summed in registers (K = k when k is 2..4, so the
// tap loop unrolls and the channel loop vectorises, libmvec's exp included; K = 0: any k), taps before t = 0 read a
// row of zeros.  taps[j] = the input row of tap j for output row t (or the zero row).
template <typename T, int K>
inline void tap_rows(const T* xs, int64_t sx, int64_t t, int64_t k, const T* zeros, const T** taps) {
    const int64_t kk = K ? K : k;
    for (int64_t j = 0; j < kk; ++j) {
        const int64_t src = t - (kk - 1) + j;
        taps[j] = src < 0 ? zeros : xs + src * sx;
    }
}

// pre[c] = bias[c] + sum_j w[c, j] x[t - (k-1) + j, c] for one channel c
template <typename T, int K>
inline T pre_at(const T* const* taps, const T* wt, int64_t C, int64_t k, const T* bias, int64_t c) {
    const int64_t kk = K ? K : k;
    T acc = bias ? bias[c] : T(0);
    for (int64_t j = 0; j < kk; ++j) acc += wt[j * C + c] * taps[j][c];
    return acc;
}

template <typename T, int K>
void forward_k(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, T* y, int64_t B, int64_t L,
               int64_t C, int64_t k, int silu, int nthreads) {
    const int64_t kk = K ? K : k;
    std::vector<T> zeros(C, T(0));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < B; ++b) {
        std::vector<const T*> taps(kk);
        for (int64_t t = 0; t < L; ++t) {
            T* __restrict yr = y + (b * L + t) * C;
            tap_rows<T, K>(x + b * sxb, sx, t, k, zeros.data(), taps.data());
            if (silu)
                for (int64_t c = 0; c < C; ++c) yr[c] = silu_of(pre_at<T, K>(taps.data(), wt, C, k, bias, c));
            else
                for (int64_t c = 0; c < C; ++c) yr[c] = pre_at<T, K>(taps.data(), wt, C, k, bias, c);
        }
    }
}

// one sequence's dw_j[c] += sum_s g[s + (k-1) - j][c] x[s][c] (g = 0 past the end), dbias[c] += sum_s g[s][c]:
// exact products of T in double, 8 channels at a time with the k + 1 sums in registers across the whole sequence
// (no load / store of the double sums per row); other channels and k: the same sums, scalar
template <typename T, int K>
void dw_sequence(const T* xs, int64_t sx, const T* g, int64_t L, int64_t C, int64_t k, double* dwt, double* dbt) {
    typedef double d8 __attribute__((vector_size(64)));
    typedef T t8 __attribute__((vector_size(8 * sizeof(T))));
    const int64_t kk = K ? K : k;
    auto load8 = [](const T* p) {
        t8 v;
        std::memcpy(&v, p, sizeof v);
        return __builtin_convertvector(v, d8);
    };
    int64_t c0 = 0;
    if (K > 0)
        for (; c0 + 8 <= C; c0 += 8) {
            d8 acc[K > 0 ? K : 1], db = d8{};
            for (int j = 0; j < K; ++j) acc[j] = d8{};
            for (int64_t s = 0; s < L; ++s) {
                const d8 xv = load8(xs + s * sx + c0);
                for (int j = 0; j < K; ++j) {
                    const int64_t t = s + (K - 1) - j;
                    if (t < L) acc[j] += load8(g + t * C + c0) * xv;
                }
                db += load8(g + s * C + c0);
            }
            for (int j = 0; j < K; ++j)
                for (int e = 0; e < 8; ++e) dwt[j * C + c0 + e] += acc[j][e];
            for (int e = 0; e < 8; ++e) dbt[c0 + e] += db[e];
        }
    for (; c0 < C; ++c0)
        for (int64_t s = 0; s < L; ++s) {
            const double xv = double(xs[s * sx + c0]);
            for (int64_t j = 0; j < kk; ++j) {
                const int64_t t = s + (kk - 1) - j;
                if (t < L) dwt[j * C + c0] += double(g[t * C + c0]) * xv;
            }
            dbt[c0] += double(g[s * C + c0]);
        }
}

// gy pieces: npieces channel ranges [start, start + size) with their own base pointer and row strides; a null
// pointer is an unused piece (gradient 0).
template <typename T, int K>
void backward_k(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, int64_t B, int64_t L, int64_t C,
                int64_t k, int silu, int npieces, const T* const* gy, const int64_t* starts, const int64_t* sizes,
                const int64_t* sgb, const int64_t* sg, T* dx, T* dw, T* dbias, int nthreads) {
    const int64_t kk = K ? K : k;
    int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> dw_acc(size_t(nt) * C * kk, 0.0), db_acc(size_t(nt) * C, 0.0);
    std::vector<T> zeros(C, T(0));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = thread_index();
        std::vector<T> g(size_t(L) * C);
        std::vector<const T*> taps(kk), grows(kk);
        double* dwt = dw_acc.data() + size_t(tid) * C * kk;
        double* dbt = db_acc.data() + size_t(tid) * C;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            const T* xs = x + b * sxb;
            for (int64_t t = 0; t < L; ++t) {                  // g = gy * SiLU'(pre), row by row
                T* __restrict gr = g.data() + t * C;
                tap_rows<T, K>(xs, sx, t, k, zeros.data(), taps.data());
                for (int p = 0; p < npieces; ++p) {
                    const int64_t c0 = starts[p], m = sizes[p];
                    T* __restrict gp = gr + c0;
                    if (!gy[p]) {                              // unused piece: 0 (times SiLU', as with a zero gy)
                        if (silu)
                            for (int64_t c = 0; c < m; ++c)
                                gp[c] = T(0) * silu_grad(pre_at<T, K>(taps.data(), wt, C, k, bias, c0 + c));
                        else
                            for (int64_t c = 0; c < m; ++c) gp[c] = T(0);
                        continue;
                    }
                    const T* __restrict src = gy[p] + b * sgb[p] + t * sg[p];
                    if (silu)
                        for (int64_t c = 0; c < m; ++c)
                            gp[c] = src[c] * silu_grad(pre_at<T, K>(taps.data(), wt, C, k, bias, c0 + c));
                    else
                        for (int64_t c = 0; c < m; ++c) gp[c] = src[c];
                }
            }
            // x row s meets output row t_j = s + (k-1) - j through tap j (g = 0 past the end):
            //   dx_s = sum_j w_j g_{t_j} (row by row),  dw_j += g_{t_j} x_s,  dbias += g_s (dw_sequence)
            for (int64_t s = 0; s < L; ++s) {
                for (int64_t j = 0; j < kk; ++j) {
                    const int64_t t = s + (kk - 1) - j;
                    grows[j] = t < L ? g.data() + t * C : zeros.data();
                }
                T* __restrict dxr = dx + (b * L + s) * C;
                if (kk == 4) {                                 // (the common k: four rows in one pass)
                    const T *__restrict g0 = grows[0], *__restrict g1 = grows[1], *__restrict g2 = grows[2],
                                                       *__restrict g3 = grows[3];
                    const T *__restrict w0 = wt, *__restrict w1 = wt + C, *__restrict w2 = wt + 2 * C,
                                                 *__restrict w3 = wt + 3 * C;
                    for (int64_t c = 0; c < C; ++c) dxr[c] = w0[c] * g0[c] + w1[c] * g1[c] + w2[c] * g2[c] + w3[c] * g3[c];
                } else {
                    for (int64_t c = 0; c < C; ++c) dxr[c] = T(0);
                    for (int64_t j = 0; j < kk; ++j) {
                        const T* __restrict gj = grows[j];
                        const T* __restrict wj = wt + j * C;
                        for (int64_t c = 0; c < C; ++c) dxr[c] += wj[c] * gj[c];
                    }
                }
            }
            dw_sequence<T, K>(xs, sx, g.data(), L, C, k, dwt, dbt);
        }
    }
    sum_thread_partials(dw_acc, nt, C * kk, dw);
    if (dbias) sum_thread_partials(db_acc, nt, C, dbias);
}

template <typename T>
void forward(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, T* y, int64_t B, int64_t L, int64_t C,
             int64_t k, int silu, int nthreads) {
    switch (k) {
        case 4: return forward_k<T, 4>(x, sxb, sx, wt, bias, y, B, L, C, k, silu, nthreads);
        case 3: return forward_k<T, 3>(x, sxb, sx, wt, bias, y, B, L, C, k, silu, nthreads);
        case 2: return forward_k<T, 2>(x, sxb, sx, wt, bias, y, B, L, C, k, silu, nthreads);
        default: return forward_k<T, 0>(x, sxb, sx, wt, bias, y, B, L, C, k, silu, nthreads);
    }
}

template <typename T>
void backward(const T* x, int64_t sxb, int64_t sx, const T* wt, const T* bias, int64_t B, int64_t L, int64_t C,
              int64_t k, int silu, int npieces, const T* const* gy, const int64_t* starts, const int64_t* sizes,
              const int64_t* sgb, const int64_t* sg, T* dx, T* dw, T* dbias, int nthreads) {
#define MMM4REC_CONV_BWD(KK) \
    backward_k<T, KK>(x, sxb, sx, wt, bias, B, L, C, k, silu, npieces, gy, starts, sizes, sgb, sg, dx, dw, dbias, nthreads)
    switch (k) {
        case 4: return MMM4REC_CONV_BWD(4);
        case 3: return MMM4REC_CONV_BWD(3);
        case 2: return MMM4REC_CONV_BWD(2);
        default: return MMM4REC_CONV_BWD(0);
    }
#undef MMM4REC_CONV_BWD
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
