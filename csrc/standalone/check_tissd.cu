// Standalone (no torch) check of the quadratic TiSSD CUDA kernels: random problems, GPU vs a float64 CPU loop for
// y and every gradient (relative-norm errors), then a cudaEvent timing of the paper's shape. Exit code 1 on failure.
//   ./tissd_cuda_check              all checks + timing
//   ./tissd_cuda_check --no-timing  checks only (--quick: the first few cases only)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../tissd_quadratic.cuh"
#include "tissd_cpu_ref.h"

using mmm4rec::TissdParams;
using mmm4rec_ref::Problem;

#define CUDA_OK(expr)                                                                       \
  do {                                                                                      \
    cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

template <typename T> T to_elem(double v);
template <> float to_elem<float>(double v) { return float(v); }
template <> __nv_bfloat16 to_elem<__nv_bfloat16>(double v) { return __float2bfloat16(float(v)); }
template <> __half to_elem<__half>(double v) { return __float2half(float(v)); }
template <typename T> double from_elem(T v);
template <> double from_elem<float>(float v) { return v; }
template <> double from_elem<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> double from_elem<__half>(__half v) { return __half2float(v); }

template <typename T> const char* type_name(bool tf32) {
  return sizeof(T) == 4 ? (tf32 ? "tf32" : "fp32") : std::is_same<T, __half>::value ? "fp16" : "bf16";
}

// device buffer holding `host` converted to T; host values are replaced by their T-rounded copies
template <typename T>
T* upload(std::vector<double>& host) {
  std::vector<T> tmp(host.size());
  for (size_t i = 0; i < host.size(); ++i) {
    tmp[i] = to_elem<T>(host[i]);
    host[i] = from_elem<T>(tmp[i]);
  }
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(tmp.size(), 1) * sizeof(T)));
  if (!tmp.empty()) CUDA_OK(cudaMemcpy(d, tmp.data(), tmp.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
T* zeros(size_t n) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(T)));
  CUDA_OK(cudaMemset(d, 0, std::max<size_t>(n, 1) * sizeof(T)));
  return d;
}

template <typename T>
std::vector<double> download(const T* d, size_t n) {
  std::vector<T> tmp(n);
  if (n) CUDA_OK(cudaMemcpy(tmp.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = from_elem<T>(tmp[i]);
  return out;
}

double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-12);  // floor: a gradient that underflows is ~0, not wrong
}

struct Case {
  int nseq, L, H, G, P, N;
  bool packed, d_skip_delta, dt_softplus, has_E;
  double dt_shift;    // added to dt: large -> strong decay
  bool gaps = false;  // E = 1e4 at ~15% of the steps: huge time gaps, |cs| >> |cs_i - cs_j| after them
};

Problem make_problem(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  Problem pb;
  pb.nseq = c.nseq; pb.H = c.H; pb.G = c.G; pb.P = c.P; pb.N = c.N;
  pb.d_skip_delta = c.d_skip_delta; pb.dt_softplus = c.dt_softplus;
  pb.has_E = c.has_E; pb.has_bias = true; pb.has_D = true;
  // lengths in [1, L]; packed: back to back, padded: stride L with a padded tail
  int64_t tok = 0;
  for (int s = 0; s < c.nseq; ++s) {
    const int len = s == 0 ? c.L : 1 + int(ud(rng) * c.L) % c.L;
    pb.seq_start.push_back(tok);
    pb.seq_len.push_back(len);
    tok += c.packed ? len : c.L;
  }
  pb.T = int(tok);
  auto fill = [&](std::vector<double>& v, size_t n, double scale, double shift) {
    v.resize(n);
    for (auto& e : v) e = shift + scale * nd(rng);
  };
  fill(pb.x, size_t(pb.T) * c.H * c.P, 1.0, 0.0);
  fill(pb.dy, size_t(pb.T) * c.H * c.P, 1.0, 0.0);
  fill(pb.B, size_t(pb.T) * c.G * c.N, 1.0 / std::sqrt(double(c.N)), 0.0);
  fill(pb.C, size_t(pb.T) * c.G * c.N, 1.0 / std::sqrt(double(c.N)), 0.0);
  fill(pb.dt, size_t(pb.T) * c.H, 1.0, c.dt_shift);
  pb.E.resize(size_t(pb.T) * c.H);
  for (auto& e : pb.E) e = c.gaps && ud(rng) < 0.15 ? 1e4 : 0.5 + 1.5 * ud(rng);
  if (c.gaps)
    for (auto& d : pb.dt) d = std::abs(d) + 0.1;
  pb.A.resize(c.H); pb.dt_bias.resize(c.H); pb.D.resize(c.H);
  for (int h = 0; h < c.H; ++h) {
    pb.A[h] = -(1.0 + 15.0 * ud(rng));
    pb.dt_bias[h] = std::log(std::expm1(0.001 + 0.1 * ud(rng)));  // inverse softplus
    pb.D[h] = nd(rng);
  }
  return pb;
}

// Everything the kernels write, downloaded as doubles (partials summed like the torch binding does).
struct Outputs {
  std::vector<double> y, dx, ddt, dE, dB, dC, dA, ddt_bias, dD;
};

// Uploads `pb` (its values are replaced by their T-rounded copies), runs forward + backward, downloads everything.
template <typename T>
Outputs run_kernels(Problem& pb, bool allow_tf32) {
  const int H = pb.H, G = pb.G, P = pb.P, N = pb.N, nseq = pb.nseq;
  const size_t TH = size_t(pb.T) * H, THP = TH * P, TGN = size_t(pb.T) * G * N, THN = TH * N;
  T* x = upload<T>(pb.x);
  T* dy = upload<T>(pb.dy);
  T* B = upload<T>(pb.B);
  T* C = upload<T>(pb.C);
  float* dt = upload<float>(pb.dt);
  float* E = upload<float>(pb.E);
  float* A = upload<float>(pb.A);
  float* bias = upload<float>(pb.dt_bias);
  float* D = upload<float>(pb.D);
  int64_t* seq_start = nullptr;
  int32_t* seq_len = nullptr;
  CUDA_OK(cudaMalloc(&seq_start, nseq * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&seq_len, nseq * sizeof(int32_t)));
  CUDA_OK(cudaMemcpy(seq_start, pb.seq_start.data(), nseq * sizeof(int64_t), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(seq_len, pb.seq_len.data(), nseq * sizeof(int32_t), cudaMemcpyHostToDevice));

  TissdParams p;
  p.x = x; p.dt = dt; p.A = A; p.B = B; p.C = C; p.E = pb.has_E ? E : nullptr; p.dt_bias = bias; p.D = D;
  p.seq_start = seq_start; p.seq_len = seq_len;
  p.nseq = nseq; p.H = H; p.G = G; p.P = P; p.N = N;
  p.max_len = *std::max_element(pb.seq_len.begin(), pb.seq_len.end());
  p.d_skip_delta = pb.d_skip_delta; p.dt_softplus = pb.dt_softplus; p.allow_tf32 = allow_tf32;
  p.y = zeros<T>(THP);
  p.dy = dy; p.dx = zeros<T>(THP);
  p.dB_head = zeros<float>(THN); p.dC_head = zeros<float>(THN);
  p.ddt = zeros<float>(TH); p.dE = pb.has_E ? zeros<float>(TH) : nullptr;
  p.dA_part = zeros<float>(size_t(nseq) * H);
  p.ddt_bias_part = zeros<float>(size_t(nseq) * H);
  p.dD_part = zeros<float>(size_t(nseq) * H);
  CUDA_OK(mmm4rec::tissd_quadratic_fwd_launch<T>(p, 0));
  CUDA_OK(mmm4rec::tissd_quadratic_bwd_launch<T>(p, 0));
  CUDA_OK(cudaDeviceSynchronize());

  auto sum_heads = [&](const std::vector<double>& head) {  // [T, H, N] -> [T, G, N]
    std::vector<double> out(TGN, 0.0);
    for (size_t t = 0; t < size_t(pb.T); ++t)
      for (int h = 0; h < H; ++h)
        for (int k = 0; k < N; ++k) out[(t * G + h / (H / G)) * N + k] += head[(t * H + h) * N + k];
    return out;
  };
  auto sum_seqs = [&](const float* part) {  // [nseq, H] -> [H]
    std::vector<double> v = download(part, size_t(nseq) * H), out(H, 0.0);
    for (int s = 0; s < nseq; ++s)
      for (int h = 0; h < H; ++h) out[h] += v[size_t(s) * H + h];
    return out;
  };
  Outputs o;
  o.y = download(static_cast<T*>(p.y), THP);
  o.dx = download(static_cast<T*>(p.dx), THP);
  o.ddt = download(p.ddt, TH);
  if (pb.has_E) o.dE = download(p.dE, TH);
  o.dB = sum_heads(download(p.dB_head, THN));
  o.dC = sum_heads(download(p.dC_head, THN));
  o.dA = sum_seqs(p.dA_part);
  o.ddt_bias = sum_seqs(p.ddt_bias_part);
  o.dD = sum_seqs(p.dD_part);
  for (void* ptr : {(void*)x, (void*)dy, (void*)B, (void*)C, (void*)dt, (void*)E, (void*)A, (void*)bias, (void*)D,
                    (void*)seq_start, (void*)seq_len, p.y, p.dx, (void*)p.dB_head, (void*)p.dC_head, (void*)p.ddt,
                    (void*)p.dE, (void*)p.dA_part, (void*)p.ddt_bias_part, (void*)p.dD_part})
    if (ptr) CUDA_OK(cudaFree(ptr));
  return o;
}

// fp32 inputs: exact FMA path (allow_tf32 = false) or TF32 tensor cores; 16-bit inputs: always tensor cores.
template <typename T>
bool run_case(const Case& c, std::mt19937& rng, double tol, bool allow_tf32 = false) {
  Problem pb = make_problem(c, rng);
  const Outputs got = run_kernels<T>(pb, allow_tf32);
  const mmm4rec_ref::Grads want = mmm4rec_ref::reference(pb);
  struct Item { const char* name; double err; };
  std::vector<Item> items = {
      {"y", rel_err(got.y, want.y)},
      {"dx", rel_err(got.dx, want.dx)},
      {"ddt", rel_err(got.ddt, want.ddt)},
      {"dA", rel_err(got.dA, want.dA)},
      {"dB", rel_err(got.dB, want.dB)},
      {"dC", rel_err(got.dC, want.dC)},
      {"ddt_bias", rel_err(got.ddt_bias, want.ddt_bias)},
      {"dD", rel_err(got.dD, want.dD)},
  };
  if (c.has_E) items.push_back({"dE", rel_err(got.dE, want.dE)});
  bool ok = true;
  double worst = 0.0;
  std::string detail;
  for (const auto& it : items) {
    worst = std::max(worst, it.err);
    if (!(it.err <= tol)) {  // also catches NaN
      ok = false;
      detail += std::string(" ") + it.name + "=" + std::to_string(it.err);
    }
  }
  std::printf("%-4s nseq=%-3d L=%-3d H=%d G=%d P=%-3d n=%-3d %s skip=%s sp=%d E=%d shift=%-5g max_rel=%.2e %s%s\n",
              type_name<T>(allow_tf32), c.nseq, c.L, c.H, c.G, c.P, c.N, c.packed ? "packed" : "padded",
              c.d_skip_delta ? "delta" : "plain", int(c.dt_softplus), int(c.has_E), c.dt_shift, worst,
              ok ? "ok" : "FAIL", detail.c_str());
  return ok;
}

// NaN causality: one NaN / inf at valid step t of sequence s (in x, dt, E, B or C) may only reach the outputs at
// steps >= t of s. With dy = 0 on those rows (a loss over rows < t), EVERY output of the backward equals the run
// without the bad value exactly, and so do the forward's rows < t of s, the other sequences and the padding (0);
// the bad value does reach some row >= t.
template <typename T>
bool nan_case(const char* input, double value, std::mt19937& rng, bool allow_tf32 = false) {
  const Case c{3, 40, 2, 1, 64, 16, false, true, true, true, 0.0};  // two score tiles, a padded tail
  Problem clean = make_problem(c, rng);
  const int s = 1, t = 20, H = c.H, P = c.P;
  clean.seq_len[s] = 37;
  for (int tt = t; tt < c.L; ++tt)
    for (int e = 0; e < H * P; ++e) clean.dy[(size_t(s) * c.L + tt) * H * P + e] = 0.0;
  Problem bad = clean;
  const size_t tok = size_t(s) * c.L + t;
  std::string name(input);
  if (name == "x") bad.x[(tok * H + 1) * P + 5] = value;
  else if (name == "dt") bad.dt[tok * H + 0] = value;
  else if (name == "E") bad.E[tok * H + 1] = value;
  else if (name == "B") bad.B[(tok * c.G + 0) * c.N + 3] = value;
  else bad.C[(tok * c.G + 0) * c.N + 7] = value;
  const Outputs a = run_kernels<T>(clean, allow_tf32), b = run_kernels<T>(bad, allow_tf32);
  bool ok = true, reached = false;
  std::string detail;
  auto same = [&](const std::vector<double>& u, const std::vector<double>& v, const char* what) {
    for (size_t i = 0; i < u.size(); ++i)
      if (!(u[i] == v[i])) { ok = false; detail += std::string(" ") + what; return; }
  };
  for (size_t i = 0; i < a.y.size(); ++i) {  // [T, H, P]: token i / (H P)
    const size_t tk = i / (size_t(H) * P);
    const int seq = int(tk / c.L), step = int(tk % c.L);
    if (seq == s && step >= t && step < clean.seq_len[s]) { reached |= !std::isfinite(b.y[i]); continue; }
    if (!(a.y[i] == b.y[i]) || (step >= clean.seq_len[seq] && b.y[i] != 0.0)) { ok = false; detail += " y"; break; }
  }
  if (!reached) { ok = false; detail += " (nothing reached rows >= t)"; }
  same(a.dx, b.dx, "dx"); same(a.ddt, b.ddt, "ddt"); same(a.dE, b.dE, "dE"); same(a.dB, b.dB, "dB");
  same(a.dC, b.dC, "dC"); same(a.dA, b.dA, "dA"); same(a.ddt_bias, b.ddt_bias, "ddt_bias"); same(a.dD, b.dD, "dD");
  std::printf("%-4s non-finite %-2s = %-4g at step %d of sequence %d: %s%s\n", type_name<T>(allow_tf32), input, value,
              t, s, ok ? "ok" : "FAIL", detail.c_str());
  return ok;
}

// ms per call of the forward and of forward + backward (including the zero fills the binding does)
template <typename T>
void time_shape(int nseq, int L, int H, int G, int P, int N, bool allow_tf32 = false) {
  const size_t T_ = size_t(nseq) * L, TH = T_ * H, THP = TH * P, TGN = T_ * G * N, THN = TH * N;
  std::vector<double> h_x(THP, 0.5), h_B(TGN, 0.1), h_dt(TH, 0.0), h_A(H, -1.0), h_bias(H, -3.0), h_D(H, 1.0),
      h_E(TH, 1.0);
  std::vector<int64_t> starts(nseq);
  std::vector<int32_t> lens(nseq, L);
  for (int s = 0; s < nseq; ++s) starts[s] = int64_t(s) * L;
  TissdParams p;
  T* x = upload<T>(h_x);
  T* B = upload<T>(h_B);
  p.x = x; p.dy = x; p.B = B; p.C = B;
  p.dt = upload<float>(h_dt); p.E = upload<float>(h_E); p.A = upload<float>(h_A);
  p.dt_bias = upload<float>(h_bias); p.D = upload<float>(h_D);
  int64_t* d_start = nullptr;
  int32_t* d_len = nullptr;
  CUDA_OK(cudaMalloc(&d_start, nseq * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&d_len, nseq * sizeof(int32_t)));
  CUDA_OK(cudaMemcpy(d_start, starts.data(), nseq * sizeof(int64_t), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_len, lens.data(), nseq * sizeof(int32_t), cudaMemcpyHostToDevice));
  p.seq_start = d_start; p.seq_len = d_len;
  p.nseq = nseq; p.H = H; p.G = G; p.P = P; p.N = N; p.max_len = L; p.allow_tf32 = allow_tf32;
  p.y = zeros<T>(THP); p.dx = zeros<T>(THP);
  p.dB_head = zeros<float>(THN); p.dC_head = zeros<float>(THN);
  p.ddt = zeros<float>(TH); p.dE = zeros<float>(TH);
  p.dA_part = zeros<float>(size_t(nseq) * H); p.ddt_bias_part = zeros<float>(size_t(nseq) * H);
  p.dD_part = zeros<float>(size_t(nseq) * H);
  auto fwd = [&] {
    CUDA_OK(cudaMemsetAsync(p.y, 0, THP * sizeof(T)));
    CUDA_OK(mmm4rec::tissd_quadratic_fwd_launch<T>(p, 0));
  };
  auto bwd = [&] {
    CUDA_OK(cudaMemsetAsync(p.dx, 0, THP * sizeof(T)));
    CUDA_OK(cudaMemsetAsync(p.dB_head, 0, THN * sizeof(float)));
    CUDA_OK(cudaMemsetAsync(p.dC_head, 0, THN * sizeof(float)));
    CUDA_OK(mmm4rec::tissd_quadratic_bwd_launch<T>(p, 0));
  };
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  const int iters = 50;
  float ms_f = 0.f, ms_fb = 0.f;
  for (int w = 0; w < 5; ++w) { fwd(); bwd(); }
  CUDA_OK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) fwd();
  CUDA_OK(cudaEventRecord(b));
  CUDA_OK(cudaEventSynchronize(b));
  CUDA_OK(cudaEventElapsedTime(&ms_f, a, b));
  CUDA_OK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) { fwd(); bwd(); }
  CUDA_OK(cudaEventRecord(b));
  CUDA_OK(cudaEventSynchronize(b));
  CUDA_OK(cudaEventElapsedTime(&ms_fb, a, b));
  std::printf("time %s (b,L,H,P,n,G)=(%d,%d,%d,%d,%d,%d): fwd %.3f ms, fwd+bwd %.3f ms\n",
              type_name<T>(allow_tf32), nseq, L, H, P, N, G, ms_f / iters, ms_fb / iters);
  CUDA_OK(cudaDeviceSynchronize());
}

constexpr double kTolFp32 = 1e-5, kTolTf32 = 1e-2, kTolBf16 = 1e-2, kTolFp16 = 5e-3;

int main(int argc, char** argv) {
  bool timing = true, quick = false;
  for (int a = 1; a < argc; ++a) {
    timing &= std::string(argv[a]) != "--no-timing";
    quick |= std::string(argv[a]) == "--quick";
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("tissd_cuda_check: no CUDA device, nothing to check\n");
    return 0;
  }
  std::mt19937 rng(1234);
  // nseq, L, H, G, P, n, packed, d_skip_delta, dt_softplus, has_E, dt_shift
  const std::vector<Case> cases = {
      {3, 1, 1, 1, 32, 16, false, true, true, true, 0.0},
      {4, 7, 2, 1, 32, 16, false, true, true, true, 0.0},
      {3, 20, 8, 8, 64, 64, false, true, true, true, 0.0},
      {3, 20, 8, 2, 64, 64, true, false, true, true, 0.0},
      {2, 63, 4, 4, 40, 16, false, true, false, false, 0.5},
      {2, 130, 2, 1, 256, 64, true, true, true, true, 0.0},
      {2, 130, 2, 2, 64, 96, false, false, true, true, -6.0},  // weak decay, n > 64 (two chunks)
      {2, 33, 2, 1, 64, 16, false, true, true, true, 3.0},     // strong decay
      {2, 33, 2, 1, 64, 16, false, true, true, true, 30.0},    // huge steps everywhere: decays underflow
      {3, 70, 2, 2, 64, 16, true, true, true, true, 0.0, true},  // a few huge time gaps
      {2, 256, 1, 1, 64, 16, true, true, true, true, 0.0},
  };
  bool ok = true;
  const size_t ncases = quick ? 4 : cases.size();
  // relative-norm tolerances vs float64: exact fp32 FMA; TF32 (10-bit mantissa operands); bf16 (8-bit) and fp16
  // (11-bit) inputs whose masked scores / gradient weights are also rounded to the input type for the second MMA
  for (size_t i = 0; i < ncases; ++i) ok &= run_case<float>(cases[i], rng, kTolFp32);
  for (size_t i = 0; i < ncases; ++i) ok &= run_case<float>(cases[i], rng, kTolTf32, /*allow_tf32=*/true);
  for (size_t i = 0; i < ncases; ++i) ok &= run_case<__nv_bfloat16>(cases[i], rng, kTolBf16);
  for (size_t i = 0; i < ncases; ++i) ok &= run_case<__half>(cases[i], rng, kTolFp16);
  const double kNan = std::nan(""), kInf = HUGE_VAL;
  const std::vector<std::pair<const char*, double>> bad_inputs = {
      {"x", kInf}, {"dt", kNan}, {"E", kNan}, {"B", -kInf}, {"C", kNan}};
  for (const auto& [input, value] : bad_inputs) {
    ok &= nan_case<float>(input, value, rng);
    if (!quick || input[0] == 'x') {
      ok &= nan_case<float>(input, value, rng, /*allow_tf32=*/true);
      ok &= nan_case<__nv_bfloat16>(input, value, rng);
      ok &= nan_case<__half>(input, value, rng);
    }
  }
  // error code beyond the length limit
  TissdParams bad;
  bad.nseq = 1; bad.H = 1; bad.G = 1; bad.P = 1; bad.N = 1; bad.max_len = mmm4rec::kTissdMaxLen + 1;
  if (mmm4rec::tissd_quadratic_fwd_launch<float>(bad, 0) != cudaErrorInvalidValue) {
    std::printf("expected cudaErrorInvalidValue for max_len > %d\n", mmm4rec::kTissdMaxLen);
    ok = false;
  }
  if (timing) {  // the paper's shape (b, L, H, P, n, G) = (1024, 20, 8, 64, 64, 8), a large batch, a wide head
    time_shape<float>(1024, 20, 8, 8, 64, 64);
    time_shape<float>(1024, 20, 8, 8, 64, 64, /*allow_tf32=*/true);
    time_shape<__nv_bfloat16>(1024, 20, 8, 8, 64, 64);
    time_shape<float>(8192, 20, 8, 8, 64, 64);
    time_shape<float>(8192, 20, 8, 8, 64, 64, /*allow_tf32=*/true);
    time_shape<__nv_bfloat16>(8192, 20, 8, 8, 64, 64);
    time_shape<float>(2048, 50, 1, 1, 512, 64);
    time_shape<float>(2048, 50, 1, 1, 512, 64, /*allow_tf32=*/true);
    time_shape<__nv_bfloat16>(2048, 50, 1, 1, 512, 64);
  }
  std::printf("%s\n", ok ? "ALL OK" : "FAILURES");
  return ok ? 0 : 1;
}
