"""Triton quadratic TiSSD kernels (mmm4rec_kernels/triton/quadratic.py) against the float64 torch reference.

Every case builds batched float64 inputs, runs `tissd_quadratic_ref` with autograd for y and all eight gradients,
and runs the kernels on the token layout (float32; seq_start/seq_len as CONTRACT.md) with the same dy.  Tokens no
sequence covers are filled with garbage in every input (dy included); their outputs and gradients must be exactly 0.
Without CUDA the kernels run under the Triton interpreter (fp32 only); a bfloat16 case runs on CUDA.
"""
from dataclasses import dataclass

import pytest
import torch

from mmm4rec_kernels.reference import tissd_quadratic_ref
from mmm4rec_kernels.triton import quadratic
from mmm4rec_kernels.triton.quadratic import QUADRATIC_MAX_LEN, tissd_quadratic_bwd, tissd_quadratic_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("dx", "ddt", "dA", "dB", "dC", "dE", "ddt_bias", "dD")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@dataclass(frozen=True)
class Case:
    L: int
    H: int = 1
    P: int = 32
    n: int = 16
    G: int = 1
    lengths: tuple = ()            # () = every sequence full (L); else one entry per sequence
    regime: str = "normal"         # normal | strong | weak | gaps | first_gap | E0
    d_skip: str = "delta"
    dt_softplus: bool = True
    has_E: bool = True
    has_bias: bool = True
    has_D: bool = True
    packed: bool = False           # sequences at irregular token offsets with uncovered tokens between them
    fill: str = "big"              # what uncovered tokens hold: big (1e6) | rand (random)
    padded: bool = False           # padded=True: kernels write the padding zeros into uninitialised outputs
    split: object = None           # backward: None = by shape, True = the three-pass split, False = fused
    seed: int = 0


@pytest.fixture(autouse=True)
def nan_for_uninitialised(monkeypatch):
    """Outputs the kernels promise to write in full (padded=True) start as NaN, so any unwritten token shows."""
    alloc = quadratic._alloc

    def nan_alloc(padded, *args):
        new = alloc(padded, *args)
        return (lambda *a, **k: new(*a, **k).fill_(float("nan"))) if padded else new
    monkeypatch.setattr(quadratic, "_alloc", nan_alloc)


def make_inputs(c: Case):
    """Batched float64 inputs [b, L, ...] (None for absent options) and lengths [b]."""
    lengths = torch.tensor(c.lengths if c.lengths else (c.L, c.L), dtype=torch.int64)
    b = lengths.numel()
    g = torch.Generator().manual_seed(1000 * c.L + 10 * c.H + c.seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    decay = {"strong": 8.0, "weak": 0.01}.get(c.regime, 1.0)
    A = -decay * (0.5 + u(c.H))
    dt = r(b, c.L, c.H) if c.dt_softplus else 0.05 + 0.5 * u(b, c.L, c.H)        # no softplus: positive Delta
    if c.regime == "strong":
        dt = dt.abs() + 1.0                                                       # big steps
    E = 2.0 * u(b, c.L, c.H)
    if c.regime == "gaps":                                                        # huge time gaps at ~30% of steps
        E = torch.where(u(b, c.L, c.H) < 0.3, 1e4 * (0.5 + u(b, c.L, c.H)), E)
    elif c.regime == "first_gap":                                                 # |cs| ~ 1e5 before small steps
        E[:, 0] = 1e4
        dt[:, 0] = 10.0
    elif c.regime == "E0":
        E = torch.zeros_like(E)
    return dict(x=r(b, c.L, c.H, c.P), dt=dt, A=A, B=r(b, c.L, c.G, c.n), C=r(b, c.L, c.G, c.n),
                E=E if c.has_E else None, dt_bias=0.5 * r(c.H) if c.has_bias else None,
                D=r(c.H) if c.has_D else None), lengths


def reference(c: Case, inp, lengths, dy):
    names = [k for k, v in inp.items() if v is not None]
    leaves = {k: inp[k].clone().requires_grad_() for k in names}
    get = lambda k: leaves.get(k)  # noqa: E731
    y = tissd_quadratic_ref(get("x"), get("dt"), get("A"), get("B"), get("C"), time_scale=get("E"),
                            dt_bias=get("dt_bias"), D=get("D"), d_skip=c.d_skip, lengths=lengths,
                            dt_softplus=c.dt_softplus)
    grads = dict(zip(names, torch.autograd.grad(y, [leaves[k] for k in names], dy)))
    return y.detach(), grads


def token_layout(c: Case, lengths):
    """seq_start [b] int64, seq_len [b] int32, T.  Padded: seq i at i*L.  Packed: irregular gaps between them."""
    b = lengths.numel()
    if not c.packed:
        return torch.arange(b, dtype=torch.int64) * c.L, lengths.to(torch.int32), b * c.L
    starts, pos = [], 3                                                           # 3 uncovered tokens first
    for i, n_i in enumerate(lengths.tolist()):
        starts.append(pos)
        pos += n_i + (i % 3)                                                      # 0..2 uncovered after each
    return torch.tensor(starts, dtype=torch.int64), lengths.to(torch.int32), pos + 2


def covered(seq_start, seq_len, T):
    """[T] bool: token belongs to some sequence."""
    m = torch.zeros(T, dtype=torch.bool)
    for s, n_i in zip(seq_start.tolist(), seq_len.tolist()):
        m[s:s + n_i] = True
    return m


def to_tokens(t, seq_start, seq_len, T, fill, gen):
    """Batched [b, L, ...] float64 -> token layout [T, ...] float32; uncovered tokens get garbage."""
    if fill == "big":
        out = torch.full((T, *t.shape[2:]), 1e6, dtype=torch.float64)
    else:
        out = 10.0 * torch.randn(T, *t.shape[2:], generator=gen, dtype=torch.float64)
    for i, (s, n_i) in enumerate(zip(seq_start.tolist(), seq_len.tolist())):
        out[s:s + n_i] = t[i, :n_i]
    return out.float().contiguous().to(DEVICE)


def from_tokens(t, seq_start, seq_len, L):
    """Token layout [T, ...] -> batched [b, L, ...] float64, zeros past each length."""
    t = t.detach().double().cpu()
    out = torch.zeros(len(seq_start), L, *t.shape[1:], dtype=torch.float64)
    for i, (s, n_i) in enumerate(zip(seq_start.tolist(), seq_len.tolist())):
        out[i, :n_i] = t[s:s + n_i]
    return out


def run_kernels(c: Case, inp, lengths, dy, dtype=torch.float32, fill=None, fill_seed=0, allow_tf32=False):
    """Kernel forward + backward on the token layout; returns (y, grads dict, layout)."""
    seq_start, seq_len, T = token_layout(c, lengths)
    gen = torch.Generator().manual_seed(fill_seed)
    tok = lambda t: None if t is None else to_tokens(t, seq_start, seq_len, T, fill or c.fill, gen)  # noqa: E731
    vec = lambda t: None if t is None else t.float().to(DEVICE)  # noqa: E731
    x, B, C = (tok(inp[k]).to(dtype) for k in ("x", "B", "C"))
    dyt = tok(dy).to(dtype)
    args = (x, tok(inp["dt"]), vec(inp["A"]), B, C, tok(inp["E"]), vec(inp["dt_bias"]), vec(inp["D"]),
            seq_start.to(DEVICE), seq_len.to(DEVICE), c.L)
    opts = dict(d_skip_delta=c.d_skip == "delta", dt_softplus=c.dt_softplus, padded=c.padded, allow_tf32=allow_tf32)
    y = tissd_quadratic_fwd(*args, **opts)
    grads = dict(zip(GRAD_NAMES, tissd_quadratic_bwd(dyt, *args, **opts, split=c.split)))
    return y, grads, (seq_start, seq_len, T)


def check_case(c: Case, tol=1e-4, allow_tf32=False):
    """Kernel y and all gradients vs the float64 reference (relative-norm error < tol); exact zeros off-sequence."""
    inp, lengths = make_inputs(c)
    dy = torch.randn(len(lengths), c.L, c.H, c.P, generator=torch.Generator().manual_seed(c.seed + 7),
                     dtype=torch.float64)
    ref_y, ref_g = reference(c, inp, lengths, dy)
    y, grads, (seq_start, seq_len, T) = run_kernels(c, inp, lengths, dy, allow_tf32=allow_tf32)
    pad = ~covered(seq_start, seq_len, T)

    assert y.dtype == torch.float32 and y.shape == (T, c.H, c.P)
    assert torch.isfinite(y).all()
    err = rel(from_tokens(y, seq_start, seq_len, c.L), ref_y)
    assert err < tol, f"y: relative error {err:.2e}"
    assert (y.cpu()[pad] == 0).all()
    per_token = {"dx": "x", "ddt": "dt", "dB": "B", "dC": "C", "dE": "E"}
    per_head = {"dA": "A", "ddt_bias": "dt_bias", "dD": "D"}
    for name in GRAD_NAMES:
        key = per_token.get(name) or per_head[name]
        g = grads[name]
        if inp[key] is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        if name in per_token:
            assert (g.cpu()[pad] == 0).all(), f"{name} not zero on padding"
            g = from_tokens(g, seq_start, seq_len, c.L)
        err = rel(g.cpu(), ref_g[key])
        assert err < tol, f"{name}: relative error {err:.2e}"


CASES = {
    # the paper's shape (H=8, P=64, n=64, G=H) at L=20, with a length-1 sequence and padding
    "paper_G=H": Case(L=20, H=8, P=64, n=64, G=8, lengths=(20, 1, 13), padded=True),
    "paper_G=1_strong": Case(L=20, H=8, P=64, n=64, G=1, lengths=(20, 9), regime="strong", padded=True),
    "L1": Case(L=1, H=1, P=32, n=16, lengths=(1, 1, 0), padded=True),
    "L7_P256_plain_nobias": Case(L=7, H=1, P=256, n=16, d_skip="plain", has_bias=False, lengths=(7, 1)),
    "L7_H8_G1_weak": Case(L=7, H=8, P=32, n=64, G=1, regime="weak", fill="rand"),
    "L20_P256_G=H_rand_fill": Case(L=20, H=8, P=256, n=16, G=8, lengths=(3, 20), fill="rand"),
    "L63_gaps": Case(L=63, H=1, P=32, n=64, lengths=(63, 1, 30), regime="gaps", padded=True),
    "L63_weak_nosoftplus": Case(L=63, H=1, P=64, n=16, regime="weak", dt_softplus=False, lengths=(50, 63)),
    "L130_multi_block": Case(L=130, H=1, P=32, n=16, lengths=(130, 77), padded=True),
    "L130_strong_plain": Case(L=130, H=1, P=32, n=16, regime="strong", d_skip="plain", lengths=(1, 130)),
    "E0": Case(L=20, H=1, P=64, n=16, regime="E0"),
    "no_E_no_bias_no_D": Case(L=20, H=8, P=32, n=16, G=8, has_E=False, has_bias=False, has_D=False,
                              lengths=(4, 20), padded=True),
    "no_D_gaps": Case(L=20, H=1, P=64, n=64, has_D=False, regime="gaps", lengths=(20, 5)),
    "first_gap_precision": Case(L=20, H=1, P=32, n=16, regime="first_gap"),
    "nosoftplus_plain_noE": Case(L=7, H=1, P=64, n=16, dt_softplus=False, d_skip="plain", has_E=False),
    "packed_H8_G1": Case(L=20, H=8, P=32, n=16, G=1, lengths=(20, 1, 7, 13, 0, 20), packed=True),
    "packed_L63_rand": Case(L=63, H=1, P=64, n=16, lengths=(63, 2, 40), packed=True, fill="rand"),
    # the split backward (column / row / token passes) on short shapes too: shared groups, gaps, packed, plain
    "split_paper_G=1_strong": Case(L=20, H=8, P=64, n=64, G=1, lengths=(20, 9), regime="strong", padded=True,
                                   split=True),
    "split_L63_gaps": Case(L=63, H=1, P=32, n=64, lengths=(63, 1, 30), regime="gaps", padded=True, split=True),
    "split_packed_plain_nosoftplus": Case(L=20, H=2, P=32, n=16, G=1, lengths=(20, 1, 7, 0), packed=True,
                                          d_skip="plain", dt_softplus=False, split=True),
    "split_L20_P256_no_D": Case(L=20, H=2, P=256, n=16, G=2, lengths=(3, 20), has_D=False, split=True),
    "fused_L130": Case(L=130, H=1, P=32, n=16, lengths=(130, 77), padded=True, split=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_quadratic_fp32_matches_reference(name):
    check_case(CASES[name])


@pytest.mark.parametrize("name", ["paper_G=H", "split_L63_gaps"])
def test_quadratic_tf32_matches_reference(name):
    """allow_tf32=True: TF32 dot products (10-bit mantissa) on GPU, so a looser tolerance that still catches a wrong
    term (those are O(1) off); the interpreter computes exactly."""
    check_case(CASES[name], tol=1e-2, allow_tf32=True)


def test_precision_flag_reaches_every_kernel(launched_precisions):
    """allow_tf32 / fp32_precision become the kernels' PRECISION constexpr: "tf32" with allow_tf32, exact "ieee"
    without, an explicit fp32_precision wins; unknown values raise."""
    seen = launched_precisions(quadratic)
    c = Case(L=7, H=1, P=32, n=16)
    inp, lengths = make_inputs(c)
    dy = torch.randn(len(lengths), c.L, c.H, c.P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for tf32, want in ((True, "tf32"), (False, "ieee")):
        seen.clear()
        run_kernels(c, inp, lengths, dy, allow_tf32=tf32)
        assert seen and set(seen) == {want}, (tf32, seen)
    seq_start, seq_len, T = token_layout(c, lengths)
    x, dt, B = torch.zeros(T, 1, 32), torch.zeros(T, 1), torch.zeros(T, 1, 16)
    args = (x, dt, -torch.ones(1), B, B, None, None, None, seq_start, seq_len.to(torch.int32), c.L)
    seen.clear()
    tissd_quadratic_bwd(x, *args, d_skip_delta=True, dt_softplus=True, allow_tf32=True, fp32_precision="tf32x3",
                        split=True)
    assert seen and set(seen) == {"tf32x3"}
    with pytest.raises(ValueError, match="fp32_precision"):
        tissd_quadratic_fwd(*args, d_skip_delta=True, dt_softplus=True, fp32_precision="fp64")


def test_small_parameters_in_any_float_dtype():
    """dt, E, A, dt_bias, D may come in float64 / bfloat16: the kernels cast on load (the wrapper need not)."""
    c = Case(L=20, H=2, P=32, n=16, G=1, lengths=(20, 9))
    inp, lengths = make_inputs(c)
    dy = torch.randn(len(lengths), c.L, c.H, c.P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y32, g32, (seq_start, seq_len, T) = run_kernels(c, inp, lengths, dy)
    x = to_tokens(inp["x"], seq_start, seq_len, T, "big", None)
    B = to_tokens(inp["B"], seq_start, seq_len, T, "big", None)
    C = to_tokens(inp["C"], seq_start, seq_len, T, "big", None)
    dyt = to_tokens(dy, seq_start, seq_len, T, "big", None)
    small = dict(dt=to_tokens(inp["dt"], seq_start, seq_len, T, "big", None).double(),
                 E=to_tokens(inp["E"], seq_start, seq_len, T, "big", None).double(),
                 A=inp["A"].to(DEVICE), dt_bias=inp["dt_bias"].to(DEVICE), D=inp["D"].to(DEVICE))  # float64
    args = (x, small["dt"], small["A"], B, C, small["E"], small["dt_bias"], small["D"], seq_start.to(DEVICE),
            seq_len.to(DEVICE), c.L)
    opts = dict(d_skip_delta=True, dt_softplus=True)
    y = tissd_quadratic_fwd(*args, **opts)
    grads = tissd_quadratic_bwd(dyt, *args, **opts)
    assert rel(y, y32) < 1e-6
    for name, g in zip(GRAD_NAMES, grads):
        assert g.dtype == (torch.float32 if name not in ("dx", "dB", "dC") else x.dtype), name
        assert rel(g, g32[name]) < 1e-5, name


def test_padding_garbage_does_not_change_valid_results():
    """Two different garbage fills of the uncovered tokens give bitwise identical outputs and gradients."""
    c = Case(L=20, H=1, P=32, n=16, lengths=(20, 4, 11), packed=True, regime="gaps")
    inp, lengths = make_inputs(c)
    dy = torch.randn(len(lengths), c.L, c.H, c.P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y1, g1, _ = run_kernels(c, inp, lengths, dy, fill="big")
    y2, g2, _ = run_kernels(c, inp, lengths, dy, fill="rand", fill_seed=5)
    assert torch.equal(y1, y2)
    for name in GRAD_NAMES:
        assert (g1[name] is None and g2[name] is None) or torch.equal(g1[name], g2[name]), name


def test_first_gap_needs_exact_cumsum_differences():
    """The first_gap case must be sensitive: the same inputs with a plain float32 cumsum (the failure mode the hi/lo
    split avoids) are off by far more than the tolerance, so passing `first_gap_precision` means something."""
    c = CASES["first_gap_precision"]
    inp, lengths = make_inputs(c)
    delta = torch.nn.functional.softplus(inp["dt"] * inp["E"] + inp["dt_bias"])
    a = (delta * inp["A"]).float()
    cs32 = torch.cumsum(a, dim=1)
    seg32 = (cs32[:, :, None, :] - cs32[:, None, :, :]).clamp(max=0).double()     # [b, i, j, H]
    cs64 = torch.cumsum(a.double(), dim=1)
    seg64 = (cs64[:, :, None, :] - cs64[:, None, :, :]).clamp(max=0)
    i, j = torch.tril_indices(c.L, c.L, offset=-1)
    keep = j >= 1                                                                  # pairs after the huge step
    m32, m64 = seg32[:, i[keep], j[keep]].exp(), seg64[:, i[keep], j[keep]].exp()
    assert rel(m32, m64) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs CUDA (the Triton interpreter is fp32-only)")
def test_quadratic_bf16_cuda():
    c = Case(L=20, H=8, P=64, n=64, G=8, lengths=(20, 1, 13, 20))
    inp, lengths = make_inputs(c)
    dy = torch.randn(len(lengths), c.L, c.H, c.P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_y, ref_g = reference(c, inp, lengths, dy)
    y, grads, (seq_start, seq_len, _) = run_kernels(c, inp, lengths, dy, dtype=torch.bfloat16)
    assert y.dtype == grads["dx"].dtype == grads["dB"].dtype == torch.bfloat16
    assert rel(from_tokens(y, seq_start, seq_len, c.L), ref_y) < 3e-2
    for name, key in (("dx", "x"), ("ddt", "dt"), ("dB", "B"), ("dC", "C"), ("dE", "E")):
        assert rel(from_tokens(grads[name], seq_start, seq_len, c.L), ref_g[key]) < 3e-2, name
    for name, key in (("dA", "A"), ("ddt_bias", "dt_bias"), ("dD", "D")):
        assert rel(grads[name].cpu(), ref_g[key]) < 3e-2, name


def test_bad_arguments_raise():
    c = Case(L=7)
    inp, lengths = make_inputs(c)
    seq_start, seq_len, T = token_layout(c, lengths)
    x = torch.zeros(T, 1, 32, device=DEVICE)
    dt = torch.zeros(T, 1, device=DEVICE)
    A = -torch.ones(1, device=DEVICE)
    B = torch.zeros(T, 1, 16, device=DEVICE)
    ss, sl = seq_start.to(DEVICE), seq_len.to(DEVICE)
    opts = dict(d_skip_delta=True, dt_softplus=True)
    with pytest.raises(ValueError, match="chunked"):
        tissd_quadratic_fwd(x, dt, A, B, B, None, None, None, ss, sl, QUADRATIC_MAX_LEN + 1, **opts)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tissd_quadratic_fwd(x.double(), dt, A, B.double(), B.double(), None, None, None, ss, sl, 7, **opts)
    with pytest.raises(ValueError, match="divide"):
        tissd_quadratic_fwd(x, dt, A, torch.zeros(T, 2, 16, device=DEVICE), torch.zeros(T, 2, 16, device=DEVICE),
                            None, None, None, ss, sl, 7, **opts)
    with pytest.raises(ValueError, match="int64"):
        tissd_quadratic_fwd(x, dt, A, B, B, None, None, None, ss.int(), sl, 7, **opts)
    with pytest.raises(ValueError, match="dt_bias"):
        tissd_quadratic_fwd(x, dt, A, B, B, None, torch.zeros(3, device=DEVICE), None, ss, sl, 7, **opts)
    with pytest.raises(ValueError, match="padded"):                                # T != nseq * max_len
        tissd_quadratic_fwd(x[:-1], dt[:-1], A, B[:-1], B[:-1], None, None, None, ss, sl, 7, padded=True, **opts)


def test_case_grid_covers_the_brief():
    """Every value the task lists appears in some case (guards against silently shrinking the grid)."""
    cs = list(CASES.values())
    assert {1, 7, 20, 63, 130} <= {c.L for c in cs}
    assert {1, 8} <= {c.H for c in cs} and {32, 64, 256} <= {c.P for c in cs} and {16, 64} <= {c.n for c in cs}
    assert any(c.G == 1 and c.H > 1 for c in cs) and any(c.G == c.H > 1 for c in cs)
    assert {"strong", "weak", "gaps", "E0", "first_gap"} <= {c.regime for c in cs}
    assert {"delta", "plain"} == {c.d_skip for c in cs} and {True, False} == {c.dt_softplus for c in cs}
    assert not all(c.has_E for c in cs) and not all(c.has_bias for c in cs) and not all(c.has_D for c in cs)
    assert any(c.packed for c in cs) and any(1 in c.lengths for c in cs)
    assert any(c.padded and c.lengths and min(c.lengths) < c.L for c in cs)
    assert any(not c.padded and not c.packed and c.lengths and min(c.lengths) < c.L for c in cs)
