"""Triton chunked TiSSD (mmm4rec_kernels/triton/chunked.py) against the float64 torch references.

Every case compares y, the final states and EVERY gradient (reference: torch.autograd on the float64 chunked reference
with the same dy / dfinal) with a relative-norm error ||a - b|| / ||b|| < 1e-4 in float32.  Without CUDA the kernels
run under the Triton interpreter (tests/conftest.py), so shapes are small but cover every value of the grid.
"""
import pytest
import torch

from mmm4rec_kernels.reference import tissd_chunked_ref, tissd_recurrent_ref
from mmm4rec_kernels.triton.chunked import tissd_chunked_bwd, tissd_chunked_fwd

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
GRAD_NAMES = ("x", "dt", "A", "B", "C", "E", "dt_bias", "D", "h0")


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (0 if both are exactly 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    nb = b.norm().item()
    if nb == 0.0:
        return a.norm().item()
    return (a - b).norm().item() / nb


def make_inputs(b, L, H, P, n, G, *, seed, lengths=None, decay="weak", E="rand", bias=True, D=True, h0=False,
                gap_frac=0.15, dtype=torch.float32):
    """Batched inputs [b, L, ...] on DEV (None for absent optional inputs) plus dy / dfinal cotangents."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)                          # noqa: E731
    ru = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g)  # noqa: E731
    inp = dict(x=rn(b, L, H, P), dt=rn(b, L, H) * 0.5, B=rn(b, L, G, n) * n ** -0.5, C=rn(b, L, G, n) * n ** -0.5)
    inp["A"] = -ru(1.0, 16.0, H) if decay == "strong" else -ru(0.01, 0.3, H)
    inp["E"] = None
    if E == "rand":
        inp["E"] = ru(-0.5, 2.0, b, L, H)
    elif E == "zero":
        inp["E"] = torch.zeros(b, L, H)
    elif E == "gaps":  # huge time gaps: Delta ~ 1e3..1e4 there, the decay across them underflows to 0
        Ev = ru(0.0, 2.0, b, L, H)
        gap = torch.rand(b, L, H, generator=g) < gap_frac
        Ev[gap] = ru(1e3, 1e4, b, L, H)[gap]
        inp["dt"] = torch.where(gap, inp["dt"].abs() + 0.1, inp["dt"])
        inp["E"], inp["gap"] = Ev, gap
    inp["dt_bias"] = ru(-3.0, 1.0, H) if bias else None
    inp["D"] = rn(H) if D else None
    inp["h0"] = rn(b, H, P, n) * 0.5 if h0 else None
    inp["lengths"] = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    inp["dy"], inp["dfinal"] = rn(b, L, H, P), rn(b, H, P, n)
    for k in ("x", "B", "C", "dy"):
        inp[k] = inp[k].to(dtype)
    return {k: (v.to(DEV) if torch.is_tensor(v) and k != "lengths" else v) for k, v in inp.items()}


def reference(inp, *, chunk_size, d_skip, dt_softplus=True, ref=tissd_chunked_ref):
    """float64 y, final and grads {name: grad or None} for loss = <y, dy> + <final, dfinal>."""
    leaves = {k: (None if inp[k] is None else inp[k].detach().double().cpu().requires_grad_()) for k in GRAD_NAMES}
    kw = dict(chunk_size=chunk_size) if ref is tissd_chunked_ref else {}
    y, fin = ref(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], time_scale=leaves["E"],
                 dt_bias=leaves["dt_bias"], D=leaves["D"], d_skip=d_skip, lengths=inp["lengths"],
                 dt_softplus=dt_softplus, initial_states=leaves["h0"], return_final_states=True, **kw)
    loss = (y * inp["dy"].double().cpu()).sum() + (fin * inp["dfinal"].double().cpu()).sum()
    loss.backward()
    return y.detach(), fin.detach(), {k: (None if v is None else v.grad) for k, v in leaves.items()}


def token_layout(inp):
    """Batched [b, L, ...] -> token layout [b * L, ...] with seq_start = arange(b) * L, seq_len = lengths."""
    b, L, H, P = inp["x"].shape
    flat = lambda t: None if t is None else t.reshape(b * L, *t.shape[2:])  # noqa: E731
    lengths = inp["lengths"] if inp["lengths"] is not None else torch.full((b,), L)
    seq = dict(seq_start=torch.arange(b, dtype=torch.int64, device=DEV) * L,
               seq_len=lengths.to(torch.int32).to(DEV), max_len=L)
    return dict(x=flat(inp["x"]), dt=flat(inp["dt"]), B=flat(inp["B"]), C=flat(inp["C"]), E=flat(inp["E"]),
                dy=flat(inp["dy"])), seq


def run_kernels(inp, *, chunk_size, d_skip, dt_softplus=True, return_final=True, fp32_precision=None):
    """Kernel y [b, L, H, P], final states and grads {name: grad} reshaped to the batched layout."""
    b, L, H, P = inp["x"].shape
    tok, seq = token_layout(inp)
    args = (tok["x"], tok["dt"], inp["A"], tok["B"], tok["C"], tok["E"], inp["dt_bias"], inp["D"],
            seq["seq_start"], seq["seq_len"], seq["max_len"])
    kw = dict(initial_states=inp["h0"], chunk_size=chunk_size, d_skip_delta=d_skip == "delta",
              dt_softplus=dt_softplus, fp32_precision=fp32_precision)
    y, fin = tissd_chunked_fwd(*args, return_final_states=return_final, **kw)
    grads = tissd_chunked_bwd(tok["dy"], inp["dfinal"], *args, **kw)
    shapes = dict(x=(b, L, H, P), dt=(b, L, H), B=inp["B"].shape, C=inp["C"].shape, E=(b, L, H))
    out = {}
    for name, gr in zip(GRAD_NAMES, grads):
        out[name] = None if gr is None else gr.reshape(shapes.get(name, gr.shape))
    return y.reshape(b, L, H, P), fin, out


def check_against_reference(inp, *, chunk_size, d_skip, dt_softplus=True, tol=TOL, fp32_precision=None):
    y_ref, fin_ref, g_ref = reference(inp, chunk_size=chunk_size, d_skip=d_skip, dt_softplus=dt_softplus)
    y, fin, g = run_kernels(inp, chunk_size=chunk_size, d_skip=d_skip, dt_softplus=dt_softplus,
                            fp32_precision=fp32_precision)
    errs = {"y": rel_err(y, y_ref), "final": rel_err(fin, fin_ref)}
    for name in GRAD_NAMES:
        if g_ref[name] is None:
            assert g[name] is None, f"d{name} should be None for an absent input"
            continue
        assert g[name] is not None, f"d{name} missing"
        assert g[name].dtype == (inp[name].dtype if name in ("x", "B", "C") else torch.float32), name
        assert torch.isfinite(g[name]).all(), f"d{name} not finite"
        errs["d" + name] = rel_err(g[name], g_ref[name])
    assert torch.isfinite(y).all() and torch.isfinite(fin).all()
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    if inp["lengths"] is not None:  # padded outputs and input-gradients are exactly 0
        b, L = inp["x"].shape[:2]
        pad = ~(torch.arange(L)[None, :] < inp["lengths"][:, None]).to(DEV)
        for name, t in (("y", y), ("dx", g["x"]), ("ddt", g["dt"]), ("dB", g["B"]), ("dC", g["C"]),
                        ("dE", g["E"])):
            if t is not None:
                assert (t[pad] == 0).all(), f"{name} not 0 on padding"
    return y, fin, g, y_ref, g_ref


# (b, L, H, P, n, G, chunk, options): together every value of L {1, 7, 20, 63, 130}, chunk {16, 64} (and 32, 128),
# H {1, 8}, P {32, 64, 256}, n {16, 64}, G {1, H}, strong/weak decay, E rand/0/None, skip delta/plain, with and
# without D, dt_bias, initial states, softplus or not, padding (incl. an empty sequence).
CASES = [
    (2, 1, 1, 32, 16, 1, 16, dict(h0=True)),
    (3, 7, 8, 32, 16, 8, 16, dict(lengths=[7, 3, 0], h0=True, decay="strong")),
    (2, 7, 1, 64, 64, 1, 64, dict(d_skip="plain", D=False)),
    (2, 20, 8, 64, 64, 1, 16, dict(lengths=[20, 13], decay="strong", d_skip="plain")),
    (2, 20, 1, 64, 16, 1, 64, dict(E="zero", h0=True)),
    (2, 20, 8, 32, 16, 8, 16, dict(E=None, bias=False, D=False)),
    (1, 20, 1, 32, 16, 1, 16, dict(E=None, bias=False, D=True, h0=True, softplus=False)),
    (2, 63, 1, 256, 16, 1, 64, dict(lengths=[63, 40])),
    (2, 63, 8, 64, 64, 8, 16, dict(lengths=[50, 63], decay="strong", h0=True)),
    (2, 63, 1, 32, 64, 1, 32, dict(d_skip="plain", h0=True, lengths=[17, 63])),
    (2, 130, 1, 32, 64, 1, 16, dict(lengths=[130, 77], decay="strong", h0=True)),
    (2, 130, 8, 32, 16, 8, 64, dict(lengths=[130, 65], d_skip="plain")),
    (1, 130, 1, 256, 64, 1, 64, dict(h0=True, decay="strong")),
    (1, 130, 1, 64, 16, 1, 128, dict(E="zero", bias=True, D=False, h0=True)),
    (2, 20, 1, 48, 24, 1, 16, dict(lengths=[20, 19], h0=True)),  # P, n not powers of 2 (masked tiles)
]


@pytest.mark.parametrize("b,L,H,P,n,G,chunk,opt", CASES, ids=[f"L{c[1]}-H{c[2]}-P{c[3]}-n{c[4]}-G{c[5]}-Q{c[6]}-{i}"
                                                          for i, c in enumerate(CASES)])
def test_chunked_matches_reference(b, L, H, P, n, G, chunk, opt):
    opt = dict(opt)
    d_skip, softplus = opt.pop("d_skip", "delta"), opt.pop("softplus", True)
    inp = make_inputs(b, L, H, P, n, G, seed=1000 + L * 7 + P + n + chunk, **opt)
    if not softplus:  # no softplus: keep Delta = dt * E + bias > 0 (a decay), dt in [0.05, 0.5]
        inp["dt"] = inp["dt"].abs().clamp(0.05, 0.5)
    check_against_reference(inp, chunk_size=chunk, d_skip=d_skip, dt_softplus=softplus)


@pytest.mark.parametrize("precision,case", [("ieee", 3), ("tf32", 8), ("ieee", 13)])
def test_single_reverse_sweep_matches_reference(precision, case):
    """The default exact fp32 ("tf32x3") backward runs its reverse sweep twice (SPLIT_BC: dx / dDelta, then
    dB / dC, for registers) and reads each chunk's C B^T from a scratch that the forward pass of the kernel wrote
    (CB_SCRATCH); every other precision runs one sweep with everything: check that path too (the interpreter
    computes every fp32 dot exactly, so the same tolerance holds)."""
    b, L, H, P, n, G, chunk, opt = CASES[case]
    opt = dict(opt)
    d_skip, softplus = opt.pop("d_skip", "delta"), opt.pop("softplus", True)
    inp = make_inputs(b, L, H, P, n, G, seed=2000 + case, **opt)
    check_against_reference(inp, chunk_size=chunk, d_skip=d_skip, dt_softplus=softplus, fp32_precision=precision)


@pytest.mark.parametrize("chunk", [16, 64])
def test_huge_time_gaps(chunk):
    """E up to 1e4: Delta ~ 1e3..1e4 at the gaps, decays across them underflow to 0 without NaN; rows after a gap
    in the same chunk keep full accuracy (|cs| ~ 1e5 there, the chunk cumsum must not cancel)."""
    inp = make_inputs(2, 63, 8, 32, 16, 1, seed=7 + chunk, E="gaps", decay="strong", h0=True, lengths=[63, 41])
    y, fin, g, y_ref, g_ref = check_against_reference(inp, chunk_size=chunk, d_skip="delta")
    calm = ~inp["gap"].cpu()  # [b, L, H] rows that are not a gap themselves (small values, next to huge ones)
    assert rel_err(y.cpu()[calm], y_ref[calm]) < TOL
    assert rel_err(g["x"].cpu()[calm], g_ref["x"][calm]) < TOL
    assert rel_err(g["dt"].cpu()[calm], g_ref["dt"][calm]) < TOL


def test_padding_garbage_is_ignored():
    """NaN / huge values in padded positions of every input (and of dy) change nothing."""
    inp = make_inputs(3, 20, 8, 32, 16, 8, seed=3, lengths=[20, 9, 0], h0=True)
    clean = run_kernels(inp, chunk_size=16, d_skip="delta")
    pad = ~(torch.arange(20)[None, :] < inp["lengths"][:, None]).to(DEV)
    dirty = dict(inp)
    for k, val in (("x", float("nan")), ("dt", float("nan")), ("E", float("inf")), ("B", 1e30), ("C", float("nan")),
                   ("dy", float("nan"))):
        t = inp[k].clone()
        t[pad] = val
        dirty[k] = t
    noisy = run_kernels(dirty, chunk_size=16, d_skip="delta")
    assert torch.equal(clean[0], noisy[0]) and torch.equal(clean[1], noisy[1])
    for name in GRAD_NAMES:
        assert torch.equal(clean[2][name], noisy[2][name]), f"d{name} changed by padding garbage"


@pytest.mark.slow          # Triton interpreter, ~40 s: CI runs it with -m slow
def test_packed_layout():
    """cu_seqlens-like layout: sequences at arbitrary token offsets, NaN tokens between them, an empty sequence;
    checked against the recurrent reference on the equivalent right-padded batch."""
    H, P, n, G, chunk = 4, 128, 16, 2, 16  # 2 heads per group and several P-blocks: partial dB / dC sums
    lens, starts, T = [5, 70, 0, 33], [3, 10, 80, 85], 125
    Lmax, nseq = max(lens), len(lens)
    inp = make_inputs(nseq, Lmax, H, P, n, G, seed=11, lengths=lens, h0=True, decay="strong")
    tok_idx = torch.cat([torch.arange(s, s + m) for s, m in zip(starts, lens)])
    bat_idx = torch.cat([torch.arange(i * Lmax, i * Lmax + m) for i, m in enumerate(lens)])

    def pack(t):  # [nseq, Lmax, ...] -> [T, ...], NaN outside the sequences
        if t is None:
            return None
        out = torch.full((T, *t.shape[2:]), float("nan"), dtype=t.dtype, device=DEV)
        out[tok_idx.to(DEV)] = t.reshape(nseq * Lmax, *t.shape[2:])[bat_idx.to(DEV)]
        return out

    def unpack(t):  # [T, ...] -> [nseq, Lmax, ...] (zeros on padding)
        out = torch.zeros(nseq * Lmax, *t.shape[1:], dtype=t.dtype, device=t.device)
        out[bat_idx.to(t.device)] = t[tok_idx.to(t.device)]
        return out.reshape(nseq, Lmax, *t.shape[1:])

    seq_start = torch.tensor(starts, dtype=torch.int64, device=DEV)
    seq_len = torch.tensor(lens, dtype=torch.int32, device=DEV)
    args = (pack(inp["x"]), pack(inp["dt"]), inp["A"], pack(inp["B"]), pack(inp["C"]), pack(inp["E"]),
            inp["dt_bias"], inp["D"], seq_start, seq_len, Lmax)
    kw = dict(initial_states=inp["h0"], chunk_size=chunk, d_skip_delta=True, dt_softplus=True)
    y, fin = tissd_chunked_fwd(*args, return_final_states=True, **kw)
    grads = tissd_chunked_bwd(pack(inp["dy"]), inp["dfinal"], *args, **kw)
    y_ref, fin_ref, g_ref = reference(inp, chunk_size=chunk, d_skip="delta", ref=tissd_recurrent_ref)

    covered = torch.zeros(T, dtype=torch.bool)
    covered[tok_idx] = True
    assert rel_err(unpack(y), y_ref) < TOL and rel_err(fin, fin_ref) < TOL
    for name, gr in zip(GRAD_NAMES, grads):
        if name in ("x", "dt", "B", "C", "E"):
            assert (gr[~covered.to(DEV)] == 0).all(), f"d{name} not 0 between sequences"
            gr = unpack(gr)
        assert rel_err(gr, g_ref[name]) < TOL, (name, rel_err(gr, g_ref[name]))
    assert (y[~covered.to(DEV)] == 0).all()


def test_without_final_states_and_dfinal():
    """return_final_states=False gives None; dfinal_states=None equals a zero dfinal."""
    inp = make_inputs(2, 20, 1, 32, 16, 1, seed=5, lengths=[20, 11], h0=True)
    tok, seq = token_layout(inp)
    args = (tok["x"], tok["dt"], inp["A"], tok["B"], tok["C"], tok["E"], inp["dt_bias"], inp["D"],
            seq["seq_start"], seq["seq_len"], seq["max_len"])
    kw = dict(initial_states=inp["h0"], chunk_size=16, d_skip_delta=True, dt_softplus=True)
    y, fin = tissd_chunked_fwd(*args, **kw)
    assert fin is None
    g_none = tissd_chunked_bwd(tok["dy"], None, *args, **kw)
    g_zero = tissd_chunked_bwd(tok["dy"], torch.zeros_like(inp["dfinal"]), *args, **kw)
    for a, b_ in zip(g_none, g_zero):
        assert torch.equal(a, b_)


def test_bad_input_raises():
    inp = make_inputs(1, 7, 2, 32, 16, 1, seed=0)
    tok, seq = token_layout(inp)
    args = [tok["x"], tok["dt"], inp["A"], tok["B"], tok["C"], tok["E"], inp["dt_bias"], inp["D"],
            seq["seq_start"], seq["seq_len"], seq["max_len"]]
    kw = dict(d_skip_delta=True, dt_softplus=True)
    with pytest.raises(ValueError, match="chunk_size"):
        tissd_chunked_fwd(*args, chunk_size=48, **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        tissd_chunked_fwd(*args, chunk_size=8, **kw)
    bad = list(args)
    bad[3] = torch.randn(7, 3, 16, device=DEV)  # G = 3 does not divide H = 2
    bad[4] = bad[3].clone()
    with pytest.raises(ValueError, match="divide"):
        tissd_chunked_fwd(*bad, **kw)
    bad = list(args)
    bad[1] = bad[1].to(torch.int32)  # any float dtype is fine (cast in the kernels), integers are not
    with pytest.raises(ValueError, match="dt must be a float tensor"):
        tissd_chunked_fwd(*bad, **kw)
    bad = list(args)
    bad[9] = bad[9].long()
    with pytest.raises(ValueError, match="int32"):
        tissd_chunked_fwd(*bad, **kw)
    with pytest.raises(ValueError, match="initial_states"):
        tissd_chunked_fwd(*args, initial_states=torch.zeros(1, 2, 32, 8, device=DEV), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a CUDA device (the Triton interpreter "
                                                           "cannot run bf16)")
@pytest.mark.parametrize("chunk", [32, 64])
def test_bf16_cuda(chunk):
    """bf16 x/B/C/dy (fp32 accumulation) against the float64 reference of the same (bf16-rounded) inputs."""
    inp = make_inputs(4, 200, 8, 64, 64, 8, seed=21, lengths=[200, 150, 64, 1], h0=True, dtype=torch.bfloat16)
    y_ref, fin_ref, g_ref = reference(inp, chunk_size=chunk, d_skip="delta")
    y, fin, g = run_kernels(inp, chunk_size=chunk, d_skip="delta")
    assert y.dtype == torch.bfloat16 and g["x"].dtype == torch.bfloat16 and g["B"].dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 2e-2 and rel_err(fin, fin_ref) < 2e-2
    for name in GRAD_NAMES:
        assert rel_err(g[name], g_ref[name]) < 3e-2, name


def test_precision_flag_reaches_the_kernels(launched_precisions):
    """fp32 dots: "tf32x3" by default (~fp32 accurate on tensor cores), "tf32" with allow_tf32, an explicit
    fp32_precision wins; unknown values raise."""
    from mmm4rec_kernels.triton import chunked

    seen = launched_precisions(chunked)
    inp = make_inputs(1, 7, 1, 32, 16, 1, seed=3)
    tok, seq = token_layout(inp)
    args = (tok["x"], tok["dt"], inp["A"], tok["B"], tok["C"], tok["E"], inp["dt_bias"], inp["D"],
            seq["seq_start"], seq["seq_len"], seq["max_len"])
    kw = dict(chunk_size=16, d_skip_delta=True, dt_softplus=True)
    for opts, want in ((dict(), "tf32x3"), (dict(allow_tf32=True), "tf32"),
                       (dict(allow_tf32=True, fp32_precision="ieee"), "ieee")):
        seen.clear()
        tissd_chunked_fwd(*args, **kw, **opts)
        tissd_chunked_bwd(tok["dy"], None, *args, **kw, **opts)
        assert seen == [want, want], (opts, seen)
    with pytest.raises(ValueError, match="fp32_precision"):
        tissd_chunked_fwd(*args, **kw, fp32_precision="bf16")


def test_small_parameters_in_any_float_dtype():
    """dt, E, A, dt_bias, D in float64: cast on load in every kernel (ddt/dE pass included); same results."""
    inp = make_inputs(2, 20, 2, 32, 16, 1, seed=11, lengths=[20, 9])
    tok, seq = token_layout(inp)
    kw = dict(chunk_size=16, d_skip_delta=True, dt_softplus=True)

    def run(cast):
        args = (tok["x"], cast(tok["dt"]), cast(inp["A"]), tok["B"], tok["C"], cast(tok["E"]), cast(inp["dt_bias"]),
                cast(inp["D"]), seq["seq_start"], seq["seq_len"], seq["max_len"])
        y, _ = tissd_chunked_fwd(*args, **kw)
        return (y,) + tuple(tissd_chunked_bwd(tok["dy"], None, *args, **kw))

    ref = run(lambda t: t)
    out = run(lambda t: t.double())
    for a, b in zip(out, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and rel_err(a, b) < 1e-6
