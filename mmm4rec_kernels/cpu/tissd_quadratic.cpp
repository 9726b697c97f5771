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
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "thread_sums.h"

// How it is computed (same sums as above, in a cache- and SIMD-friendly order), per sequence b and group g (a
// sequence with at most kShort valid steps takes the short path described above forward_short instead):
//   * B_j is transposed once into Bt [n][j], so C_i . B_j for all j <= i is one FMA per k over contiguous j; it is
//     computed once per row and shared by the group's H/G heads.
//   * seg_i[j] (j < i) is kept per head as a running row: seg_i[j] = seg_{i-1}[j] + a_i, seg_i[i] = 0.  The same
//     additions as summing a_{j+1} .. a_i directly (all <= 0, no cancellation; never a difference of prefix sums,
//     which loses everything in fp32 for large time gaps), one vectorised pass per row instead of a serial chain.
//     exp(seg) is taken per entry (decay_exp_row), never as a product of exps (no error growth); decays below
//     e^-60 (fp64: e^-600) are 0 (no denormal products), on the short path too (row_exp).
//   * rows are processed R at a time: the forward's y_i = sum_j w_ij x_j and the backward's dx_j += sum_i md_ij gy_i
//     keep R rows of accumulators in SIMD registers (P a multiple of the vector width; other P: plain loops), so each
//     x_j / dx_j is loaded once per block; only pairs j <= i of each row are touched (the diagonal block row by row).
//   * backward: gy_i . x_j over j <= i from a transposed x [P][j] (R rows at once, vectorised over j); the head sums
//     Z_ij = sum_h G^h_ij exp(seg^h_ij) give dC_i = sum_j Z_ij B_j and dB_j += Z_ij C_i once per group (the same
//     row-block kernels as y and dx); da_k = sum_{j<k<=i} G_ij M_ij via prefix sums of the block's summed rows.
namespace {

template <typename T>
struct Dims {
    int64_t L, H, P, G, n;
    int64_t x(int64_t b, int64_t t, int64_t h) const { return ((b * L + t) * H + h) * P; }
    int64_t s(int64_t b, int64_t t, int64_t h) const { return (b * L + t) * H + h; }
    int64_t bc(int64_t b, int64_t t, int64_t g) const { return ((b * L + t) * G + g) * n; }
};

// one 64-byte SIMD vector of T (GCC / clang vector extension: one AVX-512 register, two or four elsewhere)
template <typename T>
struct Simd {
    typedef T v __attribute__((vector_size(64)));
    static constexpr int lanes = 64 / sizeof(T);
    static v load(const T* p) { v r; std::memcpy(&r, p, sizeof r); return r; }
    static void store(T* p, v r) { std::memcpy(p, &r, sizeof r); }
};

// y of the forward, dx, dB and dC of the backward from kStreamBytes on (activations.h, each output by its own size):
// the short path (fp32) writes their rows (with P = n = 16, one 64-byte row per step and head / group: a whole cache
// line) and the padded rows' zeros past the caches, and does not prefetch the next sequence's rows for writing.
// Measured at b 256, L 20, H 8, P 16 (y 2.6 MB; outputs preallocated, benchmarks/bench_native_ab.py --pairs 300):
// y and dx: forward 0.92x, 0.91x, backward 0.94x, 0.95x (two runs); then dB and dC (2.6 MB each): backward 0.88x,
// 0.89x, 0.87x (three runs); b 1, L 200 (not streamed) 1.00x.

// p[0..m) = 0, past the caches when `stream` (whole 64-byte lines; the ends plainly)
template <typename T>
inline void fill_zero(T* p, int64_t m, bool stream) {
    constexpr int VL = Simd<T>::lanes;
    int64_t e = 0;
    if (stream) {
        for (; e < m && (reinterpret_cast<uintptr_t>(p + e) & 63) != 0; ++e) p[e] = T(0);
        for (; e + VL <= m; e += VL) store_past_caches(p + e, typename Simd<T>::v{});
    }
    std::fill(p + e, p + m, T(0));
}

constexpr int R = 4;                                 // rows per block

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

// cb[t][j] = C_{rows[t]} . B_j for j <= rows[t] (computed up to rows[NR-1] rounded up to 2 vectors: entries past a
// row are junk, never read); Bt [n][Lp] (zero past the valid steps), Ci[t] = C_{rows[t]}; NR rows share each load
// one chunk of W vectors at column j0 of NR rows: out[t][j0 ..] = sum_k coef[t][k] M[k][j0 ..]  (M [m][Lp])
template <typename T, int NR, int W>
inline void rows_chunk(const T* M, int64_t Lp, int64_t m, const T* const* coef, int64_t j0, T* out) {
    using S = Simd<T>;
    using V = typename S::v;
    constexpr int VL = S::lanes;
    V acc[NR][W];
    for (int t = 0; t < NR; ++t)
        for (int w = 0; w < W; ++w) acc[t][w] = V{};
    for (int64_t k = 0; k < m; ++k) {
        V mv[W];
        for (int w = 0; w < W; ++w) mv[w] = S::load(M + k * Lp + j0 + w * VL);
        for (int t = 0; t < NR; ++t) {
            const T c = coef[t][k];
            for (int w = 0; w < W; ++w) acc[t][w] += c * mv[w];
        }
    }
    for (int t = 0; t < NR; ++t)
        for (int w = 0; w < W; ++w) S::store(out + t * Lp + j0 + w * VL, acc[t][w]);
}

// out[t][j] = coef[t] . M[:, j] for j < jend, rounded up to whole vectors (2 at a time; a last single one when it
// suffices: short sequences); entries past a row's own end are junk, never read.  Used for C_i . B_j (M = Bt) and
// gy_i . x_j (M = the transposed x).
template <typename T, int NR>
void rows_nr(const T* M, int64_t Lp, int64_t m, const T* const* coef, int64_t jend, T* out) {
    constexpr int VL = Simd<T>::lanes;
    for (int64_t j0 = 0; j0 < jend; j0 += 2 * VL) {
        if (jend - j0 <= VL) {
            rows_chunk<T, NR, 1>(M, Lp, m, coef, j0, out);
            break;
        }
        rows_chunk<T, NR, 2>(M, Lp, m, coef, j0, out);
    }
}

template <typename T>
void rows_dot(const T* M, int64_t Lp, int64_t m, const T* const* coef, int nr, int64_t jend, T* out) {
    switch (nr) {
        case 4: return rows_nr<T, 4>(M, Lp, m, coef, jend, out);
        case 3: return rows_nr<T, 3>(M, Lp, m, coef, jend, out);
        case 2: return rows_nr<T, 2>(M, Lp, m, coef, jend, out);
        default: return rows_nr<T, 1>(M, Lp, m, coef, jend, out);
    }
}

// y_{rows[t]} = sum_{j <= rows[t]} w[t][j] x_j  (t < NR, rows ascending; x_j at xh + j xs; w rows Lp apart)
template <typename T, int NV, int NR>
void y_rows_simd(const T* xh, int64_t xs, const T* w, int64_t Lp, const int64_t* rows, T* yh) {
    using S = Simd<T>;
    using V = typename S::v;
    constexpr int VL = S::lanes;
    V acc[NR][NV];
    for (int t = 0; t < NR; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] = V{};
    const int64_t j0 = rows[0];
    for (int64_t j = 0; j <= j0; ++j) {                 // pairs every row of the block has
        const T* xj = xh + j * xs;
        V xv[NV];
        for (int v = 0; v < NV; ++v) xv[v] = S::load(xj + v * VL);
        for (int t = 0; t < NR; ++t) {
            const T wt = w[t * Lp + j];
            for (int v = 0; v < NV; ++v) acc[t][v] += wt * xv[v];
        }
    }
    for (int t = 1; t < NR; ++t)                        // the rest of each row (the diagonal block)
        for (int64_t j = j0 + 1; j <= rows[t]; ++j) {
            const T wt = w[t * Lp + j];
            for (int v = 0; v < NV; ++v) acc[t][v] += wt * S::load(xh + j * xs + v * VL);
        }
    for (int t = 0; t < NR; ++t)
        for (int v = 0; v < NV; ++v) S::store(yh + rows[t] * xs + v * VL, acc[t][v]);
}

// dx_j += sum_t md[t][j] gy_t over j <= rows[t]
template <typename T, int NV, int NR>
void dx_rows_simd(T* dxh, int64_t xs, const T* md, int64_t Lp, const int64_t* rows, const T* const* gyr) {
    using S = Simd<T>;
    using V = typename S::v;
    constexpr int VL = S::lanes;
    V g[NR][NV];
    for (int t = 0; t < NR; ++t)
        for (int v = 0; v < NV; ++v) g[t][v] = S::load(gyr[t] + v * VL);
    const int64_t j0 = rows[0];
    for (int64_t j = 0; j <= j0; ++j) {
        T* dxj = dxh + j * xs;
        for (int v = 0; v < NV; ++v) {
            V d = S::load(dxj + v * VL);
            for (int t = 0; t < NR; ++t) d += md[t * Lp + j] * g[t][v];
            S::store(dxj + v * VL, d);
        }
    }
    for (int t = 1; t < NR; ++t)
        for (int64_t j = j0 + 1; j <= rows[t]; ++j) {
            T* dxj = dxh + j * xs;
            const T m = md[t * Lp + j];
            for (int v = 0; v < NV; ++v) S::store(dxj + v * VL, S::load(dxj + v * VL) + m * g[t][v]);
        }
}

template <typename T>
void y_rows_plain(const T* xh, int64_t xs, int64_t P, const T* w, int64_t Lp, const int64_t* rows, int nr, T* yh) {
    for (int t = 0; t < nr; ++t) {
        T* __restrict yi = yh + rows[t] * xs;
        for (int64_t j = 0; j <= rows[t]; ++j) {
            const T* __restrict xj = xh + j * xs;
            const T wt = w[t * Lp + j];
            for (int64_t p = 0; p < P; ++p) yi[p] += wt * xj[p];
        }
    }
}

template <typename T>
void dx_rows_plain(T* dxh, int64_t xs, int64_t P, const T* md, int64_t Lp, const int64_t* rows, int nr,
                   const T* const* gyr) {
    for (int t = 0; t < nr; ++t) {
        const T* __restrict g = gyr[t];
        for (int64_t j = 0; j <= rows[t]; ++j) {
            T* __restrict dxj = dxh + j * xs;
            const T m = md[t * Lp + j];
            for (int64_t p = 0; p < P; ++p) dxj[p] += m * g[p];
        }
    }
}

template <typename T, int NV>
void y_rows_nv(const T* xh, int64_t xs, const T* w, int64_t Lp, const int64_t* rows, int nr, T* yh) {
    switch (nr) {
        case 4: return y_rows_simd<T, NV, 4>(xh, xs, w, Lp, rows, yh);
        case 3: return y_rows_simd<T, NV, 3>(xh, xs, w, Lp, rows, yh);
        case 2: return y_rows_simd<T, NV, 2>(xh, xs, w, Lp, rows, yh);
        default: return y_rows_simd<T, NV, 1>(xh, xs, w, Lp, rows, yh);
    }
}

template <typename T, int NV>
void dx_rows_nv(T* dxh, int64_t xs, const T* md, int64_t Lp, const int64_t* rows, int nr, const T* const* gyr) {
    switch (nr) {
        case 4: return dx_rows_simd<T, NV, 4>(dxh, xs, md, Lp, rows, gyr);
        case 3: return dx_rows_simd<T, NV, 3>(dxh, xs, md, Lp, rows, gyr);
        case 2: return dx_rows_simd<T, NV, 2>(dxh, xs, md, Lp, rows, gyr);
        default: return dx_rows_simd<T, NV, 1>(dxh, xs, md, Lp, rows, gyr);
    }
}

// y rows (zero on entry) of one head; nr <= R rows (also dC: x = B, P = n)
template <typename T>
void y_rows(const T* xh, int64_t xs, int64_t P, const T* w, int64_t Lp, const int64_t* rows, int nr, T* yh) {
    constexpr int VL = Simd<T>::lanes;
    if (P == VL) return y_rows_nv<T, 1>(xh, xs, w, Lp, rows, nr, yh);
    if (P == 2 * VL) return y_rows_nv<T, 2>(xh, xs, w, Lp, rows, nr, yh);
    if (P == 4 * VL) return y_rows_nv<T, 4>(xh, xs, w, Lp, rows, nr, yh);
    y_rows_plain(xh, xs, P, w, Lp, rows, nr, yh);
}

template <typename T>
void dx_rows(T* dxh, int64_t xs, int64_t P, const T* md, int64_t Lp, const int64_t* rows, int nr,
             const T* const* gyr) {
    constexpr int VL = Simd<T>::lanes;
    if (P == VL) return dx_rows_nv<T, 1>(dxh, xs, md, Lp, rows, nr, gyr);
    if (P == 2 * VL) return dx_rows_nv<T, 2>(dxh, xs, md, Lp, rows, nr, gyr);
    if (P == 4 * VL) return dx_rows_nv<T, 4>(dxh, xs, md, Lp, rows, nr, gyr);
    dx_rows_plain(dxh, xs, P, md, Lp, rows, nr, gyr);
}

// e[j] = exp(s[j]) for the segment sums of a row of the blocked path, j < n, n a multiple of the vector width
// (lanes<T>::n divides Simd<T>::lanes), 0 below e^-60 (fp64: e^-600).  A row with a decay below that bound takes
// activations.h's decay_exp (the inlined vector exp): a loop of exp_nonpos hands such lanes to libmvec's scalar path
// (GCC folds its clamp, activations.h), which made a strong-decay scan ~6x slower than a weak-decay one
// (benchmarks/bench_scan_decay.py), and with the bound at the normal range, -87, the denormal products still cost
// ~3x.  Rows all in range take libmvec's vector exp (its fast path: no select for GCC to fold).  The short path's
// rows of one or two vectors take decay_exp always (row_exp): this row check costs more than it saves there.
template <typename T>
inline void decay_exp_row(const T* s, int64_t n, T* e) {
    typedef typename lanes<T>::v V;
    constexpr int W = lanes<T>::n;
    const T lo = sizeof(T) == 4 ? T(-60) : T(-600);
    V bottom = V{};                                       // the smallest s of the row (NaN ignored)
    for (int64_t j = 0; j < n; j += W) {
        V v;
        std::memcpy(&v, s + j, sizeof v);
        bottom = v < bottom ? v : bottom;
    }
    if (!any_positive<T>(lo - bottom)) {                 // every decay in range: libmvec's vector exp (its fast
        for (int64_t j = 0; j < n; ++j) e[j] = std::exp(s[j]);   // path: no select for GCC to fold)
        return;
    }
    decay_exp(s, n, e);
}

// out[k Lp + j] = src[j stride + k] for k < m, j < Lp (0 for j >= Lb): m columns of Lb rows transposed (below)
template <typename T>
void transpose_cols(const T* src, int64_t stride, int64_t Lb, int64_t m, T* out, int64_t Lp);

// per-thread work buffers, sized for one (b, g) of r = H / G heads; Lp = L rounded up to 2 vectors
template <typename T>
struct Work {
    int64_t Lp;
    std::vector<T> Bt, cb, seg, dl, al, w;
    Work(const Dims<T>& d, int64_t r) : Lp((d.L + 2 * Simd<T>::lanes - 1) / (2 * Simd<T>::lanes) * (2 * Simd<T>::lanes)) {
        Bt.assign(size_t(d.n) * Lp, T(0));
        cb.assign(size_t(R) * Lp, T(0));
        seg.assign(size_t(r) * Lp, T(0));
        dl.assign(size_t(r) * Lp, T(0));
        al.assign(size_t(r) * Lp, T(0));
    }
    // Bt <- B_j^T of group g (zero past Lb); per head q: delta / a rows, seg cleared
    void load(const T* B, const T* delta, const T* a, int64_t b, int64_t g, int64_t r, int64_t Lb, const Dims<T>& d) {
        const int64_t sb = d.G * d.n, ss = d.H;              // row strides of B and of delta / a
        transpose_cols(B + d.bc(b, 0, g), sb, Lb, d.n, Bt.data(), Lp);
        std::fill(seg.begin(), seg.end(), T(0));
        for (int64_t q = 0; q < r; ++q) {
            const T* __restrict dq = delta + d.s(b, 0, g * r + q);
            const T* __restrict aq = a + d.s(b, 0, g * r + q);
            T* __restrict dlq = dl.data() + q * Lp;
            T* __restrict alq = al.data() + q * Lp;
            for (int64_t j = 0; j < Lb; ++j) {
                dlq[j] = dq[j * ss];
                alq[j] = aq[j * ss];
            }
        }
    }
};

// ------------------------------------------------------------------------------------------------ short sequences
// An fp32 sequence with len <= kShort valid steps (most of a recommendation batch) takes a path without the blocked
// one's per-(b, g) setup (buffers of L rounded up to 2 vectors, rows in blocks of R): a row over j < len is NW SIMD
// vectors (W = NW * VL lanes, the least that hold len), kept in registers.  Per row i: seg_i = select(j < i,
// seg_{i-1} + a_i, 0) (the same additions as the blocked path; lanes j >= i stay 0, so no lane ever holds a value
// of a step after i), one vector exp per vector up to i, and every pairwise product is selected (not multiplied by
// a mask) to j <= i.  Each output row is written once, whole (no zero-fill of what is overwritten); rows past len
// are zeroed.  The forward reads x_j, B_j, C_i, delta_j, a_j of steps j <= i only.  Backward: gx_i = gy_i . x_j
// over j from a transposed x [P][W]; M, the head sums Z and md = M delta are kept as [len][W] matrices, so dx_j
// = sum_{i>=j} md_ij gy_i and dB_j = sum_{i>=j} Z_ij C_i are one pass per output row over the rows i >= j that
// have a nonzero gy (the exact skip: inactive rows are never read); da_k = sum_{i>=k} sum_{j<k} dseg_ij adds each
// row's exclusive prefix sum over j (a log-step scan inside the vector) at lanes k <= i.
constexpr int64_t kShort = 32;
// fp32 only for now: in fp64 (P = n = 16: two vectors per x_j, the lane-by-lane transposes) it measured slower than
// the blocked path at b 256, L 20, H 8 (fwd ~1.4x): fp64 sequences take the blocked path at every length
template <typename T>
constexpr int64_t kShortMax = sizeof(T) == 4 ? kShort : 0;

template <typename T>
struct Lanes {                                        // integer lanes as wide as T's: the vector selects' masks
    typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
    typedef I v __attribute__((vector_size(64)));
};

// marks |= lanes of v that are NaN / inf (exponent bits all ones; from the bits, as all_finite)
template <typename T>
inline void mark_nonfinite(typename Simd<T>::v v, typename Lanes<T>::v& marks) {
    typedef typename Lanes<T>::I I;
    constexpr I m = sizeof(T) == 4 ? I(0x7f800000) : I(0x7ff0000000000000ll);
    typename Lanes<T>::v bits;
    std::memcpy(&bits, &v, sizeof bits);
    marks |= (bits & m) == m;
}

// v shifted up by S lanes (lane k gets v[k - S], the first S lanes 0)
template <typename T, int S>
inline typename Simd<T>::v shift_up(typename Simd<T>::v v) {
    constexpr int VL = Simd<T>::lanes;
    typename Lanes<T>::v idx;
    for (int k = 0; k < VL; ++k) idx[k] = k >= S ? k - S : VL + k;      // VL + k: a lane of the zero vector
    return __builtin_shuffle(v, typename Simd<T>::v{}, idx);
}

// out[k] = sum_{j<k} v[j] over the first nv vectors of a row (a log-step scan in each vector, carried across)
template <typename T, int NW>
inline void exclusive_prefix(const typename Simd<T>::v* v, int nv, typename Simd<T>::v* out) {
    constexpr int VL = Simd<T>::lanes;
    T carry = T(0);
    for (int w = 0; w < NW && w < nv; ++w) {
        typename Simd<T>::v s = shift_up<T, 1>(v[w]);
        s += shift_up<T, 1>(s);
        s += shift_up<T, 2>(s);
        s += shift_up<T, 4>(s);
        if constexpr (VL > 8) s += shift_up<T, 8>(s);
        s += carry;
        out[w] = s;
        carry = s[VL - 1] + v[w][VL - 1];
    }
}

// step t of an index list; idx null: the steps 0, 1, 2, ... themselves (no index loads)
inline int step_at(const int* idx, int t) { return idx ? idx[t] : t; }

// out[0..P) = sum_t w[idx[t] ws] src[idx[t] stride + 0..P)  (+ Dh[p] s xd[p] if Dh): one output row, written whole;
// idx null: the steps 0 .. cnt-1 themselves
template <typename T>
void combine_any(const T* w, int64_t ws, const int* idx, int cnt, const T* src, int64_t stride, int64_t P,
                 const T* Dh, T s, const T* xd, T* out) {
    using S = Simd<T>;
    using V = typename S::v;
    constexpr int VL = S::lanes;
    int64_t p = 0;
    for (; p + 2 * VL <= P; p += 2 * VL) {
        V a0{}, a1{};
        for (int t = 0; t < cnt; ++t) {
            const T wt = w[step_at(idx, t) * ws];
            const T* sj = src + step_at(idx, t) * stride + p;
            a0 += wt * S::load(sj);
            a1 += wt * S::load(sj + VL);
        }
        if (Dh) {
            a0 += S::load(Dh + p) * s * S::load(xd + p);
            a1 += S::load(Dh + p + VL) * s * S::load(xd + p + VL);
        }
        S::store(out + p, a0);
        S::store(out + p + VL, a1);
    }
    if (p + VL <= P) {                                 // two chains (even / odd t): FMA latency, not throughput
        V a0{}, a1{};
        int t = 0;
        for (; t + 1 < cnt; t += 2) {
            a0 += w[step_at(idx, t) * ws] * S::load(src + step_at(idx, t) * stride + p);
            a1 += w[step_at(idx, t + 1) * ws] * S::load(src + step_at(idx, t + 1) * stride + p);
        }
        if (t < cnt) a0 += w[step_at(idx, t) * ws] * S::load(src + step_at(idx, t) * stride + p);
        a0 += a1;
        if (Dh) a0 += S::load(Dh + p) * s * S::load(xd + p);
        S::store(out + p, a0);
        p += VL;
    }
    if (p < P) {                                       // P not a multiple of the vector width: the rest lane by lane
        T acc[VL] = {};
        for (int t = 0; t < cnt; ++t) {
            const T wt = w[step_at(idx, t) * ws];
            const T* sj = src + step_at(idx, t) * stride;
            for (int64_t e = p; e < P; ++e) acc[e - p] += wt * sj[e];
        }
        for (int64_t e = p; e < P; ++e) out[e] = acc[e - p] + (Dh ? Dh[e] * s * xd[e] : T(0));
    }
}

// combine_any inlined for rows of one vector (P = VL: the common head size of fp32 / the short path's hot loop);
// marks (if given) |= the row's NaN / inf lanes (mark_nonfinite: checked in registers, before a streamed store)
template <typename T>
inline __attribute__((always_inline)) void combine(const T* w, int64_t ws, const int* idx, int cnt, const T* src,
                                                   int64_t stride, int64_t P, const T* Dh, T s, const T* xd, T* out,
                                                   bool stream = false, typename Lanes<T>::v* marks = nullptr) {
    using S = Simd<T>;
    using V = typename S::v;
    if (P != S::lanes) {
        combine_any(w, ws, idx, cnt, src, stride, P, Dh, s, xd, out);
        if (marks && !all_finite(out, P)) (*marks)[0] = -1;
        return;
    }
    V a0{}, a1{};
    int t = 0;
    for (; t + 1 < cnt; t += 2) {
        a0 += w[step_at(idx, t) * ws] * S::load(src + step_at(idx, t) * stride);
        a1 += w[step_at(idx, t + 1) * ws] * S::load(src + step_at(idx, t + 1) * stride);
    }
    if (t < cnt) a0 += w[step_at(idx, t) * ws] * S::load(src + step_at(idx, t) * stride);
    a0 += a1;
    if (Dh) a0 += S::load(Dh) * s * S::load(xd);
    if (marks) mark_nonfinite<T>(a0, *marks);
    if (stream)
        store_past_caches(out, a0);
    else
        S::store(out, a0);
}

// per-thread buffers of the short path: rows of at most kShort lanes, 64-byte aligned
template <typename T>
struct ShortWork {
    typedef typename Simd<T>::v V;
    static constexpr int64_t WM = kShort;              // a multiple of the vector width of fp32 and fp64
    std::vector<V> Bt, xT, cb, Z, md;
    bool stream = false;                               // y / dx rows past the caches (kStreamBytes)
    bool stream_bc = false;                            // dB / dC rows past the caches (kStreamBytes)
    typename Lanes<T>::v marks{};                      // the forward's y rows: lanes that held NaN / inf
    ShortWork(const Dims<T>& d)
        : Bt(size_t(d.n) * WM / Simd<T>::lanes), xT(size_t(d.P) * WM / Simd<T>::lanes),
          cb(size_t(WM) * WM / Simd<T>::lanes), Z(cb.size()), md(cb.size()) {}
    static T* at(std::vector<V>& v) { return reinterpret_cast<T*>(v.data()); }
};

// a step-strided column (delta / a of one head, stride H) into W lanes, 0 past Lb
template <typename T>
inline void gather_steps(const T* src, int64_t stride, int64_t Lb, int W, T* out) {
    for (int64_t j = 0; j < Lb; ++j) out[j] = src[j * stride];
    for (int64_t j = Lb; j < W; ++j) out[j] = T(0);
}

// one stage of an in-register transpose of VL rows of VL lanes: for rows i with bit Dd clear and i + Dd, swap the
// off-diagonal blocks of Dd lanes (the stages for Dd = VL/2 .. 1 swap each bit of the row and lane index)
template <typename T, int Dd>
inline void transpose_stage(typename Simd<T>::v* r) {
    constexpr int VL = Simd<T>::lanes;
    typename Lanes<T>::v lo, hi;
    for (int k = 0; k < VL; ++k) {
        lo[k] = (k & Dd) ? VL + k - Dd : k;            // row i: its lanes, then row i + Dd's lanes - Dd
        hi[k] = (k & Dd) ? VL + k : k + Dd;            // row i + Dd: row i's lanes + Dd, then its own
    }
    for (int i = 0; i < VL; ++i)
        if (!(i & Dd)) {
            const typename Simd<T>::v a = r[i], b = r[i + Dd];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + Dd] = __builtin_shuffle(a, b, hi);
        }
}

// out[k][w VL + j] = src_{w VL + j}[k] for k < VL, the rows src_j = src + j stride for j < Lb (0 past it): a block of
// VL steps x VL columns (B_j with n = VL, x_j with P = VL) transposed with vector shuffles instead of lane by lane
template <typename T, int NW>
inline void transpose_rows(const T* src, int64_t stride, int64_t Lb, T* out) {
    using S = Simd<T>;
    constexpr int VL = S::lanes, W = NW * VL;
    for (int w = 0; w < NW; ++w) {
        typename S::v r[VL];
        for (int k = 0; k < VL; ++k) r[k] = w * VL + k < Lb ? S::load(src + (w * VL + k) * stride) : typename S::v{};
        if constexpr (VL > 8) transpose_stage<T, 8>(r);
        transpose_stage<T, 4>(r);
        transpose_stage<T, 2>(r);
        transpose_stage<T, 1>(r);
        for (int k = 0; k < VL; ++k) S::store(out + k * W + w * VL, r[k]);
    }
}

template <typename T>
void transpose_cols(const T* src, int64_t stride, int64_t Lb, int64_t m, T* out, int64_t Lp) {
    using S = Simd<T>;
    constexpr int VL = S::lanes;
    if (m % VL || Lp % VL) {                              // lane by lane
        for (int64_t k = 0; k < m; ++k) {
            T* __restrict ok = out + k * Lp;
            for (int64_t j = 0; j < Lb; ++j) ok[j] = src[j * stride + k];
            std::fill(ok + Lb, ok + Lp, T(0));
        }
        return;
    }
    for (int64_t k0 = 0; k0 < m; k0 += VL)                // blocks of VL rows x VL columns, in registers
        for (int64_t j0 = 0; j0 < Lp; j0 += VL) {
            typename S::v r[VL];
            for (int k = 0; k < VL; ++k)
                r[k] = j0 + k < Lb ? S::load(src + (j0 + k) * stride + k0) : typename S::v{};
            if constexpr (VL > 8) transpose_stage<T, 8>(r);
            transpose_stage<T, 4>(r);
            transpose_stage<T, 2>(r);
            transpose_stage<T, 1>(r);
            for (int k = 0; k < VL; ++k) S::store(out + (k0 + k) * Lp + j0, r[k]);
        }
}

// dst[k] += sum_{j<k} v[j] for k <= m: the in-vector log-step scan of exclusive_prefix on whole vectors, carried
// across them, then lane by lane (a serial running sum is one add's latency per element)
template <typename T>
inline void add_exclusive_prefix(const T* v, int64_t m, T* dst) {
    using S = Simd<T>;
    constexpr int VL = S::lanes;
    T carry = T(0);
    int64_t k0 = 0;
    for (; k0 + VL <= m; k0 += VL) {
        const typename S::v x = S::load(v + k0);
        typename S::v s = shift_up<T, 1>(x);
        s += shift_up<T, 1>(s);
        s += shift_up<T, 2>(s);
        s += shift_up<T, 4>(s);
        if constexpr (VL > 8) s += shift_up<T, 8>(s);
        s += carry;
        S::store(dst + k0, S::load(dst + k0) + s);
        carry = s[VL - 1] + x[VL - 1];
    }
    for (int64_t k = k0; k <= m; ++k) {
        dst[k] += carry;
        if (k < m) carry += v[k];
    }
}

// Bt[k][j] = B_j[k] (rows of W lanes, 0 past Lb) and cb[i][j] = C_i . B_j for i < Lb (all W lanes: junk past i)
template <typename T, int NW>
void short_cb(const T* Bg, const T* Cg, int64_t sb, int64_t n, int64_t Lb, T* Bt, T* cb) {
    using S = Simd<T>;
    using V = typename S::v;
    constexpr int VL = S::lanes, W = NW * VL;
    if (n == VL) {
        transpose_rows<T, NW>(Bg, sb, Lb, Bt);
    } else {
        for (int64_t k = 0; k < n; ++k)
            for (int w = 0; w < NW; ++w) S::store(Bt + k * W + w * VL, V{});
        for (int64_t j = 0; j < Lb; ++j)
            for (int64_t k = 0; k < n; ++k) Bt[k * W + j] = Bg[j * sb + k];
    }
    // 4 rows share each Bt load; with one vector a row (NW 1) each row sums even and odd k apart (8 FMA chains in
    // flight for two FMA pipes; measured 0.99x fwd and bwd at b 256, L 20; blocks of 8 rows: fwd 1.03x)
    constexpr int KS = NW == 1 ? 2 : 1;
    int64_t i = 0;
    for (; i + 4 <= Lb; i += 4) {
        V acc[KS][4][NW] = {};
        int64_t k = 0;
        for (; k + KS <= n; k += KS)
            for (int u = 0; u < KS; ++u)
                for (int w = 0; w < NW; ++w) {
                    const V bt = S::load(Bt + (k + u) * W + w * VL);
                    for (int t = 0; t < 4; ++t) acc[u][t][w] += Cg[(i + t) * sb + k + u] * bt;
                }
        for (; k < n; ++k)
            for (int w = 0; w < NW; ++w) {
                const V bt = S::load(Bt + k * W + w * VL);
                for (int t = 0; t < 4; ++t) acc[0][t][w] += Cg[(i + t) * sb + k] * bt;
            }
        for (int t = 0; t < 4; ++t)
            for (int w = 0; w < NW; ++w) {
                V sum = acc[0][t][w];
                for (int u = 1; u < KS; ++u) sum += acc[u][t][w];
                S::store(cb + (i + t) * W + w * VL, sum);
            }
    }
    for (; i < Lb; ++i) {                              // the last rows: 4 chains each (k mod 4)
        const T* ci = Cg + i * sb;
        V acc[4][NW] = {};
        int64_t k = 0;
        for (; k + 4 <= n; k += 4)
            for (int u = 0; u < 4; ++u)
                for (int w = 0; w < NW; ++w) acc[u][w] += ci[k + u] * S::load(Bt + (k + u) * W + w * VL);
        for (; k < n; ++k)
            for (int w = 0; w < NW; ++w) acc[0][w] += ci[k] * S::load(Bt + k * W + w * VL);
        for (int w = 0; w < NW; ++w) S::store(cb + i * W + w * VL, (acc[0][w] + acc[1][w]) + (acc[2][w] + acc[3][w]));
    }
}

// The next sequence's memory, prefetched while this one is computed (its inputs are read from DRAM / L3 and its
// outputs written there: without it the short path waits on misses), a G-th per group (a burst of misses would
// stall on the fill buffers): its valid steps of the inputs (read), every row of the outputs (written: prefetchw)
struct Ahead {
    const char* p[10];
    int64_t bytes[10];
    bool write[10];
    int n = 0;
    template <typename T>
    void add(const T* ptr, int64_t count, bool w) {
        p[n] = reinterpret_cast<const char*>(ptr);
        bytes[n] = count * int64_t(sizeof(T));
        write[n++] = w;
    }
    // the inputs both directions read of sequence b (its valid steps): x, B, C, delta, a
    template <typename T>
    void inputs(const T* x, const T* B, const T* C, const T* delta, const T* a, const int64_t* len, int64_t b,
                const Dims<T>& d) {
        const int64_t Lb = valid_steps(len, b, d.L), bc = Lb * d.G * d.n, st = Lb * d.H;
        add(x + d.x(b, 0, 0), Lb * d.H * d.P, false);
        add(B + d.bc(b, 0, 0), bc, false);
        add(C + d.bc(b, 0, 0), bc, false);
        add(delta + d.s(b, 0, 0), st, false);
        add(a + d.s(b, 0, 0), st, false);
    }
    void part(int64_t k, int64_t parts) const {
        for (int r = 0; r < n; ++r)
            for (int64_t o = bytes[r] * k / parts / 64 * 64; o < bytes[r] * (k + 1) / parts; o += 64) {
                if (write[r])
                    __builtin_prefetch(p[r] + o, 1);
                else
                    __builtin_prefetch(p[r] + o, 0);
            }
    }
};

// e[j] = exp(seg[j]) for the first nv vectors (activations.h: decay_exp, inlined: no call into libmvec per row, 0
// below e^-60 as on the blocked path, so strong decay costs what weak decay does)
template <typename T, int NW>
inline void row_exp(const typename Simd<T>::v* seg, int nv, typename Simd<T>::v* e) {
    constexpr int VL = Simd<T>::lanes;
    for (int w = 0; w < NW; ++w) {
        if (w >= nv) break;
        alignas(64) T s[VL], r[VL];
        Simd<T>::store(s, seg[w]);
        decay_exp(s, VL, r);
        e[w] = Simd<T>::load(r);
    }
}

template <typename T, int NW>
void forward_short(const T* x, const T* delta, const T* a, const T* B, const T* C, const T* D, int skip_delta, T* y,
                   int64_t b, int64_t Lb, const Ahead& next, const Dims<T>& d, ShortWork<T>& sw) {
    using S = Simd<T>;
    using V = typename S::v;
    using I = typename Lanes<T>::v;
    constexpr int VL = S::lanes, W = NW * VL;
    const int64_t r = d.H / d.G, xs = d.H * d.P, sb = d.G * d.n;
    T *Bt = ShortWork<T>::at(sw.Bt), *cb = ShortWork<T>::at(sw.cb), *wr = ShortWork<T>::at(sw.md);
    I lane[NW];
    for (int w = 0; w < NW; ++w)
        for (int k = 0; k < VL; ++k) lane[w][k] = w * VL + k;
    alignas(64) T dl[W], al[W];
    typename Lanes<T>::v marks{};                    // in a register (sw.marks in memory: a chain through the store)
    for (int64_t g = 0; g < d.G; ++g) {
        next.part(g, d.G);
        short_cb<T, NW>(B + d.bc(b, 0, g), C + d.bc(b, 0, g), sb, d.n, Lb, Bt, cb);
        for (int64_t q = 0; q < r; ++q) {
            const int64_t h = g * r + q;
            gather_steps(delta + d.s(b, 0, h), d.H, Lb, W, dl);
            gather_steps(a + d.s(b, 0, h), d.H, Lb, W, al);
            V seg[NW] = {}, e[NW];
            for (int64_t i = 0; i < Lb; ++i) {
                const int nv = int(i / VL) + 1;               // vectors holding j <= i
                const I ii = I{} + typename Lanes<T>::I(i);
                for (int w = 0; w < NW; ++w) seg[w] = lane[w] < ii ? seg[w] + al[i] : V{};
                row_exp<T, NW>(seg, nv, e);
                for (int w = 0; w < nv && w < NW; ++w)      // w_ij = (C_i . B_j) exp(seg_ij) delta_j, j <= i
                    S::store(wr + i * W + w * VL,
                             lane[w] <= ii ? S::load(cb + i * W + w * VL) * e[w] * S::load(dl + w * VL) : V{});
            }
            // y_i = sum_j w_ij x_j once all rows are stored (their lanes read back one by one: no load waits on a
            // store of the same row still in flight)
            for (int64_t i = 0; i < Lb; ++i) {
                const T si = skip_delta ? dl[i] : T(1);
                combine(wr + i * W, 1, (const int*)nullptr, int(i + 1), x + d.x(b, 0, h), xs, d.P,
                        D ? D + h * d.P : nullptr, si, x + d.x(b, i, h), y + d.x(b, i, h), sw.stream, &marks);
            }
        }
    }
    sw.marks |= marks;
}

template <typename T, int NW>
void backward_short(const T* x, const T* delta, const T* a, const T* B, const T* C, const T* D, int skip_delta,
                    const T* gy, T* dx, T* ddelta, T* da, T* dB, T* dC, double* dDt, int64_t b, int64_t Lb,
                    const Ahead& next, const Dims<T>& d, ShortWork<T>& sw) {
    using S = Simd<T>;
    using V = typename S::v;
    using I = typename Lanes<T>::v;
    constexpr int VL = S::lanes, W = NW * VL;
    const int64_t r = d.H / d.G, xs = d.H * d.P, sb = d.G * d.n;
    T *Bt = ShortWork<T>::at(sw.Bt), *cb = ShortWork<T>::at(sw.cb), *Z = ShortWork<T>::at(sw.Z),
      *md = ShortWork<T>::at(sw.md), *xT = ShortWork<T>::at(sw.xT);
    I lane[NW];
    for (int w = 0; w < NW; ++w)
        for (int k = 0; k < VL; ++k) lane[w][k] = w * VL + k;
    alignas(64) T dl[W], al[W], dd[W], dak[W], dskip[W];
    int rows[W], nrows;                                 // rows active in any head of the group / in head q
    unsigned char any[W];
    int act[W], na;
    for (int64_t g = 0; g < d.G; ++g) {
        next.part(g, d.G);
        short_cb<T, NW>(B + d.bc(b, 0, g), C + d.bc(b, 0, g), sb, d.n, Lb, Bt, cb);
        for (int64_t i = 0; i < Lb; ++i)
            for (int w = 0; w < NW; ++w) S::store(Z + i * W + w * VL, V{});
        std::fill(any, any + W, 0);
        for (int64_t q = 0; q < r; ++q) {
            const int64_t h = g * r + q;
            const T* xh = x + d.x(b, 0, h);
            const T* gyh = gy + d.x(b, 0, h);
            gather_steps(delta + d.s(b, 0, h), d.H, Lb, W, dl);
            gather_steps(a + d.s(b, 0, h), d.H, Lb, W, al);
            if (d.P == VL) {                                // xT[p][j] = x_j[p], 0 past Lb
                transpose_rows<T, NW>(xh, xs, Lb, xT);
            } else {
                for (int64_t p = 0; p < d.P; ++p)
                    for (int w = 0; w < NW; ++w) S::store(xT + p * W + w * VL, V{});
                for (int64_t j = 0; j < Lb; ++j)
                    for (int64_t p = 0; p < d.P; ++p) xT[p * W + j] = xh[j * xs + p];
            }
            V seg[NW] = {}, ddv[NW] = {}, dav[NW] = {}, e[NW], gx[NW], ds[NW], pre[NW];
            constexpr int ND = VL / 8;                    // dD of this head's rows (P = VL) in registers, added
            d8 dsum[ND] = {};                             // to the thread's sums after the rows
            na = 0;
            for (int64_t i = 0; i < Lb; ++i) {
                const I ii = I{} + typename Lanes<T>::I(i);
                for (int w = 0; w < NW; ++w) seg[w] = lane[w] < ii ? seg[w] + al[i] : V{};   // every row advances seg
                const T* gyi = gyh + i * xs;
                dskip[i] = T(0);
                if (!any_nonzero(gyi, d.P)) continue;        // a zero gy row adds exactly 0: skipped
                act[na++] = int(i);
                any[i] = 1;
                const int nv = int(i / VL) + 1;
                row_exp<T, NW>(seg, nv, e);
                for (int w = 0; w < NW; ++w) gx[w] = V{};
                V gx1[NW] = {};                              // gx_ij = gy_i . x_j (two chains: even / odd p)
                int64_t p = 0;
                for (; p + 1 < d.P; p += 2)
                    for (int w = 0; w < nv && w < NW; ++w) {
                        gx[w] += gyi[p] * S::load(xT + p * W + w * VL);
                        gx1[w] += gyi[p + 1] * S::load(xT + (p + 1) * W + w * VL);
                    }
                for (int w = 0; w < nv && w < NW; ++w)
                    gx[w] += (p < d.P ? gyi[p] * S::load(xT + p * W + w * VL) : V{}) + gx1[w];
                for (int w = 0; w < nv && w < NW; ++w) {
                    const auto keep = lane[w] <= ii;
                    const V dlw = S::load(dl + w * VL);
                    const V m = S::load(cb + i * W + w * VL) * e[w];       // M_ij
                    const V Gij = gx[w] * dlw;                             // dL / dM_ij
                    ddv[w] += keep ? m * gx[w] : V{};
                    S::store(Z + i * W + w * VL, S::load(Z + i * W + w * VL) + (keep ? Gij * e[w] : V{}));
                    ds[w] = keep ? Gij * m : V{};                          // dL / dseg_ij
                    S::store(md + i * W + w * VL, keep ? m * dlw : V{});
                }
                exclusive_prefix<T, NW>(ds, nv, pre);       // da_k += sum_{j<k} dseg_ij for k <= i
                for (int w = 0; w < nv && w < NW; ++w) dav[w] += lane[w] <= ii ? pre[w] : V{};
                if (D) {                                     // skip D s_i x_i
                    const T* xi = xh + i * xs;
                    const T* Dh = D + h * d.P;
                    const T si = skip_delta ? dl[i] : T(1);
                    double* dDh = dDt + h * d.P;
                    T gDx = T(0);
                    if (d.P == VL) {                         // one vector; dD's sums in double, 8 lanes at a time
                        const V gv = S::load(gyi), xv = S::load(xi), gxp = gv * xv;
                        const V dg = S::load(Dh) * gxp;
                        for (int k = 0; k < VL; ++k) gDx += dg[k];
                        for (int k0 = 0; k0 < VL; k0 += 8)
                            dsum[k0 / 8] += double(si) * (load8_double(gyi + k0) * load8_double(xi + k0));
                    } else {
                        for (int64_t p = 0; p < d.P; ++p) {
                            gDx += Dh[p] * gyi[p] * xi[p];
                            dDh[p] += double(si) * double(gyi[p]) * double(xi[p]);
                        }
                    }
                    if (skip_delta) dskip[i] = gDx;
                }
            }
            if (D && d.P == VL)
                for (int k0 = 0; k0 < VL; k0 += 8) {
                    d8 acc;
                    std::memcpy(&acc, dDt + h * d.P + k0, sizeof acc);
                    acc += dsum[k0 / 8];
                    std::memcpy(dDt + h * d.P + k0, &acc, sizeof acc);
                }
            // dx_j = sum_{active i >= j} md_ij gy_i  (+ D s_j gy_j if j is active)
            for (int64_t j = 0, t = 0; j < Lb; ++j) {
                while (t < na && act[t] < j) ++t;
                const bool aj = t < na && act[t] == j;
                combine(md + j, W, act + t, int(na - t), gyh, xs, d.P, D && aj ? D + h * d.P : nullptr,
                        skip_delta ? dl[j] : T(1), gyh + j * xs, dx + d.x(b, j, h), sw.stream);
            }
            for (int w = 0; w < NW; ++w) {
                S::store(dd + w * VL, ddv[w]);
                S::store(dak + w * VL, dav[w]);
            }
            T* ddq = ddelta + d.s(b, 0, h);
            T* daq = da + d.s(b, 0, h);
            for (int64_t j = 0; j < Lb; ++j) {
                ddq[j * d.H] = dd[j] + dskip[j];
                daq[j * d.H] = dak[j];
            }
        }
        // dC_i = sum_{j<=i} Z_ij B_j (0 if no head has row i),  dB_j = sum_{active i >= j} Z_ij C_i
        nrows = 0;
        for (int64_t i = 0; i < Lb; ++i)
            if (any[i]) rows[nrows++] = int(i);
        const T* Bg = B + d.bc(b, 0, g);
        const T* Cg = C + d.bc(b, 0, g);
        for (int64_t i = 0; i < Lb; ++i) {
            T* out = dC + d.bc(b, i, g);
            if (any[i])
                combine(Z + i * W, 1, (const int*)nullptr, int(i + 1), Bg, sb, d.n, (const T*)nullptr, T(0),
                        (const T*)nullptr, out, sw.stream_bc);
            else
                fill_zero(out, d.n, sw.stream_bc);
        }
        for (int64_t j = 0, t = 0; j < Lb; ++j) {
            while (t < nrows && rows[t] < j) ++t;
            combine(Z + j, W, rows + t, nrows - t, Cg, sb, d.n, (const T*)nullptr, T(0), (const T*)nullptr,
                    dB + d.bc(b, j, g), sw.stream_bc);
        }
    }
}

// the short path with NW = the vectors that hold Lb (1 <= Lb <= kShort)
template <typename T>
void forward_short_any(const T* x, const T* delta, const T* a, const T* B, const T* C, const T* D, int skip_delta,
                       T* y, int64_t b, int64_t Lb, const Ahead& next, const Dims<T>& d, ShortWork<T>& sw) {
    constexpr int VL = Simd<T>::lanes;
    switch ((Lb + VL - 1) / VL) {
        case 1: return forward_short<T, 1>(x, delta, a, B, C, D, skip_delta, y, b, Lb, next, d, sw);
        case 2: return forward_short<T, 2>(x, delta, a, B, C, D, skip_delta, y, b, Lb, next, d, sw);
        case 3: return forward_short<T, 3>(x, delta, a, B, C, D, skip_delta, y, b, Lb, next, d, sw);
        default: return forward_short<T, 4>(x, delta, a, B, C, D, skip_delta, y, b, Lb, next, d, sw);
    }
}

template <typename T>
void backward_short_any(const T* x, const T* delta, const T* a, const T* B, const T* C, const T* D, int skip_delta,
                        const T* gy, T* dx, T* ddelta, T* da, T* dB, T* dC, double* dDt, int64_t b, int64_t Lb,
                        const Ahead& next, const Dims<T>& d, ShortWork<T>& sw) {
    constexpr int VL = Simd<T>::lanes;
#define MMM4REC_SHORT_BWD(NW) \
    backward_short<T, NW>(x, delta, a, B, C, D, skip_delta, gy, dx, ddelta, da, dB, dC, dDt, b, Lb, next, d, sw)
    switch ((Lb + VL - 1) / VL) {
        case 1: return MMM4REC_SHORT_BWD(1);
        case 2: return MMM4REC_SHORT_BWD(2);
        case 3: return MMM4REC_SHORT_BWD(3);
        default: return MMM4REC_SHORT_BWD(4);
    }
#undef MMM4REC_SHORT_BWD
}

// check: return 1 when a valid row of y holds NaN / inf (checked as the rows are written: the short path in
// registers, the blocked one per block of rows while they are in L1), else 0
template <typename T>
int forward(const T* x, const T* delta, const T* a, const T* B, const T* C, const int64_t* len, const T* D,
            int skip_delta, T* y, int64_t nb, Dims<T> d, int nthreads, bool check) {
    const int64_t r = d.H / d.G, xs = d.H * d.P;
    constexpr int VL = Simd<T>::lanes;
    int nonfinite = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : nonfinite)
    {
        Work<T> wk(d, r);
        ShortWork<T> sw(d);
        sw.stream = goes_past_caches<T>(nb * d.L * xs);
        const int64_t Lp = wk.Lp;
        std::vector<T> wbuf(size_t(R) * Lp, T(0));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t Lb = valid_steps(len, b, d.L);
            if (Lb <= kShortMax<T>) {                             // rows past Lb are 0, the rest written whole
                fill_zero(y + d.x(b, Lb, 0), (d.L - Lb) * xs, sw.stream);
                Ahead next;
                if (b + 1 < nb) {
                    next.inputs(x, B, C, delta, a, len, b + 1, d);
                    if (!sw.stream) next.add(y + d.x(b + 1, 0, 0), d.L * xs, true);
                }
                if (Lb > 0) forward_short_any(x, delta, a, B, C, D, skip_delta, y, b, Lb, next, d, sw);
                continue;
            }
            // rows past Lb are 0; valid rows are stored whole by the SIMD kernels (the plain one adds: zero them)
            constexpr int VL1 = Simd<T>::lanes;
            const bool plain = d.P != VL1 && d.P != 2 * VL1 && d.P != 4 * VL1;   // as in y_rows
            std::fill(y + d.x(b, plain ? 0 : Lb, 0), y + d.x(b + 1, 0, 0), T(0));
            for (int64_t g = 0; g < d.G && Lb > 0; ++g) {
                wk.load(B, delta, a, b, g, r, Lb, d);
                for (int64_t i0 = 0; i0 < Lb; i0 += R) {
                    const int nr = int(std::min<int64_t>(R, Lb - i0));
                    int64_t rows[R];
                    const T* Ci[R];
                    for (int t = 0; t < nr; ++t) {
                        rows[t] = i0 + t;
                        Ci[t] = C + d.bc(b, i0 + t, g);
                    }
                    rows_dot(wk.Bt.data(), Lp, d.n, Ci, nr, rows[nr - 1] + 1, wk.cb.data());   // C_i . B_j
                    for (int64_t q = 0; q < r; ++q) {
                        const int64_t h = g * r + q;
                        T* __restrict sg = wk.seg.data() + q * Lp;
                        const T* __restrict dl = wk.dl.data() + q * Lp;
                        for (int t = 0; t < nr; ++t) {       // w_ij = (C_i . B_j) exp(seg_ij) delta_j, j <= i
                            const int64_t i = rows[t];
                            const T ai = wk.al[q * Lp + i];
                            const T* __restrict cb = wk.cb.data() + t * Lp;
                            T* __restrict w = wbuf.data() + t * Lp;
                            const int64_t jv = (i + VL - 1) / VL * VL; // whole vectors (no scalar exp tail): entries
                            for (int64_t j = 0; j < jv; ++j) sg[j] += ai;   // past i are junk (seg_j is reset
                            decay_exp_row(sg, jv, w);                        // at row j, w is read up to i only)
                            for (int64_t j = 0; j < jv; ++j) w[j] *= cb[j] * dl[j];
                            sg[i] = T(0);
                            w[i] = cb[i] * dl[i];
                        }
                        y_rows(x + d.x(b, 0, h), xs, d.P, wbuf.data(), Lp, rows, nr, y + d.x(b, 0, h));
                        if (D)                                      // skip D s_i x_i
                            for (int t = 0; t < nr; ++t) {
                                const int64_t i = rows[t];
                                const T si = skip_delta ? delta[d.s(b, i, h)] : T(1);
                                const T* xi = x + d.x(b, i, h);
                                const T* Dh = D + h * d.P;
                                T* yi = y + d.x(b, i, h);
                                for (int64_t p = 0; p < d.P; ++p) yi[p] += Dh[p] * si * xi[p];
                            }
                        if (check)
                            for (int t = 0; t < nr; ++t) nonfinite |= !all_finite(y + d.x(b, rows[t], h), d.P);
                    }
                }
            }
        }
        stream_fence();
        for (int k = 0; k < VL; ++k) nonfinite |= sw.marks[k] != 0;
    }
    return check && nonfinite;
}

template <typename T>
void backward(const T* x, const T* delta, const T* a, const T* B, const T* C, const int64_t* len, const T* D,
              int skip_delta, const T* gy, T* dx, T* ddelta, T* da, T* dB, T* dC, T* dD, int64_t nb, Dims<T> d,
              int nthreads) {
    const int64_t r = d.H / d.G, xs = d.H * d.P;
    constexpr int VL = Simd<T>::lanes;
    const int nt = nthreads > 1 ? nthreads : 1;
    std::vector<double> dD_acc(D ? size_t(nt) * d.H * d.P : 0, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = thread_index();
        Work<T> wk(d, r);
        ShortWork<T> sw(d);
        sw.stream = goes_past_caches<T>(nb * d.L * xs);
        sw.stream_bc = goes_past_caches<T>(nb * d.L * d.G * d.n);
        const int64_t Lp = wk.Lp;
        std::vector<T> xT(size_t(r) * d.P * Lp, T(0)), e(size_t(r) * R * Lp, T(0)), Z(size_t(R) * Lp, T(0)),
            gx(size_t(R) * Lp, T(0)), md(size_t(R) * Lp, T(0)), dseg(size_t(R) * Lp, T(0)), ssum(Lp, T(0)),
            ddl(size_t(r) * Lp), dal(size_t(r) * Lp);
        std::vector<unsigned char> act(size_t(r) * d.L);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t Lb = valid_steps(len, b, d.L);
            if (Lb <= kShortMax<T>) {                             // rows past Lb are 0, the rest written whole
                fill_zero(dx + d.x(b, Lb, 0), (d.L - Lb) * xs, sw.stream);
                std::fill(ddelta + d.s(b, Lb, 0), ddelta + d.s(b + 1, 0, 0), T(0));
                std::fill(da + d.s(b, Lb, 0), da + d.s(b + 1, 0, 0), T(0));
                fill_zero(dB + d.bc(b, Lb, 0), (d.L - Lb) * d.G * d.n, sw.stream_bc);
                fill_zero(dC + d.bc(b, Lb, 0), (d.L - Lb) * d.G * d.n, sw.stream_bc);
                Ahead next;
                if (b + 1 < nb) {
                    next.inputs(x, B, C, delta, a, len, b + 1, d);
                    next.add(gy + d.x(b + 1, 0, 0), valid_steps(len, b + 1, d.L) * xs, false);
                    if (!sw.stream) next.add(dx + d.x(b + 1, 0, 0), d.L * xs, true);
                    if (!sw.stream_bc) {
                        next.add(dB + d.bc(b + 1, 0, 0), d.L * d.G * d.n, true);
                        next.add(dC + d.bc(b + 1, 0, 0), d.L * d.G * d.n, true);
                    }
                }
                if (Lb > 0)
                    backward_short_any(x, delta, a, B, C, D, skip_delta, gy, dx, ddelta, da, dB, dC,
                                       D ? dD_acc.data() + size_t(tid) * d.H * d.P : nullptr, b, Lb, next, d, sw);
                continue;
            }
            std::fill(dx + d.x(b, 0, 0), dx + d.x(b + 1, 0, 0), T(0));
            std::fill(ddelta + d.s(b, 0, 0), ddelta + d.s(b + 1, 0, 0), T(0));
            std::fill(da + d.s(b, 0, 0), da + d.s(b + 1, 0, 0), T(0));
            std::fill(dB + d.bc(b, 0, 0), dB + d.bc(b + 1, 0, 0), T(0));
            std::fill(dC + d.bc(b, 0, 0), dC + d.bc(b + 1, 0, 0), T(0));
            for (int64_t g = 0; g < d.G && Lb > 0; ++g) {
                wk.load(B, delta, a, b, g, r, Lb, d);
                for (int64_t q = 0; q < r; ++q) {
                    const int64_t h = g * r + q;
                    T* xq = xT.data() + q * d.P * Lp;
                    const T* xh = x + d.x(b, 0, h);
                    transpose_cols(xh, xs, Lb, d.P, xq, Lp);
                    for (int64_t j = 0; j < Lb; ++j)                // a zero gy row adds exactly 0
                        act[q * d.L + j] = any_nonzero(gy + d.x(b, j, h), d.P);
                }
                std::fill(ddl.begin(), ddl.end(), T(0));
                std::fill(dal.begin(), dal.end(), T(0));

                int64_t rows[R];                                // the block: up to R rows active in some head
                int nr = 0;
                for (int64_t i = 0; i < Lb; ++i) {
                    bool any = false;
                    for (int64_t q = 0; q < r; ++q) {           // every row advances seg; active rows keep exp(seg)
                        T* __restrict sg = wk.seg.data() + q * Lp;
                        const T ai = wk.al[q * Lp + i];
                        const int64_t jv = (i + VL - 1) / VL * VL;
                        if (act[q * d.L + i]) {                 // whole vectors, as in the forward
                            T* __restrict er = e.data() + (q * R + nr) * Lp;
                            for (int64_t j = 0; j < jv; ++j) sg[j] += ai;
                            decay_exp_row(sg, jv, er);
                            er[i] = T(1);
                            any = true;
                        } else {
                            for (int64_t j = 0; j < jv; ++j) sg[j] += ai;
                        }
                        sg[i] = T(0);
                    }
                    if (any) rows[nr++] = i;
                    if (nr < R && !(i == Lb - 1 && nr > 0)) continue;

                    // ---- one block of nr rows
                    const T* Cr[R];
                    for (int s = 0; s < nr; ++s) Cr[s] = C + d.bc(b, rows[s], g);
                    rows_dot(wk.Bt.data(), Lp, d.n, Cr, nr, rows[nr - 1] + 1, wk.cb.data());
                    std::fill(Z.begin(), Z.begin() + nr * Lp, T(0));
                    for (int64_t q = 0; q < r; ++q) {
                        const int64_t h = g * r + q;
                        int slot[R], nq = 0;
                        int64_t rq[R];
                        const T* gyr[R];
                        for (int s = 0; s < nr; ++s)
                            if (act[q * d.L + rows[s]]) {
                                slot[nq] = s;
                                rq[nq] = rows[s];
                                gyr[nq++] = gy + d.x(b, rows[s], h);
                            }
                        if (nq == 0) continue;
                        rows_dot(xT.data() + q * d.P * Lp, Lp, d.P, gyr, nq, rq[nq - 1] + 1, gx.data());   // gy_i . x_j
                        const T* __restrict dl = wk.dl.data() + q * Lp;
                        T* __restrict dd = ddl.data() + q * Lp;
                        for (int t = 0; t < nq; ++t) {
                            const int s = slot[t];
                            const T* __restrict er = e.data() + (q * R + s) * Lp;
                            const T* __restrict cb = wk.cb.data() + s * Lp;
                            const T* __restrict gxt = gx.data() + t * Lp;
                            T* __restrict Zs = Z.data() + s * Lp;
                            T* __restrict dsg = dseg.data() + t * Lp;
                            T* __restrict mdt = md.data() + t * Lp;
                            const int64_t i = rq[t], jv = (i + VL) / VL * VL;   // whole vectors; past i:
                            for (int64_t j = 0; j < jv; ++j) {      // junk, selected away from the sums
                                const T m = cb[j] * er[j];          // M_ij
                                const T Gij = gxt[j] * dl[j];       // dL / dM_ij
                                const T ddj = m * gxt[j], zj = Gij * er[j];
                                dd[j] += j <= i ? ddj : T(0);
                                Zs[j] += j <= i ? zj : T(0);        // dL / d(C_i . B_j), summed over heads
                                dsg[j] = Gij * m;                   // dL / dseg_ij (read up to i only)
                                mdt[j] = m * dl[j];
                            }
                        }
                        dx_rows(dx + d.x(b, 0, h), xs, d.P, md.data(), Lp, rq, nq, gyr);
                        // da_k += sum over rows i >= k of sum_{j<k} dseg_ij: k <= rq[0] from the rows' sum, the
                        // rest of each row by its own running sum
                        T* __restrict dak = dal.data() + q * Lp;
                        const int64_t i0 = rq[0];
                        std::copy(dseg.begin(), dseg.begin() + i0, ssum.begin());   // row by row: vectorised
                        for (int t = 1; t < nq; ++t) {
                            const T* __restrict dst = dseg.data() + t * Lp;
                            T* __restrict ss = ssum.data();
                            for (int64_t j = 0; j < i0; ++j) ss[j] += dst[j];
                        }
                        add_exclusive_prefix(ssum.data(), i0, dak);
                        for (int t = 1; t < nq; ++t) {
                            const T* dsg = dseg.data() + t * Lp;
                            T rt = T(0);
                            for (int64_t j = 0; j <= i0; ++j) rt += dsg[j];
                            for (int64_t k = i0 + 1; k <= rq[t]; ++k) {
                                dak[k] += rt;
                                rt += dsg[k];
                            }
                        }
                        if (D)                                      // skip D s_i x_i
                            for (int t = 0; t < nq; ++t) {
                                const int64_t i = rq[t];
                                const T* gyi = gyr[t];
                                const T* xi = x + d.x(b, i, h);
                                const T* Dh = D + h * d.P;
                                const T si = skip_delta ? dl[i] : T(1);
                                T* dxi = dx + d.x(b, i, h);
                                double* dDh = dD_acc.data() + (size_t(tid) * d.H + h) * d.P;
                                T gDx = T(0);
                                for (int64_t p = 0; p < d.P; ++p) {
                                    dxi[p] += Dh[p] * si * gyi[p];
                                    gDx += Dh[p] * gyi[p] * xi[p];
                                    dDh[p] += double(si) * double(gyi[p]) * double(xi[p]);
                                }
                                if (skip_delta) dd[i] += gDx;
                            }
                    }
                    // dC_i = sum_{j<=i} Z_ij B_j,  dB_j += Z_ij C_i: the y / dx kernels with (x, P) = (B, n)
                    y_rows(B + d.bc(b, 0, g), d.G * d.n, d.n, Z.data(), Lp, rows, nr, dC + d.bc(b, 0, g));
                    dx_rows(dB + d.bc(b, 0, g), d.G * d.n, d.n, Z.data(), Lp, rows, nr, Cr);
                    nr = 0;
                }
                for (int64_t q = 0; q < r; ++q) {
                    T* __restrict ddq = ddelta + d.s(b, 0, g * r + q);
                    T* __restrict daq = da + d.s(b, 0, g * r + q);
                    for (int64_t j = 0; j < Lb; ++j) {
                        ddq[j * d.H] = ddl[q * Lp + j];
                        daq[j * d.H] = dal[q * Lp + j];
                    }
                }
            }
        }
        stream_fence();
    }
    if (D) sum_thread_partials(dD_acc, nt, d.H * d.P, dD);
}

}  // namespace

extern "C" {

// mmm4rec_ssd_quadratic_fwd: y only (its signature is kept: benchmarks/bench_native_ab.py loads older builds);
// mmm4rec_ssd_quadratic_fwd_checked: the same, returning 1 when a valid row of y is not finite (tissd_layer.cpp)
#define MMM4REC_SSD_ENTRIES(T, SUFFIX)                                                                                \
    void mmm4rec_ssd_quadratic_fwd_##SUFFIX(const T* x, const T* delta, const T* a, const T* B, const T* C,         \
                                            const int64_t* len, const T* D, int skip_delta, T* y, int64_t nb,        \
                                            int64_t L, int64_t H, int64_t P, int64_t G, int64_t n, int nthreads) {   \
        forward<T>(x, delta, a, B, C, len, D, skip_delta, y, nb, Dims<T>{L, H, P, G, n}, nthreads, false);          \
    }                                                                                                               \
    int mmm4rec_ssd_quadratic_fwd_checked_##SUFFIX(const T* x, const T* delta, const T* a, const T* B, const T* C,  \
                                                   const int64_t* len, const T* D, int skip_delta, T* y, int64_t nb, \
                                                   int64_t L, int64_t H, int64_t P, int64_t G, int64_t n,            \
                                                   int nthreads) {                                                  \
        return forward<T>(x, delta, a, B, C, len, D, skip_delta, y, nb, Dims<T>{L, H, P, G, n}, nthreads, true);    \
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
