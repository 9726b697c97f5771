// Gated RMSNorm on CPU, forward and backward in one pass over the rows each (the torch path walks [R, d] ~6 times
// forward and ~12 times backward).  Rows r of y, z [R, d] (z optional), weight w [d], groups of `group` channels:
//   v = y * SiLU(z)  (v = y without z),   rstd = 1 / sqrt(mean_group(v^2) + eps),   out = v * rstd * w
// Backward with g = dout * w (per channel), per group:
//   dv = rstd * g - rstd^3 * v * mean_group(g * v)
//   dy = dv * SiLU(z),   dz = dv * y * SiLU'(z),   dw = sum_rows dout * v * rstd
// dw is summed per thread in double and the threads' sums added in a fixed order (thread_sums.h).
// z is read with a row stride s_z (a slice of a wider tensor needs no copy) and dz written with a row stride s_dz
// (into a slice of the in_proj's gradient, tissd_layer.cpp).  Rows: R = nb * L; with len [nb] (int64,
// optional) row r is valid when r % L < len[r / L]: other rows get out = 0, dy = dz = 0 and add nothing to dw
// (what masking y and z to 0 there gives, without reading them).
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "thread_sums.h"

namespace {

inline bool row_valid(const int64_t* len, int64_t L, int64_t r) { return !len || r % L < len[r / L]; }

template <typename T>
void forward(const T* y, const T* z, int64_t s_z, const T* w, int64_t R, int64_t d, int64_t group, double eps,
             const int64_t* len, int64_t L, T* out, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        std::vector<T> v(d);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const T* yr = y + r * d;
            T* o = out + r * d;
            if (!row_valid(len, L, r)) {
                for (int64_t c = 0; c < d; ++c) o[c] = T(0);
                continue;
            }
            if (z) {                                                    // two loops: each one vectorises
                const T* zr = z + r * s_z;
                for (int64_t c = 0; c < d; ++c) {
                    T s, cc;
                    sigmoid_pair(zr[c], s, cc);
                    v[c] = yr[c] * (zr[c] * s);
                }
            } else {
                for (int64_t c = 0; c < d; ++c) v[c] = yr[c];
            }
            for (int64_t g0 = 0; g0 < d; g0 += group) {
                T ss = T(0);
                for (int64_t c = g0; c < g0 + group; ++c) ss += v[c] * v[c];
                const T rstd = T(1) / std::sqrt(ss / T(group) + T(eps));
                for (int64_t c = g0; c < g0 + group; ++c) o[c] = v[c] * rstd * w[c];
            }
        }
    }
}

template <typename T>
void backward(const T* dout, const T* y, const T* z, int64_t s_z, const T* w, int64_t R, int64_t d, int64_t group,
              double eps, const int64_t* len, int64_t L, T* dy, T* dz, int64_t s_dz, T* dw, int nthreads) {
    const int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> dw_acc(size_t(nt) * d, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = thread_index();
        std::vector<T> v(d), sz(d), szc(d);
        double* dwt = dw_acc.data() + size_t(tid) * d;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const T* yr = y + r * d;
            const T* gr = dout + r * d;
            if (!row_valid(len, L, r)) {
                for (int64_t c = 0; c < d; ++c) dy[r * d + c] = T(0);
                if (dz)
                    for (int64_t c = 0; c < d; ++c) dz[r * s_dz + c] = T(0);
                continue;
            }
            if (z) {
                const T* zr = z + r * s_z;
                for (int64_t c = 0; c < d; ++c) {
                    T s, cc;
                    sigmoid_pair(zr[c], s, cc);
                    sz[c] = zr[c] * s;                                      // SiLU(z)
                    szc[c] = s * (T(1) + zr[c] * cc);                       // SiLU'(z)
                    v[c] = yr[c] * sz[c];
                }
            } else {
                for (int64_t c = 0; c < d; ++c) {
                    sz[c] = T(1);
                    szc[c] = T(0);
                    v[c] = yr[c];
                }
            }
            for (int64_t g0 = 0; g0 < d; g0 += group) {
                T ss = T(0), gv = T(0);
                for (int64_t c = g0; c < g0 + group; ++c) {
                    ss += v[c] * v[c];
                    gv += gr[c] * w[c] * v[c];
                }
                const T rstd = T(1) / std::sqrt(ss / T(group) + T(eps));
                const T k = rstd * rstd * rstd * gv / T(group);
                for (int64_t c = g0; c < g0 + group; ++c) {
                    const T dv = rstd * gr[c] * w[c] - k * v[c];
                    dy[r * d + c] = dv * sz[c];
                    if (dz) dz[r * s_dz + c] = dv * yr[c] * szc[c];
                    dwt[c] += double(gr[c]) * double(v[c] * rstd);
                }
            }
        }
    }
    sum_thread_partials(dw_acc, nt, d, dw);
}

}  // namespace

extern "C" {

#define MMM4REC_NORM_ENTRIES(T, SUFFIX)                                                                               \
    void mmm4rec_gated_rmsnorm_fwd_##SUFFIX(const T* y, const T* z, int64_t s_z, const T* w, int64_t R, int64_t d, \
                                            int64_t group, double eps, const int64_t* len, int64_t L, T* out,       \
                                            int nthreads) {                                                         \
        forward<T>(y, z, s_z, w, R, d, group, eps, len, L, out, nthreads);                                          \
    }                                                                                                               \
    void mmm4rec_gated_rmsnorm_bwd_##SUFFIX(const T* dout, const T* y, const T* z, int64_t s_z, const T* w,        \
                                            int64_t R, int64_t d, int64_t group, double eps, const int64_t* len,    \
                                            int64_t L, T* dy, T* dz, int64_t s_dz, T* dw, int nthreads) {           \
        backward<T>(dout, y, z, s_z, w, R, d, group, eps, len, L, dy, dz, s_dz, dw, nthreads);                      \
    }

MMM4REC_NORM_ENTRIES(float, f32)
MMM4REC_NORM_ENTRIES(double, f64)

}  // extern "C"
