// Causal depthwise conv over L on channels-last activations, fused with SiLU: the CPU kernels behind
// mmm4rec_kernels.cpu (loaded with ctypes; no torch headers, so the build takes about a second).
//
//   pre[b, t, c] = bias[c] + sum_{j<k} w[c, j] * x[b, t - (k-1) + j, c]     (x = 0 before t = 0)
//   y = SiLU(pre) (silu != 0) or pre
// Backward, with g = dL/dpre = gy * SiLU'(pre) (pre recomputed from x, never stored):
//   dx[b, s, c] = sum_j w[c, j] * g[b, s + (k-1) - j, c]   (g = 0 past the end)
//   dw[c, j]    = sum_{b,t} g[b, t, c] * x[b, t - (k-1) + j, c],   dbias[c] = sum_{b,t} g[b, t, c]
// Every row is one pass over its channels in blocks of W (one 64-byte vector: 16 floats / 8 doubles; the last block
// of a row may be partial), rows in order, so x, gy, y and dx stream through memory once; the SiLU's exp is inlined
// (activations.h: exp_nonpositive).  The backward keeps one sequence's rows of g in a per-thread buffer (L1 / L2):
// dx of row t - (k-1) is written as soon as g of row t is known, and dw / dbias are then summed from the buffer and
// the sequence's rows of x (just read: in cache) 16 channels at a time down the rows with their sums in registers.
// Rows are addressed with a row stride (elements between (b, t) and (b, t+1)), so a channel slice of a wider tensor
// needs no copy; channels are contiguous.  Parallel over the batch with OpenMP when built with it; dw / dbias are
// summed per thread in double (exact products of T) and the threads' sums added in a fixed order at the end, so
// results do not depend on the threads' timing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "thread_sums.h"

namespace {

template <typename T>
using vec = typename lanes<T>::v;

// A row's channels go in blocks of W: whole blocks (lane count Whole<T>, a constant: one vector moves) and the last
// partial block of n < W lanes (int n: lane by lane, never past the row's end; the other lanes load as 0).
template <typename T>
using Whole = std::integral_constant<int, lanes<T>::n>;

template <typename T>
inline vec<T> load(const T* p) {
    vec<T> v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <typename T>
inline vec<T> load(const T* p, Whole<T>) {
    return load(p);
}
template <typename T>
inline vec<T> load(const T* p, int n) {
    vec<T> v = vec<T>{};
    for (int e = 0; e < n; ++e) v[e] = p[e];
    return v;
}

template <typename T>
inline void store(T* p, vec<T> v, Whole<T>) {
    std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline void store(T* p, vec<T> v, int n) {
    for (int e = 0; e < n; ++e) p[e] = v[e];
}

// y of the forward and dx of the backward go past the caches from kStreamBytes on (activations.h).  Measured at the
// hidden-64 training shape (b 256, L 20, 384 channels: 7.9 MB): the kernels 0.90x with their outputs preallocated
// (benchmarks/bench_native_ab.py), the conv call's time over the kernels' 1.07-1.10x (was 1.15x); the whole
// training step: no change measurable on a shared machine (six runs 0.86x-1.08x, median 0.98x; 15 rounds 0.96x,
// benchmarks/bench_train_step.py).
template <typename T>
inline void store_stream(T* p, vec<T> v, Whole<T> w, bool stream) {
    if (stream)
        store_past_caches(p, v);
    else
        store(p, v, w);
}
template <typename T>
inline void store_stream(T* p, vec<T> v, int n, bool) {
    store(p, v, n);
}

// f(c0, n) for the blocks of a row of C channels: the whole ones, then the partial one (if any)
template <typename T, typename F>
inline void for_blocks(int64_t C, F&& f) {
    constexpr int W = lanes<T>::n;
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) f(c0, Whole<T>());
    if (c0 < C) f(c0, int(C - c0));
}

// the taps transposed and padded to whole blocks, wt[j * Cp + c] = w[c, j] (w [C, k] with any strides), and the
// bias (0 without one); padding lanes are 0.  Cp: C rounded up to whole vectors AND to dw_sequence's groups of 8
// channels (a vector holds 4 doubles with AVX2, 2 with SSE)
template <typename T>
struct Taps {
    static constexpr int64_t block = lanes<T>::n > 8 ? lanes<T>::n : 8;
    int64_t Cp;
    std::vector<T> wt, bias;
    Taps(const T* w, int64_t swc, int64_t swj, const T* b, int64_t C, int64_t k)
        : Cp((C + block - 1) / block * block), wt(size_t(k * Cp), T(0)), bias(size_t(Cp), T(0)) {
        for (int64_t c = 0; c < C; ++c) {
            for (int64_t j = 0; j < k; ++j) wt[j * Cp + c] = w[c * swc + j * swj];
            if (b) bias[c] = b[c];
        }
    }
};

// x rows t-(k-1) .. t of one sequence (tap j: rows[j]); rows before 0 are the zero row
template <typename T, int K>
inline void tap_rows(const T* xs, int64_t sx, int64_t t, int64_t k, const T* zeros, const T** rows) {
    const int64_t kk = K ? K : k;
    for (int64_t j = 0; j < kk; ++j) {
        const int64_t src = t - (kk - 1) + j;
        rows[j] = src < 0 ? zeros : xs + src * sx;
    }
}

template <typename T, int K, bool SILU>
void forward_k(const T* x, int64_t sxb, int64_t sx, const Taps<T>& tp, T* y, int64_t B, int64_t L, int64_t C,
               int64_t k, int nthreads) {
    const int64_t kk = K ? K : k;
    const std::vector<T> zeros(size_t(tp.Cp), T(0));
    const bool stream = goes_past_caches<T>(B * L * C);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        std::vector<const T*> rows(static_cast<size_t>(kk));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < L; ++t) {
                tap_rows<T, K>(x + b * sxb, sx, t, k, zeros.data(), rows.data());
                T* yr = y + (b * L + t) * C;
                for_blocks<T>(C, [&](int64_t c0, auto n) {
                    vec<T> pre = load(tp.bias.data() + c0);
                    for (int64_t j = 0; j < kk; ++j) {
                        pre += load(tp.wt.data() + j * tp.Cp + c0) * load(rows[size_t(j)] + c0, n);
                        opaque<T>(pre);                    // one FMA per tap (no regrouping into a mul and an add)
                    }
                    store_stream(yr + c0, SILU ? silu_of_v<T>(pre) : pre, n, stream);
                });
            }
        stream_fence();
    }
}

// Where a block's gy comes from.  gy pieces: channel ranges [start, start + size) with their own base pointer and
// row strides; a null pointer is an unused piece (gradient 0).  A block inside one piece reads one vector per row;
// a block across pieces goes lane by lane.
template <typename T>
struct GySource {
    static constexpr int W = lanes<T>::n;
    bool whole = true;
    const T* base = nullptr;                       // whole: gy of the block's first channel at (0, 0), or null
    int64_t sb = 0, st = 0;
    const T* lane_base[W] = {};                    // across pieces: the same per lane
    int64_t lane_sb[W] = {}, lane_st[W] = {};

    template <typename N>
    inline vec<T> row(int64_t b, int64_t t, N n) const {
        if (whole) return base ? load(base + b * sb + t * st, n) : vec<T>{};
        vec<T> v = vec<T>{};
        for (int e = 0; e < n; ++e)
            if (lane_base[e]) v[e] = lane_base[e][b * lane_sb[e] + t * lane_st[e]];
        return v;
    }
};

// pieces: 5 int64 per piece: gy's address, start, size, gy's batch and row strides
template <typename T>
std::vector<GySource<T>> gy_sources(int npieces, const int64_t* pieces, int64_t C) {
    constexpr int W = lanes<T>::n;
    std::vector<GySource<T>> out(size_t((C + W - 1) / W));
    for (int64_t c0 = 0; c0 < C; c0 += W) {
        GySource<T>& s = out[size_t(c0 / W)];
        const int n = int(std::min<int64_t>(W, C - c0));
        int first = -1;
        for (int e = 0; e < n; ++e)
            for (int p = 0; p < npieces; ++p) {
                const int64_t* q = pieces + 5 * p;
                if (c0 + e < q[1] || c0 + e >= q[1] + q[2]) continue;
                const T* gy = reinterpret_cast<const T*>(intptr_t(q[0]));
                s.lane_base[e] = gy ? gy + (c0 + e - q[1]) : nullptr;
                s.lane_sb[e] = q[3];
                s.lane_st[e] = q[4];
                if (e == 0) first = p;
                if (p != first) s.whole = false;
                break;
            }
        if (first < 0) s.whole = false;            // (pieces that do not cover the channels: gradient 0)
        if (s.whole) {
            s.base = s.lane_base[0];
            s.sb = s.lane_sb[0];
            s.st = s.lane_st[0];
        }
    }
    return out;
}

// dw_j += sum_t g_t x_{t-(k-1)+j}, dbias += sum_t g_t over one sequence, from its rows of g (gb: L rows of Cp
// channels) and of x (xs: L rows of row stride sx, channels c < C; the channels C..Cp of the last group read as 0):
// exact products of T in double, 16 channels at a time down the rows with the k + 1 sums and the window of x rows
// (each converted once) in registers; the sums are added to this thread's dwt [k, Cp], dbt [Cp]
template <typename T, int K>
inline void dw_sequence(const T* gb, const T* xs, int64_t sx, int64_t L, int64_t k, int64_t C, int64_t Cp,
                        double* dwt, double* dbt, d8* any_k) {
    const int64_t kk = K ? K : k;
    auto add8 = [](double* q, d8 v) {
        d8 sum;
        std::memcpy(&sum, q, sizeof sum);
        sum += v;
        std::memcpy(q, &sum, sizeof sum);
    };
    auto load8_x = [&](const T* q, int64_t c0, auto full) {     // x's channels c0 .. c0 + 7, those >= C as 0
        if (full) return load8_double(q);
        d8 v = d8{};
        for (int64_t e = 0; e < 8 && c0 + e < C; ++e) v[e] = double(q[e]);
        return v;
    };
    // G groups of 8 channels at once: 2 (k + 1) independent sums per row (one group's k + 1 would wait on the
    // latency of the previous row's adds)
    auto groups = [&](int64_t c0, auto G, auto full) {          // full: the G groups' channels are all < C
        d8 fixed[G ? G : 1][K ? 2 * K : 1];
        d8* xd[G];                                     // xd[h][j] = x row t - (k-1) + j (0 before row 0)
        d8* acc[G];
        d8 db[G];
        for (int h = 0; h < G; ++h) {
            xd[h] = K ? fixed[h] : any_k + h * 2 * kk;
            acc[h] = xd[h] + kk;
            db[h] = d8{};
            for (int64_t j = 0; j < kk; ++j) xd[h][j] = acc[h][j] = d8{};
        }
        for (int64_t t = 0; t < L; ++t)
            for (int h = 0; h < G; ++h) {
                for (int64_t j = 0; j + 1 < kk; ++j) xd[h][j] = xd[h][j + 1];
                xd[h][kk - 1] = load8_x(xs + t * sx + c0 + 8 * h, c0 + 8 * h, full);
                const d8 g = load8_double(gb + t * Cp + c0 + 8 * h);
                for (int64_t j = 0; j < kk; ++j) acc[h][j] += g * xd[h][j];
                db[h] += g;
            }
        for (int h = 0; h < G; ++h) {
            for (int64_t j = 0; j < kk; ++j) add8(dwt + j * Cp + c0 + 8 * h, acc[h][j]);
            add8(dbt + c0 + 8 * h, db[h]);
        }
    };
    int64_t c0 = 0;
    using two = std::integral_constant<int, 2>;
    using one = std::integral_constant<int, 1>;
    for (; c0 + 16 <= C; c0 += 16) groups(c0, two(), std::true_type());
    if (c0 + 16 <= Cp) {
        groups(c0, two(), std::false_type());
        c0 += 16;
    }
    if (c0 < Cp) groups(c0, one(), std::false_type());
}

template <typename T, int K, bool SILU>
void backward_k(const T* x, int64_t sxb, int64_t sx, const Taps<T>& tp, int64_t B, int64_t L, int64_t C, int64_t k,
                const std::vector<GySource<T>>& gys, T* dx, int64_t sdx, T* dw, T* dbias, int nthreads) {
    constexpr int W = lanes<T>::n;
    const int64_t kk = K ? K : k, Cp = tp.Cp;
    const int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> dw_acc(size_t(nt * kk * Cp), 0.0), db_acc(size_t(nt * Cp), 0.0);   // [thread][j][c]
    const std::vector<T> zeros(size_t(Cp), T(0));
    const bool stream = goes_past_caches<T>(B * L * C);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = thread_index();
        double* dwt = dw_acc.data() + size_t(tid * kk * Cp);
        double* dbt = db_acc.data() + size_t(tid * Cp);
        std::vector<d8> any_k(K ? 0 : 4 * kk);
        std::vector<T> gb(size_t(L * Cp));                // the sequence's rows of g (padding lanes: 0)
        std::vector<const T*> rows(static_cast<size_t>(kk));
        std::vector<const T*> gy_row(gys.size());         // a whole block's gy at the current row (b, t)
        // dx_s = sum_j w_j g_{s+(k-1)-j} over the rows of g in gb (rows >= L: 0)
        auto dx_row = [&](int64_t b, int64_t s) {
            for (int64_t j = 0; j < kk; ++j) {
                const int64_t t = s + (kk - 1) - j;
                rows[size_t(j)] = t < L ? gb.data() + t * Cp : zeros.data();
            }
            T* dxr = dx + (b * L + s) * sdx;
            for_blocks<T>(C, [&](int64_t c0, auto n) {
                vec<T> d = load(tp.wt.data() + c0) * load(rows[0] + c0);
                for (int64_t j = 1; j < kk; ++j) {
                    opaque<T>(d);
                    d += load(tp.wt.data() + j * Cp + c0) * load(rows[size_t(j)] + c0);
                }
                store_stream(dxr + c0, d, n, stream);
            });
        };
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            const T* xs = x + b * sxb;                    // the sequence's rows of x (row stride sx)
            for (size_t i = 0; i < gys.size(); ++i)
                gy_row[i] = gys[i].whole && gys[i].base ? gys[i].base + b * gys[i].sb : nullptr;
            for (int64_t t = 0; t < L; ++t) {
                // g_t = gy_t * SiLU'(pre_t) (an unused piece: 0 * SiLU', NaN stays NaN) into gb
                T* gbt = gb.data() + t * Cp;
                tap_rows<T, K>(xs, sx, t, k, zeros.data(), rows.data());
                for_blocks<T>(C, [&](int64_t c0, auto n) {
                    const size_t i = size_t(c0 / W);
                    vec<T> g = gy_row[i] ? load(gy_row[i] + t * gys[i].st, n)
                                         : gys[i].whole ? vec<T>{} : gys[i].row(b, t, n);
                    if (SILU) {
                        vec<T> pre = load(tp.bias.data() + c0);
                        for (int64_t j = 0; j < kk; ++j) {
                            pre += load(tp.wt.data() + j * Cp + c0) * load(rows[size_t(j)] + c0, n);
                            opaque<T>(pre);
                        }
                        g *= silu_grad_v<T>(pre);
                    }
                    std::memcpy(gbt + c0, &g, sizeof g);
                });
                if (t >= kk - 1) dx_row(b, t - (kk - 1));
            }
            for (int64_t s = std::max<int64_t>(0, L - (kk - 1)); s < L; ++s) dx_row(b, s);
            dw_sequence<T, K>(gb.data(), xs, sx, L, k, C, Cp, dwt, dbt, any_k.data());
        }
        stream_fence();
    }
    // dw [C, k], dbias [C]: the threads' sums added in thread order
    for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < kk; ++j) {
            double acc = 0.0;
            for (int t = 0; t < nt; ++t) acc += dw_acc[size_t((t * kk + j) * Cp + c)];
            dw[c * kk + j] = T(acc);
        }
        if (dbias) {
            double acc = 0.0;
            for (int t = 0; t < nt; ++t) acc += db_acc[size_t(t * Cp + c)];
            dbias[c] = T(acc);
        }
    }
}

template <typename T>
void forward(const T* x, int64_t sxb, int64_t sx, const T* w, int64_t swc, int64_t swj, const T* bias, T* y,
             int64_t B, int64_t L, int64_t C, int64_t k, int silu, int nthreads) {
    const Taps<T> tp(w, swc, swj, bias, C, k);
#define MMM4REC_CONV_FWD(KK)                                                                \
    return silu ? forward_k<T, KK, true>(x, sxb, sx, tp, y, B, L, C, k, nthreads)           \
                : forward_k<T, KK, false>(x, sxb, sx, tp, y, B, L, C, k, nthreads)
    switch (k) {
        case 4: MMM4REC_CONV_FWD(4);
        case 3: MMM4REC_CONV_FWD(3);
        case 2: MMM4REC_CONV_FWD(2);
        default: MMM4REC_CONV_FWD(0);
    }
#undef MMM4REC_CONV_FWD
}

template <typename T>
void backward(const T* x, int64_t sxb, int64_t sx, const T* w, int64_t swc, int64_t swj, const T* bias, int64_t B,
              int64_t L, int64_t C, int64_t k, int silu, int npieces, const int64_t* pieces, T* dx, int64_t sdx, T* dw,
              T* dbias, int nthreads) {
    const Taps<T> tp(w, swc, swj, bias, C, k);
    const std::vector<GySource<T>> gys = gy_sources<T>(npieces, pieces, C);
#define MMM4REC_CONV_BWD(KK)                                                                   \
    return silu ? backward_k<T, KK, true>(x, sxb, sx, tp, B, L, C, k, gys, dx, sdx, dw, dbias, nthreads) \
                : backward_k<T, KK, false>(x, sxb, sx, tp, B, L, C, k, gys, dx, sdx, dw, dbias, nthreads)
    switch (k) {
        case 4: MMM4REC_CONV_BWD(4);
        case 3: MMM4REC_CONV_BWD(3);
        case 2: MMM4REC_CONV_BWD(2);
        default: MMM4REC_CONV_BWD(0);
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

// w [C, k] with strides (swc, swj); bias [C] or null.  Backward: pieces = npieces x (gy address, start, size, gy's
// batch stride, gy's row stride); dx [B, L, C] with row stride sdx >= C (batch stride L sdx: a slice of a wider
// gradient), dw [C, k], dbias [C] (or null) contiguous, all written.
#define MMM4REC_CONV_ENTRIES(T, SUFFIX)                                                                               \
    void mmm4rec_conv_fwd_##SUFFIX(const T* x, int64_t sxb, int64_t sx, const T* w, int64_t swc, int64_t swj,        \
                                   const T* bias, T* y, int64_t B, int64_t L, int64_t C, int64_t k, int silu,       \
                                   int nthreads) {                                                                  \
        forward<T>(x, sxb, sx, w, swc, swj, bias, y, B, L, C, k, silu, nthreads);                                  \
    }                                                                                                               \
    void mmm4rec_conv_bwd_##SUFFIX(const T* x, int64_t sxb, int64_t sx, const T* w, int64_t swc, int64_t swj,        \
                                   const T* bias, int64_t B, int64_t L, int64_t C, int64_t k, int silu,             \
                                   int npieces, const int64_t* pieces, T* dx, int64_t sdx, T* dw, T* dbias,         \
                                   int nthreads) {                                                                  \
        backward<T>(x, sxb, sx, w, swc, swj, bias, B, L, C, k, silu, npieces, pieces, dx, sdx, dw, dbias, nthreads);\
    }

MMM4REC_CONV_ENTRIES(float, f32)
MMM4REC_CONV_ENTRIES(double, f64)

}  // extern "C"
