"""Public API: argument checks, dispatch, layouts, and the torch backend against the float64 recurrence and mamba_ssm."""
import os
import subprocess
import sys

import pytest
import torch

import mmm4rec_kernels.cpu as native

import mmm4rec_kernels as mk
from mmm4rec_kernels import dispatch
from mmm4rec_kernels import reference as ref
from mmm4rec_kernels.limits import QUADRATIC_MAX_LEN
from benchmarks._rivals import load_mamba_module


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def close(a, b, rtol, atol=1e-7):
    """Relative-norm check with an absolute floor, for gradients whose true value underflows to ~0
    (e.g. dA when every decay is exp(-1e4)): ||a - b|| <= rtol ||b|| + atol."""
    return (a - b).norm().item() <= rtol * b.norm().item() + atol


def make(b=2, L=7, H=4, P=8, G=2, n=4, dtype=torch.float64, seed=0, decay=1.0, gap=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(b, L, H, P), dt=r(b, L, H), A=-decay * torch.rand(H, generator=g, dtype=dtype) - 0.01,
                B=r(b, L, G, n), C=r(b, L, G, n),
                time_scale=gap * torch.rand(b, L, H, generator=g, dtype=dtype), dt_bias=r(H), D=r(H))


def call(inp, **kw):
    args = {k: inp[k] for k in ("x", "dt", "A", "B", "C")}
    extra = {k: inp[k] for k in ("time_scale", "dt_bias", "D")}
    return mk.tissd(*args.values(), **extra, **kw)


@pytest.mark.parametrize("L", [1, 7, 20, 63, 200])
@pytest.mark.parametrize("path", ["quadratic", "chunked"])
@pytest.mark.parametrize("regime", ["weak", "strong", "gaps", "E0"])
def test_torch_paths_match_recurrence_fwd_and_grads(L, path, regime):
    decay, gap = {"weak": (0.01, 1.0), "strong": (8.0, 3.0), "gaps": (1.0, 1e4), "E0": (1.0, 1.0)}[regime]
    inp = make(b=2, L=L, H=2, P=4, G=1, n=3, decay=decay, gap=gap, seed=L)
    if regime == "E0":
        inp["time_scale"] = torch.zeros_like(inp["time_scale"])
    lengths = torch.tensor([L, max(1, L // 2)])
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = call(leaves, lengths=lengths, path=path, backend="torch", chunk_size=16)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(L + 1), dtype=y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy, allow_unused=True)
    leaves_r = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y_r = call(leaves_r, lengths=lengths, path="reference")
    grads_r = torch.autograd.grad(y_r, list(leaves_r.values()), dy, allow_unused=True)
    assert torch.isfinite(y).all()
    assert rel(y, y_r) < 1e-10
    for name, g, g_r in zip(leaves, grads, grads_r):
        assert torch.isfinite(g).all(), name
        # With gaps ~1e4 the cumulative decays reach |cs| ~ 1e6 and dA (truly ~1e-25) carries float64 rounding
        # noise of the cumsum differences (~1e-6); every other regime is held to the relative tolerance.
        assert close(g, g_r, 1e-9, atol=1e-5 if regime == "gaps" else 1e-7), (name, rel(g, g_r))
    assert y[1, lengths[1]:].abs().max() == 0 if L > 1 else True


def test_padding_does_not_leak():
    inp = make(b=2, L=9)
    lengths = torch.tensor([9, 4])
    y = call(inp, lengths=lengths)
    dirty = {k: v.clone() for k, v in inp.items()}
    for k in ("x", "dt", "B", "C", "time_scale"):
        dirty[k][1, 4:] = 1e6
    y2 = call(dirty, lengths=lengths)
    assert torch.equal(y[1, :4], y2[1, :4]) and y2[1, 4:].abs().max() == 0


def test_packed_cu_seqlens_equals_padded():
    inp = make(b=3, L=11)
    lens = [11, 1, 6]
    y = call(inp, lengths=torch.tensor(lens))
    pack = lambda t: torch.cat([t[i, :l] for i, l in enumerate(lens)])[None]  # noqa: E731
    packed = {k: (pack(v) if v.dim() > 1 else v) for k, v in inp.items()}
    cu = torch.tensor([0, 11, 12, 18])
    for path in ("quadratic", "chunked", "reference"):
        yp = call(packed, cu_seqlens=cu, path=path)
        assert rel(yp, pack(y)) < 1e-12, path


def test_states_chunked_matches_recurrence():
    inp = make(b=2, L=13, seed=3)
    h0 = torch.randn(2, 4, 8, 4, dtype=torch.float64)
    y, h = call(inp, initial_states=h0, return_final_states=True, lengths=torch.tensor([13, 5]), chunk_size=4)
    y_r, h_r = call(inp, initial_states=h0, return_final_states=True, lengths=torch.tensor([13, 5]), path="reference")
    assert rel(y, y_r) < 1e-12 and rel(h, h_r) < 1e-12
    assert mk.explain(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], return_final_states=True)["path"] == "chunked"


def test_explain_and_auto_choice():
    inp = make(L=5, dtype=torch.float32)
    e = mk.explain(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    assert e["path"] == "quadratic" and e["backend"] == "torch" and "L=5" in e["reason"]
    L_star = mk.cpu_crossover_length(2, 2) if e["table"] == "cpu-measured" else mk.crossover_length(2, 2)
    long = make(L=L_star + 1, H=1, P=2, G=1, n=2, dtype=torch.float32)
    assert mk.explain(long["x"], long["dt"], long["A"], long["B"], long["C"])["path"] == "chunked"


@pytest.mark.parametrize("P,n", [(64, 64), (512, 64), (8, 8), (2, 2)])
def test_auto_path_follows_the_cost_model(P, n, monkeypatch):
    """GPU cost model (and CPU tensors without the native kernels): quadratic while 0.75 L^2 (P+n) <= L Q (P+n) +
    4 L P n (Q = 64), never beyond the kernels' QUADRATIC_MAX_LEN."""
    L_star = mk.crossover_length(P, n)
    expected = min(QUADRATIC_MAX_LEN, int((64 * (P + n) + 4 * P * n) / (0.75 * (P + n))))
    assert L_star == expected
    monkeypatch.setattr(native, "available", lambda: False)
    for L, path in ((L_star, "quadratic"), (L_star + 1, "chunked")):
        t = make(L=L, b=1, H=1, P=P, G=1, n=n, dtype=torch.float32)
        e = mk.explain(t["x"], t["dt"], t["A"], t["B"], t["C"])
        assert (e["path"], e["table"]) == (path, "gpu-cost-model"), (P, n, L)


@pytest.mark.parametrize("P,n", [(64, 64), (16, 16), (32, 32), (2, 2)])
def test_auto_path_on_cpu_follows_the_measured_table(P, n, native_cpu):
    """CPU with the native kernels: the measured CPU_CROSSOVER table (interpolated in P + n, clamped outside)."""
    from mmm4rec_kernels.dispatch import CPU_CROSSOVER
    (w0, l0), (w1, l1) = CPU_CROSSOVER[0], CPU_CROSSOVER[-1]
    L_star = mk.cpu_crossover_length(P, n)
    assert min(l0, l1) <= L_star <= max(l0, l1)
    if P + n <= w0 or P + n >= w1:
        assert L_star == (l0 if P + n <= w0 else l1)
    for L, path in ((L_star, "quadratic"), (L_star + 1, "chunked")):
        t = make(L=L, b=1, H=1, P=P, G=1, n=n, dtype=torch.float32)
        e = mk.explain(t["x"], t["dt"], t["A"], t["B"], t["C"])
        assert (e["path"], e["backend"], e["table"]) == (path, "torch", "cpu-measured"), (P, n, L, e)


def test_cpu_table_follows_the_cpu_class():
    """One measured CPU table per CPU vendor; other vendors (ARM: no vendor_id) take the default, the shorter; the
    environment picks one by name and a name without a table is refused naming the variable."""
    assert dispatch.cpu_class("AuthenticAMD") == "AuthenticAMD"
    assert dispatch.cpu_class("GenuineIntel") == "GenuineIntel"
    assert dispatch.cpu_class("") == dispatch.cpu_class("HygonGenuine") == dispatch.CPU_DEFAULT_CLASS
    assert dispatch.cpu_class("GenuineIntel", "AuthenticAMD") == "AuthenticAMD"
    with pytest.raises(ValueError, match="MMM4REC_CPU_CLASS='zen5'"):
        dispatch.cpu_class("AuthenticAMD", "zen5")
    assert dispatch.CPU_CLASS == dispatch.cpu_class(dispatch.cpu_vendor(), os.environ.get("MMM4REC_CPU_CLASS"))
    assert (dispatch.CPU_CROSSOVER, dispatch.CPU_INFER_MAX_LEN) == dispatch.CPU_TABLES[dispatch.CPU_CLASS]
    default = dispatch.CPU_TABLES[dispatch.CPU_DEFAULT_CLASS][0]
    assert all(w == dw and L >= dL for (w, L), (dw, dL) in zip(dispatch.CPU_CROSSOVER, default))


@pytest.mark.parametrize("cls", ["GenuineIntel", "AuthenticAMD"])
def test_cpu_class_from_the_environment_reaches_explain(cls):
    """MMM4REC_CPU_CLASS picks the table that explain() names and whose length it compares (a fresh process: the
    table is read at import)."""
    code = ("import torch, mmm4rec_kernels as mk\n"
            "from mmm4rec_kernels import dispatch\n"
            "L = mk.cpu_crossover_length(16, 16) + 1\n"
            "t = [torch.randn(1, L, 1, 16), torch.rand(1, L, 1), -torch.rand(1), torch.randn(1, L, 1, 16),\n"
            "     torch.randn(1, L, 1, 16)]\n"
            "e = mk.explain(*t)\n"
            "print(dispatch.CPU_CLASS, L - 1, e['path'], e['reason'].count('CPU table ' + dispatch.CPU_CLASS))\n")
    env = dict(os.environ, MMM4REC_CPU_CLASS=cls, MMM4REC_CPP_NODES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got_cls, got_L, got_path, named = out.stdout.split()
    assert got_cls == cls and int(got_L) == dispatch.CPU_TABLES[cls][0][0][1]
    if native.library() is not None:                      # the measured table decides only with the native kernels
        assert (got_path, named) == ("chunked", "1")


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(2, 7, 4)), "x must have 4 dims"),
    (dict(dt=torch.randn(2, 7, 3)), "dt must have shape"),
    (dict(A=torch.randn(3, dtype=torch.float64)), "A must have shape"),
    (dict(B=torch.randn(2, 7, 3, 4, dtype=torch.float64), C=torch.randn(2, 7, 3, 4, dtype=torch.float64)), "must divide"),
    (dict(B=torch.zeros(2, 7, 2, 4, dtype=torch.int32)), "B must be a floating"),  # other float dtypes are cast
    (dict(time_scale=torch.randn(2, 6, 4, dtype=torch.float64)), "time_scale must have"),
    (dict(D=torch.randn(5, dtype=torch.float64)), "D must have shape"),
    (dict(x=torch.zeros(2, 7, 4, 8, dtype=torch.int64)), "x must be a floating"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    inp = make()
    inp.update(bad)
    with pytest.raises(ValueError, match=match):
        call(inp)


@pytest.mark.parametrize("kw,match", [
    (dict(lengths=torch.tensor([7, 8])), "lengths must lie"),
    (dict(lengths=torch.tensor([7.0, 2.0])), "lengths must be an integer"),
    (dict(d_skip="half"), "d_skip"),
    (dict(path="fast"), "path must be"),
    (dict(backend="tpu"), "backend must be"),
    (dict(path="quadratic", return_final_states=True), "does not carry states"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(backend="triton"), "float64|backend='triton'"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7])), "packed batch"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        call(make(), **kw)


def test_gated_rmsnorm_epilogue_matches_reference():
    inp = make(L=6)
    z = torch.randn_like(inp["x"])
    w = torch.randn(4 * 8, dtype=torch.float64)
    y = call(inp, z=z, norm_weight=w, norm_group_size=8)
    y_ref = ref.gated_rmsnorm_ref(call(inp).reshape(2, 6, 32), z.reshape(2, 6, 32), w, 1e-5, 8).view_as(y)
    assert rel(y, y_ref) < 1e-12


def test_matches_mamba_ssm_reference():
    """time_scale=None, dt_bias, d_skip='plain' is exactly mamba_ssm's SSD (dt_softplus=True)."""
    combined, why = load_mamba_module("ops.triton.ssd_combined")
    if combined is None:
        pytest.skip(why)
    minimal, why = load_mamba_module("modules.ssd_minimal")
    inp = make(b=2, L=32, H=4, P=8, G=2, n=4, seed=5)
    y = mk.tissd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], dt_bias=inp["dt_bias"], D=inp["D"],
                 d_skip="plain")
    y_m = combined.ssd_chunk_scan_combined_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16, D=inp["D"],
                                                dt_bias=inp["dt_bias"], dt_softplus=True)
    assert rel(y, y_m) < 1e-6  # the mamba reference discretizes dt in float32 (dt.float())
    # ssd_minimal_discrete takes the discretized inputs X*Delta, A*Delta and per-head B, C.
    delta = torch.nn.functional.softplus(inp["dt"] + inp["dt_bias"])
    Bh, Ch = (t.repeat_interleave(2, dim=2) for t in (inp["B"], inp["C"]))
    y_min, _ = minimal.ssd_minimal_discrete(inp["x"] * delta[..., None], inp["A"] * delta, Bh, Ch, 8)
    y0 = mk.tissd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], dt_bias=inp["dt_bias"], path="reference")
    assert rel(y0, y_min) < 1e-10


@pytest.mark.parametrize("path", ["quadratic", "chunked", "reference"])
def test_torch_backend_half_inputs(path):
    """bf16 inputs (dt and E in bf16 too) run in fp32 inside the torch backend and come back as bf16."""
    inp = make(b=2, L=12, seed=11)
    half = {k: v.to(torch.bfloat16) for k, v in inp.items()}
    half["A"] = inp["A"].float()
    y = call(half, path=path, d_skip="plain", chunk_size=4)
    assert y.dtype == torch.bfloat16
    assert rel(y.double(), call(inp, d_skip="plain", path="reference")) < 3e-2


def test_z_gate_and_per_channel_D_match_mamba_ssm():
    """mamba_ssm semantics: z without a norm gates the output (y * SiLU(z)); D may be [H, P]."""
    combined, why = load_mamba_module("ops.triton.ssd_combined")
    if combined is None:
        pytest.skip(why)
    inp = make(b=2, L=32, H=4, P=8, G=2, n=4, seed=6)
    D = torch.randn(4, 8, dtype=torch.float64)
    z = torch.randn(2, 32, 4, 8, dtype=torch.float64)
    y_m = combined.ssd_chunk_scan_combined_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16, D=D, z=z,
                                                dt_bias=inp["dt_bias"], dt_softplus=True)
    for path in ("quadratic", "chunked"):
        y = mk.tissd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], dt_bias=inp["dt_bias"], D=D, z=z,
                     d_skip="plain", path=path, chunk_size=16)
        assert rel(y, y_m) < 1e-6, path
