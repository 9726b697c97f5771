// CPU emulation shim of the nvcuda::wmma API used by csrc/tissd_quadratic.cu (see emulate_check.sh).
//
// A fragment holds its whole tile (row-major), not a lane's share. Lane 0 of each warp does the loads, products and
// stores; the other lanes skip them (their fragments are never stored), so a warp-level operation costs one tile
// product. Semantics follow the CUDA programming guide (WMMA section):
//   matrix_a (M x K), matrix_b (K x N): row_major element (r, c) at ptr[r * ldm + c], col_major at ptr[c * ldm + r];
//   accumulator (M x N) loads / stores with an explicit mem_row_major / mem_col_major layout.
// Checked here as on the GPU: pointers 32-byte aligned, ldm a multiple of 16 bytes (8 for 16-bit elements, 4 for
// float / tf32). TF32 operands enter the product with their 13 low mantissa bits dropped (the hardware ignores
// them; __float_to_tf32 rounds to nearest first), bf16 / fp16 operands exactly; products are summed in float.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

inline uint32_t emu_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float emu_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// cvt.rna.tf32.f32: round to nearest (ties away from zero) to a 10-bit mantissa; inf / nan pass through
inline float __float_to_tf32(float f) {
  const uint32_t u = emu_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;
  return emu_float((u + 0x1000u) & 0xffffe000u);
}

template <typename T> struct emu_storage { using type = T; };
template <> struct emu_storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K> struct emu_dims;
template <int M, int N, int K> struct emu_dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct emu_dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct emu_dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename emu_storage<T>::type;
  static constexpr int rows = emu_dims<Use, M, N, K>::rows, cols = emu_dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements] = {};  // x[r * cols + c]
};

inline bool emu_lane0() { return threadIdx.x % 32 == 0; }

inline void emu_check(const void* ptr, unsigned ldm, size_t elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0 || (ldm * elem_bytes) % 16 != 0) {
    std::fprintf(stderr, "wmma emulation: %s with a misaligned pointer %p or ldm %u (x %zu bytes)\n", what, ptr, ldm,
                 elem_bytes);
    std::abort();
  }
}

template <typename T> inline float emu_value(T v) { return float(v); }
inline float emu_value(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float emu_value(__half v) { return __half2float(v); }

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
  static_assert(std::is_same<typename fragment<Use, M, N, K, T, Layout>::element_type, P>::value,
                "pointer type must match the fragment element type");
  if (!emu_lane0()) return;
  emu_check(ptr, ldm, sizeof(P), "load_matrix_sync");
  constexpr bool col = std::is_same<Layout, col_major>::value;
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col ? ptr[size_t(c) * ldm + r] : ptr[size_t(r) * ldm + c];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  if (!emu_lane0()) return;
  emu_check(ptr, ldm, sizeof(float), "load_matrix_sync(accumulator)");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (!emu_lane0()) return;
  emu_check(ptr, ldm, sizeof(float), "store_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r]) = f.x[r * N + c];
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = v;
}

template <typename T> inline float emu_operand(T v) { return emu_value(v); }
template <> inline float emu_operand<float>(float v) { return emu_float(emu_bits(v) & 0xffffe000u); }  // tf32

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!emu_lane0()) return;
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc += emu_operand(a.x[m * K + k]) * emu_operand(b.x[k * N + n]);
      out[m * N + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
