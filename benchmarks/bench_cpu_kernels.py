"""The native CPU kernels against the torch code they replace, forward + backward, at the hidden-64 training shape
(batch 256, max_len 20, lengths uniform 1..20): the xBC causal conv + SiLU ([256, 20, 384]) and one TiSSD call of the
torch backend (H 8, P 16, G 8, n 16, D skip, time scale).  1 CPU thread, float32.

    pytest benchmarks/bench_cpu_kernels.py --benchmark-only --benchmark-columns=median,iqr,rounds

"native" needs a C++ compiler (skipped without one); "torch" is the same call with the native library bypassed;
"floor" copies the bytes the call must move once (every input it reads, forward and backward, and every output and
gradient it writes, float32) with one tensor copy_ of (read + written) / 2 bytes: what the kernels would take if they
were bound by this thread's memory bandwidth alone (the ratio native / floor is how far they are from it).
Gradients are set to None before each step, as optimizer.zero_grad() does (else every round would also time the
accumulation into .grad: one more read-read-write pass over each input, not part of the call).
test_causal_conv_kernel_fwd_bwd and test_tissd_scan_kernel_fwd_bwd time the native kernels alone
(mmm4rec_kernels.cpu.conv_forward + conv_backward; scan_forward + scan_backward on the same shape, D [H, P] skip,
step sizes given): the calls above also run what surrounds them (autograd, fresh gradient tensors; for the TiSSD call
the step sizes, the time scale and the finiteness check, in one native node on CPU), which the floor does not count.
"""
import pytest
import torch

import mmm4rec_kernels.cpu as native
from mmm4rec_kernels import torch_backend
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last

B, L, H, P, G, N = 256, 20, 8, 16, 8, 16


@pytest.fixture(params=["native", "torch", "floor"])
def impl(request, monkeypatch):
    if request.param == "native":
        if native.library() is None:
            pytest.skip(native.status())
    else:
        monkeypatch.setattr(native, "supports", lambda x, dtype=None: False)   # the TiSSD's torch backend
        monkeypatch.setattr(native, "available", lambda: False)               # the conv's dispatch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(threads)


def floor_copy(read_elems: int, written_elems: int):
    """A step that moves (read + written) float32 elements once: copy_ of half of them (a copy reads and writes)."""
    half = (read_elems + written_elems + 1) // 2
    src, dst = torch.randn(half), torch.empty(half)
    return lambda: dst.copy_(src)


def test_causal_conv_silu_fwd_bwd(benchmark, impl):
    if impl == "floor":        # fwd reads x, writes y; bwd reads gy, x, writes dx (w, bias: negligible)
        n = B * L * 384
        benchmark(floor_copy(3 * n, 2 * n))
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, 384, generator=g, requires_grad=True)
    w = torch.randn(384, 1, 4, generator=g, requires_grad=True)
    bias = torch.randn(384, generator=g, requires_grad=True)
    gy = torch.randn(B, L, 384, generator=g)

    def step():
        x.grad = w.grad = bias.grad = None       # as optimizer.zero_grad() leaves them: no accumulation pass timed
        causal_conv1d_channels_last(x, w, bias, silu=True).backward(gy)

    benchmark(step)


def test_causal_conv_kernel_fwd_bwd(benchmark, impl):
    if impl == "floor":        # the call's bytes: the kernels read / write exactly those
        n = B * L * 384
        benchmark(floor_copy(3 * n, 2 * n))
        return
    if impl == "torch":
        pytest.skip("the torch path of the same call: test_causal_conv_silu_fwd_bwd[torch]")
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(B, L, 384, generator=g), torch.randn(B, L, 384, generator=g)
    w, bias = torch.randn(384, 4, generator=g), torch.randn(384, generator=g)

    def step():
        native.conv_forward(x, w, bias, True)
        native.conv_backward(x, w, bias, True, [(0, 384, gy)])

    benchmark(step)


def test_tissd_quadratic_call_fwd_bwd(benchmark, impl):
    if impl == "floor":   # fwd reads x, dt, E, B, C, writes y; bwd reads gy and the inputs again, writes their grads
        inputs = B * L * H * P + 2 * B * L * H + 2 * B * L * G * N
        benchmark(floor_copy(2 * inputs + B * L * H * P, B * L * H * P + inputs))
        return
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in ((B, L, H, P), (B, L, H), (B, L, G, N),
                                                                     (B, L, G, N))]
    A = (-torch.rand(H, generator=g)).requires_grad_()
    E = torch.rand(B, L, H, generator=g).requires_grad_()
    D = torch.ones(H, requires_grad=True)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    gy = torch.randn(B, L, H, P, generator=g)
    x, dt, Bm, Cm = leaves

    def step():
        for t in (*leaves, A, E, D):
            t.grad = None
        torch_backend.tissd_torch(x, dt, A, Bm, Cm, time_scale=E, dt_bias=torch.zeros(H), D=D, lengths=lengths,
                                  path="quadratic").backward(gy)

    benchmark(step)


def test_tissd_scan_kernel_fwd_bwd(benchmark, impl):
    inputs = B * L * H * P + 2 * B * L * H + 2 * B * L * G * N
    if impl == "floor":        # the same bytes as the call's floor: the kernel reads / writes exactly those
        benchmark(floor_copy(2 * inputs + B * L * H * P, B * L * H * P + inputs))
        return
    if impl == "torch":
        pytest.skip("the torch path of the same call: test_tissd_quadratic_call_fwd_bwd[torch]")
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(B, L, H, P, generator=g), torch.randn(B, L, H, P, generator=g)
    delta, a = torch.rand(B, L, H, generator=g), -torch.rand(B, L, H, generator=g)
    Bm, Cm = torch.randn(B, L, G, N, generator=g), torch.randn(B, L, G, N, generator=g)
    D = torch.ones(H, P)
    lengths = torch.randint(1, L + 1, (B,), generator=g)

    def step():
        native.scan_forward(x, delta, a, Bm, Cm, D, lengths, True)
        native.scan_backward(gy, x, delta, a, Bm, Cm, D, lengths, True)

    benchmark(step)
