"""CUDA quadratic TiSSD kernels (mmm4rec_kernels._cuda) against the float64 reference: output and every gradient.

Skipped without the compiled extension or without a CUDA device. Gradients of the reference come from
torch.autograd in float64; errors are relative norms ||got - want|| / ||want||.
"""
import math

import pytest
import torch

from mmm4rec_kernels import cuda as tcuda
from mmm4rec_kernels.reference import tissd_quadratic_ref

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not tcuda.built():
    pytest.skip("mmm4rec_kernels._cuda not built (pip install --no-build-isolation -e .)", allow_module_level=True)

DEV = "cuda"
# relative-norm tolerances vs float64 (CPU emulator of the same kernels: fp32 <= 6e-6, TF32 <= 2.3e-3,
# bf16 <= 2.5e-3, fp16 <= 4e-4; csrc/standalone/emulate_check.sh --full)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TOL_TF32 = 1e-2
GRAD_NAMES = ("dx", "ddt", "dA", "dB", "dC", "dE", "ddt_bias", "dD")


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()  # floor: underflowed grads ~ 0


def make_inputs(b, L, H, G, P, n, dtype, decay="normal", E_mode="random", lengths=True, seed=0):
    """Padded-batch inputs [b, L, ...] in the kernel dtypes (x, B, C in `dtype`, the rest float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g)
    B = torch.randn(b, L, G, n, generator=g) / math.sqrt(n)
    C = torch.randn(b, L, G, n, generator=g) / math.sqrt(n)
    dt = torch.randn(b, L, H, generator=g)
    A = -(1 + 15 * torch.rand(H, generator=g))
    dt_bias = torch.log(torch.expm1(1e-3 + 0.1 * torch.rand(H, generator=g)))  # inverse softplus
    D = torch.randn(H, generator=g)
    E = 0.5 + 1.5 * torch.rand(b, L, H, generator=g)
    if decay == "strong":
        dt = dt + 3.0
    elif decay == "weak":
        A = -1e-3 * torch.rand(H, generator=g)
    elif decay == "gaps":  # a few huge time gaps: Delta ~ 1e4 -> the decay across them underflows to 0
        gap = torch.rand(b, L, H, generator=g) < 0.15
        E = torch.where(gap, torch.full_like(E, 1e4), E)
        dt = dt.abs() + 0.1
    if E_mode == "zero":
        E = torch.zeros_like(E)
    lens = torch.randint(1, L + 1, (b,), generator=g) if lengths else torch.full((b,), L)
    lens[0] = L
    cast = lambda t: t.to(dtype).to(DEV)
    f32 = lambda t: t.float().to(DEV)
    return dict(x=cast(x), dt=f32(dt), A=f32(A), B=cast(B), C=cast(C), E=None if E_mode == "none" else f32(E),
                dt_bias=f32(dt_bias), D=f32(D), lengths=lens.to(DEV))


def reference(inp, dy, d_skip, dt_softplus):
    """Float64 reference y and autograd gradients, same order as tissd_quadratic_bwd."""
    names = ["x", "dt", "A", "B", "C", "E", "dt_bias", "D"]
    leaf = {k: (None if inp[k] is None else inp[k].double().requires_grad_()) for k in names}
    y = tissd_quadratic_ref(leaf["x"], leaf["dt"], leaf["A"], leaf["B"], leaf["C"], time_scale=leaf["E"],
                            dt_bias=leaf["dt_bias"], D=leaf["D"], d_skip=d_skip, lengths=inp["lengths"],
                            dt_softplus=dt_softplus)
    y.backward(dy.double())
    return y.detach(), [None if leaf[k] is None else leaf[k].grad for k in names]


def run_cuda(inp, dy, d_skip, dt_softplus, allow_tf32=False):
    """Kernels on the padded batch viewed as tokens: T = b L, seq_start = arange(b) L, seq_len = lengths."""
    b, L, H, P = inp["x"].shape
    G, n = inp["B"].shape[2:]
    tok = lambda t: None if t is None else t.reshape(b * L, *t.shape[2:]).contiguous()
    seq_start = torch.arange(b, device=DEV, dtype=torch.int64) * L
    seq_len = inp["lengths"].to(torch.int32)
    args = (tok(inp["x"]), tok(inp["dt"]), inp["A"], tok(inp["B"]), tok(inp["C"]), tok(inp["E"]), inp["dt_bias"],
            inp["D"], seq_start, seq_len, L)
    kw = dict(d_skip_delta=d_skip == "delta", dt_softplus=dt_softplus, allow_tf32=allow_tf32)
    y = tcuda.tissd_quadratic_fwd(*args, **kw).reshape(b, L, H, P)
    grads = tcuda.tissd_quadratic_bwd(tok(dy), *args, **kw)
    shapes = [(b, L, H, P), (b, L, H), (H,), (b, L, G, n), (b, L, G, n), (b, L, H), (H,), (H,)]
    return y, [None if g_ is None else g_.reshape(s) for g_, s in zip(grads, shapes)]


def check(inp, d_skip="delta", dt_softplus=True, seed=1, allow_tf32=False):
    dtype = inp["x"].dtype
    dy = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
    y_ref, g_ref = reference(inp, dy, d_skip, dt_softplus)
    y, g = run_cuda(inp, dy, d_skip, dt_softplus, allow_tf32)
    tol = TOL_TF32 if allow_tf32 and dtype == torch.float32 else TOL[dtype]
    assert y.dtype == dtype
    errs = {"y": rel_err(y, y_ref)}
    for name, got, want in zip(GRAD_NAMES, g, g_ref):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        errs[name] = rel_err(got, want)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"rel errors above {tol}: {bad} (all: {errs})"


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 7, 20, 63, 130])
@pytest.mark.parametrize("H", [1, 8])
@pytest.mark.parametrize("P", [32, 64, 256])
@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("grouped", [False, True])
def test_grid_fp32(L, H, P, n, grouped):
    G = 1 if grouped else H
    check(make_inputs(2, L, H, G, P, n, torch.float32, seed=L * 7 + H + P + n))


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 20, 130])
@pytest.mark.parametrize("H,G", [(1, 1), (8, 8), (8, 1)])
@pytest.mark.parametrize("P", [32, 64, 256])
def test_grid_bf16(L, H, G, P):
    check(make_inputs(2, L, H, G, P, 64, torch.bfloat16, seed=L + H + P))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["strong", "weak", "gaps"])
@pytest.mark.parametrize("L", [20, 130])
def test_decay_regimes(dtype, decay, L):
    check(make_inputs(3, L, 4, 2, 64, 16, dtype, decay=decay, seed=3))


@pytest.mark.gpu
@pytest.mark.parametrize("E_mode", ["zero", "none"])
@pytest.mark.parametrize("d_skip", ["delta", "plain"])
@pytest.mark.parametrize("dt_softplus", [True, False])
def test_options(E_mode, d_skip, dt_softplus):
    inp = make_inputs(3, 20, 8, 8, 64, 64, torch.float32, E_mode=E_mode, seed=5)
    if not dt_softplus:  # raw Delta must stay positive for a sane decay
        inp["dt"] = inp["dt"].abs() * 0.1 + 0.01
    check(inp, d_skip=d_skip, dt_softplus=dt_softplus)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_optional_inputs_and_full_lengths(dtype):
    inp = make_inputs(2, 63, 2, 1, 48, 96, dtype, lengths=False, seed=9)  # P not a tile multiple, n > 64
    inp["dt_bias"], inp["D"] = None, None
    check(inp)


@pytest.mark.gpu
def test_packed_matches_padded():
    """Packed tokens (cu_seqlens layout) give the padded results at the valid tokens."""
    inp = make_inputs(4, 40, 2, 2, 64, 16, torch.float32, seed=11)
    b, L, H, P = inp["x"].shape
    lens = inp["lengths"]
    valid = (torch.arange(L, device=DEV)[None] < lens[:, None]).reshape(-1)
    dy = torch.randn(inp["x"].shape, device=DEV)
    kw = dict(d_skip_delta=True, dt_softplus=True)
    y_pad, g_pad = run_cuda(inp, dy, "delta", True)
    pk = lambda t: t.reshape(b * L, *t.shape[2:])[valid].contiguous()
    cu = torch.zeros(b + 1, dtype=torch.int64, device=DEV)
    cu[1:] = torch.cumsum(lens, 0)
    args = (pk(inp["x"]), pk(inp["dt"]), inp["A"], pk(inp["B"]), pk(inp["C"]), pk(inp["E"]), inp["dt_bias"],
            inp["D"], cu[:-1].contiguous(), lens.to(torch.int32), L)
    y = tcuda.tissd_quadratic_fwd(*args, **kw)
    grads = tcuda.tissd_quadratic_bwd(pk(dy), *args, **kw)
    torch.testing.assert_close(y, pk(y_pad), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(GRAD_NAMES, grads, g_pad):
        want = want if want.dim() == 1 else pk(want)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_deterministic():
    inp = make_inputs(4, 63, 8, 1, 64, 64, torch.float32, seed=13)
    dy = torch.randn(inp["x"].shape, device=DEV)
    _, g1 = run_cuda(inp, dy, "delta", True)
    _, g2 = run_cuda(inp, dy, "delta", True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_too_long_raises():
    inp = make_inputs(1, 257, 1, 1, 32, 16, torch.float32, lengths=False)
    with pytest.raises(ValueError):
        run_cuda(inp, torch.zeros_like(inp["x"]), "delta", True)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["normal", "strong", "gaps"])
@pytest.mark.parametrize("L,P,n", [(20, 64, 64), (130, 256, 16), (63, 48, 96)])
def test_tf32(decay, L, P, n):
    """fp32 inputs on TF32 tensor cores (allow_tf32=True) stay within TOL_TF32 of float64."""
    check(make_inputs(3, L, 4, 2, P, n, torch.float32, decay=decay, seed=L + P), allow_tf32=True)


@pytest.mark.gpu
def test_tf32_flag_selects_the_path():
    """allow_tf32 reaches the kernels: TF32 results differ from the exact fp32 ones, but only by TF32 rounding."""
    inp = make_inputs(2, 40, 2, 2, 64, 64, torch.float32, seed=17)
    dy = torch.randn(inp["x"].shape, device=DEV)
    y_exact, g_exact = run_cuda(inp, dy, "delta", True, allow_tf32=False)
    y_tf32, g_tf32 = run_cuda(inp, dy, "delta", True, allow_tf32=True)
    assert not torch.equal(y_exact, y_tf32)
    assert rel_err(y_tf32, y_exact.double()) < TOL_TF32
    for name, a, b in zip(GRAD_NAMES, g_tf32, g_exact):
        assert rel_err(a, b.double()) < TOL_TF32, name


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["normal", "strong"])
@pytest.mark.parametrize("L", [20, 130])
def test_fp16(decay, L):
    """fp16 inputs (TF32 MMAs inside). No time-gap case here: D Delta x alone can exceed fp16's 65504 in y."""
    check(make_inputs(2, L, 4, 2, 64, 64, torch.float16, decay=decay, seed=L + 1))
