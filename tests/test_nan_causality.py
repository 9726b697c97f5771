"""NaN causality (issue 21, item 3): a NaN or inf at a valid step t of sequence s, in x, dt, time_scale, B or C, may
only reach the outputs at steps >= t of s, and only the gradients that flow from them.  Checked on a right-padded
batch (the bad sequence is itself padded; the others are clean) through the public op, on the Triton backend
(interpreter on CPU, fp32) and the torch backend, quadratic and chunked (chunk_size 16 at L = 20: two chunks, the
bad step in the first or the second).

Definitions (b = 3, lengths 20 / 19 / 11, bad sequence s = 1):
  forward   rows < t of s equal the clean run's (finite); every padded row is exactly 0; the other sequences equal
            the clean run's.
  backward  loss = sum of y * w over rows < t of s and every row of the other sequences (w random, nonzero on the
            padded rows too); "causal": the gradients of x, dt, time_scale, B, C at the steps < t of s and at every
            step of the other sequences equal the clean run's (same loss) and are finite, padded steps get exactly 0;
            "strong zeros": EVERY gradient, A, dt_bias and D and the steps >= t of s included, is finite and equals
            the clean run's (the loss does not depend on anything at steps >= t, so the exact gradient there is 0).
The kernels meet both: masked pairs are selected (tl.where) instead of multiplied by 0, a non-finite operand of a
dot over steps reaches only the rows that keep pairs with it, and the backward runs on the live prefix of each
(sequence, head): the rows after the last one with a nonzero dy contribute exactly nothing.
"""
import functools

import pytest
import torch

import mmm4rec_kernels as mk

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")     # numpy (interpreter) on NaN / inf arithmetic

B_, L_, H_, P_, N_ = 3, 20, 2, 16, 16
LENGTHS = (20, 19, 11)
S = 1                                     # the sequence that gets the bad value
# (input, value, step t): NaN and inf in each input, the bad step in the first chunk (6) or the second (17)
SOURCES = [("x", "nan", 6), ("x", "inf", 17), ("dt", "nan", 17), ("dt", "inf", 6), ("time_scale", "nan", 6),
           ("time_scale", "inf", 17), ("B", "nan", 17), ("B", "-inf", 6), ("C", "nan", 6), ("C", "inf", 17)]
BACKENDS = [("triton", "quadratic"), ("triton", "chunked"), ("torch", "quadratic"), ("torch", "chunked")]
TOKEN_INPUTS = ("x", "dt", "time_scale", "B", "C")
NAMES = ("x", "dt", "A", "B", "C", "time_scale", "dt_bias", "D")

def _inputs(L=L_, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b = len(lengths)
    return dict(x=r(b, L, H_, P_), dt=r(b, L, H_) * 0.5, A=-(0.5 + torch.rand(H_, generator=g)),
                B=r(b, L, 1, N_) / 4, C=r(b, L, 1, N_) / 4, time_scale=torch.rand(b, L, H_, generator=g) + 0.1,
                dt_bias=r(H_) * 0.5, D=r(H_))


def _poison(inp, name, value, t):
    bad = {k: v.clone() for k, v in inp.items()}
    v = float(value)
    if name == "x":
        bad["x"][S, t, 1, 3] = v
    elif name in ("B", "C"):
        bad[name][S, t, 0, 5] = v
    else:
        bad[name][S, t, 0] = v
        if name == "time_scale" and value == "inf":
            bad["dt"][S, t, 0] = 1.0           # v = dt * inf = +inf: Delta = inf (a negative dt would give Delta 0)
    return bad


def _weights(y_shape, t, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(y_shape, generator=g)
    if t is not None:
        w[S, t:] = 0.0                         # the loss reads rows < t of the bad sequence (all rows elsewhere)
    return w


def _run(inp, backend, path, t, L=L_, lengths=LENGTHS, full_loss=False):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    y = mk.tissd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], time_scale=leaves["time_scale"],
                 dt_bias=leaves["dt_bias"], D=leaves["D"], lengths=torch.tensor(lengths), backend=backend, path=path,
                 chunk_size=16)
    y.backward(_weights(y.shape, None if full_loss else t))    # d loss / dy = w: the loss sum(y * w)
    return y.detach(), {k: leaves[k].grad.detach() for k in NAMES}


@functools.lru_cache(maxsize=None)
def _pair(backend, path, name, value, t, L=L_, lengths=LENGTHS, full_loss=False):
    """(clean run, run with the bad value) with the same loss: (y, grads) each."""
    inp = _inputs(L, lengths)
    return (_run(inp, backend, path, t, L, lengths, full_loss),
            _run(_poison(inp, name, value, t), backend, path, t, L, lengths, full_loss))


def _same(a, b, what):
    assert torch.isfinite(a).all(), f"{what}: non-finite values {(~torch.isfinite(a)).nonzero()[:4].tolist()}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what}: differs from the clean run by {err:.3g}"


def _pad_mask(lengths, L):
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]          # [b, L] True on padded steps


def _check_forward(clean, bad, t, lengths=LENGTHS, L=L_):
    y0, y1 = clean[0], bad[0]
    _same(y1[S, :t], y0[S, :t], "y, rows < t of the bad sequence")
    others = [i for i in range(len(lengths)) if i != S]
    _same(y1[others], y0[others], "y, the other sequences")
    pad = _pad_mask(lengths, L)
    assert (y1[pad] == 0).all(), "padded rows of y are not exactly 0"


def _check_causal_grads(clean, bad, t, lengths=LENGTHS, L=L_):
    pad = _pad_mask(lengths, L)
    others = [i for i in range(len(lengths)) if i != S]
    for k in TOKEN_INPUTS:
        g0, g1 = clean[1][k], bad[1][k]
        _same(g1[S, :t], g0[S, :t], f"d{k}, steps < t of the bad sequence")
        _same(g1[others], g0[others], f"d{k}, the other sequences")
        assert (g1[pad] == 0).all(), f"d{k} is not exactly 0 on padded steps"


def _check_all_grads(clean, bad):
    for k in NAMES:
        _same(bad[1][k], clean[1][k], f"d{k} (every step / the whole parameter)")


def _params(tier):
    return [pytest.param(backend, path, name, value, t, id=f"{backend}-{path}-{name}-{value}-t{t}")
            for backend, path in BACKENDS for name, value, t in SOURCES]


@pytest.mark.parametrize("backend,path,name,value,t", _params("causal"))
def test_nonfinite_input_stays_causal(backend, path, name, value, t):
    """Forward rows < t, padding, other sequences; gradients at steps < t and of the other sequences (see top)."""
    clean, bad = _pair(backend, path, name, value, t)
    _check_forward(clean, bad, t)
    _check_causal_grads(clean, bad, t)


@pytest.mark.parametrize("backend,path,name,value,t", _params("all"))
def test_nonfinite_input_every_gradient_exact(backend, path, name, value, t):
    """Loss over rows < t: every gradient (parameters and the steps >= t included) finite and equal to the clean
    run's: an output row with a zero gradient contributes exactly nothing, whatever its value."""
    clean, bad = _pair(backend, path, name, value, t)
    _check_all_grads(clean, bad)


@pytest.mark.parametrize("name,value,t", [("x", "inf", 30), ("dt", "nan", 9), ("B", "nan", 30), ("C", "-inf", 9)])
def test_triton_quadratic_split_backward_causal(name, value, t):
    """L = 40 (BLOCK_L 64): the split backward (column / row / token passes and the live-prefix pass)."""
    lengths = (40, 37, 23)
    clean, bad = _pair("triton", "quadratic", name, value, t, 40, lengths)
    _check_forward(clean, bad, t, lengths, 40)
    _check_causal_grads(clean, bad, t, lengths, 40)
    _check_all_grads(clean, bad)


FULL_LOSS = [("x", "nan", 6), ("x", "inf", 17), ("B", "nan", 6), ("B", "-inf", 17)]


def _full_loss_params(sources):
    return [pytest.param(backend, path, name, value, t, id=f"{backend}-{path}-{name}-{value}-t{t}")
            for backend, path in BACKENDS for name, value, t in sources]


@pytest.mark.parametrize("backend,path,name,value,t", _full_loss_params(FULL_LOSS))
def test_nonfinite_x_or_b_prefix_gradients_with_a_loss_over_every_row(backend, path, name, value, t):
    """Backward with a random dy on EVERY row, the same in both runs (the loss sum(y * w) itself is NaN): a NaN /
    inf in x_t or B_t enters y_i (i >= t) only through the pair (i, t), so the gradients of x, dt, time_scale, B, C
    at the steps < t still equal the clean run's (only a bad Delta_t, from dt or time_scale, enters the decays of
    every pair that spans t).  On the Triton backward this covers dC_i = sum_j dCB_ij B_j, a dot over the steps of
    a block / chunk where a bad B_t meets the masked zeros of the rows i < t."""
    clean, bad = _pair(backend, path, name, value, t, full_loss=True)
    for k in TOKEN_INPUTS:
        _same(bad[1][k][S, :t], clean[1][k][S, :t], f"d{k}, steps < t of the bad sequence (loss over every row)")


def _check_c_full_loss(clean, bad, t, lengths=LENGTHS, L=L_):
    """A bad C_t with dy on every row: y_t = C_t . h_t reads x, B, Delta of every step <= t, so their gradients at
    the steps < t may be non-finite (the gradients of an output at a step >= t); dC at the steps < t may not (dC_i
    reads dy_i and steps <= i only), nor anything of the other sequences, and padded steps stay exactly 0 (in a
    block / chunk a bad C_t meets the masked zeros of the padded columns j > t)."""
    pad = _pad_mask(lengths, L)
    others = [i for i in range(len(lengths)) if i != S]
    _same(bad[1]["C"][S, :t], clean[1]["C"][S, :t], "dC, steps < t of the bad sequence (loss over every row)")
    for k in TOKEN_INPUTS:
        _same(bad[1][k][others], clean[1][k][others], f"d{k}, the other sequences (loss over every row)")
        assert (bad[1][k][pad] == 0).all(), f"d{k} is not exactly 0 on padded steps (loss over every row)"


@pytest.mark.parametrize("backend,path,name,value,t", _full_loss_params([("C", "nan", 6), ("C", "inf", 17)]))
def test_nonfinite_c_with_a_loss_over_every_row(backend, path, name, value, t):
    """See _check_c_full_loss (L = 20: the bad step and the padding share a block of the fused Triton backward)."""
    clean, bad = _pair(backend, path, name, value, t, full_loss=True)
    _check_c_full_loss(clean, bad, t)


@pytest.mark.parametrize("name,value,t", [("C", "-inf", 34), ("B", "nan", 34)])
def test_triton_quadratic_split_backward_loss_over_every_row(name, value, t):
    """L = 40 (BLOCK_L 64, the split backward), dy on every row, the bad step in the column / row block of the
    padded steps 37..39 of the bad sequence."""
    lengths = (40, 37, 23)
    clean, bad = _pair("triton", "quadratic", name, value, t, 40, lengths, full_loss=True)
    if name == "C":
        _check_c_full_loss(clean, bad, t, lengths, 40)
    else:
        for k in TOKEN_INPUTS:
            _same(bad[1][k][S, :t], clean[1][k][S, :t], f"d{k}, steps < t of the bad sequence (loss over every row)")
        assert all((bad[1][k][_pad_mask(lengths, 40)] == 0).all() for k in TOKEN_INPUTS)
