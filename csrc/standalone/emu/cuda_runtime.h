// CPU emulation shim of the few CUDA runtime pieces the kernels and check_tissd.cu use (one block at a time,
// blockDim std::threads, __syncthreads = std::barrier, __shared__ = static locals shared by the threads).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
using std::min;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
typedef int cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* g_bar = nullptr;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline std::atomic<int> g_or{0};
inline int __syncthreads_or(int pred) {  // barrier; nonzero when pred is nonzero on any thread of the block
  if (pred) g_or.fetch_or(1);
  g_bar->arrive_and_wait();
  const int any = g_or.load();
  g_bar->arrive_and_wait();
  if (threadIdx.x == 0) g_or.store(0);
  g_bar->arrive_and_wait();
  return any;
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
template <typename K, typename P>
void emu_launch(K kernel, dim3 grid, int threads, int, cudaStream_t, const P& p) {
  std::barrier<> bar(threads);
  g_bar = &bar;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t);
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by);
          kernel(p);
          bar.arrive_and_wait();  // nobody starts the next block while shared memory is in use
        }
    });
  for (auto& th : pool) th.join();
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "error" : "success"; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
template <typename T> cudaError_t cudaMalloc(T** p, size_t n) { *p = (T*)std::malloc(n); return cudaSuccess; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return 0; }
inline cudaError_t cudaMemset(void* d, int v, size_t n) { std::memset(d, v, n); return 0; }
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t = 0) { std::memset(d, v, n); return 0; }
inline cudaError_t cudaDeviceSynchronize() { return 0; }
inline cudaError_t cudaEventCreate(cudaEvent_t*) { return 0; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = 0) { return 0; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return 0; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0; return 0; }
