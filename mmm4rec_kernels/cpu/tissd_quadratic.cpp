// The quadratic form of the time-aware SSD on CPU, forward and backward: what torch_backend.quadratic_form computes
// with einsums when no initial / final states are involved (the training case).
//
// Per sequence b and head h (group g = h / (H / G)), over its valid steps i, j < len[b]:
//   seg_ij = sum_{k=j+1..i} a_k   (summed directly over the covered steps: all a_k <= 0, so no cancellation)
//   M_ij   = (C_i . B_j) exp(seg_ij)               j <= i
//   y_i    = sum_{j<=i} M_ij delta_j x_j  +  D s_i x_i
//            (skip: s_i = delta_i or 1, none without D; rows i >= len[b] are 0)
// Backward with gy (G_ij = gy_i . (delta_j x_j)):
//   dx_j = delta_j sum_{i>=j} M_ij gy_i,  ddelta_j = sum_{i>=j} M_ij (gy_i . x_j),
//   dC_i += sum_j G_ij exp(seg_ij) B_j,  dB_j += sum_i G_ij exp(seg_ij) C_i  (summed over the group's heads),
//   da_k = sum over pairs (i >= k > j) of G_ij M_ij;
//   skip: dx_i += D s_i gy_i, ddelta_i += D gy_i . x_i (if s = delta), dD += sum over (b, i) of s_i gy_i x_i
//   (dD per thread in double, added in a fixed order).
// Inputs contiguous: x [b, L, H, P], delta / a [b, L, H], B / C [b, L, G, n], len [b] int64, D [H, P] or null.
// Padded steps are never read, so they need not be clean.  NaN / inf at a valid step t: the forward only sums pairs
// j <= i, so it reaches rows >= t only; the backward skips every output row whose gradient gy_i is exactly 0 (all
// its terms carry the factor gy_i: the skip is exact), so a loss that reads rows < t gets the same gradients as
// without the bad value (no 0 * NaN).  Work per (b, h) is O(len^2 (P + n)) with no intermediate
// tensors; parallel over b (OpenMP), each thread writes only its own sequences.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "thread_sums.h"

namespace {

template <typename T>
struct Dims {
    int64_t L, H, P, G, n;
    int64_t x(int64_t b, int64_t t, int64_t h) const { return ((b * L + t) * H + h) * P; }
    int64_t s(int64_t b, int64_t t, int64_t h) const { return (b * L + t) * H + h; }
    int64_t bc(int64_t b, int64_t t, int64_t g) const { return ((b * L + t) * G + g) * n; }
};

template <typename T>
inline T dot(const T* u, const T* v, int64_t m) {
    T acc = T(0);
    for (int64_t k = 0; k < m; ++k) acc += u[k] * v[k];
    return acc;
}

// does v[0..m) hold a nonzero (or NaN) entry?
template <typename T>
inline bool any_nonzero(const T* v, int64_t m) {
    int nz = 0;
    for (int64_t k = 0; k < m; ++k) nz |= v[k] != T(0);
    return nz != 0;
}

// steps of sequence b that are read: len[b] clamped to [0, L]
inline int64_t valid_steps(const int64_t* len, int64_t b, int64_t L) {
    return std::min<int64_t>(std::max<int64_t>(len[b], 0), L);
}

// decay[j] = exp(sum_{k=j+1..i} a_k) for j <= i, of one (b, h): a_k read at stride H
template <typename T>
inline void decay_row(const T* a_bh, int64_t H, int64_t i, T* seg, T* decay) {
    seg[i] = T(0);
    for (int64_t j = i - 1; j >= 0; --j) seg[j] = seg[j + 1] + a_bh[(j + 1) * H];
    for (int64_t j = 0; j <= i; ++j) decay[j] = std::exp(seg[j]);
}

template <typename T>
void forward(const T* x, const T* delta, const T* a, const T* B, const T* C, const int64_t* len, const T* D,
             int skip_delta, T* y, int64_t nb, Dims<T> d, int nthreads) {
    const int64_t r = d.H / d.G;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        std::vector<T> seg(d.L), w(d.L);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t Lb = valid_steps(len, b, d.L);
            std::fill(y + d.x(b, 0, 0), y + d.x(b + 1, 0, 0), T(0));
            for (int64_t h = 0; h < d.H; ++h) {
                const int64_t g = h / r;
                for (int64_t i = 0; i < Lb; ++i) {
                    decay_row(a + d.s(b, 0, h), d.H, i, seg.data(), w.data());
                    const T* Ci = C + d.bc(b, i, g);
                    for (int64_t j = 0; j <= i; ++j)
                        w[j] *= dot(Ci, B + d.bc(b, j, g), d.n) * delta[d.s(b, j, h)];
                    T* yi = y + d.x(b, i, h);
                    for (int64_t j = 0; j <= i; ++j) {
                        const T* xj = x + d.x(b, j, h);
                        const T wj = w[j];
                        for (int64_t p = 0; p < d.P; ++p) yi[p] += wj * xj[p];
                    }
                    if (D) {                                                // skip D s_i x_i
                        const T si = skip_delta ? delta[d.s(b, i, h)] : T(1);
                        const T* xi = x + d.x(b, i, h);
                        const T* Dh = D + h * d.P;
                        for (int64_t p = 0; p < d.P; ++p) yi[p] += Dh[p] * si * xi[p];
                    }
                }
            }
        }
    }
}

template <typename T>
void backward(const T* x, const T* delta, const T* a, const T* B, const T* C, const int64_t* len, const T* D,
              int skip_delta, const T* gy, T* dx, T* ddelta, T* da, T* dB, T* dC, T* dD, int64_t nb, Dims<T> d,
              int nthreads) {
    const int64_t r = d.H / d.G;
    const int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> dD_acc(D ? size_t(nt) * d.H * d.P : 0, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        std::vector<T> seg(d.L), decay(d.L), dseg(d.L);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t Lb = valid_steps(len, b, d.L);
            std::fill(dx + d.x(b, 0, 0), dx + d.x(b + 1, 0, 0), T(0));
            std::fill(ddelta + d.s(b, 0, 0), ddelta + d.s(b + 1, 0, 0), T(0));
            std::fill(da + d.s(b, 0, 0), da + d.s(b + 1, 0, 0), T(0));
            std::fill(dB + d.bc(b, 0, 0), dB + d.bc(b + 1, 0, 0), T(0));
            std::fill(dC + d.bc(b, 0, 0), dC + d.bc(b + 1, 0, 0), T(0));
            for (int64_t h = 0; h < d.H; ++h) {
                const int64_t g = h / r;
                for (int64_t i = 0; i < Lb; ++i) {
                    const T* gyi = gy + d.x(b, i, h);
                    if (!any_nonzero(gyi, d.P)) continue;               // a zero gradient row adds exactly 0
                    decay_row(a + d.s(b, 0, h), d.H, i, seg.data(), decay.data());
                    const T* Ci = C + d.bc(b, i, g);
                    T* dCi = dC + d.bc(b, i, g);
                    for (int64_t j = 0; j <= i; ++j) {
                        const T* Bj = B + d.bc(b, j, g);
                        const T* xj = x + d.x(b, j, h);
                        const T dj = delta[d.s(b, j, h)];
                        const T m = dot(Ci, Bj, d.n) * decay[j];            // M_ij
                        const T gx = dot(gyi, xj, d.P);                     // gy_i . x_j
                        const T G = gx * dj;                                // dL / dM_ij
                        T* dxj = dx + d.x(b, j, h);
                        const T md = m * dj;
                        for (int64_t p = 0; p < d.P; ++p) dxj[p] += md * gyi[p];
                        ddelta[d.s(b, j, h)] += m * gx;
                        const T dcb = G * decay[j];                         // dL / d(C_i . B_j)
                        T* dBj = dB + d.bc(b, j, g);
                        for (int64_t k = 0; k < d.n; ++k) {
                            dCi[k] += dcb * Bj[k];
                            dBj[k] += dcb * Ci[k];
                        }
                        dseg[j] = G * m;                                    // dL / dseg_ij
                    }
                    if (D) {                                                // skip D s_i x_i
                        const T* xi = x + d.x(b, i, h);
                        const T* Dh = D + h * d.P;
                        const T si = skip_delta ? delta[d.s(b, i, h)] : T(1);
                        T* dxi = dx + d.x(b, i, h);
                        double* dDh = dD_acc.data() + (size_t(tid) * d.H + h) * d.P;
                        T gDx = T(0);
                        for (int64_t p = 0; p < d.P; ++p) {
                            dxi[p] += Dh[p] * si * gyi[p];
                            gDx += Dh[p] * gyi[p] * xi[p];
                            dDh[p] += double(si) * double(gyi[p]) * double(xi[p]);
                        }
                        if (skip_delta) ddelta[d.s(b, i, h)] += gDx;
                    }
                    // da_k gets dseg_ij for every j < k <= i: a running sum over j
                    T run = T(0);
                    for (int64_t k = 1; k <= i; ++k) {
                        run += dseg[k - 1];
                        da[d.s(b, k, h)] += run;
                    }
                }
            }
        }
    }
    if (D) sum_thread_partials(dD_acc, nt, d.H * d.P, dD);
}

}  // namespace

extern "C" {

#define MMM4REC_SSD_ENTRIES(T, SUFFIX)                                                                                \
    void mmm4rec_ssd_quadratic_fwd_##SUFFIX(const T* x, const T* delta, const T* a, const T* B, const T* C,         \
                                            const int64_t* len, const T* D, int skip_delta, T* y, int64_t nb,        \
                                            int64_t L, int64_t H, int64_t P, int64_t G, int64_t n, int nthreads) {   \
        forward<T>(x, delta, a, B, C, len, D, skip_delta, y, nb, Dims<T>{L, H, P, G, n}, nthreads);                 \
    }                                                                                                               \
    void mmm4rec_ssd_quadratic_bwd_##SUFFIX(const T* x, const T* delta, const T* a, const T* B, const T* C,         \
                                            const int64_t* len, const T* D, int skip_delta, const T* gy, T* dx,      \
                                            T* ddelta, T* da, T* dB, T* dC, T* dD, int64_t nb, int64_t L, int64_t H, \
                                            int64_t P, int64_t G, int64_t n, int nthreads) {                        \
        backward<T>(x, delta, a, B, C, len, D, skip_delta, gy, dx, ddelta, da, dB, dC, dD, nb,                      \
                    Dims<T>{L, H, P, G, n}, nthreads);                                                              \
    }

MMM4REC_SSD_ENTRIES(float, f32)
MMM4REC_SSD_ENTRIES(double, f64)

}  // extern "C"
