// Thin torch binding of the quadratic TiSSD CUDA kernels: extension `mmm4rec_kernels._cuda`.
// allow_tf32 (fp32 inputs only): TF32 tensor cores instead of exact fp32 FMA; bf16 / fp16 always use tensor cores.
// Checks tensors, allocates zero-filled outputs, calls the launchers on the current stream, and sums the
// per-(sequence, head) partials with torch (deterministic). Python-level API: mmm4rec_kernels/cuda.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "tissd_quadratic.cuh"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_cuda(const Tensor& t, const char* name, at::ScalarType dtype, int dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
}

const float* opt_ptr(const OptTensor& t, const char* name, std::initializer_list<int64_t> shape) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_cuda(*t, name, at::kFloat, int(shape.size()));
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), name, " has shape ", t->sizes(), ", expected ",
              at::IntArrayRef(shape));
  return t->data_ptr<float>();
}

// Validates the inputs and fills everything of the params but the outputs.
mmm4rec::TissdParams make_params(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                                 const Tensor& C, const OptTensor& E, const OptTensor& dt_bias,
                                 const OptTensor& D, const Tensor& seq_start, const Tensor& seq_len,
                                 int64_t max_len, bool d_skip_delta, bool dt_softplus, bool allow_tf32) {
  check_cuda(x, "x", x.scalar_type(), 3);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const int64_t T = x.size(0), H = x.size(1), P = x.size(2);
  check_cuda(B, "B", dtype, 3);
  check_cuda(C, "C", dtype, 3);
  TORCH_CHECK(B.sizes() == C.sizes(), "B and C must have the same shape");
  const int64_t G = B.size(1), N = B.size(2);
  TORCH_CHECK(B.size(0) == T && G > 0 && H % G == 0, "B, C must be [T, G, n] with G dividing H");
  check_cuda(dt, "dt", at::kFloat, 2);
  TORCH_CHECK(dt.size(0) == T && dt.size(1) == H, "dt must be [T, H]");
  check_cuda(A, "A", at::kFloat, 1);
  TORCH_CHECK(A.size(0) == H, "A must be [H]");
  check_cuda(seq_start, "seq_start", at::kLong, 1);
  check_cuda(seq_len, "seq_len", at::kInt, 1);
  TORCH_CHECK(seq_start.size(0) == seq_len.size(0), "seq_start and seq_len must have the same length");
  TORCH_CHECK(max_len >= 0 && max_len <= mmm4rec::kTissdMaxLen, "CUDA quadratic TiSSD supports max_len <= ",
              mmm4rec::kTissdMaxLen, ", got ", max_len, " (use the chunked path)");
  TORCH_CHECK(x.device() == B.device() && x.device() == dt.device() && x.device() == seq_start.device(),
              "all tensors must be on the same device");

  mmm4rec::TissdParams p;
  p.x = x.data_ptr();
  p.dt = dt.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.E = opt_ptr(E, "E", {T, H});
  p.dt_bias = opt_ptr(dt_bias, "dt_bias", {H});
  p.D = opt_ptr(D, "D", {H});
  p.seq_start = seq_start.data_ptr<int64_t>();
  p.seq_len = seq_len.data_ptr<int32_t>();
  p.nseq = int(seq_start.size(0));
  p.H = int(H);
  p.G = int(G);
  p.P = int(P);
  p.N = int(N);
  p.max_len = int(max_len);
  p.d_skip_delta = d_skip_delta;
  p.dt_softplus = dt_softplus;
  p.allow_tf32 = allow_tf32;
  return p;
}

template <typename Fn>
void dispatch(at::ScalarType dtype, Fn&& fn) {
  cudaError_t err;
  if (dtype == at::kFloat) {
    err = fn(float{});
  } else if (dtype == at::kBFloat16) {
    err = fn(__nv_bfloat16{});
  } else {
    err = fn(__half{});
  }
  TORCH_CHECK(err == cudaSuccess, "tissd_quadratic CUDA launch failed: ", cudaGetErrorString(err));
}

Tensor tissd_quadratic_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                           const OptTensor& E, const OptTensor& dt_bias, const OptTensor& D,
                           const Tensor& seq_start, const Tensor& seq_len, int64_t max_len, bool d_skip_delta,
                           bool dt_softplus, bool allow_tf32) {
  auto p = make_params(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, d_skip_delta, dt_softplus,
                       allow_tf32);
  const c10::cuda::CUDAGuard guard(x.device());  // after the checks: x is a CUDA tensor
  Tensor y = at::zeros_like(x);  // padding tokens stay 0
  p.y = y.data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    return mmm4rec::tissd_quadratic_fwd_launch<decltype(tag)>(p, stream);
  });
  return y;
}

// Returns (dx, ddt, dA, dB, dC, dE, ddt_bias, dD); dE / ddt_bias / dD are undefined (None) when the input was.
std::vector<Tensor> tissd_quadratic_bwd(const Tensor& dy, const Tensor& x, const Tensor& dt, const Tensor& A,
                                        const Tensor& B, const Tensor& C, const OptTensor& E,
                                        const OptTensor& dt_bias, const OptTensor& D, const Tensor& seq_start,
                                        const Tensor& seq_len, int64_t max_len, bool d_skip_delta,
                                        bool dt_softplus, bool allow_tf32) {
  auto p = make_params(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, d_skip_delta, dt_softplus,
                       allow_tf32);
  const c10::cuda::CUDAGuard guard(x.device());  // after the checks: x is a CUDA tensor
  check_cuda(dy, "dy", x.scalar_type(), 3);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have x's shape");
  const int64_t T = x.size(0), H = x.size(1), nseq = seq_start.size(0), G = B.size(1), N = B.size(2);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::zeros_like(x);
  Tensor ddt = at::zeros({T, H}, f32);
  Tensor dE = p.E ? at::zeros({T, H}, f32) : Tensor();
  Tensor dB_head = at::zeros({T, H, N}, f32);  // per-head gradients, summed over a group's heads below
  Tensor dC_head = at::zeros({T, H, N}, f32);
  Tensor dA_part = at::zeros({nseq, H}, f32);
  Tensor ddt_bias_part = at::zeros({nseq, H}, f32);
  Tensor dD_part = at::zeros({nseq, H}, f32);
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.ddt = ddt.data_ptr<float>();
  p.dE = p.E ? dE.data_ptr<float>() : nullptr;
  p.dB_head = dB_head.data_ptr<float>();
  p.dC_head = dC_head.data_ptr<float>();
  p.dA_part = dA_part.data_ptr<float>();
  p.ddt_bias_part = ddt_bias_part.data_ptr<float>();
  p.dD_part = dD_part.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    return mmm4rec::tissd_quadratic_bwd_launch<decltype(tag)>(p, stream);
  });
  // dB[t, g] = sum over the heads h of group g of dB_head[t, h]   (head h reads group h / (H / G))
  auto group_sum = [&](const Tensor& per_head) {
    Tensor g = G == H ? per_head : per_head.view({T, G, H / G, N}).sum(2);
    return g.to(x.scalar_type());
  };
  Tensor dA = dA_part.sum(0);
  Tensor ddt_bias = p.dt_bias ? ddt_bias_part.sum(0) : Tensor();
  Tensor dD = p.D ? dD_part.sum(0) : Tensor();
  return {dx, ddt, dA, group_sum(dB_head), group_sum(dC_head), dE, ddt_bias, dD};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused time-aware SSD (TiSSD), quadratic form: CUDA kernels";
  m.def("tissd_quadratic_fwd", &tissd_quadratic_fwd, "y = TiSSD quadratic forward (token layout)",
        py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("E"), py::arg("dt_bias"),
        py::arg("D"), py::arg("seq_start"), py::arg("seq_len"), py::arg("max_len"), py::arg("d_skip_delta"),
        py::arg("dt_softplus"), py::arg("allow_tf32"));
  m.def("tissd_quadratic_bwd", &tissd_quadratic_bwd,
        "(dx, ddt, dA, dB, dC, dE, ddt_bias, dD) = TiSSD quadratic backward (token layout)", py::arg("dy"),
        py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("E"), py::arg("dt_bias"),
        py::arg("D"), py::arg("seq_start"), py::arg("seq_len"), py::arg("max_len"), py::arg("d_skip_delta"),
        py::arg("dt_softplus"), py::arg("allow_tf32"));
  m.attr("max_len") = mmm4rec::kTissdMaxLen;
}
