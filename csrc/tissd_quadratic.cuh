// Fused time-aware SSD, quadratic (attention-like) form: CUDA launchers, free of torch headers.
//
// Token layout (see mmm4rec_kernels/CONTRACT.md), all contiguous:
//   x, y, dy, dx [T, H, P] (element type T_), dt, E, ddt, dE [T, H] float32,
//   B, C [T, G, n] (element type T_), head h reads group h / (H / G),
//   A, dt_bias, D [H] float32, seq_start [nseq] int64, seq_len [nseq] int32.
// Per sequence and head:
//   Delta_t = softplus(dt_t E_t + dt_bias), cs_t = sum_{k<=t} A Delta_k,
//   y_i = sum_{j<=i} (C_i . B_j) exp(min(cs_i - cs_j, 0)) Delta_j x_j + D s_i x_i  (s = Delta or 1).
// Padding tokens are never read or written: callers allocate outputs zero-filled.
// A NaN / inf input at valid step t reaches only the outputs at steps >= t of its sequence (and, in the backward,
// only through the rows whose dy is nonzero: rows after the last such row are not processed at all, their tokens
// keep the caller's zeros).
// Requires sm_80 or newer (bf16 / TF32 tensor cores).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mmm4rec {

constexpr int kTissdMaxLen = 256;  // longest sequence the quadratic kernels accept

struct TissdParams {
  // inputs
  const void* x = nullptr;          // [T, H, P]
  const float* dt = nullptr;        // [T, H]
  const float* A = nullptr;         // [H]
  const void* B = nullptr;          // [T, G, n]
  const void* C = nullptr;          // [T, G, n]
  const float* E = nullptr;         // [T, H] or null (E = 1)
  const float* dt_bias = nullptr;   // [H] or null (0)
  const float* D = nullptr;         // [H] or null (no skip)
  const int64_t* seq_start = nullptr;  // [nseq]
  const int32_t* seq_len = nullptr;    // [nseq]
  int nseq = 0, H = 0, G = 0, P = 0, N = 0;  // N = d_state n
  int max_len = 0;                  // >= every seq_len, <= kTissdMaxLen
  bool d_skip_delta = true;         // s_t = Delta_t (official) or 1 (mamba_ssm)
  bool dt_softplus = true;
  bool allow_tf32 = false;          // fp32 inputs: TF32 tensor cores (true) or exact fp32 FMA (false); 16-bit
                                    // inputs always use tensor cores (bf16 MMAs; TF32 MMAs for fp16), fp32 accumulate
  // forward output
  void* y = nullptr;                // [T, H, P], zero-filled by the caller
  // backward input / outputs (all zero-filled by the caller)
  const void* dy = nullptr;         // [T, H, P]
  void* dx = nullptr;               // [T, H, P]
  float* dB_head = nullptr;         // [T, H, n] float32, per head (caller sums the heads of a group)
  float* dC_head = nullptr;         // [T, H, n] float32, per head
  float* ddt = nullptr;             // [T, H]
  float* dE = nullptr;              // [T, H] or null when E is null
  float* dA_part = nullptr;         // [nseq, H] per-(sequence, head) partial sums
  float* ddt_bias_part = nullptr;   // [nseq, H]
  float* dD_part = nullptr;         // [nseq, H]
};

// y = forward(params). Returns cudaErrorInvalidValue for bad sizes (max_len > kTissdMaxLen, G not dividing H).
template <typename T>
cudaError_t tissd_quadratic_fwd_launch(const TissdParams& p, cudaStream_t stream);

// dx, dB_head, dC_head, ddt, dE and the per-(sequence, head) partials of dA, ddt_bias, dD.
template <typename T>
cudaError_t tissd_quadratic_bwd_launch(const TissdParams& p, cudaStream_t stream);

extern template cudaError_t tissd_quadratic_fwd_launch<float>(const TissdParams&, cudaStream_t);
extern template cudaError_t tissd_quadratic_fwd_launch<__nv_bfloat16>(const TissdParams&, cudaStream_t);
extern template cudaError_t tissd_quadratic_fwd_launch<__half>(const TissdParams&, cudaStream_t);
extern template cudaError_t tissd_quadratic_bwd_launch<float>(const TissdParams&, cudaStream_t);
extern template cudaError_t tissd_quadratic_bwd_launch<__nv_bfloat16>(const TissdParams&, cudaStream_t);
extern template cudaError_t tissd_quadratic_bwd_launch<__half>(const TissdParams&, cudaStream_t);

}  // namespace mmm4rec
