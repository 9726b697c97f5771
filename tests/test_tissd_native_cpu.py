"""The torch backend's two CPU implementations of the quadratic form without states: the native C++ kernel
(torch.ops.mmm4rec.ssd_scan_cpu through mmm4rec_kernels.ops.ssd_scan, D skip fused) and the einsum path, each against the float64 recurrence of
reference.py: y and every gradient (x, dt, A, B, C, E, D, dt_bias), awkward lengths, weak / strong decay, a huge time
gap, NaN garbage in padded steps, groups, D as [H] / [H, P] / none, both skip kinds, with and without softplus; the
eager call as one native node (in C++: mmm4rec_kernels.cpu.nodes; in Python: torch_backend._TiSSDCPU) and the scan op
with torch ops around it."""
import pytest
import torch

import mmm4rec_kernels.cpu as native
from mmm4rec_kernels import ops, reference, torch_backend


class _CountingNodes:
    """The C++ nodes module with its tissd() calls counted."""

    def __init__(self, module, calls):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        return getattr(self._module, name)

    def tissd(self, *args):
        self._calls.append(1)
        return self._module.tissd(*args)


@pytest.fixture(params=["cpp-node", "native-call", "native-scan", "einsum"])
def impl(request, monkeypatch):
    """cpp-node: the eager call as one native node in C++ (mmm4rec_kernels.cpu.nodes); native-call: the same node in
    Python (torch_backend._TiSSDCPU); native-scan: the registered scan op with torch step sizes around it (what
    torch.compile traces); einsum: no native library.  calls: the native kernel's uses."""
    calls = []
    if request.param == "cpp-node":
        from mmm4rec_kernels.cpu import nodes
        monkeypatch.setattr(nodes, "_module", _CountingNodes(request.getfixturevalue("cpp_nodes"), calls))
    elif request.param == "native-call":
        request.getfixturevalue("python_nodes")                 # skip without a compiler, fail if it does not load
        fwd = native.tissd_forward
        monkeypatch.setattr(native, "tissd_forward", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    elif request.param == "native-scan":
        request.getfixturevalue("native_cpu")
        monkeypatch.setattr(torch_backend, "_native_call", lambda *a, **k: None)
        scan = ops.ssd_scan
        monkeypatch.setattr(ops, "ssd_scan", lambda *a, **k: calls.append(1) or scan(*a, **k))
    else:
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param, calls


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def case(L, b=3, H=4, P=3, G=2, n=5, decay="mixed", gap=None, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + L)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    scale = {"weak": 0.01, "strong": 5.0, "mixed": 1.0}[decay]
    inp = dict(x=mk(b, L, H, P), dt=mk(b, L, H), A=-torch.rand(H, generator=g, dtype=torch.float64) * scale - 1e-3,
               B=mk(b, L, G, n), C=mk(b, L, G, n), E=mk(b, L, H).abs() + 0.1)
    if gap is not None and L > 2:
        inp["E"][:, L // 2] = gap
        inp["dt"][:, L // 2] = inp["dt"][:, L // 2].abs() + 0.5
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    lengths[0] = L
    return inp, lengths, mk


@pytest.mark.parametrize("L", [1, 7, 20, 63, 200])
@pytest.mark.parametrize("decay", ["weak", "strong"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quadratic_without_states_matches_float64_recurrence(impl, L, decay, dtype):
    name, calls = impl
    inp, lengths, mk = case(L, decay=decay, G=2 if L != 63 else 1)
    D = mk(inp["x"].shape[2])
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    garbage = {k: v.clone() for k, v in inp.items()}
    for k in ("x", "dt", "B", "C", "E"):                        # NaN in padded steps must not reach anything
        garbage[k][pad] = float("nan")
    order = ("x", "dt", "A", "B", "C", "E")
    leaves = [garbage[k].to(dtype).requires_grad_() for k in order] + [D.to(dtype).requires_grad_()]
    y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], D=leaves[6], lengths=lengths, path="quadratic")
    cot = mk(*y.shape)
    grads = torch.autograd.grad(y, leaves, cot.to(dtype))
    ref_leaves = [inp[k].clone().requires_grad_() for k in order] + [D.clone().requires_grad_()]
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], D=ref_leaves[6], lengths=lengths)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert y.dtype == dtype and rel(y, ref) < tol
    for k, a, r in zip(order + ("D",), grads, ref_grads):
        assert torch.isfinite(a).all(), k
        assert rel(a, r) < tol, (k, rel(a, r))
    assert len(calls) == (0 if name == "einsum" else 1)


@pytest.mark.parametrize("H,G,P,n", [(4, 2, 16, 16), (2, 2, 12, 5), (4, 1, 32, 8), (2, 1, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_short_and_long_sequences_in_one_batch(impl, H, G, P, n, dtype):
    """Lengths on both sides of the native kernel's short-sequence path (<= 32 steps: one to four SIMD vectors per row
    in fp32 / fp64) and past it in one batch, P a multiple of the vector width or not, G < H and G = H, NaN in the
    padded steps: y and every gradient against the float64 recurrence."""
    name, calls = impl
    L = 40
    inp, _, mk = case(L, b=12, H=H, P=P, G=G, n=n, seed=11)
    lengths = torch.tensor([1, 2, 5, 8, 9, 16, 17, 20, 24, 32, 33, 40])
    D = mk(H, P)
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    garbage = {k: v.clone() for k, v in inp.items()}
    for k in ("x", "dt", "B", "C", "E"):
        garbage[k][pad] = float("nan")
    order = ("x", "dt", "A", "B", "C", "E")
    leaves = [garbage[k].to(dtype).requires_grad_() for k in order] + [D.to(dtype).requires_grad_()]
    y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], D=leaves[6], lengths=lengths, path="quadratic")
    cot = mk(*y.shape)
    cot[3, 4:] = 0.0                                            # zero gy rows: the backward's exact skip
    grads = torch.autograd.grad(y, leaves, cot.to(dtype))
    ref_leaves = [inp[k].clone().requires_grad_() for k in order] + [D.clone().requires_grad_()]
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], D=ref_leaves[6], lengths=lengths)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert y.dtype == dtype and rel(y, ref) < tol and (y[pad] == 0).all()
    for k, a, r in zip(order + ("D",), grads, ref_grads):
        assert torch.isfinite(a).all(), k
        assert rel(a, r) < tol, (k, rel(a, r))
    assert len(calls) == (0 if name == "einsum" else 1)


@pytest.mark.parametrize("dtype,P", [(torch.float32, 16), (torch.float64, 8)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_outputs_of_a_megabyte_or_more(impl, dtype, P, nthreads):
    """y, dx, dB and dC of at least 1 MB: the fp32 short path writes their rows (one 64-byte line per step and head /
    group: P = n = 16 floats) and the padded rows' zeros with non-temporal stores (activations.h: kStreamBytes); fp64
    (no short path: plain stores) is the control.  y and every gradient against the float64 recurrence, padded rows
    exactly 0, 1 and 2 threads."""
    name, calls = impl
    if name == "einsum":
        pytest.skip("the native kernel's stores")
    b, L, H, G, n = 210, 20, 8, 4, 16
    assert b * L * min(H * P, G * n) * torch.tensor([], dtype=dtype).element_size() >= 1 << 20
    inp, lengths, mk = case(L, b=b, H=H, P=P, G=G, n=n, seed=7)
    D = mk(H)
    order = ("x", "dt", "A", "B", "C", "E")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(nthreads)
        leaves = [inp[k].to(dtype).requires_grad_() for k in order] + [D.to(dtype).requires_grad_()]
        y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], D=leaves[6], lengths=lengths,
                                      path="quadratic")
        cot = mk(*y.shape)
        grads = torch.autograd.grad(y, leaves, cot.to(dtype))
    finally:
        torch.set_num_threads(threads)
    ref_leaves = [inp[k].clone().requires_grad_() for k in order] + [D.clone().requires_grad_()]
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], D=ref_leaves[6], lengths=lengths)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    assert pad.any() and (y[pad] == 0).all() and all((grads[k][pad] == 0).all() for k in (0, 3, 4))   # x, B, C
    assert rel(y, ref) < tol
    for k, a, r in zip(order + ("D",), grads, ref_grads):
        assert rel(a, r) < tol, (k, rel(a, r))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype,L,P,b", [(torch.float32, 20, 16, 136), (torch.float32, 20, 16, 3),
                                         (torch.float32, 20, 6, 3), (torch.float32, 45, 16, 3),
                                         (torch.float64, 20, 16, 3)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_native_call_flags_exactly_the_nonfinite_valid_rows(native_cpu, dtype, L, P, b, nthreads):
    """mmm4rec_kernels.cpu.tissd_forward gives None exactly when a valid row of y is not finite: the scan checks each
    row as it writes it (fp32's short path in registers before the store, streamed at b 136; P 6 after its plain row
    loop; the blocked path, L 45 and fp64, per block of rows).  NaN at a random valid step of each input, inf in x, B
    or C (the last valid step of a sequence too), and finite inputs whose y overflows, give None; NaN at every padded
    step, and clean inputs, give y (the clean y on valid rows)."""
    H, G, n = 8, 4, 16
    inp, lengths, mk = case(L, b=b, H=H, P=P, G=G, n=n, seed=17)
    lengths[-1] = max(L // 2, 1)                                 # a padded tail in the last sequence
    g = torch.Generator().manual_seed(L * P + b)
    order = ("x", "dt", "A", "B", "C", "E")
    D2, bias = torch.ones(H, P, dtype=dtype), torch.zeros(H, dtype=dtype)

    def call(t):
        return native.tissd_forward(t["x"], t["dt"], t["A"], t["B"], t["C"], t["E"], bias, D2, lengths, True, True)

    clean = {k: inp[k].to(dtype).contiguous() for k in order}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(nthreads)
        y = call(clean)
        assert y is not None and torch.isfinite(y).all()
        padded = {k: v.clone() for k, v in clean.items()}
        pad = torch.arange(L)[None, :] >= lengths[:, None]
        for k in ("x", "dt", "B", "C", "E"):
            padded[k][pad] = float("nan")
        y_pad = call(padded)
        assert y_pad is not None and torch.equal(y_pad, y)
        for trial in range(12):
            seq = int(torch.randint(b, (1,), generator=g))
            last = int(lengths[seq]) - 1
            step = last if trial % 3 == 0 else int(torch.randint(last + 1, (1,), generator=g))
            bad = {k: v.clone() for k, v in clean.items()}
            if trial % 6 == 5:                                   # finite inputs, y overflows (D s x, s > 1)
                bad["x"][seq, step] = torch.finfo(dtype).max
                bad["dt"][seq, step] = 10.0
                what = "overflow"
            else:
                what = ("x", "dt", "B", "C", "E")[trial % 5]
                inf_ok = what in ("x", "B", "C")                 # dt * E = -inf is a finite step size (0)
                bad[what][seq, step] = float("inf") if inf_ok and trial % 2 == 0 else float("nan")
            assert call(bad) is None, (what, seq, step, trial)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("gap", [1e4, 1e9])
def test_fp32_huge_time_gap(impl, gap):
    inp, lengths, mk = case(20, gap=gap, seed=3)
    order = ("x", "dt", "A", "B", "C", "E")
    leaves = [inp[k].float().requires_grad_() for k in order]
    y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], lengths=lengths, path="quadratic")
    cot = mk(*y.shape)
    grads = torch.autograd.grad(y, leaves, cot.float())
    ref_leaves = [inp[k].clone().requires_grad_() for k in order]
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], lengths=lengths)
    for k, a, r in zip(("y",) + order, (y,) + grads, (ref,) + torch.autograd.grad(ref, ref_leaves, cot)):
        assert rel(a, r) < 1e-4, k


@pytest.mark.parametrize("D_shape,d_skip", [((4, 3), "delta"), ((4,), "plain"), (None, "delta")])
def test_skip_variants_and_threads(impl, D_shape, d_skip):
    """D [H, P] / [H] / none, skip D x (plain) or D Delta x; 1 and 2 threads agree (dD is summed per thread)."""
    inp, lengths, mk = case(20, seed=7)
    D = None if D_shape is None else mk(*D_shape)
    order = ("x", "dt", "A", "B", "C", "E")
    cot = mk(*inp["x"].shape)
    ref_leaves = [inp[k].clone().requires_grad_() for k in order] + ([D.clone().requires_grad_()] if D_shape else [])
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], lengths=lengths,
                                        D=ref_leaves[6] if D_shape else None, d_skip=d_skip)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    threads = torch.get_num_threads()
    try:
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            leaves = [t.detach().clone().requires_grad_() for t in ref_leaves]
            y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], lengths=lengths, path="quadratic",
                                          D=leaves[6] if D_shape else None, d_skip=d_skip)
            assert rel(y, ref) < 1e-12
            for a, r in zip(torch.autograd.grad(y, leaves, cot), ref_grads):
                assert rel(a, r) < 1e-12
    finally:
        torch.set_num_threads(threads)


def test_states_take_the_einsum_path(impl):
    """initial / final states are not in the native kernel: those calls keep the einsum path (and stay correct)."""
    name, calls = impl
    inp, lengths, mk = case(7, seed=9)
    h0 = mk(3, 4, 3, 5)
    y, hT = torch_backend.tissd_torch(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["E"],
                                      lengths=lengths, initial_states=h0, return_final_states=True)
    ry, rhT = reference.tissd_recurrent_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["E"],
                                            lengths=lengths, initial_states=h0, return_final_states=True)
    assert rel(y, ry) < 1e-12 and rel(hT, rhT) < 1e-12 and calls == []


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("L", [1, 20, 63])
def test_dt_bias_softplus_and_no_lengths(impl, softplus, L):
    """dt_bias (its gradient too), dt_softplus off (dt used as the step size: kept positive here), lengths None."""
    inp, _, mk = case(L, seed=11)
    if not softplus:
        inp["dt"] = inp["dt"].abs() * 0.5
    bias = mk(4) * 0.5
    order = ("x", "dt", "A", "B", "C", "E")
    cot = mk(*inp["x"].shape)
    ref_leaves = [inp[k].clone().requires_grad_() for k in order] + [bias.clone().requires_grad_()]
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], dt_bias=ref_leaves[6],
                                        dt_softplus=softplus)
    leaves = [t.detach().clone().requires_grad_() for t in ref_leaves]
    y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], dt_bias=leaves[6], dt_softplus=softplus,
                                  path="quadratic")
    assert rel(y, ref) < 1e-12
    for k, a, r in zip(order + ("dt_bias",), torch.autograd.grad(y, leaves, cot), torch.autograd.grad(ref, ref_leaves,
                                                                                                      cot)):
        assert rel(a, r) < 1e-12, k


@pytest.mark.parametrize("where", ["x", "dt", "B", "C", "E"])
def test_nonfinite_input_takes_the_general_path(impl, where):
    """A NaN at a valid step: the native call gives up (its output row is not finite) and the general path's NaN rule
    runs: outputs before the step stay the clean call's, from it on NaN for the heads it reaches."""
    name, calls = impl
    inp, lengths, mk = case(20, seed=13)
    clean = torch_backend.tissd_torch(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["E"],
                                      lengths=lengths, path="quadratic")
    bad = {k: v.clone() for k, v in inp.items()}
    bad[where][0, 5] = float("nan")
    y = torch_backend.tissd_torch(bad["x"], bad["dt"], bad["A"], bad["B"], bad["C"], time_scale=bad["E"],
                                  lengths=lengths, path="quadratic")
    assert rel(y[1:], clean[1:]) < 1e-12 and rel(y[0, :5], clean[0, :5]) < 1e-12      # (paths differ: rounding)
    assert torch.isnan(y[0, 5:]).any(dim=(1, 2)).all()
    if name in ("native-call", "cpp-node"):
        assert len(calls) == 2                                  # tried twice, the NaN call fell back


def test_fp32_step_sizes_keep_fp32_accuracy(impl):
    """Each fp32 step size to fp32 accuracy, tiny ones included: with one step, x = B = C = 1 and no skip, y is the
    step size softplus(dt) itself, here over dt in [-16, 24] (softplus down to 1e-7 and past torch's threshold 20).
    A softplus that loses the small values (log(1 + e) rounded; a log1p correction folded away by reassociation,
    which made this 0.33 at dt -15.5) fails."""
    dt = torch.linspace(-16, 24, 2001, dtype=torch.float64)
    b = dt.numel()
    one = lambda *s: torch.ones(*s)  # noqa: E731
    y = torch_backend.tissd_torch(one(b, 1, 1, 1), dt.float().reshape(b, 1, 1), -one(1), one(b, 1, 1, 1),
                                  one(b, 1, 1, 1), path="quadratic")
    ref = torch.nn.functional.softplus(dt)
    assert ((y.reshape(-1).double() - ref) / ref).abs().max() < 1e-6


@pytest.mark.parametrize("L", [20, 63])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_with_tiny_and_growing_decays(impl, dtype, L):
    """Rows (L 20: fp32's short path; L 63: the blocked path) where some heads' decays fall far below e^-60 (the
    inlined vector exp gives 0 there) while one head's A is POSITIVE (never in the model: its decays exceed 1; right
    from the AVX-512 exp, recomputed by std::exp on other builds): values and every gradient against the float64
    recurrence."""
    name, calls = impl
    inp, lengths, mk = case(L, decay="strong", G=1, seed=5)
    inp["A"][0] = 0.02                                           # head 0 grows: exp(seg) > 1
    order = ("x", "dt", "A", "B", "C", "E")
    leaves = [inp[k].to(dtype).requires_grad_() for k in order]
    y = torch_backend.tissd_torch(*leaves[:5], time_scale=leaves[5], lengths=lengths, path="quadratic")
    cot = mk(*y.shape)
    grads = torch.autograd.grad(y, leaves, cot.to(dtype))
    ref_leaves = [inp[k].clone().requires_grad_() for k in order]
    ref = reference.tissd_recurrent_ref(*ref_leaves[:5], time_scale=ref_leaves[5], lengths=lengths)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel(y, ref) < tol
    for k, a, r in zip(order, grads, ref_grads):
        assert rel(a, r) < tol, (k, rel(a, r))
    assert len(calls) == (0 if name == "einsum" else 1)


@pytest.mark.parametrize("L", [20, 48])
def test_scan_kernel_row_with_tiny_and_positive_segments(native_cpu, L):
    """The scan kernel's own API takes any log-decay: rows (L 48: the blocked path; L 20: fp32's short path) whose
    segment sums hold values far below e^-60 AND positive ones (alternating -40 / +1 steps) take the inlined exp (the
    positive entries recomputed by std::exp where it needs it, not with AVX-512); float32 and float64 against the
    quadratic form in float64."""
    b, L, H, P, G, n = 2, L, 2, 16, 1, 16
    g = torch.Generator().manual_seed(3)
    x, B, C = (torch.randn(b, L, *s, generator=g, dtype=torch.float64) for s in ((H, P), (G, n), (G, n)))
    delta = torch.rand(b, L, H, generator=g, dtype=torch.float64)
    a = torch.where(torch.arange(L)[None, :, None] % 2 == 0, -40.0, 1.0).expand(b, L, H).contiguous().double()
    cum = a.cumsum(1)                                            # seg_ij = cum_i - cum_j (float64 is exact enough)
    seg = cum[:, :, None, :] - cum[:, None, :, :]                # [b, i, j, H]
    mask = torch.ones(L, L, dtype=torch.bool).tril()[None, :, :, None]
    M = torch.einsum("bign,bjgn->bij", C, B)[..., None] * torch.where(mask, seg, -torch.inf).exp()
    ref = torch.einsum("bijh,bjh,bjhp->bihp", M, delta, x)
    lengths = torch.full((b,), L)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        y = native_cpu.scan_forward(*(t.to(dtype) for t in (x, delta, a, B, C)), None, lengths, False)
        assert rel(y, ref) < tol, (dtype, rel(y, ref))
