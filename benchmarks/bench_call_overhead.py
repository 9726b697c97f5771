"""Where the native CPU calls' time goes beyond moving their bytes, at benchmarks/bench_cpu_kernels.py's shape
(batch 256, max_len 20, lengths 1..20; H 8, P 16, G 8, n 16; conv [256, 20, 384], k 4; float32, 1 thread):

  1. the SiLU inside the conv kernels: the same kernels with silu off (the conv alone) vs on (its exp and
     reciprocal, recomputed by the backward from x: it stores no pre-activation);
  2. autograd: one tissd() call of the torch backend (one native autograd node) and the conv call vs the same native
     forward + backward without autograd (outputs kept alive as autograd keeps them);
  3. that autograd + Python cost at batch 1 (native calls of ~0.1 ms), run as a micro-benchmark does (warm caches)
     and with a copy of 16 MB after each native call (as the kernels at batch 256 sweep L1 / L2 between two Python
     steps).

    python benchmarks/bench_call_overhead.py --rounds 300
    python benchmarks/bench_call_overhead.py --rounds 300 --cpp-node   # + the same node written in C++

--cpp-node builds (torch.utils.cpp_extension, ~30 s, needs torch's headers and a C++ compiler) a torch C++
autograd Function around the same two C entries (CPP_NODE below: what the tissd() call's Python node would cost as a
C++ one) and adds its rows to the tissd() groups; its outputs and gradients are checked equal to the call's first.

Each round runs every case once, in turn (interleaved: a busy neighbour slows all of them alike); the table gives
each case's median and best round, and its difference to the row above as the median of the per-round
differences.  "bytes floor": bench_cpu_kernels.py's (one copy_ of every byte the call reads and writes), here one
copy per round between the other cases (slower than that script's blocks of back-to-back copies).
"""
import argparse
import os
import statistics
import time

import torch

import mmm4rec_kernels.cpu as native
from mmm4rec_kernels import torch_backend
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last

try:                                    # pytest imports this as benchmarks.bench_call_overhead; the script runs alone
    from benchmarks.bench_cpu_kernels import conv_floor, ssd_floor
except ImportError:
    from bench_cpu_kernels import conv_floor, ssd_floor

L, H, P, G, N, CONV_C = 20, 8, 16, 8, 16, 384


def ssd_inputs(b: int):
    """The tissd() call's leaves (requires_grad) and the rest, as benchmarks/bench_cpu_kernels.py draws them."""
    g = torch.Generator().manual_seed(0)
    x, dt, Bm, Cm = (torch.randn(*s, generator=g).requires_grad_() for s in ((b, L, H, P), (b, L, H), (b, L, G, N),
                                                                          (b, L, G, N)))
    A = (-torch.rand(H, generator=g)).requires_grad_()
    E = torch.rand(b, L, H, generator=g).requires_grad_()
    D = torch.ones(H, requires_grad=True)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    gy = torch.randn(b, L, H, P, generator=g)
    return (x, dt, A, Bm, Cm, E, D), lengths, gy


CPP_NODE = r"""
// tissd() fwd + bwd as a torch C++ autograd Function around the native library's C entries (float32, D per head,
// D skip times Delta, softplus; what torch_backend._TiSSDCPU does in Python), for bench_call_overhead.py --cpp-node
#include <torch/extension.h>
using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
typedef int (*fwd_t)(const float*, const float*, const float*, const float*, const float*, const float*, int, int, int,
                     const float*, const float*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                     float*, int);
typedef void (*bwd_t)(const float*, const float*, const float*, const float*, const float*, const float*, const float*,
                      int, int, int, const float*, const float*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                      int64_t, int64_t, float*, float*, float*, float*, float*, float*, float*, float*, int);
static fwd_t entry_fwd;
static bwd_t entry_bwd;
void set_entries(int64_t fwd, int64_t bwd) {
    entry_fwd = reinterpret_cast<fwd_t>(fwd);
    entry_bwd = reinterpret_cast<bwd_t>(bwd);
}
static const float* f(const Tensor& t) { return t.data_ptr<float>(); }
static float* w(Tensor& t) { return t.data_ptr<float>(); }
struct TiSSDNode : public torch::autograd::Function<TiSSDNode> {
    static Tensor forward(AutogradContext* ctx, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor E,
                          Tensor dt_bias, Tensor D, Tensor len) {
        Tensor y = torch::empty_like(x);
        TORCH_CHECK(!entry_fwd(f(x), f(dt), f(E), f(dt_bias), f(A), f(D), 1, 1, 1, f(B), f(C), len.data_ptr<int64_t>(),
                               x.size(0), x.size(1), x.size(2), x.size(3), B.size(2), B.size(3), w(y), 1),
                    "a valid row of y is not finite");
        ctx->save_for_backward({x, dt, A, B, C, E, dt_bias, D, len});
        return y;
    }
    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        variable_list s = ctx->get_saved_variables();
        Tensor &x = s[0], &dt = s[1], &A = s[2], &B = s[3], &C = s[4], &E = s[5], &dtb = s[6], &D = s[7];
        Tensor gy = grads[0].contiguous();
        Tensor dx = torch::empty_like(x), ddt = torch::empty_like(dt), dA = torch::empty_like(A),
               dB = torch::empty_like(B), dC = torch::empty_like(C), dE = torch::empty_like(E),
               ddtb = torch::empty_like(dtb), dD = torch::empty_like(D);
        entry_bwd(f(gy), f(x), f(dt), f(E), f(dtb), f(A), f(D), 1, 1, 1, f(B), f(C), s[8].data_ptr<int64_t>(),
                  x.size(0), x.size(1), x.size(2), x.size(3), B.size(2), B.size(3), w(dx), w(ddt), w(dE), w(ddtb),
                  w(dA), w(dB), w(dC), w(dD), 1);
        return {dx, ddt, dA, dB, dC, dE, ddtb, dD, Tensor()};
    }
};
Tensor tissd_node(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor E, Tensor dt_bias, Tensor D, Tensor len) {
    return TiSSDNode::apply(x, dt, A, B, C, E, dt_bias, D, len);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("set_entries", &set_entries);
    m.def("tissd_node", &tissd_node);
}
"""


def cpp_node():
    """The C++ node's module (built once per source into a temp dir), its entries set to the loaded library's."""
    import ctypes
    import tempfile

    from torch.utils.cpp_extension import load_inline
    build = os.path.join(tempfile.gettempdir(), "mmm4rec_bench_cpp_node")
    os.makedirs(build, exist_ok=True)
    mod = load_inline("mmm4rec_bench_cpp_node", cpp_sources=[CPP_NODE], extra_cflags=["-O2"], build_directory=build)
    lib = native.library()
    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    mod.set_entries(address(lib.mmm4rec_tissd_fwd_f32), address(lib.mmm4rec_tissd_bwd_f32))
    return mod


def tissd_cases(b: int, sweep=None, node=None):
    """{'autograd': tissd() fwd + bwd, 'native': the same two native calls (, 'C++ node': node's, if given)};
    sweep() (if given) after each native call."""
    leaves, lengths, gy = ssd_inputs(b)
    x, dt, A, Bm, Cm, E, D = leaves
    dt_bias = torch.zeros(H)
    plain = [t.detach() for t in (x, dt, A, Bm, Cm, E)] + [dt_bias, D.detach()]
    after = sweep or (lambda: None)
    kept = []

    def autograd():
        for t in leaves:
            t.grad = None
        y = torch_backend.tissd_torch(x, dt, A, Bm, Cm, time_scale=E, dt_bias=dt_bias, D=D, lengths=lengths,
                                      path="quadratic")
        after()
        y.backward(gy)
        after()

    def direct():
        kept.clear()                        # the previous gradients die here, as .grad = None does above
        y = native.tissd_forward(*plain, lengths, True, True)
        after()
        kept.append(native.tissd_backward(gy, *plain, lengths, True, True))
        after()
        del y

    def cpp():
        for t in leaves:
            t.grad = None
        y = node.tissd_node(x, dt, A, Bm, Cm, E, dt_bias, D, lengths)
        after()
        y.backward(gy)
        after()
    return {"autograd": autograd, "native": direct, **({"C++ node": cpp} if node is not None else {})}


def conv_cases():
    """{'call': causal_conv1d_channels_last + SiLU fwd + bwd, 'kernels': the native pair, 'kernels, no SiLU'}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, L, CONV_C, generator=g, requires_grad=True)
    w = torch.randn(CONV_C, 1, 4, generator=g, requires_grad=True)
    bias = torch.randn(CONV_C, generator=g, requires_grad=True)
    gy = torch.randn(256, L, CONV_C, generator=g)
    xd, wd, bd = x.detach(), w.detach().reshape(CONV_C, 4), bias.detach()
    kept = []

    def call():
        x.grad = w.grad = bias.grad = None
        causal_conv1d_channels_last(x, w, bias, silu=True).backward(gy)

    def kernels(silu):
        def step():
            kept.clear()
            y = native.conv_forward(xd, wd, bd, silu)
            kept.append(native.conv_backward(xd, wd, bd, silu, [(0, CONV_C, gy)]))
            del y
        return step
    return {"call": call, "kernels": kernels(True), "kernels, no SiLU": kernels(False)}


def interleaved(cases: dict, rounds: int, warmup: int = 5):
    """{name: [seconds per round]}: each round runs every case once, in turn."""
    times = {k: [] for k in cases}
    for r in range(warmup + rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def rows(label: str, times: dict):
    """Table rows, in the dict's order: each case's median and best round (us), and its median per-round difference
    to the row above (the first row: none)."""
    out, above = [], None
    for k, v in times.items():
        diff = "" if above is None else f"{statistics.median([a - b for a, b in zip(v, times[above])]) * 1e6:+.0f}"
        out.append(f"| {label} | {k} | {statistics.median(v) * 1e6:.0f} | {min(v) * 1e6:.0f} | {diff} |")
        above = k
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--cpp-node", action="store_true", help="add the tissd() node written in C++ (builds it, ~30 s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if native.library() is None:
        raise SystemExit(native.status())
    node = cpp_node() if args.cpp_node else None
    if node is not None:                                     # the same values as the call's Python node, exactly
        leaves, lengths, gy = ssd_inputs(4)
        dt_bias = torch.zeros(H)
        ys = [node.tissd_node(*leaves[:6], dt_bias, leaves[6], lengths),
              torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], dt_bias=dt_bias, D=leaves[6],
                                        lengths=lengths, path="quadratic")]
        grads = [torch.autograd.grad(y, leaves, gy) for y in ys]
        if not (torch.equal(*ys) and all(torch.equal(a, b) for a, b in zip(*grads))):
            raise SystemExit("the C++ node's outputs or gradients differ from the tissd() call's")
    print("allocator:", native.retain_freed_memory())
    print("| shape | case | median us | best us | minus the row above (median of per-round differences) |")
    print("|---|---|---|---|---|")
    conv = conv_cases()
    conv = interleaved({"bytes floor": conv_floor(), "kernels, no SiLU": conv["kernels, no SiLU"],
                        "kernels": conv["kernels"], "call": conv["call"]}, args.rounds)
    print("\n".join(rows("conv b 256", conv)), flush=True)
    ssd = tissd_cases(256, node=node)
    ssd = interleaved({"bytes floor": ssd_floor(), "native": ssd["native"], "autograd": ssd["autograd"],
                       **({"C++ node": ssd["C++ node"]} if node is not None else {})}, args.rounds)
    print("\n".join(rows("tissd b 256", ssd)), flush=True)
    src, dst = torch.randn(4 << 20), torch.empty(4 << 20)        # 16 MB read, 16 MB written

    def sweep():
        dst.copy_(src)
    # warm and swept cases in separate loops (a warm case run right after a swept one would start cold)
    order = ("native", "autograd", "C++ node")
    for suffix, cases in (("", tissd_cases(1, node=node)), (", caches swept", tissd_cases(1, sweep, node))):
        t = interleaved({k + suffix: cases[k] for k in order if k in cases}, args.rounds)
        print("\n".join(rows("tissd b 1", t)), flush=True)


if __name__ == "__main__":
    main()
