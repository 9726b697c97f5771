// A TimeAwareSSD layer's core on CPU in few native calls, for CPU batches where the general path's ~150 small
// torch ops per call (and as many backward nodes) cost more than the math: modules/layer_cpu.py calls these between
// in_proj, the causal conv and out_proj (eager only; torch.compile traces the general path).
//
// 1. mmm4rec_time_encoding_fwd / _bwd: CausalTimeEncoding.forward (dropout, if any, applied to the gaps by the
//    caller) and the gradients of its 10 parameters; per sequence b, step i, head h:
//      gap_0 = 0, gap_i = max(t_i - t_{i-1}, 0)  (or the given gaps), float64
//      mu_i = sum_{j<=i} gap_j / (i+1),  m2_i = sum_{j<=i} gap_j^2 / (i+1),  var_i = max(m2_i - mu_i^2, 0)
//      s_i = (gap_i - mu_i) / sqrt(var_i + eps m2_i + 1e-30)                  (float64, then cast to T)
//      D_ih = s_i scale_h + shift_h;  E_ih = D_ih * Tanhshrink(W2 SiLU(W1 D_i + b1) + b2)_h
//      time_scale = SiLU(conv2(SiLU(conv1(E))))   conv: causal depthwise over i, k taps, bias first then taps
// 2. mmm4rec_ssd_core_fwd: from the conv output xBC (x | B | C per row) and the in_proj pieces z, dt (row strides):
//      v = dt * time_scale + dt_bias (time_scale optional),  Delta = softplus(v),  a = A Delta
//      y = the quadratic form with the D skip (mmm4rec_ssd_quadratic_fwd, tissd_quadratic.cpp)
//      out = RMSNorm_group(y * SiLU(z)) * w  (mmm4rec_gated_rmsnorm_fwd, gated_rmsnorm.cpp); rows past len[b]: 0
//    y is also written to y_out when given (the backward reads it).  Returns 1, writing nothing, when x, B, C, dt or
//    time_scale hold NaN / inf at a valid step (or dt * time_scale overflows): the caller then runs the general path
//    (its NaN-causality rule).
// 3. mmm4rec_ssd_core_bwd: gradients of 2 from dout: the norm's backward (dy, dz, dw), the scan's (dx, dDelta, da,
//    dB, dC, dD), then da -> dDelta += A da, dA = sum Delta da;  dv = dDelta * sigmoid(v) (torch's softplus
//    backward: dDelta where v > 20);  ddt = dv * time_scale (or dv), dtime_scale = dv * dt, ddt_bias = sum dv.
//    dxBC [b, L, conv_dim] = dx | dB | dC; every gradient is 0 on padded rows.  Parameter gradients are summed per
//    thread in double and added in a fixed order.
// 4. mmm4rec_tissd_fwd / _bwd: one tissd() call of the torch backend on CPU (x [b, L, H, P], B / C [b, L, G, n]
//    contiguous, no states): v = dt * time_scale + dt_bias (each optional), Delta = softplus(v) (or v), a = A Delta,
//    y = the quadratic form with the D skip [H] or [H, P] (optional; d_per_head: [H], its gradient summed over P).
//    The forward returns 1 when a valid row of y is not finite (the scan checks each row as it writes it): a NaN /
//    inf input at a valid step t always makes row t non-finite (every input of step t enters y_t through a
//    product), so the caller then runs the general path and its NaN-causality rule (finite inputs whose y overflows
//    take it too: same values, slower).  The backward: the scan's, then the step sizes' chain as in 3.
// Same math as the torch modules; sums run in other orders (rounding only).  T = float or double.
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

// the scan (tissd_quadratic.cpp) and the norm (gated_rmsnorm.cpp) of the same library
#define MMM4REC_DECLARE(T, S)                                                                                         \
    void mmm4rec_ssd_quadratic_fwd_##S(const T*, const T*, const T*, const T*, const T*, const int64_t*, const T*,   \
                                       int, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);          \
    int mmm4rec_ssd_quadratic_fwd_checked_##S(const T*, const T*, const T*, const T*, const T*, const int64_t*,      \
                                              const T*, int, T*, int64_t, int64_t, int64_t, int64_t, int64_t,       \
                                              int64_t, int);                                                        \
    void mmm4rec_ssd_quadratic_bwd_##S(const T*, const T*, const T*, const T*, const T*, const int64_t*, const T*,   \
                                       int, const T*, T*, T*, T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t,    \
                                       int64_t, int64_t, int);                                                      \
    void mmm4rec_gated_rmsnorm_fwd_##S(const T*, const T*, int64_t, const T*, int64_t, int64_t, int64_t, double,     \
                                       const int64_t*, int64_t, T*, int);                                           \
    void mmm4rec_gated_rmsnorm_bwd_##S(const T*, const T*, const T*, int64_t, const T*, int64_t, int64_t, int64_t,   \
                                       double, const int64_t*, int64_t, T*, T*, int64_t, T*, int);
extern "C" {
MMM4REC_DECLARE(float, f32)
MMM4REC_DECLARE(double, f64)
}

namespace {

template <typename T> struct Lib;
#define MMM4REC_LIB(T, S)                                                                                             \
    template <> struct Lib<T> {                                                                                     \
        static constexpr auto scan_fwd = mmm4rec_ssd_quadratic_fwd_##S;                                             \
        static constexpr auto scan_fwd_checked = mmm4rec_ssd_quadratic_fwd_checked_##S;                             \
        static constexpr auto scan_bwd = mmm4rec_ssd_quadratic_bwd_##S;                                             \
        static constexpr auto norm_fwd = mmm4rec_gated_rmsnorm_fwd_##S;                                             \
        static constexpr auto norm_bwd = mmm4rec_gated_rmsnorm_bwd_##S;                                             \
    };
MMM4REC_LIB(float, f32)
MMM4REC_LIB(double, f64)

// dst[0..n) = src[0..n); false when src holds NaN / inf
template <typename T>
inline bool copy_finite(const T* __restrict src, int64_t n, T* __restrict dst) {
    std::memcpy(dst, src, size_t(n) * sizeof(T));
    return all_finite(src, n);
}

// The step sizes of one sequence's m = len * H values, flat (so the loops vectorise, softplus included), from
// v = dt * ts + dt_bias already in v:  delta = softplus(v) (or v),  a = A delta  (at: A tiled over the rows)
template <typename T>
inline void steps_flat(const T* __restrict v, int64_t m, const T* __restrict at, int softplus, T* __restrict delta,
                       T* __restrict a) {
    if (softplus)
        for (int64_t e = 0; e < m; ++e) delta[e] = softplus_of(v[e]);
    else
        for (int64_t e = 0; e < m; ++e) delta[e] = v[e];
    for (int64_t e = 0; e < m; ++e) a[e] = delta[e] * at[e];
}

// steps_flat backward over one sequence's m values: dv from dL/ddelta and dL/da, with dA and ddt_bias summed per
// position e (double, folded over e % H later by fold_step_sums):
//   dd = ddelta + da A;  dA += da delta;  dv = dd softplus'(v) = dd e^v / (e^v + 1) (dd past v = 20, torch's
//   threshold; dd without softplus);  ddt_bias += dv
template <typename T>
inline void steps_flat_bwd(const T* __restrict ddelta, const T* __restrict da, const T* __restrict v,
                           const T* __restrict delta, const T* __restrict at, int softplus, int64_t m,
                           double* __restrict dA, double* __restrict ddt_bias, T* __restrict dv) {
    for (int64_t e = 0; e < m; ++e) {
        const T dd = ddelta[e] + da[e] * at[e];
        const T ev = exp_nonpos(v[e] > T(20) ? T(0) : v[e]);   // e^v (0 below the normal range)
        const T g = softplus && !(v[e] > T(20)) ? dd * ev / (ev + T(1)) : dd;
        dA[e] += double(da[e]) * double(delta[e]);
        ddt_bias[e] += double(g);
        dv[e] = g;
    }
}

// A and dt_bias (0 without) tiled over L rows of H: the flat step loops' per-position constants
template <typename T>
struct Tiled {
    std::vector<T> A, bias;
    Tiled(const T* A_, const T* dt_bias, int64_t L, int64_t H) : A(size_t(L * H)), bias(size_t(L * H), T(0)) {
        for (int64_t e = 0; e < L * H; ++e) {
            A[e] = A_[e % H];
            if (dt_bias) bias[e] = dt_bias[e % H];
        }
    }
};

// Causal depthwise conv over the rows of e [L, H] (taps w [H, k], bias [H]): the pre-activations, into out [L, H]
template <typename T>
void conv_pre(const T* e, int64_t L, int64_t H, const T* w, const T* bias, int64_t k, T* out) {
    for (int64_t i = 0; i < L; ++i)
        for (int64_t h = 0; h < H; ++h) {
            T acc = bias ? bias[h] : T(0);
            for (int64_t j = 0; j < k; ++j) {
                const int64_t src = i - (k - 1) + j;
                if (src >= 0) acc += w[h * k + j] * e[src * H + h];
            }
            out[i * H + h] = acc;
        }
}

// Backward of conv_pre: de [L, H] (overwritten) from dpre; dw [H, k] / dbias [H] accumulated (double)
template <typename T>
void conv_pre_bwd(const T* e, const T* dpre, int64_t L, int64_t H, const T* w, int64_t k, T* de, double* dw,
                  double* dbias) {
    for (int64_t s = 0; s < L; ++s)
        for (int64_t h = 0; h < H; ++h) {
            T acc = T(0);
            for (int64_t j = 0; j < k; ++j) {
                const int64_t t = s + (k - 1) - j;                       // output row where input row s meets tap j
                if (t < L) {
                    acc += w[h * k + j] * dpre[t * H + h];
                    dw[h * k + j] += double(dpre[t * H + h]) * double(e[s * H + h]);
                }
            }
            de[s * H + h] = acc;
            dbias[h] += double(dpre[s * H + h]);
        }
}

// CausalTimeEncoding's parameters, in its forward's order; the gradients of the same shapes
template <typename T>
struct TimeParams {
    const T *scale, *shift, *w1, *b1, *w2, *b2, *cw1, *cb1, *cw2, *cb2;
};

// One sequence of the time encoding with every intermediate kept (the backward reads them): s [L] and, per step and
// head, D, the mix pre-activations p1 / p2, a1 = SiLU(p1), th = tanh(p2), E, the conv pre-activations c1 / c2 and
// h1 = SiLU(c1).  The H x H mixes are small loops; every activation is one loop over all L * H values (vectorised,
// glibc's vector exp) except tanh (std::tanh keeps Tanhshrink's x - tanh x exact for small x, as torch computes it).
template <typename T>
struct TimeSeq {
    int64_t L, H, k;
    std::vector<T> s, D, p1, a1, p2, th, E, c1, h1, c2;
    TimeSeq(int64_t L_, int64_t H_, int64_t k_) : L(L_), H(H_), k(k_), s(L_), D(L_ * H_), p1(L_ * H_), a1(L_ * H_),
        p2(L_ * H_), th(L_ * H_), E(L_ * H_), c1(L_ * H_), h1(L_ * H_), c2(L_ * H_) {}

    // out[i, o] = bias[o] + sum_c w[o, c] in[i, c]   (an H x H Linear over the steps)
    void mix(const T* in, const T* w, const T* bias, T* out) const {
        for (int64_t i = 0; i < L; ++i)
            for (int64_t o = 0; o < H; ++o) {
                T acc = T(0);
                for (int64_t c = 0; c < H; ++c) acc += w[o * H + c] * in[i * H + c];
                out[i * H + o] = acc + bias[o];
            }
    }

    void run(const double* tb, int is_gaps, const TimeParams<T>& q, double eps) {
        const int64_t n = L * H;
        double sum = 0.0, sum_sq = 0.0;
        for (int64_t i = 0; i < L; ++i) {
            double gap;
            if (is_gaps) {
                gap = tb[i];
            } else {
                const double d = i ? tb[i] - tb[i - 1] : 0.0;
                gap = d < 0.0 ? 0.0 : d;                             // NaN stays NaN (as clamp(min=0))
            }
            sum += gap;
            sum_sq += gap * gap;
            const double cnt = double(i + 1), mean = sum / cnt, mean_sq = sum_sq / cnt;
            double var = mean_sq - mean * mean;
            var = var < 0.0 ? 0.0 : var;
            s[i] = T((gap - mean) / std::sqrt(var + eps * mean_sq + 1e-30));
            for (int64_t h = 0; h < H; ++h) D[i * H + h] = s[i] * q.scale[h] + q.shift[h];
        }
        mix(D.data(), q.w1, q.b1, p1.data());
        for (int64_t e = 0; e < n; ++e) a1[e] = silu_of(p1[e]);
        mix(a1.data(), q.w2, q.b2, p2.data());
        for (int64_t e = 0; e < n; ++e) th[e] = std::tanh(p2[e]);
        for (int64_t e = 0; e < n; ++e) E[e] = D[e] * (p2[e] - th[e]);  // D * Tanhshrink(p2)
        conv_pre(E.data(), L, H, q.cw1, q.cb1, k, c1.data());
        for (int64_t e = 0; e < n; ++e) h1[e] = silu_of(c1[e]);
        conv_pre(h1.data(), L, H, q.cw2, q.cb2, k, c2.data());
    }

    // parameter gradients of sum(dout * SiLU(c2)) added to g (double, TimeParams order, flattened)
    void backward(const T* dout, const TimeParams<T>& q, double* g) {
        const int64_t n = L * H, HH = H * H;
        double *g_scale = g, *g_shift = g + H, *g_w1 = g + 2 * H, *g_b1 = g_w1 + HH, *g_w2 = g_b1 + H,
               *g_b2 = g_w2 + HH, *g_cw1 = g_b2 + H, *g_cb1 = g_cw1 + H * k, *g_cw2 = g_cb1 + H,
               *g_cb2 = g_cw2 + H * k;
        std::vector<T> dc(n), dh(n), dD(n), dp(n), da(n);
        for (int64_t e = 0; e < n; ++e) dc[e] = dout[e] * silu_grad(c2[e]);
        conv_pre_bwd(h1.data(), dc.data(), L, H, q.cw2, k, dh.data(), g_cw2, g_cb2);
        for (int64_t e = 0; e < n; ++e) dh[e] *= silu_grad(c1[e]);           // now d c1
        conv_pre_bwd(E.data(), dh.data(), L, H, q.cw1, k, dc.data(), g_cw1, g_cb1);   // dc = dE
        for (int64_t e = 0; e < n; ++e) {                               // E = D * (p2 - tanh p2)
            dD[e] = dc[e] * (p2[e] - th[e]);
            dp[e] = dc[e] * D[e] * th[e] * th[e];                       // Tanhshrink' = tanh^2
        }
        for (int64_t i = 0; i < L; ++i)                                 // mix2: p2 = W2 a1 + b2
            for (int64_t c = 0; c < H; ++c) {
                T acc = T(0);
                for (int64_t o = 0; o < H; ++o) {
                    g_w2[o * H + c] += double(dp[i * H + o]) * double(a1[i * H + c]);
                    acc += q.w2[o * H + c] * dp[i * H + o];
                }
                da[i * H + c] = acc;
            }
        for (int64_t e = 0; e < n; ++e) g_b2[e % H] += double(dp[e]);
        for (int64_t e = 0; e < n; ++e) dp[e] = da[e] * silu_grad(p1[e]); // now d p1
        for (int64_t i = 0; i < L; ++i)                                 // mix1: p1 = W1 D + b1
            for (int64_t c = 0; c < H; ++c) {
                T acc = dD[i * H + c];
                for (int64_t o = 0; o < H; ++o) {
                    g_w1[o * H + c] += double(dp[i * H + o]) * double(D[i * H + c]);
                    acc += q.w1[o * H + c] * dp[i * H + o];
                }
                g_scale[c] += double(acc) * double(s[i]);               // D = s scale + shift
                g_shift[c] += double(acc);
            }
        for (int64_t e = 0; e < n; ++e) g_b1[e % H] += double(dp[e]);
    }
};

template <typename T>
void time_encoding(const double* t, int is_gaps, int64_t nb, int64_t L, int64_t H, int64_t k,
                   const TimeParams<T>& q, double eps, T* out, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        TimeSeq<T> seq(L, H, k);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            seq.run(t + b * L, is_gaps, q, eps);
            T* o = out + b * L * H;
            for (int64_t e = 0; e < L * H; ++e) o[e] = silu_of(seq.c2[e]);
        }
    }
}

// grads: 10 arrays in TimeParams order (overwritten)
template <typename T>
void time_encoding_bwd(const double* t, int is_gaps, int64_t nb, int64_t L, int64_t H, int64_t k,
                       const TimeParams<T>& q, double eps, const T* dout, T* const* grads, int nthreads) {
    const int64_t sizes[10] = {H, H, H * H, H, H * H, H, H * k, H, H * k, H};
    int64_t total = 0;
    for (int64_t sz : sizes) total += sz;
    const int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> acc(size_t(nt) * total, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = thread_index();
        TimeSeq<T> seq(L, H, k);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            seq.run(t + b * L, is_gaps, q, eps);
            seq.backward(dout + b * L * H, q, acc.data() + size_t(tid) * total);
        }
    }
    std::vector<double> part(size_t(nt) * total);
    int64_t off = 0;
    for (int p = 0; p < 10; ++p) {                                   // each parameter's thread sums, fixed order
        for (int th = 0; th < nt; ++th)
            for (int64_t e = 0; e < sizes[p]; ++e) part[size_t(th) * sizes[p] + e] = acc[size_t(th) * total + off + e];
        sum_thread_partials(part, nt, sizes[p], grads[p]);
        off += sizes[p];
    }
}

// Grow-only buffers of the calling thread, reused across calls: a fresh [b, L, d] buffer costs page faults that,
// on CPU, take longer than the arithmetic done in it.  Each slot is one distinct array of a call; the memory stays
// with the thread (the largest call's size).
template <typename T>
T* scratch(int slot, size_t count) {
    thread_local std::vector<T> buffers[13];
    std::vector<T>& buf = buffers[slot];
    if (buf.size() < count) buf.resize(count);
    return buf.data();
}

struct Dims {
    int64_t nb, L, H, P, G, n;
    int64_t d_inner() const { return H * P; }
    int64_t gn() const { return G * n; }
};

// valid steps of each sequence: len[b] clamped to [0, L] (all L without len)
inline std::vector<int64_t> valid_lengths(const int64_t* len, int64_t nb, int64_t L) {
    std::vector<int64_t> lens(size_t(nb), L);
    if (len)
        for (int64_t b = 0; b < nb; ++b) lens[b] = std::min<int64_t>(std::max<int64_t>(len[b], 0), L);
    return lens;
}

// dA and ddt_bias [H] from per-thread double partial sums laid out [thread][2 n]: dA's n values, then ddt_bias's,
// position e of each part belonging to head e % H (n = H: one per head; n = L H: one per position of an [L, H]
// block); folded per thread over e, then the threads added in a fixed order (sum_thread_partials)
template <typename T>
void fold_step_sums(const std::vector<double>& acc, int nt, int64_t n, int64_t H, T* dA, T* ddt_bias) {
    std::vector<double> sums(size_t(nt) * H);
    for (int part = 0; part < 2; ++part) {
        T* out = part == 0 ? dA : ddt_bias;
        if (!out) continue;
        for (int t = 0; t < nt; ++t)
            for (int64_t h = 0; h < H; ++h) {
                double s = 0.0;
                for (int64_t e = h; e < n; e += H) s += acc[size_t(t) * 2 * n + part * n + e];
                sums[size_t(t) * H + h] = s;
            }
        sum_thread_partials(sums, nt, H, out);
    }
}

// The step sizes' chain backward over every sequence's valid values (steps_flat_bwd), with dA and ddt_bias summed
// per thread in double per [L, H] position and folded at the end (fold_step_sums); emit(b, dv) then writes what
// sequence b's dv [len_b * H] gives (ddt, dts: their layouts differ between the layer core and the call)
template <typename T, typename Emit>
void steps_chain_bwd(const T* ddelta, const T* da, const T* v, const T* delta, const T* At, int softplus,
                     const std::vector<int64_t>& lens, const Dims& d, int nthreads, T* dA, T* ddt_bias, Emit emit) {
    const int nt = nthreads > 1 ? nthreads : 1;
    const int64_t LH = d.L * d.H;
    std::vector<double> acc(size_t(nt) * 2 * LH, 0.0);        // per thread: dA [L, H], ddt_bias [L, H]
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = thread_index();
        double *dA_t = acc.data() + size_t(tid) * 2 * LH, *db_t = dA_t + LH;
        std::vector<T> dv(static_cast<size_t>(LH));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.nb; ++b) {
            const int64_t o = b * LH;
            steps_flat_bwd(ddelta + o, da + o, v + o, delta + o, At, softplus, lens[b] * d.H, dA_t, db_t, dv.data());
            emit(b, static_cast<const T*>(dv.data()));
        }
    }
    fold_step_sums(acc, nt, LH, d.H, dA, ddt_bias);
}

// D per head [H] (d_per_head) or per channel [H, P]: the scan takes it per channel (Dhp: the expanded copy)
template <typename T>
const T* channel_skip(const T* D, int d_per_head, const Dims& d, std::vector<T>& Dhp) {
    if (!D || !d_per_head) return D;
    Dhp.resize(size_t(d.d_inner()));
    for (int64_t h = 0; h < d.H; ++h) std::fill(Dhp.begin() + h * d.P, Dhp.begin() + (h + 1) * d.P, D[h]);
    return Dhp.data();
}

// dD [H] from the scan's per-channel dDhp [H, P]: each head's sum over P
template <typename T>
void head_sums(const std::vector<T>& dDhp, const Dims& d, T* dD) {
    for (int64_t h = 0; h < d.H; ++h) {
        T s = T(0);
        for (int64_t p = 0; p < d.P; ++p) s += dDhp[h * d.P + p];
        dD[h] = s;
    }
}

// The scan's contiguous inputs gathered from xBC and the step sizes, valid rows only (the scan never reads the
// others): x / B / C copied row by row, the step sizes flat per sequence (steps_flat).  gather returns true when a
// valid step holds NaN / inf in x, B, C, dt or time_scale (v = dt ts + dt_bias is then non-finite).
template <typename T>
struct Steps {
    T *x, *B, *C, *delta, *a, *v;                   // scratch slots 0..5 (valid rows written, only those read)
    std::vector<T> Dhp;
    std::vector<int64_t> lens;

    bool gather(const T* xbc, int64_t s_xbc, const T* dt, int64_t s_zdt, const T* ts, const Tiled<T>& tiled,
                const T* D, const int64_t* len, const Dims& d, int nthreads) {
        const int64_t di = d.d_inner(), gn = d.gn(), rows = d.nb * d.L, H = d.H;
        x = scratch<T>(0, size_t(rows) * di);
        B = scratch<T>(1, size_t(rows) * gn);
        C = scratch<T>(2, size_t(rows) * gn);
        delta = scratch<T>(3, size_t(rows) * H);
        a = scratch<T>(4, size_t(rows) * H);
        v = scratch<T>(5, size_t(rows) * H);
        lens = valid_lengths(len, d.nb, d.L);
        const T* bt = tiled.bias.data();
        int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) reduction(| : bad)
        for (int64_t b = 0; b < d.nb; ++b) {
            bool ok = true;
            const int64_t o = b * d.L * H, m = lens[b] * H;
            for (int64_t i = 0; i < lens[b]; ++i) {
                const int64_t r = b * d.L + i;
                const T* src = xbc + r * s_xbc;
                ok &= copy_finite(src, di, x + r * di);
                ok &= copy_finite(src + di, gn, B + r * gn);
                ok &= copy_finite(src + di + gn, gn, C + r * gn);
                const T* dtr = dt + r * s_zdt;
                T* vr = v + r * H;
                if (ts)
                    for (int64_t h = 0; h < H; ++h) vr[h] = dtr[h] * ts[r * H + h];
                else
                    for (int64_t h = 0; h < H; ++h) vr[h] = dtr[h];
            }
            T* vb = v + o;
            for (int64_t e = 0; e < m; ++e) vb[e] += bt[e];
            ok &= all_finite(vb, m);
            steps_flat(vb, m, tiled.A.data(), 1, delta + o, a + o);
            bad |= !ok;
        }
        channel_skip(D, 1, d, Dhp);                       // the scan takes D per channel [H, P]
        return bad != 0;
    }
};

template <typename T>
int core_fwd(const T* xbc, int64_t s_xbc, const T* z, const T* dt, int64_t s_zdt, const T* ts, const T* dt_bias,
             const T* A, const T* D, int skip_delta, const T* norm_w, int64_t group, double eps, const int64_t* len,
             Dims d, T* out, T* y_out, int nthreads) {
    Steps<T> st;
    if (st.gather(xbc, s_xbc, dt, s_zdt, ts, Tiled<T>(A, dt_bias, d.L, d.H), D, len, d, nthreads)) return 1;
    T* y = y_out ? y_out : scratch<T>(6, size_t(d.nb) * d.L * d.d_inner());
    Lib<T>::scan_fwd(st.x, st.delta, st.a, st.B, st.C, st.lens.data(),
                     D ? st.Dhp.data() : nullptr, skip_delta, y, d.nb, d.L, d.H, d.P, d.G, d.n, nthreads);
    Lib<T>::norm_fwd(y, z, s_zdt, norm_w, d.nb * d.L, d.d_inner(), group, eps, st.lens.data(), d.L, out, nthreads);
    return 0;
}

// dz and ddt are written with the row stride s_g (slices of the in_proj output's gradient), dxbc [b, L, conv_dim]
// and dts [b, L, H] contiguous
template <typename T>
void core_bwd(const T* dout, const T* xbc, int64_t s_xbc, const T* z, const T* dt, int64_t s_zdt, const T* ts,
              const T* dt_bias, const T* A, const T* D, int skip_delta, const T* norm_w, int64_t group, double eps,
              const int64_t* len, Dims d, const T* y, T* dxbc, T* dz, T* ddt, int64_t s_g, T* dts, T* ddt_bias, T* dA,
              T* dD, T* dnorm_w, int nthreads) {
    Steps<T> st;
    const Tiled<T> tiled(A, dt_bias, d.L, d.H);
    st.gather(xbc, s_xbc, dt, s_zdt, ts, tiled, D, len, d, nthreads);
    const int64_t rows = d.nb * d.L, di = d.d_inner(), gn = d.gn(), cd = di + 2 * gn, H = d.H;
    T* dy = scratch<T>(7, size_t(rows) * di);
    Lib<T>::norm_bwd(dout, y, z, s_zdt, norm_w, rows, di, group, eps, st.lens.data(), d.L, dy, dz, s_g, dnorm_w,
                     nthreads);
    T *dx = scratch<T>(8, size_t(rows) * di), *ddelta = scratch<T>(9, size_t(rows) * H),
      *da = scratch<T>(10, size_t(rows) * H), *dB = scratch<T>(11, size_t(rows) * gn),
      *dC = scratch<T>(12, size_t(rows) * gn);
    std::vector<T> dDhp(D ? size_t(di) : 0);
    Lib<T>::scan_bwd(st.x, st.delta, st.a, st.B, st.C, st.lens.data(), D ? st.Dhp.data() : nullptr, skip_delta, dy,
                     dx, ddelta, da, dB, dC, D ? dDhp.data() : nullptr, d.nb, d.L, H, d.P, d.G, d.n, nthreads);
    steps_chain_bwd(ddelta, da, st.v, st.delta, tiled.A.data(), 1, st.lens, d, nthreads, dA, ddt_bias,
                    [&](int64_t b, const T* dv) {
        const int64_t len_b = st.lens[b];
        for (int64_t i = 0; i < d.L; ++i) {
            const int64_t r = b * d.L + i;
            T* out = dxbc + r * cd;
            T* g_dt = ddt + r * s_g;
            T* g_ts = dts ? dts + r * H : nullptr;
            if (i >= len_b) {                            // padded rows: zero gradients
                std::fill(out, out + cd, T(0));
                std::fill(g_dt, g_dt + H, T(0));
                if (g_ts) std::fill(g_ts, g_ts + H, T(0));
                continue;
            }
            std::copy(dx + r * di, dx + (r + 1) * di, out);
            std::copy(dB + r * gn, dB + (r + 1) * gn, out + di);
            std::copy(dC + r * gn, dC + (r + 1) * gn, out + di + gn);
            const T* dvr = dv + i * H;                   // ddt = dv ts (or dv), dts = dv dt
            const T* dtr = dt + r * s_zdt;
            if (ts)
                for (int64_t h = 0; h < H; ++h) g_dt[h] = dvr[h] * ts[r * H + h];
            else
                for (int64_t h = 0; h < H; ++h) g_dt[h] = dvr[h];
            if (g_ts)
                for (int64_t h = 0; h < H; ++h) g_ts[h] = dvr[h] * dtr[h];
        }
    });
    if (dD) head_sums(dDhp, d, dD);
}

// The step sizes of a tissd() call over each sequence's valid rows as ONE flat loop of lens[b] * H values (dt, ts
// and the outputs are [L, H] blocks per sequence), steps_flat: v, delta, a [nb, L, H] into scratch slots 5 / 3 / 4.
template <typename T>
struct CallSteps {
    Tiled<T> tiled;
    T *v, *delta, *a;

    CallSteps(const T* dt, const T* ts, const T* dt_bias, const T* A, int softplus, const std::vector<int64_t>& lens,
              const Dims& d, int nthreads)
        : tiled(A, dt_bias, d.L, d.H) {
        const size_t count = size_t(d.nb) * d.L * d.H;
        v = scratch<T>(5, count);
        delta = scratch<T>(3, count);
        a = scratch<T>(4, count);
        const T* btp = tiled.bias.data();
        T* pv = v;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t b = 0; b < d.nb; ++b) {
            const int64_t o = b * d.L * d.H, m = lens[b] * d.H;
            const T *__restrict dtb = dt + o, *__restrict tsb = ts ? ts + o : nullptr;
            T* __restrict vb = pv + o;
            if (tsb)
                for (int64_t e = 0; e < m; ++e) vb[e] = dtb[e] * tsb[e] + btp[e];
            else
                for (int64_t e = 0; e < m; ++e) vb[e] = dtb[e] + btp[e];
            steps_flat(vb, m, tiled.A.data(), softplus, delta + o, a + o);
        }
    }
};

template <typename T>
int tissd_fwd(const T* x, const T* dt, const T* ts, const T* dt_bias, const T* A, const T* D, int d_per_head,
              int skip_delta, int softplus, const T* B, const T* C, const int64_t* len, Dims d, T* y, int nthreads) {
    const std::vector<int64_t> lens = valid_lengths(len, d.nb, d.L);
    const CallSteps<T> st(dt, ts, dt_bias, A, softplus, lens, d, nthreads);
    std::vector<T> Dhp;
    return Lib<T>::scan_fwd_checked(x, st.delta, st.a, B, C, lens.data(), channel_skip(D, d_per_head, d, Dhp),
                                    skip_delta, y, d.nb, d.L, d.H, d.P, d.G, d.n, nthreads);   // 1: y not finite
}

template <typename T>
void tissd_bwd(const T* gy, const T* x, const T* dt, const T* ts, const T* dt_bias, const T* A, const T* D,
               int d_per_head, int skip_delta, int softplus, const T* B, const T* C, const int64_t* len, Dims d, T* dx,
               T* ddt, T* dts, T* ddt_bias, T* dA, T* dB, T* dC, T* dD, int nthreads) {
    const std::vector<int64_t> lens = valid_lengths(len, d.nb, d.L);
    const CallSteps<T> st(dt, ts, dt_bias, A, softplus, lens, d, nthreads);
    const size_t count = size_t(d.nb) * d.L * d.H;
    T *ddelta = scratch<T>(9, count), *da = scratch<T>(10, count);
    const bool per_head = D && d_per_head;            // the scan's dD per channel, then summed per head
    std::vector<T> Dhp, dDhp(per_head ? size_t(d.d_inner()) : 0);
    Lib<T>::scan_bwd(x, st.delta, st.a, B, C, lens.data(), channel_skip(D, d_per_head, d, Dhp), skip_delta, gy, dx,
                     ddelta, da, dB, dC, per_head ? dDhp.data() : dD, d.nb, d.L, d.H, d.P, d.G, d.n, nthreads);
    if (per_head) head_sums(dDhp, d, dD);
    // the step sizes' chain (steps_chain_bwd), then ddt = dv ts (or dv), dts = dv dt
    const int64_t LH = d.L * d.H;
    steps_chain_bwd(ddelta, da, st.v, st.delta, st.tiled.A.data(), softplus, lens, d, nthreads, dA, ddt_bias,
                    [&](int64_t b, const T* dv) {
        const int64_t o = b * LH, m = lens[b] * d.H;
        const T *__restrict dtb = dt + o, *__restrict tsb = ts ? ts + o : nullptr;
        T *__restrict g_dt = ddt + o, *__restrict g_ts = dts ? dts + o : nullptr;
        if (tsb)
            for (int64_t e = 0; e < m; ++e) g_dt[e] = dv[e] * tsb[e];
        else
            std::copy(dv, dv + m, g_dt);
        if (g_ts)
            for (int64_t e = 0; e < m; ++e) g_ts[e] = dv[e] * dtb[e];
        std::fill(g_dt + m, g_dt + LH, T(0));                    // padded rows: zero gradients
        if (g_ts) std::fill(g_ts + m, g_ts + LH, T(0));
    });
}

}  // namespace

extern "C" {

#define MMM4REC_LAYER_ENTRIES(T, SUFFIX)                                                                              \
    void mmm4rec_time_encoding_fwd_##SUFFIX(const double* t, int is_gaps, int64_t nb, int64_t L, int64_t H,         \
                                            int64_t k, const T* const* params, double eps, T* out, int nthreads) {  \
        const TimeParams<T> q{params[0], params[1], params[2], params[3], params[4],                                \
                              params[5], params[6], params[7], params[8], params[9]};                               \
        time_encoding<T>(t, is_gaps, nb, L, H, k, q, eps, out, nthreads);                                           \
    }                                                                                                               \
    void mmm4rec_time_encoding_bwd_##SUFFIX(const double* t, int is_gaps, int64_t nb, int64_t L, int64_t H,         \
                                            int64_t k, const T* const* params, double eps, const T* dout,           \
                                            T* const* grads, int nthreads) {                                        \
        const TimeParams<T> q{params[0], params[1], params[2], params[3], params[4],                                \
                              params[5], params[6], params[7], params[8], params[9]};                               \
        time_encoding_bwd<T>(t, is_gaps, nb, L, H, k, q, eps, dout, grads, nthreads);                               \
    }                                                                                                               \
    int mmm4rec_ssd_core_fwd_##SUFFIX(const T* xbc, int64_t s_xbc, const T* z, const T* dt, int64_t s_zdt,           \
                                      const T* ts, const T* dt_bias, const T* A, const T* D, int skip_delta,        \
                                      const T* norm_w, int64_t group, double eps, const int64_t* len, int64_t nb,   \
                                      int64_t L, int64_t H, int64_t P, int64_t G, int64_t n, T* out, T* y_out,      \
                                      int nthreads) {                                                               \
        return core_fwd<T>(xbc, s_xbc, z, dt, s_zdt, ts, dt_bias, A, D, skip_delta, norm_w, group, eps, len,        \
                           Dims{nb, L, H, P, G, n}, out, y_out, nthreads);                                          \
    }                                                                                                               \
    void mmm4rec_ssd_core_bwd_##SUFFIX(const T* dout, const T* xbc, int64_t s_xbc, const T* z, const T* dt,         \
                                       int64_t s_zdt, const T* ts, const T* dt_bias, const T* A, const T* D,        \
                                       int skip_delta, const T* norm_w, int64_t group, double eps,                  \
                                       const int64_t* len, int64_t nb, int64_t L, int64_t H, int64_t P, int64_t G,  \
                                       int64_t n, const T* y, T* dxbc, T* dz, T* ddt, int64_t s_g, T* dts,           \
                                       T* ddt_bias, T* dA, T* dD, T* dnorm_w, int nthreads) {                       \
        core_bwd<T>(dout, xbc, s_xbc, z, dt, s_zdt, ts, dt_bias, A, D, skip_delta, norm_w, group, eps, len,         \
                    Dims{nb, L, H, P, G, n}, y, dxbc, dz, ddt, s_g, dts, ddt_bias, dA, dD, dnorm_w, nthreads);      \
    }

#define MMM4REC_CALL_ENTRIES(T, SUFFIX)                                                                               \
    int mmm4rec_tissd_fwd_##SUFFIX(const T* x, const T* dt, const T* ts, const T* dt_bias, const T* A, const T* D,   \
                                   int d_per_head, int skip_delta, int softplus, const T* B, const T* C,            \
                                   const int64_t* len, int64_t nb, int64_t L, int64_t H, int64_t P, int64_t G,      \
                                   int64_t n, T* y, int nthreads) {                                                 \
        return tissd_fwd<T>(x, dt, ts, dt_bias, A, D, d_per_head, skip_delta, softplus, B, C, len,                  \
                            Dims{nb, L, H, P, G, n}, y, nthreads);                                                  \
    }                                                                                                               \
    void mmm4rec_tissd_bwd_##SUFFIX(const T* gy, const T* x, const T* dt, const T* ts, const T* dt_bias, const T* A, \
                                    const T* D, int d_per_head, int skip_delta, int softplus, const T* B,           \
                                    const T* C, const int64_t* len, int64_t nb, int64_t L, int64_t H, int64_t P,    \
                                    int64_t G, int64_t n, T* dx, T* ddt, T* dts, T* ddt_bias, T* dA, T* dB, T* dC,  \
                                    T* dD, int nthreads) {                                                          \
        tissd_bwd<T>(gy, x, dt, ts, dt_bias, A, D, d_per_head, skip_delta, softplus, B, C, len,                     \
                     Dims{nb, L, H, P, G, n}, dx, ddt, dts, ddt_bias, dA, dB, dC, dD, nthreads);                    \
    }

MMM4REC_LAYER_ENTRIES(float, f32)
MMM4REC_LAYER_ENTRIES(double, f64)
MMM4REC_CALL_ENTRIES(float, f32)
MMM4REC_CALL_ENTRIES(double, f64)

}  // extern "C"
