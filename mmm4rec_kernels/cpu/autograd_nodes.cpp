// Two eager CPU calls as torch C++ autograd nodes around the native library's C entries (causal_conv.cpp,
// tissd_layer.cpp), the twins of the Python nodes ops._ConvCPU and torch_backend._TiSSDCPU: the same kernels with
// the same arguments (so the same values, bit for bit), without the Python interpreter on the call's forward and
// backward (measured: 0.14-0.22 ms less per call at batch 256, where a kernel has swept the caches; benchmarks/
// bench_call_overhead.py).  Built by mmm4rec_kernels/cpu/nodes.py with torch's headers (pybind11 module
// _mmm4rec_nodes); the C entries are passed in as addresses (bind), so this file does not depend on the kernels'
// build.  The Python callers decide the path and check the arguments; the checks here only turn a wrong direct
// call into an error instead of an out-of-bounds read.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// the C entries, per dtype (0: float, 1: double); signatures as in causal_conv.cpp / tissd_layer.cpp with void*
typedef void (*conv_fwd_t)(const void*, int64_t, int64_t, const void*, int64_t, int64_t, const void*, void*,
                           int64_t, int64_t, int64_t, int64_t, int, int);
typedef void (*conv_bwd_t)(const void*, int64_t, int64_t, const void*, int64_t, int64_t, const void*, int64_t,
                           int64_t, int64_t, int64_t, int, int, const int64_t*, void*, int64_t, void*, void*, int);
typedef int (*tissd_fwd_t)(const void*, const void*, const void*, const void*, const void*, const void*, int, int,
                           int, const void*, const void*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, void*, int);
typedef void (*tissd_bwd_t)(const void*, const void*, const void*, const void*, const void*, const void*,
                            const void*, int, int, int, const void*, const void*, const int64_t*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, void*, void*, void*, void*, void*, void*, void*,
                            void*, int);
conv_fwd_t conv_fwd[2];
conv_bwd_t conv_bwd[2];
tissd_fwd_t tissd_fwd[2];
tissd_bwd_t tissd_bwd[2];

// addresses in this order: conv fwd f32, f64, conv bwd f32, f64, tissd fwd f32, f64, tissd bwd f32, f64
void bind(const std::vector<int64_t>& a) {
    TORCH_CHECK(a.size() == 8, "bind: 8 addresses expected, got ", a.size());
    for (int d = 0; d < 2; ++d) {
        conv_fwd[d] = reinterpret_cast<conv_fwd_t>(a[0 + d]);
        conv_bwd[d] = reinterpret_cast<conv_bwd_t>(a[2 + d]);
        tissd_fwd[d] = reinterpret_cast<tissd_fwd_t>(a[4 + d]);
        tissd_bwd[d] = reinterpret_cast<tissd_bwd_t>(a[6 + d]);
    }
}

int dtype_index(const Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "mmm4rec native node: float32 / float64 only, got ", t.scalar_type());
    return t.scalar_type() == at::kDouble;
}
const void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mut(Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
Tensor empty_like_or_undefined(const Tensor& t) { return t.defined() ? at::empty_like(t) : Tensor(); }

// @once_differentiable's rule: a backward run under create_graph hands out gradients whose own backward raises
variable_list once_differentiable(variable_list grads, const variable_list& grad_outputs) {
    bool any_requires_grad = false;
    for (const auto& g : grad_outputs) any_requires_grad |= g.defined() && g.requires_grad();
    if (!at::GradMode::is_enabled() || !any_requires_grad) return grads;
    for (auto& g : grads)
        if (g.defined()) g = g.detach().requires_grad_(true);
    return torch::autograd::DelayedError(
               "trying to differentiate twice a function that was marked with @once_differentiable",
               int64_t(grads.size()))
        .apply(std::move(grads));
}

// ---------------------------------------------------------------------------------- causal conv (+ SiLU) node
void check_same(const Tensor& t, const Tensor& x, const char* name) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), "mmm4rec native node: ", name,
                " must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
}

void check_conv(const Tensor& x, const Tensor& w, const Tensor& bias, const std::vector<int64_t>& sizes) {
    TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "mmm4rec conv node: x must be [b, L, C] with unit channel stride");
    const int64_t C = x.size(2);
    TORCH_CHECK((w.dim() == 2 || (w.dim() == 3 && w.size(1) == 1)) && w.size(0) == C && w.size(-1) >= 1,
                "mmm4rec conv node: weight must be [C, k] or [C, 1, k] with C = ", C, ", got ", w.sizes());
    check_same(w, x, "weight");
    TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == C && bias.is_contiguous()),
                "mmm4rec conv node: bias must be a contiguous [", C, "]");
    if (bias.defined()) check_same(bias, x, "bias");
    int64_t total = 0;
    for (int64_t c : sizes) total += c;
    TORCH_CHECK(!sizes.empty() && total == C, "mmm4rec conv node: sizes must sum to C = ", C);
}

// x [b, L, C] with unit channel stride, w [C, k] or [C, 1, k] (any strides), bias [C] or none; sizes: channel pieces
// (one piece: y itself; else its split, whose gradients are taken piece by piece, never concatenated)
struct ConvNode : public torch::autograd::Function<ConvNode> {
    static variable_list forward(AutogradContext* ctx, Tensor x, Tensor w, std::optional<Tensor> bias_or_none,
                                 bool silu, std::vector<int64_t> sizes) {
        ctx->set_materialize_grads(false);
        const Tensor bias = bias_or_none.value_or(Tensor());
        check_conv(x, w, bias, sizes);
        const int64_t b = x.size(0), L = x.size(1), C = x.size(2);
        Tensor y = at::empty({b, L, C}, x.options());
        if (y.numel())
            conv_fwd[dtype_index(x)](x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), w.stride(0), w.stride(-1),
                                     ptr(bias), y.data_ptr(), b, L, C, w.size(-1), silu, at::get_num_threads());
        ctx->save_for_backward({x, w, bias});
        ctx->saved_data["silu"] = silu;
        ctx->saved_data["sizes"] = sizes;
        if (sizes.size() == 1) return {y};
        return y.split_with_sizes(sizes, 2);
    }

    static variable_list backward(AutogradContext* ctx, variable_list gys) {
        variable_list s = ctx->get_saved_variables();
        const Tensor &x = s[0], &w = s[1], &bias = s[2];
        const bool silu = ctx->saved_data["silu"].toBool();
        const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
        const int64_t b = x.size(0), L = x.size(1), C = x.size(2), k = w.size(-1);
        Tensor dx = at::empty({b, L, C}, x.options()), dw = at::empty(w.sizes(), w.options());   // [C, (1,) k]
        Tensor db = empty_like_or_undefined(bias);
        if (!dx.numel()) {
            dw.zero_();
            if (db.defined()) db.zero_();
        } else {
            std::vector<Tensor> rows(sizes.size());     // each piece's gy with unit channel stride (kept alive)
            std::vector<int64_t> flat;                   // per piece: gy's address (0: unused), start, size, strides
            int64_t start = 0;
            for (size_t i = 0; i < sizes.size(); ++i) {
                const Tensor& g = gys[i];
                if (g.defined()) rows[i] = g.stride(2) == 1 ? g : g.contiguous();
                const Tensor& r = rows[i];
                flat.insert(flat.end(), {r.defined() ? reinterpret_cast<int64_t>(r.data_ptr()) : 0, start, sizes[i],
                                         r.defined() ? r.stride(0) : 0, r.defined() ? r.stride(1) : 0});
                start += sizes[i];
            }
            conv_bwd[dtype_index(x)](x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), w.stride(0), w.stride(-1),
                                     ptr(bias), b, L, C, k, silu, int(sizes.size()), flat.data(), dx.data_ptr(),
                                     dx.stride(1), dw.data_ptr(), mut(db), at::get_num_threads());
        }
        return once_differentiable({dx, dw, db, Tensor(), Tensor()}, gys);
    }
};

variable_list causal_conv(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, bool silu,
                          const std::vector<int64_t>& sizes) {
    return ConvNode::apply(x, w, bias, silu, sizes);
}

// ------------------------------------------------------------------------------------------------ tissd() node
struct NonFinite {};                                      // thrown out of the forward, caught by tissd() below

// Delta = softplus(dt * ts + dt_bias) (or without softplus), a = A Delta, y = quadratic form + D skip; x [b, L, H, P],
// dt / ts [b, L, H], A / dt_bias [H], B / C [b, L, G, n], D [H] or [H, P], valid_len [b] int64: contiguous, one
// float dtype; ts, dt_bias, D, valid_len may be none.  When a valid row of y is not finite the call returns an
// undefined tensor (None in Python; no node is recorded): the caller then runs the general path.
void check_tissd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                 const Tensor& ts, const Tensor& dt_bias, const Tensor& D, const Tensor& valid_len) {
    TORCH_CHECK(x.dim() == 4 && B.dim() == 4 && C.dim() == 4, "mmm4rec tissd node: x, B, C must be 4-D");
    const int64_t b = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3), G = B.size(2), n = B.size(3);
    TORCH_CHECK(G >= 1 && H % G == 0 && B.sizes() == C.sizes() && B.size(0) == b && B.size(1) == L,
                "mmm4rec tissd node: B, C must be [", b, ", ", L, ", G, n] with G dividing H = ", H);
    auto bLH = [&](const Tensor& t) { return t.dim() == 3 && t.size(0) == b && t.size(1) == L && t.size(2) == H; };
    TORCH_CHECK(bLH(dt) && (!ts.defined() || bLH(ts)), "mmm4rec tissd node: dt / time_scale must be [b, L, H]");
    TORCH_CHECK(A.dim() == 1 && A.size(0) == H && (!dt_bias.defined() || (dt_bias.dim() == 1 && dt_bias.size(0) == H)),
                "mmm4rec tissd node: A / dt_bias must be [H]");
    TORCH_CHECK(!D.defined() || (D.dim() == 1 && D.size(0) == H) || (D.dim() == 2 && D.size(0) == H && D.size(1) == P),
                "mmm4rec tissd node: D must be [H] or [H, P]");
    TORCH_CHECK(!valid_len.defined() || (valid_len.dim() == 1 && valid_len.size(0) == b &&
                                         valid_len.scalar_type() == at::kLong && valid_len.is_contiguous()),
                "mmm4rec tissd node: lengths must be a contiguous int64 [b]");
    for (const Tensor* t : {&x, &dt, &A, &B, &C, &ts, &dt_bias, &D})
        if (t->defined()) {
            check_same(*t, x, "every tensor");
            TORCH_CHECK(t->is_contiguous(), "mmm4rec tissd node: inputs must be contiguous");
        }
}

struct TiSSDNode : public torch::autograd::Function<TiSSDNode> {
    static Tensor forward(AutogradContext* ctx, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                          std::optional<Tensor> ts_, std::optional<Tensor> dt_bias_, std::optional<Tensor> D_,
                          std::optional<Tensor> valid_len_, bool skip_delta, bool softplus) {
        const Tensor ts = ts_.value_or(Tensor()), dt_bias = dt_bias_.value_or(Tensor()), D = D_.value_or(Tensor()),
                     valid_len = valid_len_.value_or(Tensor());
        check_tissd(x, dt, A, B, C, ts, dt_bias, D, valid_len);
        const int64_t b = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3), G = B.size(2), n = B.size(3);
        Tensor y = at::empty({b, L, H, P}, x.options());
        const int d_per_head = D.defined() && D.dim() == 1;
        if (y.numel() &&
            tissd_fwd[dtype_index(x)](x.data_ptr(), dt.data_ptr(), ptr(ts), ptr(dt_bias), A.data_ptr(), ptr(D),
                                      d_per_head, skip_delta, softplus, B.data_ptr(), C.data_ptr(),
                                      valid_len.defined() ? valid_len.data_ptr<int64_t>() : nullptr, b, L, H, P, G,
                                      n, y.data_ptr(), at::get_num_threads()))
            throw NonFinite();
        ctx->save_for_backward({x, dt, A, B, C, ts, dt_bias, D, valid_len});
        ctx->saved_data["skip_delta"] = skip_delta;
        ctx->saved_data["softplus"] = softplus;
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        variable_list s = ctx->get_saved_variables();
        const Tensor &x = s[0], &dt = s[1], &A = s[2], &B = s[3], &C = s[4], &ts = s[5], &dt_bias = s[6], &D = s[7],
                     &valid_len = s[8];
        const bool skip_delta = ctx->saved_data["skip_delta"].toBool(), softplus = ctx->saved_data["softplus"].toBool();
        const Tensor gy = grads[0].contiguous();
        Tensor dx = at::empty_like(x), ddt = at::empty_like(dt), dA = at::empty_like(A), dB = at::empty_like(B),
               dC = at::empty_like(C), dts = empty_like_or_undefined(ts), ddt_bias = empty_like_or_undefined(dt_bias),
               dD = empty_like_or_undefined(D);
        const int64_t b = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3), G = B.size(2), n = B.size(3);
        if (gy.numel()) {
            tissd_bwd[dtype_index(x)](gy.data_ptr(), x.data_ptr(), dt.data_ptr(), ptr(ts), ptr(dt_bias), A.data_ptr(),
                                      ptr(D), D.defined() && D.dim() == 1, skip_delta, softplus, B.data_ptr(),
                                      C.data_ptr(), valid_len.defined() ? valid_len.data_ptr<int64_t>() : nullptr, b,
                                      L, H, P, G, n, dx.data_ptr(), ddt.data_ptr(), mut(dts), mut(ddt_bias),
                                      dA.data_ptr(), dB.data_ptr(), dC.data_ptr(), mut(dD), at::get_num_threads());
        } else {
            for (Tensor* t : {&dA, &ddt_bias, &dD})
                if (t->defined()) t->zero_();
        }
        return once_differentiable({dx, ddt, dA, dB, dC, dts, ddt_bias, dD, Tensor(), Tensor(), Tensor()}, grads);
    }
};

Tensor tissd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
             const std::optional<Tensor>& ts, const std::optional<Tensor>& dt_bias, const std::optional<Tensor>& D,
             const std::optional<Tensor>& valid_len, bool skip_delta, bool softplus) {
    try {
        return TiSSDNode::apply(x, dt, A, B, C, ts, dt_bias, D, valid_len, skip_delta, softplus);
    } catch (const NonFinite&) {
        return Tensor();                                  // None in Python
    }
}

}  // namespace

PYBIND11_MODULE(_mmm4rec_nodes, m) {
    m.doc() = "mmm4rec_kernels' eager CPU autograd nodes in C++ (built by mmm4rec_kernels/cpu/nodes.py)";
    m.def("bind", &bind, "the native library's C entries (8 addresses, see autograd_nodes.cpp)");
    m.def("causal_conv", &causal_conv, "ops._ConvCPU as a C++ node: a list of y's pieces");
    m.def("tissd", &tissd, "torch_backend._TiSSDCPU as a C++ node: y, or None when a valid row is not finite");
}
