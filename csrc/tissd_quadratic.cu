// Fused time-aware SSD, quadratic form: forward and backward CUDA kernels (see tissd_quadratic.cuh).
//
// Kernels (one thread block of 256 threads = 8 warps per (sequence, head[, head-dim tile])):
//   tissd_apply_kernel<kDx=false>  y_i  = sum_{j<=i} (C_i.B_j) M_ij Delta_j x_j + D s_i x_i        (forward)
//   tissd_apply_kernel<kDx=true>   dx_j = Delta_j sum_{i>=j} (C_i.B_j) M_ij dy_i + D s_j dy_j      (backward)
//   tissd_grad_kernel              dB, dC, ddt, dE and partial dA, ddt_bias, dD                    (backward)
// with M_ij = exp(min(cs_i - cs_j, 0)) built from the block's own float64 cumulative sum of a = A Delta.
// Sequence steps are processed in kBL x kBL tiles of the L x L score matrix staged in shared memory.
//
// Inner products (template flag kTC):
//   kTC = true : tensor cores through nvcuda::wmma, fp32 accumulate. bf16 inputs: 16x16x16 bf16 MMAs; the
//                masked scores S, Delta_j x_j and the gradient weights dG are rounded to bf16 before their product
//                (as flash-attention style kernels do). fp32 inputs (only when the caller allows TF32) and fp16
//                inputs (always): 16x16x8 TF32 MMAs, operands rounded to TF32 (10-bit mantissa, fp32 range).
//   kTC = false: fp32 inputs with TF32 not allowed: exact fp32 FMA loops (no TF32 anywhere).
// All 8 warps take part in every product: a 32x32 score tile is split into four 16x16 tiles x two k halves (apply)
// or C.B on warps 0-3 next to dy.x on warps 4-7 (grad); the L x P / L x n products give each warp a 16x16 tile
// (TP = 32: warps 0-3 only). Reductions are in a fixed order: results are bitwise deterministic run to run.
// Needs sm_80+ (bf16 / TF32 WMMA). No fast-math intrinsics: expf / log1pf are the accurate libdevice versions.
//
// Non-finite inputs (NaN / inf at a valid step t of a sequence) stay causal: masked scores are selected, never
// multiplied by 0; the forward's S V product, whose masked zeros would meet a non-finite Delta_j x_j (0 * inf = NaN,
// reaching rows < t and padding), runs on a sanitised V when a tile holds one and marks the outputs that keep a pair
// with it as NaN; the backward runs on the live prefix of each (sequence, head[, head-dim tile]): output rows after
// the last one with a nonzero dy contribute exactly nothing (all their terms carry dy_i), so a loss over rows < t
// gets the gradients of the run without the bad value.
#include <mma.h>

#include <type_traits>

#include "tissd_quadratic.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "csrc/tissd_quadratic.cu needs sm_80 or newer (bf16 / TF32 tensor cores): set TORCH_CUDA_ARCH_LIST >= 8.0"
#endif

namespace mmm4rec {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // threads per block; also one thread per sequence step in scans
// 2 resident blocks per SM caps registers at 128: spill-free for every kernel on sm_80 / sm_90 (nvcc 13.0 -O3).
// Without it ptxas aims at 3-4 blocks (64-80 registers) and spills 4-40 bytes in some instantiations; at 3 the fp32
// gradient kernel spills ~100 bytes (tools/offline_csrc.sh shows the table).
constexpr int kMinBlocks = 2;
constexpr int kBL = 32;        // sequence tile: rows/columns of one score tile
constexpr int kNC = 64;        // d_state chunk loaded at once
constexpr int kPC = 32;        // head-dim chunk of the gradient kernel's dy_i . x_j product
static_assert(kThreads == kTissdMaxLen, "scans use one thread per step");
static_assert(kBL == 32 && kThreads == 256, "tile/warp assignments below assume 8 warps and 32x32 score tiles");

// Element type of the staged operand tiles: bf16 on the tensor-core path for bf16 inputs, else float (TF32 MMAs on
// the tensor-core path). fp16 inputs use TF32 too: an fp16 value is exact in TF32 (same 10-bit mantissa), and the
// intermediate operands (Delta_j x_j, masked scores, dG) keep the fp32 range; in fp16 they overflowed (65504) after
// time gaps of ~1e4 in the emulator check.
template <typename T, bool kTC> struct OperandOf { using type = float; };
template <> struct OperandOf<__nv_bfloat16, true> { using type = __nv_bfloat16; };

// Row pitch (elements) of a staged tile with K columns. Tensor cores: +16 bytes (WMMA wants a multiple of 16 bytes;
// the shift spreads rows over the banks). Scalar fp32: +1 (odd pitch, conflict-free column reads).
template <typename TS, bool kTC, int K> constexpr int pitch = kTC ? K + 16 / int(sizeof(TS)) : K + 1;

// WMMA shapes: m16 n16 k16 for bf16 / fp16, m16 n16 k8 for TF32.
template <typename TS> constexpr int kMmaK = std::is_same<TS, float>::value ? 8 : 16;
template <typename TS> struct MmaElem { using type = TS; };
template <> struct MmaElem<float> { using type = wmma::precision::tf32; };
template <bool kColMajor> using LayoutOf = typename std::conditional<kColMajor, wmma::col_major, wmma::row_major>::type;
template <typename TS, bool kTrans>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kMmaK<TS>, typename MmaElem<TS>::type, LayoutOf<kTrans>>;
template <typename TS, bool kTrans>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kMmaK<TS>, typename MmaElem<TS>::type, LayoutOf<kTrans>>;
template <typename TS> using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, kMmaK<TS>, float>;

// acc(16x16) += a(16xK) b(Kx16) on one warp. a(m, k) = A[m * lda + k] (A[k * lda + m] if kATrans),
// b(k, n) = Bm[k * ldb + n] (Bm[n * ldb + k] if kBTrans); A and Bm point at the tile's (row 0, k = 0) corner.
template <typename TS, bool kATrans, bool kBTrans>
__device__ __forceinline__ void warp_mma(FragAcc<TS>& acc, const TS* A, int lda, const TS* Bm, int ldb, int K) {
  FragA<TS, kATrans> fa;
  FragB<TS, kBTrans> fb;
  for (int k = 0; k < K; k += kMmaK<TS>) {
    wmma::load_matrix_sync(fa, kATrans ? A + k * lda : A + k, lda);
    wmma::load_matrix_sync(fb, kBTrans ? Bm + k : Bm + k * ldb, ldb);
    if constexpr (std::is_same<TS, float>::value) {  // TF32: round to nearest (the MMA would truncate)
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
      for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// softplus(v) = log(1 + e^v), linear beyond 20 (as torch)
__device__ __forceinline__ float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

// v_t = dt_t E_t + dt_bias for token row `tok` (= token * H + h)
__device__ __forceinline__ float dt_input(const TissdParams& p, int64_t tok, int h) {
  return p.dt[tok] * (p.E ? p.E[tok] : 1.f) + (p.dt_bias ? p.dt_bias[h] : 0.f);
}

// Delta_t and cs_t = sum_{k<=t} A Delta_k into shared dl[], cs[] (0 for t >= len). One thread per step.
// cs is kept in float64 so that cs_i - cs_j stays exact after huge time gaps (|cs| >> |cs_i - cs_j|).
__device__ void discretize_cumsum(const TissdParams& p, int64_t start, int len, int h, float* dl, double* cs) {
  const int t = threadIdx.x;
  float delta = 0.f;
  if (t < len) {
    const float v = dt_input(p, (start + t) * p.H + h, h);
    delta = p.dt_softplus ? softplus(v) : v;
  }
  dl[t] = delta;
  cs[t] = double(p.A[h]) * delta;
  __syncthreads();
  for (int off = 1; off < kThreads; off *= 2) {  // Hillis-Steele inclusive scan
    const double add = t >= off ? cs[t - off] : 0.0;
    __syncthreads();
    cs[t] += add;
    __syncthreads();
  }
}

// buf[t] <- sum_{k>=t} buf[k] (reverse inclusive scan over the block)
__device__ void reverse_cumsum(double* buf) {
  const int t = threadIdx.x;
  for (int off = 1; off < kThreads; off *= 2) {
    const double add = t + off < kThreads ? buf[t + off] : 0.0;
    __syncthreads();
    buf[t] += add;
    __syncthreads();
  }
}

// Deterministic block sum (tree in shared scratch[kThreads]); every thread gets the result.
__device__ double block_sum(double v, double* scratch) {
  const int t = threadIdx.x;
  scratch[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) scratch[t] += scratch[t + s];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();
  return total;
}

// Deterministic block max of non-negative ints (tree in shared scratch[kThreads]); every thread gets the result.
__device__ int block_max(int v, double* scratch) {
  const int t = threadIdx.x;
  scratch[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) scratch[t] = fmax(scratch[t], scratch[t + s]);
    __syncthreads();
  }
  const int total = int(scratch[0]);
  __syncthreads();
  return total;
}

__device__ __forceinline__ bool is_finite(float v) { return fabsf(v) <= 3.402823466e+38f; }  // false for NaN, inf

// The live prefix of a sequence for the backward: 1 + the last step t < len whose dy row (head h, channels
// [p0, p1)) has a nonzero (or NaN) entry, 0 if none. One thread per step; `scratch` is kThreads doubles.
template <typename T>
__device__ int live_prefix(const T* dyh, int64_t vstride, int64_t start, int len, int p0, int p1, double* scratch) {
  const int t = threadIdx.x;
  bool live = false;
  if (t < len)
    for (int q = p0; q < p1 && !live; ++q) live = to_float(dyh[(start + t) * vstride + q]) != 0.f;
  return block_max(live ? t + 1 : 0, scratch);
}

// tile[r * ld + k] = scale_r * src[(start + r0 + r) * stride + col0 + k] for r0 + r < len and col0 + k < ncols,
// else 0, converted to the tile type TS. `src` already points at the head/group column; `scale` (optional) is
// indexed by step r0 + r.
template <typename T, typename TS, int R, int K>
__device__ void load_tile(TS* tile, int ld, const T* src, int64_t stride, int64_t start, int r0, int len, int col0,
                          int ncols, const float* scale = nullptr) {
  for (int e = threadIdx.x; e < R * K; e += kThreads) {
    const int r = e / K, k = e % K;
    float v = 0.f;
    if (r0 + r < len && col0 + k < ncols) {
      v = to_float(src[(start + r0 + r) * stride + col0 + k]);
      if (scale) v *= scale[r0 + r];
    }
    tile[r * ld + k] = from_float<TS>(v);
  }
}

// Sacc[r * lda + c] = rowM_{r0 + r} . colM_{c0 + c} over all n (float), for the kBL x kBL tile. rowM / colM point
// at the group column of B or C (row stride G n). Stages n in kNC chunks through rowK / colK and leaves the last
// chunk there. Tensor cores: warps 0-3 sum the first half of each chunk into Sacc, warps 4-7 the second half into
// Sacc2 (the score is Sacc + Sacc2); scalar: Sacc2 is unused. Ends without a barrier: __syncthreads() before reading.
template <typename T, bool kTC, typename TS>
__device__ void score_tile(const TissdParams& p, const T* rowM, const T* colM, int64_t start, int r0, int c0, int len,
                           TS* rowK, TS* colK, float* Sacc, float* Sacc2) {
  constexpr int ldk = pitch<TS, kTC, kNC>, lda = pitch<float, kTC, kBL>;
  const int64_t stride = int64_t(p.G) * p.N;
  if constexpr (kTC) {
    const int warp = threadIdx.x / 32, tm = (warp % 4) / 2, tn = warp % 2, kh = warp / 4;  // tile (tm, tn), k half
    FragAcc<TS> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < p.N; k0 += kNC) {
      load_tile<T, TS, kBL, kNC>(rowK, ldk, rowM, stride, start, r0, len, k0, p.N);
      load_tile<T, TS, kBL, kNC>(colK, ldk, colM, stride, start, c0, len, k0, p.N);
      __syncthreads();
      warp_mma<TS, false, true>(acc, rowK + tm * 16 * ldk + kh * (kNC / 2), ldk,
                                colK + tn * 16 * ldk + kh * (kNC / 2), ldk, kNC / 2);
      __syncthreads();
    }
    wmma::store_matrix_sync((kh ? Sacc2 : Sacc) + tm * 16 * lda + tn * 16, acc, lda, wmma::mem_row_major);
  } else {
    const int c = threadIdx.x % kBL, rbase = threadIdx.x / kBL;  // rows rbase + 8 m, column c
    float dot[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < p.N; k0 += kNC) {
      load_tile<T, TS, kBL, kNC>(rowK, ldk, rowM, stride, start, r0, len, k0, p.N);
      load_tile<T, TS, kBL, kNC>(colK, ldk, colM, stride, start, c0, len, k0, p.N);
      __syncthreads();
      for (int k = 0; k < kNC; ++k) {
        const float b = colK[c * ldk + k];
        for (int m = 0; m < 4; ++m) dot[m] += rowK[(rbase + 8 * m) * ldk + k] * b;
      }
      __syncthreads();
    }
    for (int m = 0; m < 4; ++m) Sacc[(rbase + 8 * m) * lda + c] = dot[m];
  }
}

// Forward (kDx = false), rows r = i, columns c = j <= i:
//     y_i  = sum_j (C_i.B_j) M_ij (Delta_j x_j) + D s_i x_i
// dx (kDx = true), rows r = j, columns c = i >= j (the transposed score matrix):
//     dx_j = Delta_j sum_i (C_i.B_j) M_ij dy_i + D s_j dy_j
// Grid: (nseq * H, ceil(P / TP)); block: kThreads.
template <typename T, int TP, bool kDx, bool kTC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) tissd_apply_kernel(const TissdParams p) {
  using TS = typename OperandOf<T, kTC>::type;
  constexpr bool kSopAliased = std::is_same<TS, float>::value;  // fp32 operands: mask the scores in place
  constexpr int ldk = pitch<TS, kTC, kNC>, lds = pitch<TS, kTC, kBL>, ldv = pitch<TS, kTC, TP>;
  constexpr int lda = pitch<float, kTC, kBL>, ldo = pitch<float, kTC, TP>;
  constexpr int kRowsPerPass = kThreads / TP;   // rows of a [kBL, TP] output tile per pass (epilogue, scalar)
  constexpr int kRowsPerThread = kBL / kRowsPerPass;
  constexpr int kOutTilesN = TP / 16, kOutTiles = (kBL / 16) * kOutTilesN;  // 16x16 output tiles of [kBL, TP]
  static_assert(kOutTiles <= kThreads / 32, "one output tile per warp");
  __shared__ float dl[kTissdMaxLen];
  __shared__ double cs[kTissdMaxLen];
  __shared__ __align__(128) TS rowK[kBL * ldk];
  __shared__ __align__(128) TS colK[kBL * ldk];
  __shared__ __align__(128) float Sacc[kBL * lda];                 // raw scores C.B (then masked, fp32 operands)
  __shared__ __align__(128) float Sacc2[kTC ? kBL * lda : 1];       // tensor cores: second k-half of C.B
  __shared__ __align__(128) TS Sop_own[kSopAliased ? 1 : kBL * lds];  // masked scores as 16-bit MMA operand
  __shared__ __align__(128) TS V[kBL * ldv];
  __shared__ __align__(128) float Out[kTC ? kBL * ldo : 1];         // tensor-core accumulators, for the epilogue
  TS* Sop = kSopAliased ? reinterpret_cast<TS*>(Sacc) : Sop_own;

  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / (p.H / p.G);
  const int p0 = blockIdx.y * TP;
  const int64_t start = p.seq_start[s];
  int len = min(p.seq_len[s], p.max_len);  // max_len <= kTissdMaxLen bounds the shared arrays
  const int64_t vstride = int64_t(p.H) * p.P;
  const T* vsrc = static_cast<const T*>(kDx ? p.dy : p.x) + int64_t(h) * p.P;  // [T, H, P] at head h
  // dx: only this head-dim tile of dy enters it, so its live prefix is exact (rows past it: zero-filled by the caller)
  if (kDx && len > 0) len = live_prefix(vsrc, vstride, start, len, p0, min(p0 + TP, p.P), cs);
  if (len <= 0) return;  // uniform over the block
  discretize_cumsum(p, start, len, h, dl, cs);

  const T* Bg = static_cast<const T*>(p.B) + int64_t(g) * p.N;
  const T* Cg = static_cast<const T*>(p.C) + int64_t(g) * p.N;
  const T* rowM = kDx ? Bg : Cg;
  const T* colM = kDx ? Cg : Bg;
  T* out = static_cast<T*>(kDx ? p.dx : p.y) + int64_t(h) * p.P;
  const float Dh = p.D ? p.D[h] : 0.f;

  const int ntiles = (len + kBL - 1) / kBL;
  const int sc = threadIdx.x % kBL, sr = threadIdx.x / kBL;     // score-tile element (sr + 8 m, sc)
  const int op = threadIdx.x % TP, orow = threadIdx.x / TP;     // output element (orow + kRowsPerPass m, op)
  const int warp = threadIdx.x / 32, otm = warp / kOutTilesN, otn = warp % kOutTilesN;  // warp's output tile

  for (int rt = 0; rt < ntiles; ++rt) {
    const int r0 = rt * kBL;
    float acc[kRowsPerThread];
    bool poison[kRowsPerThread];  // forward: this output keeps a pair with a non-finite Delta_j x_j
    for (int m = 0; m < kRowsPerThread; ++m) acc[m] = 0.f, poison[m] = false;
    FragAcc<TS> oacc;
    if constexpr (kTC) wmma::fill_fragment(oacc, 0.f);
    const int ct_lo = kDx ? rt : 0, ct_hi = kDx ? ntiles - 1 : rt;
    for (int ct = ct_lo; ct <= ct_hi; ++ct) {
      const int c0 = ct * kBL;
      score_tile<T, kTC>(p, rowM, colM, start, r0, c0, len, rowK, colK, Sacc, Sacc2);
      __syncthreads();
      // S[r][c] = (C.B) M_ij, causal (j <= i) and inside the sequence; same thread reads and writes an element
      for (int m = 0; m < 4; ++m) {
        const int rr = sr + 8 * m, r = r0 + rr, c = c0 + sc;
        const int i = kDx ? c : r, j = kDx ? r : c;
        const bool ok = j <= i && i < len;
        const float cb = kTC ? Sacc[rr * lda + sc] + Sacc2[rr * lda + sc] : Sacc[rr * lda + sc];
        const float v = ok ? cb * expf(fminf(float(cs[i] - cs[j]), 0.f)) : 0.f;
        Sop[rr * lds + sc] = from_float<TS>(v);
      }
      // V[c][:] = Delta_c x_c (forward) or dy_c (dx), this head-dim tile
      load_tile<T, TS, kBL, TP>(V, ldv, vsrc, vstride, start, c0, len, p0, p.P, kDx ? nullptr : dl);
      bool bad = false;  // forward: a NaN / inf among Delta_c x_c of this tile (never in a real run)
      if constexpr (!kDx)
        for (int e = threadIdx.x; e < kBL * TP; e += kThreads) bad |= !is_finite(to_float(V[(e / TP) * ldv + e % TP]));
      if (__syncthreads_or(bad)) {  // uniform: mark the outputs it reaches, then zero it (no 0 * inf in S V)
        for (int m = 0; m < kRowsPerThread; ++m) {
          const int r = r0 + orow + kRowsPerPass * m;
          for (int c = 0; c < kBL && r < len; ++c)
            poison[m] |= c0 + c <= r && !is_finite(to_float(V[c * ldv + op]));
        }
        __syncthreads();
        for (int e = threadIdx.x; e < kBL * TP; e += kThreads) {
          TS& v = V[(e / TP) * ldv + e % TP];
          if (!is_finite(to_float(v))) v = from_float<TS>(0.f);
        }
        __syncthreads();
      }
      if constexpr (kTC) {  // out[r][:] += S[r][:] V
        if (warp < kOutTiles) warp_mma<TS, false, false>(oacc, Sop + otm * 16 * lds, lds, V + otn * 16, ldv, kBL);
      } else {
        for (int c = 0; c < kBL; ++c) {
          const float v = V[c * ldv + op];
          for (int m = 0; m < kRowsPerThread; ++m) acc[m] += Sop[(orow + kRowsPerPass * m) * lds + c] * v;
        }
      }
      __syncthreads();
    }
    if constexpr (kTC) {
      if (warp < kOutTiles) wmma::store_matrix_sync(Out + otm * 16 * ldo + otn * 16, oacc, ldo, wmma::mem_row_major);
      __syncthreads();
      for (int m = 0; m < kRowsPerThread; ++m) acc[m] = Out[(orow + kRowsPerPass * m) * ldo + op];
    }
    // epilogue: scale and skip term, s_r = Delta_r (delta mode) or 1
    const int pp = p0 + op;
    if (pp < p.P) {
      for (int m = 0; m < kRowsPerThread; ++m) {
        const int r = r0 + orow + kRowsPerPass * m;
        if (r >= len) continue;
        const int64_t off = (start + r) * vstride + pp;
        const float skip_scale = p.d_skip_delta ? dl[r] : 1.f;
        float o = kDx ? dl[r] * acc[m] : acc[m];
        if (p.D) o += Dh * skip_scale * to_float(vsrc[off]);  // skip reads x_r (forward) or dy_r (dx)
        if (poison[m]) o = __int_as_float(0x7fc00000);        // NaN: reached by a non-finite Delta_j x_j, j <= r
        out[off] = from_float<T>(o);
      }
    }
  }
}

// Gradient kernel for everything but dx, one block per (sequence, head). With Q_ij = dy_i . x_j (all of P):
//   Z_ij = (C_i.B_j) M_ij Q_ij               -> dDelta_j += sum_i Z_ij            (= du_j . x_j)
//   dG_ij = Q_ij Delta_j M_ij                -> dC_i += sum_j dG_ij B_j, dB_j += sum_i dG_ij C_i
//   W_ij = Delta_j Z_ij (i != j, 0 where clamped) -> dcs_i = sum_j W_ij - sum_k W_ki, da_t = sum_{i>=t} dcs_i
//   dDelta_t += A da_t (+ D Q_tt in delta mode), dA += Delta_t da_t, dD += s_t Q_tt
//   dv = dDelta sigmoid(v), ddt = dv E, dE = dv dt, ddt_bias += dv
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) tissd_grad_kernel(const TissdParams p) {
  using TS = typename OperandOf<T, kTC>::type;
  constexpr int ldk = pitch<TS, kTC, kNC>, ldp = pitch<TS, kTC, kPC>, ldg = pitch<TS, kTC, kBL>;
  constexpr int lda = pitch<float, kTC, kBL>, ldn = pitch<float, kTC, kNC>;
  __shared__ float dl[kTissdMaxLen];
  __shared__ double cs[kTissdMaxLen];
  // row / column sums of W in float64: W_ij enters rowW_i and colW_j with the same value, so the sums that cancel
  // in da_t = sum_{i>=t} (rowW_i - colW_i) cancel (almost) exactly, even next to a huge Delta_t (a time gap)
  __shared__ double rowW[kTissdMaxLen], colW[kTissdMaxLen];
  __shared__ float colZ[kTissdMaxLen], diagQ[kTissdMaxLen];
  __shared__ __align__(128) TS Ck[kBL * ldk];
  __shared__ __align__(128) TS Bk[kBL * ldk];
  // phase-shared: the dy / x staging tiles of Q, later the [kBL, kNC] float result tile of dC / dB (tensor cores)
  constexpr int kStageBytes = 2 * kBL * ldp * int(sizeof(TS)), kOutBytes = kTC ? kBL * ldn * int(sizeof(float)) : 0;
  __shared__ __align__(128) unsigned char stage[kStageBytes > kOutBytes ? kStageBytes : kOutBytes];
  __shared__ __align__(128) float Sacc[kBL * lda];              // C_i.B_j, then Z_ij
  __shared__ __align__(128) unsigned char qbuf[kBL * lda * sizeof(float)];  // Q_ij (float), then dG_ij (TS)
  TS* Dy = reinterpret_cast<TS*>(stage);
  TS* Xs = Dy + kBL * ldp;
  float* dOut = reinterpret_cast<float*>(stage);
  float* Qacc = reinterpret_cast<float*>(qbuf);
  TS* Gop = reinterpret_cast<TS*>(qbuf);
  static_assert(kBL * ldg * sizeof(TS) <= kBL * lda * sizeof(float), "dG fits in Q's buffer");

  const int t = threadIdx.x, warp = t / 32;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / (p.H / p.G);
  const int64_t start = p.seq_start[s];
  const int64_t bstride = int64_t(p.G) * p.N, vstride = int64_t(p.H) * p.P;
  const T* dyh = static_cast<const T*>(p.dy) + int64_t(h) * p.P;
  int len = min(p.seq_len[s], p.max_len);
  if (len > 0) len = live_prefix(dyh, vstride, start, len, 0, p.P, rowW);  // all of P enters dy_i . x_j
  if (len <= 0) return;  // partial buffers (and the tokens past the live prefix) are zero-filled by the caller
  discretize_cumsum(p, start, len, h, dl, cs);
  rowW[t] = colW[t] = colZ[t] = diagQ[t] = 0.f;
  __syncthreads();

  const T* Bg = static_cast<const T*>(p.B) + int64_t(g) * p.N;
  const T* Cg = static_cast<const T*>(p.C) + int64_t(g) * p.N;
  const T* xh = static_cast<const T*>(p.x) + int64_t(h) * p.P;
  const int ntiles = (len + kBL - 1) / kBL;
  const int sc = t % kBL, sr = t / kBL;                 // score-tile element (sr + 8 m, sc)
  const int nk = t % kNC, nrow = t / kNC;               // [kBL, kNC] element (nrow + 4 m, nk)
  constexpr int kNRowsPerPass = kThreads / kNC;
  const int qtm = (warp % 4) / 2, qtn = warp % 2;       // tensor cores: warp's 16x16 tile of C.B (0-3) / Q (4-7)
  const int ntm = warp / 4, ntn = warp % 4;             // tensor cores: warp's 16x16 tile of a [kBL, kNC] result

  for (int it = 0; it < ntiles; ++it) {
    const int i0 = it * kBL;
    for (int jt = 0; jt <= it; ++jt) {
      const int j0 = jt * kBL;
      if constexpr (kTC) {
        // Sacc = C_i . B_j on warps 0-3 and Qacc = dy_i . x_j on warps 4-7, staged together: step s loads n-chunk s
        // (if any) and P-chunk s (if any). Leaves the last n-chunk in Ck / Bk, as score_tile does.
        const int nsteps_n = (p.N + kNC - 1) / kNC, nsteps_p = (p.P + kPC - 1) / kPC;
        const int nsteps = nsteps_n > nsteps_p ? nsteps_n : nsteps_p;
        const bool cb_warp = warp < 4;
        FragAcc<TS> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int step = 0; step < nsteps; ++step) {
          if (step < nsteps_n) {
            load_tile<T, TS, kBL, kNC>(Ck, ldk, Cg, bstride, start, i0, len, step * kNC, p.N);
            load_tile<T, TS, kBL, kNC>(Bk, ldk, Bg, bstride, start, j0, len, step * kNC, p.N);
          }
          if (step < nsteps_p) {
            load_tile<T, TS, kBL, kPC>(Dy, ldp, dyh, vstride, start, i0, len, step * kPC, p.P);
            load_tile<T, TS, kBL, kPC>(Xs, ldp, xh, vstride, start, j0, len, step * kPC, p.P);
          }
          __syncthreads();
          if (cb_warp && step < nsteps_n)
            warp_mma<TS, false, true>(acc, Ck + qtm * 16 * ldk, ldk, Bk + qtn * 16 * ldk, ldk, kNC);
          if (!cb_warp && step < nsteps_p)
            warp_mma<TS, false, true>(acc, Dy + qtm * 16 * ldp, ldp, Xs + qtn * 16 * ldp, ldp, kPC);
          __syncthreads();
        }
        float* dst = cb_warp ? Sacc : Qacc;
        wmma::store_matrix_sync(dst + qtm * 16 * lda + qtn * 16, acc, lda, wmma::mem_row_major);
      } else {
        score_tile<T, kTC>(p, Cg, Bg, start, i0, j0, len, Ck, Bk, Sacc, nullptr);  // Sacc = C_i . B_j
        float q[4] = {0.f, 0.f, 0.f, 0.f};                                   // Qacc = dy_i . x_j over P
        for (int k0 = 0; k0 < p.P; k0 += kPC) {
          load_tile<T, TS, kBL, kPC>(Dy, ldp, dyh, vstride, start, i0, len, k0, p.P);
          load_tile<T, TS, kBL, kPC>(Xs, ldp, xh, vstride, start, j0, len, k0, p.P);
          __syncthreads();
          for (int k = 0; k < kPC; ++k) {
            const float xv = Xs[sc * ldp + k];
            for (int m = 0; m < 4; ++m) q[m] += Dy[(sr + 8 * m) * ldp + k] * xv;
          }
          __syncthreads();
        }
        for (int m = 0; m < 4; ++m) Qacc[(sr + 8 * m) * lda + sc] = q[m];
      }
      __syncthreads();
      // element-wise: Z into Sacc (in place), dG into Gop (overwrites Qacc: all reads first, then a barrier)
      float gv[4], zv[4];
      for (int m = 0; m < 4; ++m) {
        const int r = sr + 8 * m, i = i0 + r, j = j0 + sc;
        gv[m] = zv[m] = 0.f;
        if (j <= i && i < len) {
          const float qv = Qacc[r * lda + sc];
          const float M = expf(fminf(float(cs[i] - cs[j]), 0.f));
          gv[m] = qv * dl[j] * M;
          zv[m] = Sacc[r * lda + sc] * M * qv;
          if (i == j) diagQ[i] = qv;
        }
      }
      __syncthreads();
      for (int m = 0; m < 4; ++m) {
        const int r = sr + 8 * m;
        Sacc[r * lda + sc] = zv[m];
        Gop[r * ldg + sc] = from_float<TS>(gv[m]);
      }
      __syncthreads();
      // row / column sums of the tile, one thread per row or column (fixed order: deterministic).
      // W_ij = Delta_j Z_ij, without W_ii (it adds to dcs_i and subtracts from it again; it is the largest term under
      // strong decay and would cost precision) and 0 where cs_i - cs_j > 0 (clamp(max=0) passes no gradient)
      auto w_of = [&](int r, int c) {
        const int i = i0 + r, j = j0 + c;
        return (i != j && float(cs[i] - cs[j]) <= 0.f) ? dl[j] * Sacc[r * lda + c] : 0.f;
      };
      if (t < kBL) {
        double acc = 0.0;
        for (int c = 0; c < kBL; ++c) acc += w_of(t, c);
        rowW[i0 + t] += acc;
      } else if (t < 2 * kBL) {
        const int c = t - kBL;
        double aw = 0.0;
        float az = 0.f;
        for (int r = 0; r < kBL; ++r) { aw += w_of(r, c); az += Sacc[r * lda + c]; }
        colW[j0 + c] += aw;
        colZ[j0 + c] += az;
      }
      // dC_i += dG B_j and dB_j += dG^T C_i, accumulated in global fp32 (one thread per entry and tile, in order)
      for (int k0 = 0; k0 < p.N; k0 += kNC) {
        if (p.N > kNC) {  // otherwise score_tile left exactly these chunks in Ck / Bk
          __syncthreads();
          load_tile<T, TS, kBL, kNC>(Ck, ldk, Cg, bstride, start, i0, len, k0, p.N);
          load_tile<T, TS, kBL, kNC>(Bk, ldk, Bg, bstride, start, j0, len, k0, p.N);
          __syncthreads();
        }
        if constexpr (kTC) {
          for (int pass = 0; pass < 2; ++pass) {  // pass 0: dC rows i (dG B), pass 1: dB rows j (dG^T C)
            FragAcc<TS> acc;
            wmma::fill_fragment(acc, 0.f);
            if (pass == 0)
              warp_mma<TS, false, false>(acc, Gop + ntm * 16 * ldg, ldg, Bk + ntn * 16, ldk, kBL);
            else
              warp_mma<TS, true, false>(acc, Gop + ntm * 16, ldg, Ck + ntn * 16, ldk, kBL);
            wmma::store_matrix_sync(dOut + ntm * 16 * ldn + ntn * 16, acc, ldn, wmma::mem_row_major);
            __syncthreads();
            const int row0 = pass == 0 ? i0 : j0;
            float* dst = pass == 0 ? p.dC_head : p.dB_head;
            for (int e = t; e < kBL * kNC; e += kThreads) {
              const int r = e / kNC, k = e % kNC;
              if (row0 + r < len && k0 + k < p.N) dst[((start + row0 + r) * p.H + h) * p.N + k0 + k] += dOut[r * ldn + k];
            }
            __syncthreads();
          }
        } else if (k0 + nk < p.N) {
          for (int m = 0; m < kBL / kNRowsPerPass; ++m) {
            const int r = nrow + kNRowsPerPass * m;
            float dc = 0.f, db = 0.f;
            for (int c = 0; c < kBL; ++c) {
              dc += Gop[r * ldg + c] * Bk[c * ldk + nk];  // row r = i, column c = j
              db += Gop[c * ldg + r] * Ck[c * ldk + nk];  // row r = j, column c = i
            }
            if (i0 + r < len) p.dC_head[((start + i0 + r) * p.H + h) * p.N + k0 + nk] += dc;
            if (j0 + r < len) p.dB_head[((start + j0 + r) * p.H + h) * p.N + k0 + nk] += db;
          }
        }
      }
      __syncthreads();
    }
  }

  // per-step epilogue, thread t = step t
  const bool valid = t < len;
  const double dcs = valid ? rowW[t] - colW[t] : 0.0;
  const float dDelta_direct = valid ? colZ[t] : 0.f, qtt = valid ? diagQ[t] : 0.f;
  __syncthreads();
  rowW[t] = dcs;
  __syncthreads();
  reverse_cumsum(rowW);  // da_t = sum_{i>=t} dcs_i
  const double da = rowW[t];
  const float A = p.A[h], Dh = p.D ? p.D[h] : 0.f;
  float dDelta = dDelta_direct + float(A * da);
  if (p.D && p.d_skip_delta) dDelta += Dh * qtt;
  float dv = 0.f;
  if (valid) {
    const int64_t tok = (start + t) * p.H + h;
    const float v = dt_input(p, tok, h);
    dv = p.dt_softplus ? dDelta / (1.f + expf(-v)) : dDelta;  // softplus' = sigmoid
    p.ddt[tok] = p.E ? dv * p.E[tok] : dv;
    if (p.dE) p.dE[tok] = dv * p.dt[tok];
  }
  const double dA = block_sum(valid ? dl[t] * da : 0.0, colW);
  const double ddt_bias = block_sum(dv, colW);
  const double dD = block_sum(valid ? (p.d_skip_delta ? dl[t] : 1.f) * qtt : 0.f, colW);
  if (t == 0) {
    const int64_t o = int64_t(s) * p.H + h;
    p.dA_part[o] = float(dA);
    if (p.ddt_bias_part) p.ddt_bias_part[o] = float(ddt_bias);
    if (p.dD_part) p.dD_part[o] = float(dD);
  }
}

cudaError_t check_params(const TissdParams& p) {
  if (p.nseq < 0 || p.H <= 0 || p.G <= 0 || p.H % p.G != 0 || p.P <= 0 || p.N <= 0) return cudaErrorInvalidValue;
  if (p.max_len < 0 || p.max_len > kTissdMaxLen) return cudaErrorInvalidValue;
  if (int64_t(p.nseq) * p.H > 0x7fffffffLL) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename T, bool kDx, bool kTC>
void launch_apply(const TissdParams& p, cudaStream_t stream) {
  if (p.P <= 32) {
    tissd_apply_kernel<T, 32, kDx, kTC><<<dim3(p.nseq * p.H, 1), kThreads, 0, stream>>>(p);
  } else {
    tissd_apply_kernel<T, 64, kDx, kTC><<<dim3(p.nseq * p.H, (p.P + 63) / 64), kThreads, 0, stream>>>(p);
  }
}

template <typename T, bool kTC>
void launch_bwd(const TissdParams& p, cudaStream_t stream) {
  launch_apply<T, true, kTC>(p, stream);
  tissd_grad_kernel<T, kTC><<<p.nseq * p.H, kThreads, 0, stream>>>(p);
}

}  // namespace

// 16-bit inputs always run on tensor cores (bf16 MMAs, or TF32 for fp16); fp32 inputs on TF32 tensor cores only when
// p.allow_tf32, else on the exact fp32 FMA path.
template <typename T>
cudaError_t tissd_quadratic_fwd_launch(const TissdParams& p, cudaStream_t stream) {
  cudaError_t err = check_params(p);
  if (err != cudaSuccess) return err;
  if (p.nseq == 0 || p.max_len == 0) return cudaSuccess;
  if constexpr (std::is_same<T, float>::value) {
    if (!p.allow_tf32) {
      launch_apply<float, false, false>(p, stream);
      return cudaGetLastError();
    }
  }
  launch_apply<T, false, true>(p, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t tissd_quadratic_bwd_launch(const TissdParams& p, cudaStream_t stream) {
  cudaError_t err = check_params(p);
  if (err != cudaSuccess) return err;
  if (p.nseq == 0 || p.max_len == 0) return cudaSuccess;
  if constexpr (std::is_same<T, float>::value) {
    if (!p.allow_tf32) {
      launch_bwd<float, false>(p, stream);
      return cudaGetLastError();
    }
  }
  launch_bwd<T, true>(p, stream);
  return cudaGetLastError();
}

template cudaError_t tissd_quadratic_fwd_launch<float>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_fwd_launch<__nv_bfloat16>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_fwd_launch<__half>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_bwd_launch<float>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_bwd_launch<__nv_bfloat16>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_bwd_launch<__half>(const TissdParams&, cudaStream_t);

}  // namespace mmm4rec
