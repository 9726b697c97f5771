"""mmm4rec_kernels.modules: TimeAwareSSD against a float64 reimplementation written from the formulas and against
mamba_ssm's own torch references; layouts (right/left padding, packed); time encodings; step == forward."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from mmm4rec_kernels.modules import (CausalDepthwiseConv1d, CausalTimeEncoding, Log1pTimeEncoding, TimeAwareSSD,
                                     init_ssd_params, last_valid, no_weight_decay_param_groups)
from benchmarks._rivals import load_mamba_module

SMALL = dict(d_model=12, d_state=4, headdim=6, ngroups=2, expand=2, d_conv=3, chunk_size=4)   # H = 4


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def block(seed=0, **kw):
    torch.manual_seed(seed)
    m = TimeAwareSSD(**{**SMALL, **kw})
    with torch.no_grad():   # move every parameter off its init so each one matters in the comparisons
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def stamps(b, L, seed=1, dtype=torch.int64, scale=5000):
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, scale, (b, L), generator=g)
    return (1_700_000_000 + gaps.cumsum(1)).to(dtype)


# ----------------------------------------------------------------------------- float64 reference from the formulas
def time_ref(enc, t):
    """One sequence t [L] -> time_scale [L, H], float64 loop (CausalTimeEncoding or Log1pTimeEncoding)."""
    p = {k: v.double() for k, v in enc.named_parameters()}
    t = t.double()
    L = t.shape[0]
    gaps = [0.0] + [max(float(t[i] - t[i - 1]), 0.0) for i in range(1, L)]
    if isinstance(enc, Log1pTimeEncoding):
        return torch.stack([p["weight"] * math.log1p(g / enc.time_unit) + p["bias"] for g in gaps])
    E = []
    for i in range(L):
        seen = torch.tensor(gaps[: i + 1], dtype=torch.float64)
        s = (gaps[i] - seen.mean()) / torch.sqrt(seen.var(unbiased=False) + enc.eps * seen.pow(2).mean() + 1e-30)
        D = s * p["scale"] + p["shift"]
        hid = F.silu(D @ p["mix1.weight"].T + p["mix1.bias"])
        E.append(D * F.tanhshrink(hid @ p["mix2.weight"].T + p["mix2.bias"]))
    E = torch.stack(E)                                                              # [L, H]

    def conv(v, w, b):   # causal depthwise over rows of v [L, H]
        k = w.shape[-1]
        vp = torch.cat([v.new_zeros(k - 1, v.shape[1]), v])
        return torch.stack([(vp[i:i + k].T * w[:, 0, :]).sum(-1) + b for i in range(v.shape[0])])

    return F.silu(conv(F.silu(conv(E, p["conv1.weight"], p["conv1.bias"])), p["conv2.weight"], p["conv2.bias"]))


def block_ref(m, h, t=None, lengths=None):
    """float64 reimplementation of the block, a per-step recurrence per sequence.  h [b, L, d] -> [b, L, d]."""
    p = {k: v.double() for k, v in m.named_parameters()}
    h = h.double()
    b, L, _ = h.shape
    H, P, G, n, di, k = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_inner, m.d_conv
    out = torch.zeros(b, L, m.d_model, dtype=torch.float64)
    for i in range(b):
        Li = L if lengths is None else int(lengths[i])
        if Li == 0:
            continue
        zxbcdt = h[i, :Li] @ p["in_proj.weight"].T + (p["in_proj.bias"] if "in_proj.bias" in p else 0)
        z, xBC, dt = torch.split(zxbcdt, [di, di + 2 * G * n, H], dim=-1)
        xp = torch.cat([xBC.new_zeros(k - 1, xBC.shape[1]), xBC])
        xBC = F.silu(torch.stack([(xp[j:j + k].T * p["conv1d.weight"][:, 0, :]).sum(-1) for j in range(Li)])
                     + p.get("conv1d.bias", 0))
        x, B, C = torch.split(xBC, [di, G * n, G * n], dim=-1)
        E = time_ref(m.time_encoding, t[i, :Li]) if t is not None else torch.ones(Li, H, dtype=torch.float64)
        A = -torch.exp(p["A_log"])
        D = p["D"].view(H, P) if m.D_has_hdim else p["D"][:, None].expand(H, P)
        state = torch.zeros(H, P, n, dtype=torch.float64)
        ys = []
        for j in range(Li):
            delta = F.softplus(dt[j] * E[j] + p["dt_bias"])                          # [H]
            xj = x[j].view(H, P)
            Bj = B[j].view(G, n).repeat_interleave(H // G, 0)
            Cj = C[j].view(G, n).repeat_interleave(H // G, 0)
            state = torch.exp(A * delta)[:, None, None] * state + (delta[:, None] * xj)[..., None] * Bj[:, None, :]
            y = (state * Cj[:, None, :]).sum(-1) + D * (delta[:, None] if m.d_skip == "delta" else 1.0) * xj
            ys.append(y.reshape(di))
        y = torch.stack(ys)
        if not m.rmsnorm:
            y = y * F.silu(z)
        else:
            gs = di // G
            pre = y if m.norm_before_gate else y * F.silu(z)
            grp = pre.view(Li, G, gs)
            y = (grp * torch.rsqrt(grp.pow(2).mean(-1, keepdim=True) + 1e-5)).view(Li, di) * p["norm.weight"]
            if m.norm_before_gate:
                y = y * F.silu(z)
        out[i, :Li] = y @ p["out_proj.weight"].T + (p["out_proj.bias"] if "out_proj.bias" in p else 0)
    return out


CONFIGS = {
    "default": dict(),
    "plain_skip": dict(d_skip="plain"),
    "D_has_hdim": dict(D_has_hdim=True),
    "no_rmsnorm": dict(rmsnorm=False, bias=True),
    "norm_before_gate": dict(norm_before_gate=True, D_has_hdim=True, d_skip="plain"),
    "log1p": dict(time_encoding="log1p"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("with_time", [False, True])
def test_block_matches_float64_reference_fwd_and_grads(name, with_time):
    m = block(**CONFIGS[name])
    b, L = 3, 9
    h = torch.randn(b, L, SMALL["d_model"], generator=torch.Generator().manual_seed(2))
    t = stamps(b, L) if with_time else None
    lengths = torch.tensor([9, 5, 1])
    hh = h.clone().requires_grad_()
    y = m(hh, t, lengths=lengths)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, [hh, *m.parameters()], dy, allow_unused=True)
    m64 = block(**CONFIGS[name]).double()
    m64.load_state_dict(m.state_dict())
    h64 = h.double().requires_grad_()
    y_r = block_ref(m64, h64, t, lengths)
    grads_r = torch.autograd.grad(y_r, [h64, *m64.parameters()], dy.double(), allow_unused=True)
    assert rel(y, y_r) < 1e-4
    assert y[1, 5:].abs().max() == 0 and y[2, 1:].abs().max() == 0     # padded outputs are 0
    names = ["hidden"] + [k for k, _ in m.named_parameters()]
    for nm, g, g_r in zip(names, grads, grads_r):
        if g_r is None or g_r.norm() == 0:
            assert g is None or g.norm() < 1e-6, nm
            continue
        assert rel(g, g_r) < 1e-4, (nm, rel(g, g_r))


@pytest.mark.parametrize("path", ["quadratic", "chunked"])
@pytest.mark.parametrize("with_time", [False, True])
def test_triton_torch_and_float64_reference_agree(path, with_time):
    """Triton (interpreter on CPU, fp32) vs torch backend vs float64 reference: forward and every gradient, 1e-4."""
    pytest.importorskip("triton")
    from mmm4rec_kernels.dispatch import triton_usable
    if not triton_usable(torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    L = 6 if path == "quadratic" else 18    # the Triton chunked path takes chunk_size >= 16: cross one boundary
    h = torch.randn(2, L, SMALL["d_model"], generator=torch.Generator().manual_seed(4))
    t = stamps(2, L) if with_time else None
    lengths = torch.tensor([L, 4])
    dy = torch.randn(2, L, SMALL["d_model"], generator=torch.Generator().manual_seed(9))
    results = {}
    for backend in ("torch", "triton"):
        m = block(backend=backend, path=path, chunk_size=16).to(dev)
        hh = h.clone().to(dev).requires_grad_()
        y = m(hh, None if t is None else t.to(dev), lengths=lengths.to(dev))
        grads = torch.autograd.grad(y, [hh, *m.parameters()], dy.to(dev), allow_unused=True)
        results[backend] = (y.cpu(), [None if g is None else g.cpu() for g in grads])
    m64 = block(path=path, chunk_size=16).double()
    h64 = h.double().requires_grad_()
    y_r = block_ref(m64, h64, t, lengths)
    g_r = torch.autograd.grad(y_r, [h64, *m64.parameters()], dy.double(), allow_unused=True)
    results["float64"] = (y_r, g_r)
    (y0, g0), (y1, g1) = results["torch"], results["triton"]
    assert rel(y1, y0) < 1e-4 and rel(y1, y_r) < 1e-4
    for a, b, r in zip(g1, g0, g_r):
        if r is not None and r.norm() > 0:
            assert rel(a, b) < 1e-4 and rel(a, r) < 1e-4


# ----------------------------------------------------------------------------------------- mamba_ssm references
def _mamba_refs():
    combined, why = load_mamba_module("ops.triton.ssd_combined")
    if combined is None:
        pytest.skip(why)
    norm, why = load_mamba_module("ops.triton.layernorm_gated")
    ssu, why2 = load_mamba_module("ops.triton.selective_state_update")
    if norm is None or ssu is None:
        pytest.skip(why or why2)
    return combined, norm, ssu


@pytest.mark.parametrize("kw", [dict(), dict(norm_before_gate=True, D_has_hdim=True)])
def test_timestamps_none_equals_mamba2_mixer_from_mamba_refs(kw):
    """timestamps=None, d_skip='plain': Mamba2's mixer composed from mamba_ssm's torch references
    (ssd_chunk_scan_combined_ref, rms_norm_ref, selective_state_update_ref for the step)."""
    combined, norm, ssu = _mamba_refs()
    m = block(d_skip="plain", time_encoding=None, **kw)
    b, L = 2, 12   # the mamba chunked reference needs L % chunk_size == 0
    H, P, G, n, di = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_inner
    h = torch.randn(b, L, m.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = m(h)
        z, xBC, dt = torch.split(m.in_proj(h), [di, m.conv_dim, H], dim=-1)
        xBC = F.silu(F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1,
                              groups=m.conv_dim)[..., :L]).transpose(1, 2)
        x, B, C = torch.split(xBC, [di, G * n, G * n], dim=-1)
        D = m.D.view(H, P) if m.D_has_hdim else m.D
        A = -torch.exp(m.A_log)
        ys = combined.ssd_chunk_scan_combined_ref(x.reshape(b, L, H, P), dt, A, B.reshape(b, L, G, n),
                                                  C.reshape(b, L, G, n), 4, D=D, dt_bias=m.dt_bias, dt_softplus=True)
        yn = norm.rms_norm_ref(ys.reshape(b, L, di), m.norm.weight, None, z=z, eps=1e-5, group_size=di // G,
                               norm_before_gate=m.norm_before_gate)
        y_m = m.out_proj(yn)
        assert rel(y, y_m) < 1e-5
        # one step from a prefilled state against selective_state_update_ref
        _, state = m(h[:, :-1], return_state=True)
        y_step, _ = m.step(h[:, -1], None, state)
        ssm = state.ssm.clone()
        rep = lambda v: v[:, None].expand(H, P)  # noqa: E731  per-head values -> [H, P]
        zx, xBC_t, dt_t = torch.split(m.in_proj(h[:, -1]), [di, m.conv_dim, H], dim=-1)
        window = torch.cat([state.conv, xBC_t[..., None]], -1)
        xBC_t = F.silu((window * m.conv1d.weight[:, 0]).sum(-1) + m.conv1d.bias)
        x_t, B_t, C_t = torch.split(xBC_t, [di, G * n, G * n], dim=-1)
        y_ssu = ssu.selective_state_update_ref(ssm, x_t.view(b, H, P), dt_t[..., None].expand(b, H, P),
                                               A[:, None, None].expand(H, P, n), B_t.view(b, G, n),
                                               C_t.view(b, G, n), D=D.view(H, P) if m.D_has_hdim else rep(D),
                                               dt_bias=rep(m.dt_bias), dt_softplus=True)
        y_ssu = m.out_proj(norm.rms_norm_ref(y_ssu.reshape(b, di), m.norm.weight, None, z=zx, eps=1e-5,
                                             group_size=di // G, norm_before_gate=m.norm_before_gate))
        assert rel(y_step, y_ssu) < 1e-5
        assert rel(y_step, y[:, -1]) < 1e-5


def test_mamba2_state_dict_loads(monkeypatch):
    """Same parameter names and shapes as mamba_ssm's Mamba2 (a Mamba2 checkpoint loads; time_encoding is extra)."""
    try:
        import huggingface_hub  # noqa: F401   mamba2.py imports it for a hub mixin only
    except ImportError:
        import types
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        monkeypatch.setitem(sys.modules, "huggingface_hub", stub)
    mod, why = load_mamba_module("modules.mamba2")
    if mod is None:
        pytest.skip(why)
    try:
        ref = mod.Mamba2(d_model=32, d_state=16, headdim=16, ngroups=2, d_conv=4, D_has_hdim=True,
                         use_mem_eff_path=False, device="cpu")
    except Exception as exc:  # pragma: no cover - depends on the mamba_ssm install
        pytest.skip(f"mamba_ssm Mamba2 cannot be built on CPU: {type(exc).__name__}: {exc}")
    m = TimeAwareSSD(32, d_state=16, headdim=16, ngroups=2, d_conv=4, D_has_hdim=True, d_skip="plain")
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("time_encoding.") for k in missing)
    for name in ("A_log", "dt_bias", "D"):
        assert getattr(ref, name)._no_weight_decay and getattr(m, name)._no_weight_decay


# ------------------------------------------------------------------------------------------------------ layouts
def test_left_right_packed_and_mask_layouts_agree():
    m = block()
    lens = [7, 3, 5]
    L = max(lens)
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randn(n, SMALL["d_model"], generator=g) for n in lens]
    times = [stamps(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    with torch.no_grad():
        alone = [m(s[None], t[None])[0] for s, t in zip(seqs, times)]
        junk = lambda *s: 1e6 * torch.randn(*s, generator=g)  # noqa: E731   padding must not matter at all
        right_h, right_t = junk(3, L, SMALL["d_model"]), torch.full((3, L), -7, dtype=torch.int64)
        left_h, left_t = right_h.clone(), right_t.clone()
        mask_r, mask_l = torch.zeros(3, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.bool)
        for i, n in enumerate(lens):
            right_h[i, :n], right_t[i, :n], mask_r[i, :n] = seqs[i], times[i], 1
            left_h[i, L - n:], left_t[i, L - n:], mask_l[i, L - n:] = seqs[i], times[i], True
        y_len = m(right_h, right_t, lengths=torch.tensor(lens))
        y_mask = m(right_h, right_t, attention_mask=mask_r)
        y_left = m(left_h, left_t, attention_mask=mask_l)
        cu = torch.tensor([0, 7, 10, 15])
        y_pack = m(torch.cat(seqs)[None], torch.cat(times)[None], cu_seqlens=cu)
    for i, n in enumerate(lens):
        for y_pad in (y_len, y_mask):
            assert rel(y_pad[i, :n], alone[i]) < 1e-5 and y_pad[i, n:].abs().sum() == 0
        assert rel(y_left[i, L - n:], alone[i]) < 1e-5 and y_left[i, :L - n].abs().sum() == 0
        assert rel(y_pack[0, cu[i]:cu[i + 1]], alone[i]) < 1e-5
        assert torch.equal(last_valid(y_left, attention_mask=mask_l)[i], y_left[i, L - 1])
        assert torch.equal(last_valid(y_len, lengths=torch.tensor(lens))[i], y_len[i, n - 1])


@pytest.mark.parametrize("bad, match", [
    (dict(attention_mask=torch.tensor([[1, 0, 1, 0]])), "contiguous"),
    (dict(lengths=torch.tensor([5])), "lengths"),
    (dict(lengths=torch.tensor([2.0])), "lengths"),
    (dict(lengths=torch.tensor([2]), attention_mask=torch.ones(1, 4)), "at most one"),
    (dict(timestamps=torch.zeros(1, 3)), "timestamps"),
])
def test_bad_arguments_raise_naming_them(bad, match):
    m = block()
    h = torch.randn(1, 4, SMALL["d_model"])
    with pytest.raises((ValueError, TypeError), match=match):
        m(h, **bad)
    with pytest.raises(ValueError, match="hidden"):
        m(h[0])
    with pytest.raises(ValueError, match="time_encoding"):
        TimeAwareSSD(8, headdim=4, time_encoding="fourier")


# ---------------------------------------------------------------------------------------------- time encodings
@pytest.mark.parametrize("kind", ["paper", "log1p"])
def test_time_encoding_matches_float64_loop_any_length_and_dtype(kind):
    torch.manual_seed(0)
    enc = CausalTimeEncoding(4, d_conv=3) if kind == "paper" else Log1pTimeEncoding(4, time_unit=60.0)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    t = stamps(2, 300, seed=7)                          # L = 300: no max_len anywhere
    t[1, 5] = t[1, 4] - 100                             # out-of-order event: gap clamped to 0
    with torch.no_grad():
        E = enc(t)
        for i in range(2):
            assert rel(E[i], time_ref(enc, t[i])) < 1e-5
        assert rel(enc(t.double()), E) < 1e-6 and rel(enc((t - 1_700_000_000).float()), E) < 1e-5   # float seconds work
        if kind == "paper":     # the causal standardisation is unit-free: milliseconds or days give the same signal
            assert rel(enc(t * 1000), E) < 1e-6 and rel(enc(t.double() / 86400), E) < 1e-6


def test_causal_time_encoding_is_causal():
    enc = CausalTimeEncoding(4)
    t = stamps(1, 12)
    t2 = t.clone()
    t2[0, 8:] += 10 ** 6                             # change the future only
    with torch.no_grad():
        assert torch.equal(enc(t)[0, :8], enc(t2)[0, :8])
        assert not torch.equal(enc(t)[0, 8:], enc(t2)[0, 8:])


# ---------------------------------------------------------------------------------------------------- step API
@pytest.mark.parametrize("kw", [dict(), dict(time_encoding="log1p", d_skip="plain", D_has_hdim=True),
                                dict(rmsnorm=False, norm_before_gate=True)])
@pytest.mark.parametrize("with_time", [False, True])
def test_step_equals_full_forward_and_prefill_continues(kw, with_time):
    m = block(**kw).eval()
    b, L = 3, 11
    h = torch.randn(b, L, SMALL["d_model"], generator=torch.Generator().manual_seed(8))
    t = stamps(b, L) if with_time else None
    with torch.no_grad():
        full = m(h, t)
        state = m.allocate_state(b)
        steps = []
        for i in range(L):
            y_t, state = m.step(h[:, i], None if t is None else t[:, i], state)
            steps.append(y_t)
        assert rel(torch.stack(steps, 1), full) < 1e-5
        # prefill ragged prefixes (right padding), then continue each sequence with step
        lengths = torch.tensor([4, 7, 1])
        _, state = m(h, t, lengths=lengths, return_state=True)
        for k in range(3):
            pos = lengths + k
            x_t = h[torch.arange(b), pos]
            y_t, state = m.step(x_t, None if t is None else t[torch.arange(b), pos], state)
            assert rel(y_t, full[torch.arange(b), pos]) < 1e-5
        # the same prefill from a left-padded batch and from a packed batch gives the same state
        left_h, left_t = torch.zeros_like(h), None if t is None else torch.zeros_like(t)
        mask = torch.zeros(b, L, dtype=torch.bool)
        for i, n in enumerate(lengths.tolist()):
            left_h[i, L - n:], mask[i, L - n:] = h[i, :n], True
            if t is not None:
                left_t[i, L - n:] = t[i, :n]
        _, s_left = m(left_h, left_t, attention_mask=mask, return_state=True)
        packed_h = torch.cat([h[i, :n] for i, n in enumerate(lengths.tolist())])[None]
        packed_t = None if t is None else torch.cat([t[i, :n] for i, n in enumerate(lengths.tolist())])[None]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        _, s_pack = m(packed_h, packed_t, cu_seqlens=cu, return_state=True)
        x_t, t_t = h[torch.arange(b), lengths], None if t is None else t[torch.arange(b), lengths]
        for s in (s_left, s_pack):
            y_t, _ = m.step(x_t, t_t, s)
            assert rel(y_t, full[torch.arange(b), lengths]) < 1e-5


def test_conv_step_and_window():
    conv = CausalDepthwiseConv1d(5, 4)
    x = torch.randn(2, 5, 9)
    with torch.no_grad():
        y = conv(x)
        w = conv.allocate_window(2)
        for i in range(9):
            y_t, w = conv.step(x[..., i], w)
            assert torch.allclose(y_t, y[..., i], atol=1e-6)
        assert torch.equal(conv.window_from(x), x[..., -3:])
        w2 = conv.window_from(x, torch.tensor([2, 9]))
        assert torch.equal(w2[0, :, 1:], x[0, :, :2]) and w2[0, :, 0].abs().max() == 0
    assert set(conv.state_dict()) == {"weight", "bias"}


def test_init_ssd_params_ranges_flags_and_model_layer_equivalence():
    torch.manual_seed(0)
    A_log, dt_bias, D = init_ssd_params(64)
    A = torch.exp(A_log)
    dt = F.softplus(dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    assert torch.equal(D, torch.ones(64)) and all(p._no_weight_decay for p in (A_log, dt_bias, D))
    # the MMM4Rec model layer builds its SSD parameters and convs from these same blocks (no second copy)
    from mmm4rec.model import layers as model_layers
    from mmm4rec.model import MMM4RecConfig
    cfg = MMM4RecConfig(hidden_size=16, headdim=8, d_state=4, ngroups=1, ffn_inner=8, max_len=4, feat_dim=8)
    tissd_block = model_layers.TiSSD(cfg)
    assert isinstance(tissd_block.conv, CausalDepthwiseConv1d)
    assert all(getattr(p, "_no_weight_decay", False) for p in (tissd_block.core.A_log, tissd_block.core.dt_bias,
                                                                tissd_block.core.D))
    groups = no_weight_decay_param_groups(block(), 0.1)
    assert len(groups[1]["params"]) == 3 + 0 and groups[1]["weight_decay"] == 0.0


def test_float64_module_steps_in_float64():
    m = block(backend="torch").double().eval()
    h = torch.randn(2, 9, SMALL["d_model"], dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    t = stamps(2, 9)
    with torch.no_grad():
        full, state = m(h, t), m.allocate_state(2)
        assert state.ssm.dtype == torch.float64
        for i in range(9):
            y_t, state = m.step(h[:, i], t[:, i], state)
            assert rel(y_t, full[:, i]) < 1e-12
