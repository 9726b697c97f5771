// Fused time-aware SSD, quadratic form: forward and backward CUDA kernels (see tissd_quadratic.cuh).
//
// Kernels (one thread block of 256 threads per (sequence, head[, head-dim tile])):
//   tissd_apply_kernel<kDx=false>  y_i  = sum_{j<=i} (C_i.B_j) M_ij Delta_j x_j + D s_i x_i        (forward)
//   tissd_apply_kernel<kDx=true>   dx_j = Delta_j sum_{i>=j} (C_i.B_j) M_ij dy_i + D s_j dy_j      (backward)
//   tissd_grad_kernel              dB, dC, ddt, dE and partial dA, ddt_bias, dD                    (backward)
// with M_ij = exp(min(cs_i - cs_j, 0)) built from the block's own cumulative sum of a = A Delta.
// Sequence steps are processed in kBL x kBL tiles of the L x L score matrix held in shared memory; all math is
// fp32 FMA (exact for fp32 inputs, inputs of other types are converted when loaded). Reductions are sequential
// per thread or tree-shaped in shared memory: results are bitwise deterministic.
#include "tissd_quadratic.cuh"

namespace mmm4rec {
namespace {

constexpr int kThreads = 256;  // threads per block; also one thread per sequence step in scans
constexpr int kBL = 32;        // sequence tile: rows/columns of one score tile
constexpr int kNC = 64;        // d_state chunk loaded at once
constexpr int kPC = 32;        // head-dim chunk of the gradient kernel
static_assert(kThreads == kTissdMaxLen, "scans use one thread per step");

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

// tile[r][k] = scale_r * src[(start + r0 + r) * stride + col0 + k] for r0 + r < len and col0 + k < ncols, else 0.
// `src` already points at the head/group column; `scale` (optional) is indexed by step r0 + r.
template <typename T, int R, int K>
__device__ void load_tile(float (&tile)[R][K + 1], const T* src, int64_t stride, int64_t start, int r0, int len,
                          int col0, int ncols, const float* scale = nullptr) {
  for (int e = threadIdx.x; e < R * K; e += kThreads) {
    const int r = e / K, k = e % K;
    float v = 0.f;
    if (r0 + r < len && col0 + k < ncols) {
      v = to_float(src[(start + r0 + r) * stride + col0 + k]);
      if (scale) v *= scale[r0 + r];
    }
    tile[r][k] = v;
  }
}

// dot[m] = rowM_{r0 + r} . colM_{c0 + c} over all n, for r = threadIdx.x / kBL + 8 m, c = threadIdx.x % kBL.
// rowM/colM point at the group column of B or C (row stride G n). Leaves the last n-chunk in rowK/colK.
template <typename T>
__device__ void score_dots(const TissdParams& p, const T* rowM, const T* colM, int64_t start, int r0, int c0,
                           int len, float (&rowK)[kBL][kNC + 1], float (&colK)[kBL][kNC + 1], float (&dot)[4]) {
  const int64_t stride = int64_t(p.G) * p.N;
  const int c = threadIdx.x % kBL, rbase = threadIdx.x / kBL;
  for (int m = 0; m < 4; ++m) dot[m] = 0.f;
  for (int k0 = 0; k0 < p.N; k0 += kNC) {
    load_tile<T, kBL, kNC>(rowK, rowM, stride, start, r0, len, k0, p.N);
    load_tile<T, kBL, kNC>(colK, colM, stride, start, c0, len, k0, p.N);
    __syncthreads();
    for (int k = 0; k < kNC; ++k) {
      const float b = colK[c][k];
      for (int m = 0; m < 4; ++m) dot[m] += rowK[rbase + 8 * m][k] * b;
    }
    __syncthreads();
  }
}

// Forward (kDx = false), rows r = i, columns c = j <= i:
//     y_i  = sum_j (C_i.B_j) M_ij (Delta_j x_j) + D s_i x_i
// dx (kDx = true), rows r = j, columns c = i >= j (the transposed score matrix):
//     dx_j = Delta_j sum_i (C_i.B_j) M_ij dy_i + D s_j dy_j
// Grid: (nseq * H, ceil(P / TP)); block: kThreads.
template <typename T, int TP, bool kDx>
__global__ void __launch_bounds__(kThreads) tissd_apply_kernel(const TissdParams p) {
  constexpr int kRowsPerPass = kThreads / TP;   // rows of a [kBL, TP] output tile per pass
  constexpr int kRowsPerThread = kBL / kRowsPerPass;
  __shared__ float dl[kTissdMaxLen];
  __shared__ double cs[kTissdMaxLen];
  __shared__ float rowK[kBL][kNC + 1], colK[kBL][kNC + 1];
  __shared__ float S[kBL][kBL + 1];
  __shared__ float V[kBL][TP + 1];

  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / (p.H / p.G);
  const int p0 = blockIdx.y * TP;
  const int64_t start = p.seq_start[s];
  const int len = min(p.seq_len[s], p.max_len);  // max_len <= kTissdMaxLen bounds the shared arrays
  if (len <= 0) return;  // uniform over the block
  discretize_cumsum(p, start, len, h, dl, cs);

  const T* Bg = static_cast<const T*>(p.B) + int64_t(g) * p.N;
  const T* Cg = static_cast<const T*>(p.C) + int64_t(g) * p.N;
  const T* rowM = kDx ? Bg : Cg;
  const T* colM = kDx ? Cg : Bg;
  const int64_t vstride = int64_t(p.H) * p.P;
  const T* vsrc = static_cast<const T*>(kDx ? p.dy : p.x) + int64_t(h) * p.P;  // [T, H, P] at head h
  T* out = static_cast<T*>(kDx ? p.dx : p.y) + int64_t(h) * p.P;
  const float Dh = p.D ? p.D[h] : 0.f;

  const int ntiles = (len + kBL - 1) / kBL;
  const int sc = threadIdx.x % kBL, sr = threadIdx.x / kBL;     // score-tile element (sr + 8 m, sc)
  const int op = threadIdx.x % TP, orow = threadIdx.x / TP;     // output element (orow + kRowsPerPass m, op)

  for (int rt = 0; rt < ntiles; ++rt) {
    const int r0 = rt * kBL;
    float acc[kRowsPerThread];
    for (int m = 0; m < kRowsPerThread; ++m) acc[m] = 0.f;
    const int ct_lo = kDx ? rt : 0, ct_hi = kDx ? ntiles - 1 : rt;
    for (int ct = ct_lo; ct <= ct_hi; ++ct) {
      const int c0 = ct * kBL;
      float dot[4];
      score_dots<T>(p, rowM, colM, start, r0, c0, len, rowK, colK, dot);
      // S[r][c] = dot * M_ij, causal (j <= i) and inside the sequence
      for (int m = 0; m < 4; ++m) {
        const int r = r0 + sr + 8 * m, c = c0 + sc;
        const int i = kDx ? c : r, j = kDx ? r : c;
        const bool ok = j <= i && i < len;
        S[sr + 8 * m][sc] = ok ? dot[m] * expf(fminf(float(cs[i] - cs[j]), 0.f)) : 0.f;
      }
      // V[c][:] = Delta_c x_c (forward) or dy_c (dx), this head-dim tile
      load_tile<T, kBL, TP>(V, vsrc, vstride, start, c0, len, p0, p.P, kDx ? nullptr : dl);
      __syncthreads();
      for (int c = 0; c < kBL; ++c) {
        const float v = V[c][op];
        for (int m = 0; m < kRowsPerThread; ++m) acc[m] += S[orow + kRowsPerPass * m][c] * v;
      }
      __syncthreads();
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
template <typename T>
__global__ void __launch_bounds__(kThreads) tissd_grad_kernel(const TissdParams p) {
  __shared__ float dl[kTissdMaxLen];
  __shared__ double cs[kTissdMaxLen];
  // row / column sums of W in float64: W_ij enters rowW_i and colW_j with the same value, so the sums that cancel
  // in da_t = sum_{i>=t} (rowW_i - colW_i) cancel (almost) exactly, even next to a huge Delta_t (a time gap)
  __shared__ double rowW[kTissdMaxLen], colW[kTissdMaxLen];
  __shared__ float colZ[kTissdMaxLen], diagQ[kTissdMaxLen];
  __shared__ float Ck[kBL][kNC + 1], Bk[kBL][kNC + 1];
  __shared__ float Dy[kBL][kPC + 1], Xs[kBL][kPC + 1];
  __shared__ float Gt[kBL][kBL + 1], Zt[kBL][kBL + 1], Wt[kBL][kBL + 1];

  const int t = threadIdx.x;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / (p.H / p.G);
  const int64_t start = p.seq_start[s];
  const int len = min(p.seq_len[s], p.max_len);
  if (len <= 0) return;  // partial buffers are zero-filled by the caller
  discretize_cumsum(p, start, len, h, dl, cs);
  rowW[t] = colW[t] = colZ[t] = diagQ[t] = 0.f;
  __syncthreads();

  const int64_t bstride = int64_t(p.G) * p.N, vstride = int64_t(p.H) * p.P;
  const T* Bg = static_cast<const T*>(p.B) + int64_t(g) * p.N;
  const T* Cg = static_cast<const T*>(p.C) + int64_t(g) * p.N;
  const T* xh = static_cast<const T*>(p.x) + int64_t(h) * p.P;
  const T* dyh = static_cast<const T*>(p.dy) + int64_t(h) * p.P;
  const int ntiles = (len + kBL - 1) / kBL;
  const int sc = t % kBL, sr = t / kBL;                 // score-tile element (sr + 8 m, sc)
  const int nk = t % kNC, nrow = t / kNC;               // [kBL, kNC] element (nrow + 4 m, nk)
  constexpr int kNRowsPerPass = kThreads / kNC;

  for (int it = 0; it < ntiles; ++it) {
    const int i0 = it * kBL;
    for (int jt = 0; jt <= it; ++jt) {
      const int j0 = jt * kBL;
      float cb[4], q[4] = {0.f, 0.f, 0.f, 0.f};
      score_dots<T>(p, Cg, Bg, start, i0, j0, len, Ck, Bk, cb);    // cb = C_i . B_j
      for (int k0 = 0; k0 < p.P; k0 += kPC) {                      // q = dy_i . x_j
        load_tile<T, kBL, kPC>(Dy, dyh, vstride, start, i0, len, k0, p.P);
        load_tile<T, kBL, kPC>(Xs, xh, vstride, start, j0, len, k0, p.P);
        __syncthreads();
        for (int k = 0; k < kPC; ++k) {
          const float xv = Xs[sc][k];
          for (int m = 0; m < 4; ++m) q[m] += Dy[sr + 8 * m][k] * xv;
        }
        __syncthreads();
      }
      for (int m = 0; m < 4; ++m) {
        const int r = sr + 8 * m, i = i0 + r, j = j0 + sc;
        float gv = 0.f, zv = 0.f, wv = 0.f;
        if (j <= i && i < len) {
          const float diff = float(cs[i] - cs[j]);
          const float M = expf(fminf(diff, 0.f));
          gv = q[m] * dl[j] * M;
          zv = cb[m] * M * q[m];
          // W_ii adds to dcs_i and subtracts from it again: leave it out (it is the largest term under strong
          // decay and would cost precision); clamp(max=0) passes no gradient where diff > 0
          wv = (i != j && diff <= 0.f) ? dl[j] * zv : 0.f;
          if (i == j) diagQ[i] = q[m];
        }
        Gt[r][sc] = gv;
        Zt[r][sc] = zv;
        Wt[r][sc] = wv;
      }
      __syncthreads();
      // row / column sums of the tile, one thread per row or column (fixed order: deterministic)
      if (t < kBL) {
        double acc = 0.0;
        for (int c = 0; c < kBL; ++c) acc += Wt[t][c];
        rowW[i0 + t] += acc;
      } else if (t < 2 * kBL) {
        const int c = t - kBL;
        double aw = 0.0;
        float az = 0.f;
        for (int r = 0; r < kBL; ++r) { aw += Wt[r][c]; az += Zt[r][c]; }
        colW[j0 + c] += aw;
        colZ[j0 + c] += az;
      }
      // dC_i += dG B_j and dB_j += dG^T C_i, accumulated in global fp32 (same thread owns the same entries)
      for (int k0 = 0; k0 < p.N; k0 += kNC) {
        if (p.N > kNC) {  // otherwise score_dots left exactly these tiles in Ck / Bk
          __syncthreads();
          load_tile<T, kBL, kNC>(Ck, Cg, bstride, start, i0, len, k0, p.N);
          load_tile<T, kBL, kNC>(Bk, Bg, bstride, start, j0, len, k0, p.N);
          __syncthreads();
        }
        if (k0 + nk < p.N) {
          for (int m = 0; m < kBL / kNRowsPerPass; ++m) {
            const int r = nrow + kNRowsPerPass * m;
            float dc = 0.f, db = 0.f;
            for (int c = 0; c < kBL; ++c) {
              dc += Gt[r][c] * Bk[c][nk];  // row r = i, column c = j
              db += Gt[c][r] * Ck[c][nk];  // row r = j, column c = i
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

template <typename T, bool kDx>
void launch_apply(const TissdParams& p, cudaStream_t stream) {
  if (p.P <= 32) {
    tissd_apply_kernel<T, 32, kDx><<<dim3(p.nseq * p.H, 1), kThreads, 0, stream>>>(p);
  } else {
    tissd_apply_kernel<T, 64, kDx><<<dim3(p.nseq * p.H, (p.P + 63) / 64), kThreads, 0, stream>>>(p);
  }
}

}  // namespace

template <typename T>
cudaError_t tissd_quadratic_fwd_launch(const TissdParams& p, cudaStream_t stream) {
  cudaError_t err = check_params(p);
  if (err != cudaSuccess) return err;
  if (p.nseq == 0 || p.max_len == 0) return cudaSuccess;
  launch_apply<T, false>(p, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t tissd_quadratic_bwd_launch(const TissdParams& p, cudaStream_t stream) {
  cudaError_t err = check_params(p);
  if (err != cudaSuccess) return err;
  if (p.nseq == 0 || p.max_len == 0) return cudaSuccess;
  launch_apply<T, true>(p, stream);
  tissd_grad_kernel<T><<<p.nseq * p.H, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t tissd_quadratic_fwd_launch<float>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_fwd_launch<__nv_bfloat16>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_fwd_launch<__half>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_bwd_launch<float>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_bwd_launch<__nv_bfloat16>(const TissdParams&, cudaStream_t);
template cudaError_t tissd_quadratic_bwd_launch<__half>(const TissdParams&, cudaStream_t);

}  // namespace mmm4rec
