"""The native CPU kernels (mmm4rec_kernels.cpu, issue 21 item 4) at extreme inputs, fp32, against torch and the
float64 reference:
  - the causal conv + SiLU equals F.conv1d + F.silu (values and gradients) for pre-activations from -1e4 to 1e4,
    around the fp32 exp overflow at +-88.7 (built with -ffast-math it returned NaN below ~-89), and with inf / NaN
    inputs (the same non-finite entries as torch, the same finite values elsewhere);
  - the quadratic scan (the torch backend's CPU quadratic path) at huge log-decays (time gaps 1e9), large x and
    subnormal x equals the float64 recurrence, forward and gradients;
  - a NaN / inf at a valid step of the scan stays causal, and a loss over the rows before it gets exactly the clean
    gradients (rows with a zero gradient are skipped);
  - loading the library leaves the process's floating point state alone (a -ffast-math build links crtfastmath.o,
    which turns on flush-to-zero / denormals-are-zero for every later torch op).
Every test checks that the native kernel ran (spies on mmm4rec_kernels.cpu's entry points, under the Python nodes)."""
import pytest
import torch
import torch.nn.functional as F

import mmm4rec_kernels as mk
from mmm4rec_kernels import reference as ref
from mmm4rec_kernels import torch_backend
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last


@pytest.fixture
def spy(python_nodes, monkeypatch):
    """Counts the calls of the native entry points (the library is loaded: native_cpu fails or skips otherwise),
    through the calls' Python autograd nodes (the C++ ones call the same C entries with the same arguments, bit for
    bit: test_cpp_nodes.py)."""
    native_cpu = python_nodes
    calls = {}

    def wrap(name):
        fn = getattr(native_cpu, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(native_cpu, name, counted)
    for name in ("conv_forward", "conv_backward", "scan_forward", "scan_backward", "tissd_forward", "tissd_backward"):
        wrap(name)
    return calls


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------ conv + SiLU
def _conv_both(x, w, bias, gy, ref_dtype=torch.float32):
    """(y, dx, dw, dbias) of the native channels-last conv + SiLU on fp32 leaves and of F.conv1d + F.silu on the same
    values in ref_dtype (float64: the exact reference; torch's fp32 sums for dw / dbias are off by ~1e-5)."""
    out = []
    for native in (True, False):
        leaves = [t.clone().to(torch.float32 if native else ref_dtype).requires_grad_() for t in (x, w, bias)]
        if native:
            y = causal_conv1d_channels_last(leaves[0], leaves[1], leaves[2], silu=True)
        else:
            k = w.shape[-1]
            pre = F.conv1d(F.pad(leaves[0].transpose(1, 2), (k - 1, 0)), leaves[1], leaves[2], groups=x.shape[2])
            y = F.silu(pre).transpose(1, 2)
        y.backward(gy.to(y.dtype))
        out.append((y.detach(), *(t.grad for t in leaves)))
    return out


def _boundary_values():
    """fp32 pre-activations: -1e4 .. 1e4 and dense around the exp overflow of exp(-p) (p ~ -88.72) and of exp(p)."""
    pts = [torch.linspace(-1e4, 1e4, 401), torch.linspace(-120.0, 120.0, 481), torch.linspace(-90.0, -87.0, 121),
           torch.linspace(87.0, 90.0, 121), torch.tensor([-1e4, -103.98, -103.97, -88.73, -88.72, -88.7, 0.0, 88.72])]
    return torch.cat(pts).float()


@pytest.mark.parametrize("k", [1, 4])
def test_conv_silu_equals_torch_from_minus_to_plus_1e4(spy, k):
    """Taps (0, .., 0, 1), no bias: the pre-activation IS x, so every value of the grid reaches SiLU exactly; y and all
    gradients equal torch's float64 F.conv1d + F.silu elementwise (rtol 1e-5), and torch's fp32 result within its
    own rounding (fp32 torch gives -0 for -88.7 > p > -103, where exp(-p) overflows; we give the true ~-2e-37).
    k = 4 (the layers' conv, its own compiled kernel): dw_j sums 1140 products up to ~1e4 that cancel down to ~17
    (torch's fp32 dw is off by 1.5e-3 there, fp32 sums over blocks of 16 rows measured 6.6e-5: both fail; the
    double sums give 6.5e-7), so it is held to float64 only."""
    v = _boundary_values()
    C = 16
    x = v.repeat_interleave(C).reshape(1, -1, C)                      # every channel sees the whole grid
    w = torch.zeros(C, 1, k)
    w[..., -1] = 1.0
    bias = torch.zeros(C)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    ours, exact = _conv_both(x, w, bias, gy, torch.float64)
    assert spy.get("conv_forward") and spy.get("conv_backward"), "the native conv did not run"
    _, fp32 = _conv_both(x, w, bias, gy)
    for name, a, b, c in zip(("y", "dx", "dw", "dbias"), ours, exact, fp32):
        assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite entries"
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-30, msg=name)
        if k == 1:                     # torch's fp32 within its own error: its dw sums cancel too (1 thread on
            own = (c.double() - b).abs()   # the Zen 5 box: -109.5 for -109.4777, 2e-4 off; ours: 1.4e-7)
            bad = (a.double() - c.double()).abs() > 1e-4 * c.double().abs() + own + 1e-30
            assert not bad.any(), f"{name}: {bad.sum().item()} entries off torch's fp32 by more than its own error"


@pytest.mark.parametrize("scale", [30.0, 3e3])
def test_conv_silu_k4_large_preactivations(spy, scale):
    """k = 4, random taps and bias, x ~ N(0, scale^2): pre-activations up to ~1e4, most beyond the +-89 boundary
    at scale 3e3; relative-norm error of y and every gradient <= 1e-5 (different summation orders)."""
    g = torch.Generator().manual_seed(int(scale))
    b, L, C = 3, 20, 24
    x = torch.randn(b, L, C, generator=g) * scale
    w = torch.randn(C, 1, 4, generator=g)
    bias = torch.randn(C, generator=g) * scale / 10
    gy = torch.randn(b, L, C, generator=g)
    ours, theirs = _conv_both(x, w, bias, gy)
    assert spy.get("conv_forward") and spy.get("conv_backward")
    for name, a, t in zip(("y", "dx", "dw", "dbias"), ours, theirs):
        assert torch.isfinite(a).all(), name
        assert rel(a, t) <= 1e-5, (name, rel(a, t))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_conv_silu_nonfinite_input_like_torch(spy, value):
    """One non-finite x (step 7, channel 3) in a large-valued input: y, dx, dw, dbias are non-finite exactly where
    torch's are (y rows 7..10 of channel 3, dx rows 4..10, dw / dbias of channel 3) and equal elsewhere."""
    g = torch.Generator().manual_seed(1)
    b, L, C = 2, 16, 8
    x = torch.randn(b, L, C, generator=g) * 100.0
    x[1, 7, 3] = float(value)
    w = torch.randn(C, 1, 4, generator=g)
    bias = torch.randn(C, generator=g)
    gy = torch.randn(b, L, C, generator=g)
    ours, theirs = _conv_both(x, w, bias, gy)
    assert spy.get("conv_forward") and spy.get("conv_backward")
    for name, a, t in zip(("y", "dx", "dw", "dbias"), ours, theirs):
        fin = torch.isfinite(t)
        assert torch.equal(torch.isfinite(a), fin), (name, (~torch.isfinite(a)).nonzero().tolist(),
                                                     (~fin).nonzero().tolist())
        assert (~fin).any() or name == "dbias"
        assert rel(a[fin], t[fin]) <= 1e-5, (name, rel(a[fin], t[fin]))


def test_loading_the_library_keeps_subnormals(spy):
    """The library is loaded (and has run): torch still computes with subnormals (no flush-to-zero / DAZ), and the
    conv passes subnormal values through (a -ffast-math build links crtfastmath.o: both were 0)."""
    x = torch.full((1, 4, 16), 1e-39)
    assert (x * 0.5 > 0).all(), "flush-to-zero is on in this process"
    y = causal_conv1d_channels_last(x, torch.ones(16, 1, 1), None, silu=False)
    assert spy.get("conv_forward")
    assert torch.equal(y, x)


# ------------------------------------------------------------------------------------------------ quadratic scan
def _scan_case(kind, seed=0):
    """fp32 inputs of the public op (right-padded, lengths 20 / 13 / 17).  kind: 'gap' = time_scale 1e9 at three
    steps (a = A Delta ~ -1e9), 'large' = x ~ 1e4 and B, C ~ 30, 'subnormal' = x ~ 1e-39 (below fp32's smallest
    normal 1.2e-38)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b, L, H, P, G, n = 3, 20, 2, 8, 1, 8
    inp = dict(x=r(b, L, H, P), dt=r(b, L, H) * 0.5, A=-(0.5 + torch.rand(H, generator=g)), B=r(b, L, G, n) / 3,
               C=r(b, L, G, n) / 3, time_scale=torch.rand(b, L, H, generator=g) + 0.1, dt_bias=r(H) * 0.5, D=r(H))
    if kind == "gap":
        for t in (3, 9, 15):
            inp["time_scale"][:, t] = 1e9
            inp["dt"][:, t] = inp["dt"][:, t].abs() + 0.5
    elif kind == "large":
        inp["x"] = inp["x"] * 1e4
        inp["B"], inp["C"] = inp["B"] * 30, inp["C"] * 30
    elif kind == "subnormal":
        inp["x"] = inp["x"] * 1e-39
    return inp, torch.tensor([20, 13, 17])


def _grads(fn, inp, cot):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    y = fn(leaves)
    grads = torch.autograd.grad(y, list(leaves.values()), cot.to(y.dtype))
    return y.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("via", ["call", "scan"])
@pytest.mark.parametrize("kind", ["gap", "large", "subnormal"])
def test_scan_extremes_match_float64_reference(spy, kind, via, monkeypatch):
    """The torch backend's quadratic path on CPU (the native scan: in the eager one-node call, or as the scan op with
    torch step sizes) vs reference.tissd_recurrent_ref in float64 on the same fp32 values: y and every gradient
    within 1e-4 (relative norm)."""
    if via == "scan":
        monkeypatch.setattr(torch_backend, "_native_call", lambda *a, **k: None)
    inp, lengths = _scan_case(kind)
    cot = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def ours(d):
        return mk.tissd(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"], dt_bias=d["dt_bias"],
                        D=d["D"], lengths=lengths, backend="torch", path="quadratic")

    def oracle(d):
        return ref.tissd_recurrent_ref(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"],
                                       dt_bias=d["dt_bias"], D=d["D"], lengths=lengths)

    y, g = _grads(ours, inp, cot)
    entry = "tissd" if via == "call" else "scan"
    assert spy.get(f"{entry}_forward") and spy.get(f"{entry}_backward"), "the native scan did not run"
    y_r, g_r = _grads(oracle, {k: v.double() for k, v in inp.items()}, cot)
    if kind == "subnormal":          # under flush-to-zero x would already be 0 here, and everything trivially equal
        assert (inp["x"] != 0).all() and (y_r != 0).any() and (y != 0).any()
    assert torch.isfinite(y).all() and rel(y, y_r) <= 1e-4, rel(y, y_r)
    for k in g:
        assert torch.isfinite(g[k]).all(), k
        assert rel(g[k], g_r[k]) <= 1e-4, (k, rel(g[k], g_r[k]))


def test_scan_dD_where_its_terms_cancel(native_cpu):
    """The fp32 short path's dD = sum over (b, i) of s_i gy_i x_i with x spread over +-1e4 (57 full sequences of 20
    steps, P 16; this seed's smallest |dD| is 505, its terms reach 4e4): elementwise within 1e-6 of the float64 sum
    of the same fp32 values.  The double sums give 5.6e-8; fp32 sums per sequence (then double) gave 2.5e-5 here
    and were reverted."""
    g = torch.Generator().manual_seed(3)
    b, L, H, P, G, n = 57, 20, 2, 16, 1, 16
    v = torch.linspace(-1e4, 1e4, b * L)[torch.randperm(b * L, generator=g)]
    x = v.reshape(b, L, 1, 1).expand(b, L, H, P).contiguous()
    gy = torch.randn(b, L, H, P, generator=g)
    delta = torch.rand(b, L, H, generator=g) + 0.5
    B, C = torch.randn(b, L, G, n, generator=g), torch.randn(b, L, G, n, generator=g)
    out = native_cpu.scan_backward(gy, x, delta, -0.3 * delta, B, C, torch.ones(H, P),
                                   torch.full((b,), L, dtype=torch.int64), True)
    exact = (delta.double()[..., None] * gy.double() * x.double()).sum((0, 1))
    assert ((out[5].double() - exact).abs() / exact.abs()).max() < 1e-6


def _scan_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, L, H, P, G, n = 3, 12, 2, 8, 1, 8
    delta = torch.rand(b, L, H, generator=g) + 0.05
    return dict(x=torch.randn(b, L, H, P, generator=g), delta=delta, log_decay=-delta * 1.5,
                B=torch.randn(b, L, G, n, generator=g) / 3, C=torch.randn(b, L, G, n, generator=g) / 3,
                D=torch.randn(H, P, generator=g)), torch.tensor([12, 9, 5])


@pytest.mark.parametrize("name,value", [("x", "nan"), ("delta", "inf"), ("log_decay", "nan"), ("log_decay", "-inf"),
                                        ("B", "inf"), ("C", "nan")])
def test_scan_nonfinite_at_valid_step_stays_causal(native_cpu, name, value):
    """mmm4rec_kernels.cpu.scan_forward / scan_backward with a NaN / inf at step t = 4 of sequence 1 (length 9):
    rows < t and the other sequences equal the clean run, padded rows are 0; with gy = 0 on rows >= t of that
    sequence (random everywhere else, padding included) EVERY gradient equals the clean run's, bit for bit."""
    inp, lengths = _scan_inputs()
    s, t = 1, 4
    bad = {k: v.clone() for k, v in inp.items()}
    if name in ("x", "B", "C"):
        bad[name][s, t, 0, 2] = float(value)
    else:
        bad[name][s, t, 1] = float(value)
    gy = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(2))
    gy[s, t:] = 0.0
    runs = []
    for d in (inp, bad):
        args = (d["x"], d["delta"], d["log_decay"], d["B"], d["C"], d["D"], lengths)
        y = native_cpu.scan_forward(*args, True)
        runs.append((y, native_cpu.scan_backward(gy, *args, True)))
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y1[s, :t], y0[s, :t]) and torch.equal(y1[[0, 2]], y0[[0, 2]])
    pad = torch.arange(y0.shape[1])[None, :] >= lengths[:, None]
    assert (y1[pad] == 0).all()
    if value == "nan":
        assert not torch.isfinite(y1[s, t:lengths[s]]).all()      # the bad value does reach rows >= t
    for k, a, b in zip(("dx", "ddelta", "dlog_decay", "dB", "dC", "dD"), g1, g0):
        assert torch.equal(a, b), (k, (a != b).nonzero()[:4].tolist())
