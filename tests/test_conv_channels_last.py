"""causal_conv1d_channels_last against nn.Conv1d + SiLU on transposed tensors, float64, on both implementations:
the native C++ kernel (mmm4rec_kernels.cpu) and the torch path with its hand-written backward."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmm4rec_kernels.modules import CausalDepthwiseConv1d
from mmm4rec_kernels.modules import conv as conv_module
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last
from mmm4rec_kernels.torch_backend import COVER_MAX_LEN, segment_sum_stable


@pytest.fixture(params=["native", "torch"])
def impl(request, monkeypatch):
    """Run the test on the native kernel (skipped only where no C++ compiler exists) and on the torch path."""
    if request.param == "native":
        request.getfixturevalue("native_cpu")                   # skip without a compiler, fail if it does not load
    else:
        monkeypatch.setattr(conv_module.native, "available", lambda: False)
    return request.param


def rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm().clamp_min(1e-300))


def conv_ref(x, weight, bias, silu):
    """The definition: nn.functional.conv1d over [b, C, L] with k-1 zeros in front, then SiLU."""
    k = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=x.shape[2]).transpose(1, 2)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("L", [1, 2, 7, 20, 63])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("silu,with_bias", [(True, True), (False, True), (True, False)])
def test_forward_and_gradients_match_conv1d(impl, L, k, silu, with_bias):
    g = torch.Generator().manual_seed(L * 10 + k)
    b, C = 3, 5
    x = torch.randn(b, L, C, generator=g, dtype=torch.float64) * 3      # large enough to reach SiLU's curvature
    w = torch.randn(C, 1, k, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64) if with_bias else None
    cot = torch.randn(b, L, C, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((bias,) if with_bias else ())]
    ours = causal_conv1d_channels_last(leaves[0], leaves[1], leaves[2] if with_bias else None, silu)
    grads = torch.autograd.grad(ours, leaves, cot)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((bias,) if with_bias else ())]
    ref = conv_ref(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, silu)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    assert rel(ours, ref) < 1e-12
    for name, a, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert rel(a, r) < 1e-12, name


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)])
def test_split_output_matches_split_of_conv1d(impl, silu, used):
    """split=[...]: the pieces equal torch.split of the reference, and every gradient matches with some pieces unused
    (their gradient is None inside the backward: treated as 0)."""
    g = torch.Generator().manual_seed(len(used) * 7 + silu)
    b, L, sizes = 3, 9, [4, 2, 3]
    x = torch.randn(b, L, sum(sizes), generator=g, dtype=torch.float64) * 3
    w = torch.randn(sum(sizes), 1, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    cots = [torch.randn(b, L, s, generator=g, dtype=torch.float64) for s in sizes]
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    pieces = causal_conv1d_channels_last(*leaves, silu=silu, split=sizes)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    ref_pieces = torch.split(conv_ref(*ref_leaves, silu), sizes, dim=-1)
    assert len(pieces) == 3
    for p, r in zip(pieces, ref_pieces):
        assert rel(p, r) < 1e-12
    loss = sum((pieces[i] * cots[i]).sum() for i in used)
    ref_loss = sum((ref_pieces[i] * cots[i]).sum() for i in used)
    for name, a, r in zip(("dx", "dweight", "dbias"), torch.autograd.grad(loss, leaves),
                          torch.autograd.grad(ref_loss, ref_leaves)):
        assert rel(a, r) < 1e-12, name
    with pytest.raises(ValueError, match="split"):
        causal_conv1d_channels_last(x, w, bias, split=[4, 4])


def test_module_method_equals_module_forward_and_is_causal(impl):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv1d(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(conv.forward_channels_last(x), conv(x.transpose(1, 2)).transpose(1, 2))
    bumped = x.clone()
    bumped[:, 5] += 100.0                                   # a change at t=5 leaves t<5 untouched
    y0, y1 = conv.forward_channels_last(x, silu=True), conv.forward_channels_last(bumped, silu=True)
    assert torch.equal(y0[:, :5], y1[:, :5]) and not torch.equal(y0[:, 5], y1[:, 5])


def test_strided_input_float32_and_threads(impl):
    """A channel slice of a wider tensor (row stride != C, as the in_proj pieces), float32 against float64 (1e-5),
    and 1 vs 2 threads (the native kernel's weight gradient sums per thread)."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 13, 40, generator=g, dtype=torch.float64) * 2
    x64 = wide[..., 7:7 + 24]                                  # [4, 13, 24], row stride 40
    w64 = torch.randn(24, 1, 4, generator=g, dtype=torch.float64)
    b64 = torch.randn(24, generator=g, dtype=torch.float64)
    cot = torch.randn(4, 13, 24, generator=g, dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
    ref = conv_ref(*ref_leaves, True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    threads = torch.get_num_threads()
    try:
        for dtype, tol, nthreads in ((torch.float64, 1e-12, 1), (torch.float64, 1e-12, 2), (torch.float32, 1e-5, 1)):
            torch.set_num_threads(nthreads)
            xw = wide.to(dtype).requires_grad_()
            leaves = [xw, w64.to(dtype).requires_grad_(), b64.to(dtype).requires_grad_()]
            y = causal_conv1d_channels_last(xw[..., 7:7 + 24], leaves[1], leaves[2], silu=True)
            assert y.dtype == dtype and rel(y.double(), ref) < tol
            dwide, dw, db = torch.autograd.grad(y, leaves, cot.to(dtype))
            assert float(dwide[..., :7].abs().max()) == 0 and float(dwide[..., 31:].abs().max()) == 0
            for name, a, r in zip(("dx", "dweight", "dbias"), (dwide[..., 7:31], dw, db), ref_grads):
                assert rel(a.double(), r) < tol, (name, dtype, nthreads)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,C", [(torch.float32, 264), (torch.float64, 256), (torch.float32, 256)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_native_outputs_of_a_megabyte_or_more(native_cpu, dtype, C, nthreads):
    """y and dx of at least 1 MB are written with non-temporal stores (causal_conv.cpp: kStreamBytes) where a block's
    address is 64-byte aligned, plain stores elsewhere: C 264 fp32 puts every other row off the 64-byte grid (and a
    partial block at each row's end), dx into a slice of a wider gradient (row stride 300) is never aligned as a
    whole.  Everything against conv1d + SiLU in float64 (1e-12 / 1e-5), with 1 and 2 threads."""
    g = torch.Generator().manual_seed(C + nthreads)
    b, L = 64, 20
    assert b * L * C * torch.tensor([], dtype=dtype).element_size() >= 1 << 20
    x64 = torch.randn(b, L, C, generator=g, dtype=torch.float64) * 2
    w64 = torch.randn(C, 1, 4, generator=g, dtype=torch.float64)
    b64 = torch.randn(C, generator=g, dtype=torch.float64)
    gy64 = torch.randn(b, L, C, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
    ref = conv_ref(*leaves, True)
    ref_grads = torch.autograd.grad(ref, leaves, gy64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(nthreads)
        x, w, bias, gy = (t.to(dtype) for t in (x64, w64.reshape(C, 4), b64, gy64))
        y = native_cpu.conv_forward(x, w, bias, True)
        assert rel(y.double(), ref) < tol
        dx, dw, db = native_cpu.conv_backward(x, w, bias, True, [(0, C, gy)])
        wide = torch.full((b, L, 300), 7.0, dtype=dtype)
        dx_slice, _, _ = native_cpu.conv_backward(x, w, bias, True, [(0, C, gy)], dx_out=wide[..., 5:5 + C])
    finally:
        torch.set_num_threads(threads)
    for name, a, r in zip(("dx", "dweight", "dbias", "dx into a slice"), (dx, dw, db, wide[..., 5:5 + C]),
                          ref_grads + (ref_grads[0],)):
        assert rel(a.reshape(r.shape).double(), r) < tol, name
    assert float(wide[..., :5].sub(7).abs().max()) == 0 and float(wide[..., 5 + C:].sub(7).abs().max()) == 0


def test_native_kernel_is_used_on_cpu_and_can_be_turned_off(native_cpu, tmp_path):
    """With a compiler, CPU float tensors take the native kernel (the autograd node says so: the C++ one where it
    is loaded, else the Python one); MMM4REC_NATIVE_CPU=0 and a broken compiler fall back to the torch path with the
    reason in one line."""
    from mmm4rec_kernels.cpu import nodes
    x = torch.randn(2, 5, 3, requires_grad=True)
    y = causal_conv1d_channels_last(x, torch.randn(3, 1, 4), silu=True)
    expect = "ConvNode" if nodes.get() is not None else "_ConvCPUBackward"
    assert expect in (y.grad_fn.name() if expect == "ConvNode" else type(y.grad_fn).__name__)
    assert "native CPU kernels: " in native_cpu.status()
    code = ("import torch, mmm4rec_kernels.cpu as n; from mmm4rec_kernels.modules.conv import "
            "causal_conv1d_channels_last as f; x = torch.randn(2, 5, 3, requires_grad=True); "
            "print(type(f(x, torch.randn(3, 1, 4)).grad_fn).__name__); print(n.status())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for env, expect in (({"MMM4REC_NATIVE_CPU": "0"}, "MMM4REC_NATIVE_CPU=0"),
                        ({"CXX": str(tmp_path / "no-such-compiler"), "MMM4REC_CACHE_DIR": str(tmp_path)},
                         "unavailable")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                             env={**os.environ, "PYTHONPATH": root, **env}, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        backward_name, status = out.stdout.strip().splitlines()
        assert backward_name == "_CausalConvChannelsLastBackward" and expect in status and "torch path" in status


def test_bad_shapes_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"x must be \[b, L, C\]"):
        causal_conv1d_channels_last(torch.zeros(2, 3), torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d_channels_last(torch.zeros(2, 3, 5), torch.zeros(4, 1, 4))


@pytest.mark.parametrize("L", [1, 7, 20, COVER_MAX_LEN, COVER_MAX_LEN + 1])
def test_segment_sum_cover_matmul_equals_direct_sums(L):
    """seg[i, j] = sum_{j<k<=i} a_k, 0 for j >= i, with a huge gap in the middle (no cancellation), and its gradient
    reaches exactly the covered steps."""
    g = torch.Generator().manual_seed(L)
    a = -torch.rand(2, 3, L, generator=g, dtype=torch.float64)
    a[..., L // 2] = -1e12                                    # a huge time gap
    a.requires_grad_()
    seg = segment_sum_stable(a)
    direct = torch.zeros(2, 3, L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i):
            direct[..., i, j] = a.detach()[..., j + 1:i + 1].sum(-1)
    assert torch.equal(seg.detach(), direct) or rel(seg.detach(), direct) < 1e-15
    after = L // 2 + 1                                        # a segment after the gap keeps its small value
    if after + 1 < L:
        assert seg[0, 0, after + 1, after].item() == a[0, 0, after + 1].item()
    weight = torch.randn(2, 3, L, L, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((seg * weight).sum(), a)
    cover = torch.zeros(L, L, L, dtype=torch.float64)         # cover[k, i, j] = 1 when j < k <= i
    for i in range(L):
        for j in range(i):
            cover[j + 1:i + 1, i, j] = 1
    torch.testing.assert_close(grad, torch.einsum("kij,bhij->bhk", cover, weight), rtol=1e-13, atol=1e-13)


def test_cached_constants_survive_a_first_call_under_inference_mode():
    """The cover / mask constants are cached per (L, device, dtype): built under inference_mode they would be
    inference tensors that autograd refuses to save.  L = 11 is used by no other test (fresh cache entries)."""
    from mmm4rec_kernels.torch_backend import decay_matrix
    with torch.inference_mode():
        decay_matrix(torch.randn(2, 11, dtype=torch.float64), torch.float32)
    a = torch.randn(2, 11, dtype=torch.float64, requires_grad=True)
    decay_matrix(a, torch.float32).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_silu_exp_at_extreme_and_random_preactivations(native_cpu, dtype):
    """The native kernel's inlined exp (activations.h: exp_nonpositive) through SiLU and SiLU': k = 1, w = 1, no bias,
    so the pre-activation IS x; y = x sigmoid(x) and dx = gy SiLU'(x) against torch's float64 values, elementwise,
    at -100, -88, -20, 0, 20, 88, 100, +-inf, NaN and on random x.  Bounds: fp32 4e-7 relative (an exp off by 1e-6
    relative fails), the gradient relative to the size of its two terms s and s |x| (1 - s) (it crosses 0 near
    x = -1.28); float64 1e-14.  Non-finite entries: where torch's are, the same values."""
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([-100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, float("inf"), float("-inf"), float("nan")],
                           dtype=torch.float64)
    rand = torch.cat([torch.randn(4000, generator=g, dtype=torch.float64) * s for s in (1.0, 8.0, 40.0)])
    v = torch.cat([special, rand]).to(dtype)
    C = 16                                                    # a whole block of channels; 3 rows per value
    x = v.repeat_interleave(C).reshape(1, -1, C)[..., :13]    # 13 channels: a partial block too
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.ones(13, 1, dtype=dtype)
    y = native_cpu.conv_forward(x, w, None, True)
    dx, dw, _ = native_cpu.conv_backward(x, w, None, True, [(0, 13, gy)])
    p, g64 = x.double(), gy.double()
    s = torch.sigmoid(p)
    y_ref, grad_ref = p * s, g64 * s * (1 + p * (1 - s))
    bound = 4e-7 if dtype == torch.float32 else 1e-14
    tiny = 1e-35 if dtype == torch.float32 else 1e-300        # (results below are subnormal or 0 in fp32)
    for name, ours, ref, scale in (("y", y, y_ref, y_ref.abs()),
                                   ("dx", dx, grad_ref, (g64 * s * (1 + p.abs() * (1 - s))).abs())):
        ours = ours.double()
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), name
        assert torch.equal(ours[~fin & ~torch.isnan(ref)], ref[~fin & ~torch.isnan(ref)]), name
        err = (ours - ref).abs()[fin]
        sc = scale[fin]
        big = sc > tiny
        assert float((err[big] / sc[big]).max()) <= bound, (name, float((err[big] / sc[big]).max()))
        assert not (~big).any() or float(err[~big].max()) <= 1e-37, name
    assert torch.isnan(dw).all() and dw.shape == (13, 1)     # NaN and +-inf x NaN / inf gradients reach every dw
