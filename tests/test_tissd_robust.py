"""Robustness of the public op on the torch AND the Triton backend (interpreter on CPU, fp32), issue 10:
fp32 inputs with huge time gaps vs the float64 oracle, NaN/inf garbage in padded steps, mixed dtypes, L=0 / b=0,
dispatch on the longest sequence, strict argument rules, explain() == tissd() signature, mamba semantics (z gate
without a norm, D [H, P], A < 0)."""
import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import mmm4rec_kernels as mk
from mmm4rec_kernels import reference as ref
from mmm4rec_kernels.limits import QUADRATIC_MAX_LEN

from test_tissd_api import rel

tissd_module = importlib.import_module("mmm4rec_kernels.tissd")  # the package attribute `tissd` is the function

BACKENDS = [("torch", "quadratic"), ("torch", "chunked"), ("triton", "quadratic"), ("triton", "chunked")]
NAMES = ("x", "dt", "A", "B", "C", "time_scale", "dt_bias", "D")


def make32(b=2, L=12, H=2, P=4, G=1, n=4, seed=0, gap=None, gap_at=5):
    """fp32 inputs; `gap`: one time_scale step of that size at position gap_at (dt > 0 there, so Delta ~ gap)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(x=r(b, L, H, P), dt=r(b, L, H) * 0.5, A=-(0.5 + torch.rand(H, generator=g)), B=r(b, L, G, n),
               C=r(b, L, G, n), time_scale=torch.rand(b, L, H, generator=g) + 0.1, dt_bias=r(H) * 0.5, D=r(H))
    if gap is not None:
        inp["time_scale"][:, gap_at] = gap
        inp["dt"][:, gap_at] = inp["dt"][:, gap_at].abs() + 0.5
    return inp


def oracle(inp, lengths=None, h0=None, final=False, d_skip="delta"):
    """float64 recurrence (reference.py) on the same values: y (and h_T)."""
    d = {k: v.double() for k, v in inp.items()}
    return ref.tissd_recurrent_ref(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"],
                                   dt_bias=d["dt_bias"], D=d["D"], d_skip=d_skip, lengths=lengths,
                                   initial_states=None if h0 is None else h0.double(), return_final_states=final)


def with_grads(fn, inp, seed=1, extra=()):
    """outputs of fn(leaves) and the gradients of every leaf for a fixed random cotangent (float64 copies)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    extra_leaves = [t.detach().clone().requires_grad_() for t in extra]
    out = fn(leaves, *extra_leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    wrt = list(leaves.values()) + extra_leaves
    grads = torch.autograd.grad(outs, wrt, cot, allow_unused=True)
    grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
    return [o.detach().double() for o in outs], [gr.double() for gr in grads]


def call(d, **kw):
    return mk.tissd(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"], dt_bias=d["dt_bias"],
                    D=d["D"], **kw)


def assert_close(outs, grads, outs_r, grads_r, names, tol=1e-4):
    for o, o_r in zip(outs, outs_r):
        assert torch.isfinite(o).all() and rel(o, o_r) <= tol, rel(o, o_r)
    for name, gr, gr_r in zip(names, grads, grads_r):
        assert torch.isfinite(gr).all(), name
        err = (gr - gr_r).norm().item()
        assert err <= tol * gr_r.norm().item() + 1e-9, (name, rel(gr, gr_r))


# ------------------------------------------------------------------------------------------------ huge time gaps
@pytest.mark.parametrize("gap", [1e4, 1e6, 1e9])
@pytest.mark.parametrize("backend,path", BACKENDS)
def test_fp32_huge_time_gap_matches_float64(backend, path, gap):
    """One time_scale step of 1e4 / 1e6 / 1e9 (fp32 inputs): y and every gradient within 1e-4 of float64."""
    inp = make32(L=20, gap=gap, seed=int(gap) % 97)
    lengths = torch.tensor([20, 13])
    outs, grads = with_grads(lambda d: call(d, lengths=lengths, backend=backend, path=path, chunk_size=16), inp)
    outs_r, grads_r = with_grads(lambda d: oracle(d, lengths), {k: v.double() for k, v in inp.items()})
    assert_close(outs, grads, outs_r, grads_r, NAMES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_huge_gap_with_states(backend):
    inp = make32(b=2, L=24, gap=1e9, gap_at=9, seed=4)
    h0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    lengths = torch.tensor([24, 17])
    fn = lambda d, h: call(d, lengths=lengths, backend=backend, path="chunked", chunk_size=16,  # noqa: E731
                           initial_states=h, return_final_states=True)
    outs, grads = with_grads(fn, inp, extra=(h0,))
    outs_r, grads_r = with_grads(lambda d, h: oracle(d, lengths, h, True), {k: v.double() for k, v in inp.items()},
                                 extra=(h0.double(),))
    assert_close(outs, grads, outs_r, grads_r, NAMES + ("initial_states",))


# ------------------------------------------------------------------------------------------- garbage in padding
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend,path", BACKENDS)
def test_garbage_in_padded_steps_never_reaches_valid_results(backend, path, garbage):
    inp = make32(b=2, L=10, H=2, P=4, n=4, seed=3)
    z = torch.randn(2, 10, 2, 4, generator=torch.Generator().manual_seed(5))
    w = torch.randn(8, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([10, 6])
    fn = lambda d, zz, ww: call(d, lengths=lengths, backend=backend, path=path, chunk_size=16,  # noqa: E731
                                z=zz, norm_weight=ww)
    outs, grads = with_grads(fn, inp, extra=(z, w))
    dirty = {k: v.clone() for k, v in inp.items()}
    for k in ("x", "dt", "B", "C", "time_scale"):
        dirty[k][1, 6:] = garbage
    z_dirty = z.clone()
    z_dirty[1, 6:] = garbage
    outs_d, grads_d = with_grads(fn, dirty, extra=(z_dirty, w))
    valid = torch.arange(10)[None, :] < lengths[:, None]
    assert torch.isfinite(outs_d[0]).all() and (outs_d[0][~valid] == 0).all()
    assert torch.allclose(outs_d[0], outs[0], rtol=1e-6, atol=1e-7)
    for name, g, g_d in zip(NAMES + ("z", "norm_weight"), grads, grads_d):
        assert torch.isfinite(g_d).all(), name
        assert torch.allclose(g_d, g, rtol=1e-6, atol=1e-7), name
        if g_d.dim() >= 3:  # per-step gradients are exactly 0 on padded steps
            assert (g_d[~valid] == 0).all(), name


@pytest.mark.parametrize("backend,path", BACKENDS)
def test_packed_sequences_are_isolated_from_garbage_in_another(backend, path):
    """cu_seqlens: NaN in one sequence never reaches another sequence's outputs or gradients."""
    inp = make32(b=1, L=15, seed=8)
    cu = torch.tensor([0, 6, 6, 11, 15])
    dirty = {k: v.clone() for k, v in inp.items()}
    for k in ("x", "dt", "B", "C", "time_scale"):
        dirty[k][0, 6:11] = float("nan")
    fn = lambda d: call(d, cu_seqlens=cu, backend=backend, path=path, chunk_size=16)  # noqa: E731
    outs, grads = with_grads(fn, inp)
    outs_d, grads_d = with_grads(fn, dirty)
    keep = torch.ones(15, dtype=torch.bool)
    keep[6:11] = False
    assert torch.allclose(outs_d[0][0, keep], outs[0][0, keep], rtol=1e-6, atol=1e-7)
    for name, g, g_d in zip(NAMES, grads, grads_d):
        if g.dim() >= 3:
            assert torch.allclose(g_d[0, keep], g[0, keep], rtol=1e-6, atol=1e-7), name


# -------------------------------------------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("backend,path", BACKENDS)
def test_mixed_dtypes_are_cast_and_return_x_dtype(backend, path):
    inp = make32(b=2, L=9, seed=12)
    mixed = dict(inp, dt=inp["dt"].double(), A=inp["A"].double(), dt_bias=inp["dt_bias"].double(),
                 time_scale=inp["time_scale"].double(), D=inp["D"].double(), B=inp["B"].double())
    outs, grads = with_grads(lambda d: call(d, backend=backend, path=path, chunk_size=16), mixed)
    leaves = {k: v.clone().requires_grad_() for k, v in mixed.items()}
    y = call(leaves, backend=backend, path=path, chunk_size=16)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert all(leaves[k].grad.dtype == mixed[k].dtype for k in NAMES)
    outs_r, grads_r = with_grads(lambda d: oracle(d), {k: v.double() for k, v in mixed.items()})
    assert_close(outs, grads, outs_r, grads_r, NAMES)


def test_half_inputs_on_torch_backend_compute_in_fp32():
    inp = make32(b=2, L=12, seed=2)
    half = dict(inp, x=inp["x"].bfloat16(), B=inp["B"].bfloat16(), C=inp["C"].bfloat16())
    y = call(half, backend="torch")
    assert y.dtype == torch.bfloat16
    y_r = oracle({k: v.double() for k, v in half.items()})
    assert rel(y.double(), y_r) < 1e-2  # only the final rounding to bf16 (~4e-3)


# ---------------------------------------------------------------------------------------------------- empty input
@pytest.mark.parametrize("b,L", [(2, 0), (0, 5), (0, 0)])
@pytest.mark.parametrize("backend,path", BACKENDS + [("torch", "reference")])
def test_empty_batches(b, L, backend, path):
    inp = make32(b=b, L=L, seed=0)
    e = mk.explain(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], backend=backend, path=path)
    assert (e["backend"], e["path"]) == (backend, path)
    y = call(inp, backend=backend, path=path)
    assert y.shape == (b, L, 2, 4) and y.dtype == torch.float32
    if path != "quadratic":
        h0 = torch.randn(b, 2, 4, 4)
        y, h = call(inp, backend=backend, path=path, initial_states=h0, return_final_states=True)
        assert y.shape == (b, L, 2, 4) and torch.equal(h, h0)
    packed = make32(b=1, L=0)
    cu = torch.tensor([0, 0, 0])
    y = call(packed, backend=backend, path=path, cu_seqlens=cu)
    assert y.shape == (1, 0, 2, 4)


def test_all_lengths_zero():
    inp = make32(b=2, L=6)
    for backend in ("torch", "triton"):
        y, h = call(inp, backend=backend, path="chunked", chunk_size=16, lengths=torch.tensor([0, 0]),
                    return_final_states=True)
        assert (y == 0).all() and (h == 0).all()


# -------------------------------------------------------------------------------------------------------- dispatch
def test_packed_batch_dispatches_on_the_longest_sequence():
    """30 sequences of 10 packed (T = 300 > the quadratic limit) run the quadratic path, also on Triton."""
    nseq, each = 30, 10
    inp = make32(b=1, L=nseq * each, H=1, P=2, n=2, seed=1)
    cu = torch.arange(nseq + 1) * each
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    assert nseq * each > QUADRATIC_MAX_LEN
    e = mk.explain(*args, cu_seqlens=cu)
    assert e["path"] == "quadratic" and "L=10" in e["reason"]
    assert mk.explain(*args, cu_seqlens=cu, backend="triton")["path"] == "quadratic"
    y = call(inp, cu_seqlens=cu, path="quadratic", backend="triton")
    padded = {k: (v.view(nseq, each, *v.shape[2:]) if v.dim() > 1 else v) for k, v in inp.items()}
    assert rel(y.double().view(nseq, each, 1, 2), oracle(padded)) < 1e-5
    long = torch.tensor([0, 10, 10 + QUADRATIC_MAX_LEN + 1])
    long_inp = make32(b=1, L=int(long[-1]), H=1, P=2, n=2)
    with pytest.raises(ValueError, match="quadratic"):
        call(long_inp, cu_seqlens=long, path="quadratic", backend="triton")


def test_padded_batch_dispatches_on_the_longest_length():
    L = max(QUADRATIC_MAX_LEN, mk.cpu_crossover_length(2, 2)) + 44      # past both tables (the CPU one by CPU class)
    inp = make32(b=2, L=L, H=1, P=2, n=2, seed=6)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    lengths = torch.tensor([12, 30])
    assert mk.explain(*args)["path"] == "chunked"
    assert mk.explain(*args, lengths=lengths)["path"] == "quadratic"
    y = call(inp, lengths=lengths, path="quadratic", backend="triton")
    y_t = call(inp, lengths=lengths)  # torch backend, trimmed to the longest prefix
    y_r = oracle(inp, lengths)
    assert rel(y.double(), y_r) < 1e-5 and rel(y_t.double(), y_r) < 1e-5 and (y_t[:, 30:] == 0).all()


# ------------------------------------------------------------------------------------------------ argument rules
def test_explain_has_exactly_tissds_signature():
    assert inspect.signature(mk.explain).parameters == inspect.signature(mk.tissd).parameters
    inp = make32()
    with pytest.raises(TypeError):
        mk.explain(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], lenghts=torch.tensor([1, 2]))
    with pytest.raises(TypeError):
        call(inp, lenghts=torch.tensor([1, 2]))


@pytest.mark.parametrize("fn", ["tissd", "explain"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw,match", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-16), "chunk_size"), (dict(chunk_size=1.5), "chunk_size"),
    (dict(chunk_size=True), "chunk_size"), (dict(A=torch.tensor([-1.0, 0.5])), "A must be negative"),
    (dict(A=torch.tensor([-1.0, 0.0])), "A must be negative"),
    (dict(dt_softplus=False), "dt_softplus=False.*dt"), (dict(allow_tf32="yes"), "allow_tf32"),
    (dict(z=torch.randn(2, 12, 2, 3)), "z must have"), (dict(norm_weight=torch.randn(7)), "norm_weight"),
    (dict(D=torch.randn(2, 3)), "D must have shape"),
])
def test_bad_arguments_name_the_argument(fn, backend, kw, match):
    inp, kw = make32(), dict(kw)  # the parametrized dict is shared between runs: never mutate it
    inp.update({k: kw.pop(k) for k in ("A", "D") if k in kw})
    f = getattr(mk, fn)
    with pytest.raises(ValueError, match=match):
        f(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["time_scale"], dt_bias=inp["dt_bias"],
          D=inp["D"], backend=backend, path="chunked", **kw)


def test_dt_softplus_false_accepts_positive_delta():
    inp = make32(seed=3)
    inp["dt"] = inp["dt"].abs() + 0.1
    inp["dt_bias"] = inp["dt_bias"].abs()
    lengths = torch.tensor([12, 5])
    dirty = dict(inp, dt=inp["dt"].clone())
    dirty["dt"][1, 5:] = -1.0  # padded steps are not checked
    y = call(dirty, dt_softplus=False, lengths=lengths)
    d = {k: v.double() for k, v in inp.items()}
    y_r = ref.tissd_recurrent_ref(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"],
                                  dt_bias=d["dt_bias"], D=d["D"], dt_softplus=False, lengths=lengths)
    assert rel(y.double(), y_r) < 1e-5


def test_half_precision_on_the_triton_interpreter_is_refused():
    inp = make32()
    half = dict(inp, x=inp["x"].bfloat16(), B=inp["B"].bfloat16(), C=inp["C"].bfloat16())
    if torch.cuda.is_available():
        pytest.skip("CUDA present: bf16 runs on the GPU kernels")
    with pytest.raises(ValueError, match="interpreter"):
        call(half, backend="triton")


@pytest.mark.parametrize("flag", [True, False])
def test_allow_tf32_none_follows_torch_matmul_flag(monkeypatch, flag):
    seen = {}
    from mmm4rec_kernels import ops
    real = ops.fused_forward

    def spy(*args):
        seen["allow_tf32"] = args[16]                 # fused_forward(..., d_skip_delta, dt_softplus, allow_tf32, ...)
        return real(*args)

    monkeypatch.setattr(ops, "fused_forward", spy)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = flag
        inp = make32(L=5)
        call(inp, backend="triton")
        assert seen["allow_tf32"] is flag
        call(inp, backend="triton", allow_tf32=not flag)
        assert seen["allow_tf32"] is (not flag)
    finally:
        matmul.allow_tf32 = before


def test_quadratic_limit_is_declared_once():
    from mmm4rec_kernels import cuda
    from mmm4rec_kernels.triton import quadratic
    assert quadratic.QUADRATIC_MAX_LEN is QUADRATIC_MAX_LEN and cuda.QUADRATIC_MAX_LEN is QUADRATIC_MAX_LEN


# -------------------------------------------------------------------------------------- mamba-compatible semantics
@pytest.mark.parametrize("backend,path", BACKENDS)
def test_z_without_norm_gates_and_D_per_channel(backend, path):
    """z without norm_weight: y * SiLU(z) (mamba_ssm); D [H, P]: per-channel skip, dD checked."""
    inp = make32(b=2, L=11, H=2, P=3, seed=21)
    inp["D"] = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 11, 2, 3, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([11, 4])
    for d_skip in ("delta", "plain"):
        fn = lambda d, zz: call(d, z=zz, lengths=lengths, backend=backend, path=path, chunk_size=16,  # noqa: E731
                                d_skip=d_skip)
        outs, grads = with_grads(fn, inp, extra=(z,))
        fn_r = lambda d, zz: oracle(d, lengths, d_skip=d_skip) * F.silu(zz)  # noqa: E731
        outs_r, grads_r = with_grads(fn_r, {k: v.double() for k, v in inp.items()}, extra=(z.double(),))
        assert_close(outs, grads, outs_r, grads_r, NAMES + ("z",))
