"""MMM4Rec building blocks: the time path, TiSSD, the dual-channel Fourier filter, TiCoSSD, FFN.

Shapes: b batch, L = config.max_len positions (right padded), N hidden, H heads, P headdim, G groups, n d_state.
`mask [b, L]` bool is True on valid (history) positions, `lengths [b]` its row sums.  Time signals are [b, H, L]
(one row per head, the sequence axis last so that the L-axis Linear(L, L) layers act on it).

No SSD math lives here: every scan (and its gated-RMSNorm epilogue) goes through `mmm4rec_kernels.tissd` /
`ticossd`, looked up at call time (so a whole model switches backend with config.backend, and tests can spy on the calls).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import mmm4rec_kernels
# Shared with the drop-in layers (mmm4rec_kernels.modules): the mamba-like (A_log, dt_bias, D) init and the causal
# depthwise conv (an nn.Conv1d: same state_dict keys as before), and the CPU-cheaper Dropout (nn.Dropout's semantics).
from mmm4rec_kernels.modules import CausalDepthwiseConv1d, Dropout, init_ssd_params, linear_split

from .config import MMM4RecConfig

def init_official_(module: nn.Module, std: float = 0.02) -> None:
    """The official initialisation pass: every nn.Linear weight ~ N(0, std), every Linear bias 0 (in place).
    Everything else (convs, LayerNorms, SSD parameters, item biases) keeps its own init.  Then init_time_path_ (a
    no-op with the default, official time-path switches)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    init_time_path_(module)


def init_time_path_(module: nn.Module) -> None:
    """Apply the time-path init switches, in place, after the model's own init: every TimeModulation with a
    `mlp_gain` redraws its time MLP (mix1, mix2) weights from N(0, gain^2 / L) with zero bias, and when
    `module.config.fourier_init == "identity"` every FourierFilter starts as a pass-through (the adaptive gates
    CL1 / CL2 get the complex bias 1, so CL(F) * F ~ F; CL3 gets the identity added to its real weight, so
    Dco ~ Dv + Dt).  A no-op with the official switches (mlp_gain None, fourier_init "model")."""
    config = getattr(module, "config", None)
    identity = config is not None and getattr(config, "fourier_init", "model") == "identity"
    for m in module.modules():
        if isinstance(m, TimeModulation):
            m.reset_time_mlp()
        elif isinstance(m, FourierFilter) and identity:
            m.reset_identity()


def _rms_normalize_l(x: torch.Tensor, m, eps: float) -> torch.Tensor:
    """x / sqrt(mean over L of x^2 + eps), per [b, H] row; the mean runs over valid positions (m [b, 1, L] float, 1 on
    valid positions) or over all L (m None).  Statistics in float32 or wider."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if m is None:
        ms = xf.pow(2).mean(-1, keepdim=True)
    else:
        ms = (xf.pow(2) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return (xf * torch.rsqrt(ms + eps)).to(x.dtype)


# Tanhshrink's Taylor series x - tanh x = sum c_k x^(2k+1), k = 1..5, used below |x| < _SERIES_CUT: there the direct
# form loses ~3 eps / x^2 relative accuracy (everything below |x| ~ 5e-4 rounds to exactly 0 in float32); the first
# omitted term (21844/6081075 x^13) is < 1e-8 relative at the cut, the direct form's cancellation < 3e-6.
_SERIES_CUT = 0.25
_TANHSHRINK_SERIES = (1.0 / 3.0, -2.0 / 15.0, 17.0 / 315.0, -62.0 / 2835.0, 1382.0 / 155925.0)


def tanhshrink_series(x: torch.Tensor) -> torch.Tensor:
    """x - tanh(x) without the float32 cancellation for small |x| (the same function; gradient tanh(x)^2 up to
    the series' accuracy).  Branch-free (torch.where on a clamped copy, so no inf/nan reaches the unused branch)."""
    xs = x.clamp(-_SERIES_CUT, _SERIES_CUT)
    x2 = xs * xs
    poly = x2.new_full((), _TANHSHRINK_SERIES[-1])
    for c in reversed(_TANHSHRINK_SERIES[:-1]):
        poly = poly * x2 + c
    return torch.where(x.abs() < _SERIES_CUT, xs * x2 * poly, x - torch.tanh(x))


def masked_layer_norm_l(x: torch.Tensor, mask, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """LayerNorm over the sequence axis using valid positions only; padded outputs are 0.

    x [b, H, L], mask [b, L] bool or None (None: a plain LayerNorm over all L positions, the official behaviour),
    weight/bias [L] (per-position affine).  Returns [b, H, L]."""
    if mask is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    m = mask[:, None, :].to(x.dtype)                                   # [b, 1, L]
    count = m.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(-1, keepdim=True) / count
    centred = (x - mean) * m
    var = centred.pow(2).sum(-1, keepdim=True) / count
    return (centred * torch.rsqrt(var + eps) * weight + bias) * m


class MaskedLayerNormL(nn.Module):
    """LayerNorm along L (per-position affine, statistics over valid positions only).  [b, H, L] -> [b, H, L]."""

    def __init__(self, max_len: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(max_len))
        self.bias = nn.Parameter(torch.zeros(max_len))
        self.eps = eps

    def forward(self, x, mask):
        return masked_layer_norm_l(x, mask, self.weight, self.bias, self.eps)


class TimeEncoder(nn.Module):
    """TiSSD step 3: raw timestamps -> normalised time-difference signal.

    forward(time_seq [b, L] unix seconds (any float/int dtype), mask [b, L] bool or None, copies) -> D [copies*b, H, L]:
    d_0 = 0, d_i = t_i - t_{i-1} (differences taken in float64, then cast to the model's dtype: float64 models keep
    full precision), padded positions 0 when mask is given (mask None: padded differences enter as given, the
    official behaviour); Dropout (one mask per copy: the official code encodes the time once per stream); LayerNorm
    over L (on valid positions when masked); repeated over the H heads (a view)."""

    def __init__(self, max_len: int, nheads: int, dropout: float, eps: float):
        super().__init__()
        self.nheads = nheads
        self.dropout = Dropout(dropout)
        self.norm = MaskedLayerNormL(max_len, eps)

    def forward(self, time_seq, mask, copies: int = 1):
        t = time_seq.to(torch.float64)
        d = F.pad(t[:, 1:] - t[:, :-1], (1, 0))                             # [b, L], d_0 = 0
        if mask is not None:
            d = d * mask                                                    # padding injects nothing
        d = d.to(self.norm.weight.dtype)
        if copies > 1:
            d = d.repeat(copies, 1)
            mask = None if mask is None else mask.repeat(copies, 1)
        D = self.norm(self.dropout(d)[:, None, :], mask)                    # [copies*b, 1, L]
        return D.expand(-1, self.nheads, -1)


class TimeModulation(nn.Module):
    """TiSSD steps 4 and 8: the per-head time scale E2 that enters the discretisation, and the next time signal.

        alpha  = shrink(Lin_LL(SiLU(Lin_LL(Drop(D')))))     along L   (hidden masked to valid positions)
        E      = D' * alpha
        E2     = SiLU(dwconv(SiLU(dwconv(E))))                causal, over the H channels
        g      = sigmoid(Lin_{L->1}(Drop(D))) ;  D_next = LN_L(g * D + (1 - g) * E2)   (only if with_update)

    Drop is the official time dropout before the MLP and before the gate (two independent masks; p = 0 skips it).
    Switches (defaults = official): D' = D (input_norm False) or D / rms_L(D) (True); shrink = Tanhshrink
    ("tanhshrink", official), its fp32-exact series form ("series") or Tanhshrink(x / rms_L(x)) ("normalized");
    mlp_gain: None keeps the model's init of mix1 / mix2, g redraws their weights from N(0, g^2 / L) (reset_time_mlp).
    rms_L runs over valid positions (mask given) or all L (mask None), per (sequence, head), eps 1e-12.
    forward(D [b, H, L], mask [b, L] or None) -> (time_scale [b, L, H], D_next [b, H, L] or None); mask None: no
    masking (official)."""

    NORM_EPS = 1e-12

    def __init__(self, max_len: int, nheads: int, d_conv: int, with_update: bool = True, dropout: float = 0.0,
                 eps: float = 1e-12, shrink: str = "tanhshrink", input_norm: bool = False, mlp_gain=None):
        super().__init__()
        if shrink not in ("tanhshrink", "series", "normalized"):
            raise ValueError(f"shrink must be tanhshrink, series or normalized, got {shrink!r}")
        self.mix1 = nn.Linear(max_len, max_len)
        self.mix2 = nn.Linear(max_len, max_len)
        self.conv1 = CausalDepthwiseConv1d(nheads, d_conv)
        self.conv2 = CausalDepthwiseConv1d(nheads, d_conv)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.with_update = with_update
        self.shrink, self.input_norm, self.mlp_gain = shrink, input_norm, mlp_gain
        if with_update:
            self.gate = nn.Linear(max_len, 1)
            self.norm = MaskedLayerNormL(max_len, eps)
        self.reset_time_mlp()

    @torch.no_grad()
    def reset_time_mlp(self) -> None:
        """mlp_gain g: mix1 / mix2 weights ~ N(0, g^2 / L), biases 0 (unit-variance input -> pre-activation std ~ g^2
        / 2 through the SiLU); None: nothing (the model's own init stands)."""
        if self.mlp_gain is None:
            return
        for lin in (self.mix1, self.mix2):
            nn.init.normal_(lin.weight, mean=0.0, std=float(self.mlp_gain) / lin.in_features ** 0.5)
            nn.init.zeros_(lin.bias)

    def alpha(self, D, m):
        """(D' [b, H, L], pre-activation x [b, H, L], alpha [b, H, L]); m [b, 1, L] float or None.  The pieces the
        diagnostic (mmm4rec.diagnose) inspects."""
        if self.input_norm:
            D = _rms_normalize_l(D, m, self.NORM_EPS)
        hidden = F.silu(self.mix1(self.dropout(D)))
        if m is not None:
            hidden = hidden * m
        x = self.mix2(hidden)
        if self.shrink == "tanhshrink":
            alpha = F.tanhshrink(x)
        elif self.shrink == "series":
            alpha = tanhshrink_series(x)
        else:
            alpha = F.tanhshrink(_rms_normalize_l(x, m, self.NORM_EPS))
        return D, x, alpha

    def forward(self, D, mask):
        m = None if mask is None else mask[:, None, :].to(D.dtype)
        Dn, _, alpha = self.alpha(D, m)
        E = Dn * alpha if m is None else Dn * alpha * m
        # the two causal convs run over L with the H heads as channels, in [b, L, H] (channels-last) layout
        E2 = self.conv2.forward_channels_last(self.conv1.forward_channels_last(E.transpose(1, 2), silu=True),
                                              silu=True)                 # [b, L, H]
        D_next = None
        if self.with_update:
            g = torch.sigmoid(self.gate(self.dropout(D)))                # [b, H, 1]
            D_next = self.norm(torch.lerp(E2.transpose(1, 2), D, g), mask)  # g * D + (1 - g) * E2
        return E2, D_next


class _SSDCore(nn.Module):
    """What TiSSD and TiCoSSD share: per-head SSD parameters, the optional time path, gated RMSNorm, out_proj."""

    def __init__(self, config: MMM4RecConfig, time_update: bool):
        super().__init__()
        c = config
        self.H, self.P, self.G, self.n = c.nheads, c.headdim, c.ngroups, c.d_state
        self.backend, self.path = c.backend, c.path
        self.A_log, self.dt_bias, self.D = init_ssd_params(c.nheads)
        self.time = (TimeModulation(c.max_len, c.nheads, c.d_conv, with_update=time_update,
                                    dropout=c.time_mlp_dropout, eps=c.time_ln_eps, shrink=c.time_shrink,
                                    input_norm=c.time_input_norm, mlp_gain=c.time_mlp_gain)
                     if c.use_time else None)
        self.norm_weight = nn.Parameter(torch.ones(c.d_inner))
        self.norm_eps, self.norm_group_size = c.rmsnorm_eps, c.d_inner // c.norm_groups
        self.out_proj = nn.Linear(c.d_inner, c.hidden_size)

    def time_scale(self, D, mask):
        """D [b, H, L] or None, mask [b, L] or None -> (time_scale [b, L, H] or None, D_next [b, H, L] or None)."""
        if self.time is None or D is None:
            return None, None
        return self.time(D, mask)

    def scan_and_project(self, op, x, dt, B, C, z, time_scale, lengths):
        """x [b,L,d_inner], dt [b,L,H], B/C [b,L,G*n], z [b,L,d_inner] -> out [b,L,N] via the kernel `op`."""
        b, L, _ = x.shape
        heads = (b, L, self.H, self.P)
        y = op(x.reshape(heads), dt, -torch.exp(self.A_log),
               B.reshape(b, L, self.G, self.n), C.reshape(b, L, self.G, self.n),
               time_scale=time_scale, dt_bias=self.dt_bias, D=self.D, d_skip="delta", dt_softplus=True,
               lengths=lengths, backend=self.backend, path=self.path,
               # gated RMSNorm epilogue (step 7): official one group over all d_inner channels, eps 1e-12
               z=z.reshape(heads), norm_weight=self.norm_weight, norm_eps=self.norm_eps,
               norm_group_size=self.norm_group_size)
        return self.out_proj(y.reshape(b, L, -1))

    def scan_and_project_last(self, op, x, dt, B, C, z_last, time_scale, lengths):
        """scan_and_project at each sequence's last valid position only: out [b, N] = the rows lengths-1 of
        scan_and_project(...) (z_last [b, d_inner] = z at those rows).  The scan still reads every position; the
        gated RMSNorm and out_proj (position-wise) run on b rows instead of b*L."""
        b, L, _ = x.shape
        y = op(x.reshape(b, L, self.H, self.P), dt, -torch.exp(self.A_log),
               B.reshape(b, L, self.G, self.n), C.reshape(b, L, self.G, self.n),
               time_scale=time_scale, dt_bias=self.dt_bias, D=self.D, d_skip="delta", dt_softplus=True,
               lengths=lengths, backend=self.backend, path=self.path)
        y_last = y[torch.arange(b, device=y.device), lengths - 1].reshape(b, -1)           # [b, d_inner]
        y_last = mmm4rec_kernels.gated_rmsnorm(y_last, z_last, self.norm_weight, eps=self.norm_eps,
                                               group_size=self.norm_group_size,
                                               backend="torch" if self.backend == "torch" else "auto")
        return self.out_proj(y_last)


class TiSSD(nn.Module):
    """Time-aware SSD block (docs/design.md, "TiSSD", steps 1-8).

    forward(h [b, L, N], D [b, H, L] or None, mask [b, L] or None, lengths [b]) -> (out [b, L, N], D_next or None).
    in_proj N -> [z | x B C | dt_raw]; causal dwconv + SiLU on xBC; Delta = softplus(dt_raw * E2 + dt_bias) and the
    scan run inside `mmm4rec_kernels.tissd`; y = RMSNorm(y * SiLU(z)) * w (config.rmsnorm_groups groups); out_proj.
    `mask` only steers the time path (None = unmasked, official); the scan always uses `lengths`."""

    def __init__(self, config: MMM4RecConfig):
        super().__init__()
        c = config
        self.d_inner, self.gn, self.H = c.d_inner, c.ngroups * c.d_state, c.nheads
        conv_dim = c.d_inner + 2 * self.gn
        self.in_proj = nn.Linear(c.hidden_size, c.d_inner + conv_dim + c.nheads)
        self.conv = CausalDepthwiseConv1d(conv_dim, c.d_conv)
        self.core = _SSDCore(c, time_update=True)

    def forward(self, h, D, mask, lengths):
        # split outputs whose backward never concatenates the pieces' gradients (same values as torch.split)
        z, xBC, dt = linear_split(h, self.in_proj.weight, self.in_proj.bias,
                                  [self.d_inner, self.d_inner + 2 * self.gn, self.H])
        x, B, C = self.conv.forward_channels_last(xBC, silu=True,           # causal dwconv + SiLU over L
                                                  split=[self.d_inner, self.gn, self.gn])
        time_scale, D_next = self.core.time_scale(D, mask)
        out = self.core.scan_and_project(mmm4rec_kernels.tissd, x, dt, B, C, z, time_scale, lengths)
        return out, D_next


class TiCoSSD(nn.Module):
    """Cross-modal time-aware SSD: x, B, dt_raw read the aligned text stream, C the aligned vision stream.

    forward(pt [b, L, N], pv [b, L, N], Dco [b, H, L] or None, mask [b, L] or None, lengths) -> M [b, L, N];
    last_only=True -> M [b, N] at the positions lengths-1 only (the same values; the position-wise epilogue runs on
    b rows: what the model's last cross block needs).
    text in_proj N -> [x | B | dt_raw], vision in_proj N -> C (G * n), gate z = Linear(pt + pv) (d_inner); the same
    causal dwconv + SiLU as TiSSD on x|B (text) and C (vision); time path driven by Dco (no update); the scan runs in
    `mmm4rec_kernels.ticossd`; gated RMSNorm; out_proj."""

    def __init__(self, config: MMM4RecConfig):
        super().__init__()
        c = config
        self.d_inner, self.gn, self.H = c.d_inner, c.ngroups * c.d_state, c.nheads
        self.text_proj = nn.Linear(c.hidden_size, c.d_inner + self.gn + c.nheads)
        self.vision_proj = nn.Linear(c.hidden_size, self.gn)
        self.gate_proj = nn.Linear(c.hidden_size, c.d_inner)
        self.text_conv = CausalDepthwiseConv1d(c.d_inner + self.gn, c.d_conv)
        self.vision_conv = CausalDepthwiseConv1d(self.gn, c.d_conv)
        self.core = _SSDCore(c, time_update=False)

    def forward(self, pt, pv, Dco, mask, lengths, last_only: bool = False):
        xB, dt = linear_split(pt, self.text_proj.weight, self.text_proj.bias, [self.d_inner + self.gn, self.H])
        x, B = self.text_conv.forward_channels_last(xB, silu=True, split=[self.d_inner, self.gn])
        C = self.vision_conv.forward_channels_last(self.vision_proj(pv), silu=True)
        time_scale, _ = self.core.time_scale(Dco, mask)
        if last_only:                                                    # M [b, N] at the rows lengths-1 only
            rows = torch.arange(pt.shape[0], device=pt.device), lengths - 1
            z_last = self.gate_proj(pt[rows] + pv[rows])
            return self.core.scan_and_project_last(mmm4rec_kernels.ticossd, x, dt, B, C, z_last, time_scale,
                                                   lengths)
        z = self.gate_proj(pt + pv)
        return self.core.scan_and_project(mmm4rec_kernels.ticossd, x, dt, B, C, z, time_scale, lengths)


class ComplexLinear(nn.Module):
    """CL(F) = F W + b on complex spectra [..., K] using two real Linears: W = W_re + i W_im, i.e.
    re = lin_re(F_re) - lin_im(F_im), im = lin_re(F_im) + lin_im(F_re) (the biases form an arbitrary complex b)."""

    def __init__(self, bins: int):
        super().__init__()
        self.lin_re = nn.Linear(bins, bins)
        self.lin_im = nn.Linear(bins, bins)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        re, im = spec.real, spec.imag
        return torch.complex(self.lin_re(re) - self.lin_im(im), self.lin_re(im) + self.lin_im(re))


class FourierFilter(nn.Module):
    """Dual-channel Fourier filter: fuse the vision and text time signals in the frequency domain.

        Fv = rfft(Dv), Ft = rfft(Dt)                  over L, norm='ortho', K = L//2 + 1 bins per head
        adaptive:  Fv' = CL1(Fv) * Fv,  Ft' = CL2(Ft) * Ft      (else Fv' = Fv, Ft' = Ft)
        learnable: Dco = irfft(CL3(Fv' + Ft'), n=L)              (else irfft(Fv' + Ft'))
    forward(Dv [b, H, L], Dt [b, H, L], mask [b, L] or None) -> Dco [b, H, L], padded positions 0 (mask None: not
    masked, official)."""

    def __init__(self, max_len: int, adaptive: bool = True, learnable: bool = True):
        super().__init__()
        bins = max_len // 2 + 1
        self.max_len = max_len
        self.cl_v = ComplexLinear(bins) if adaptive else None
        self.cl_t = ComplexLinear(bins) if adaptive else None
        self.cl_co = ComplexLinear(bins) if learnable else None

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Start as a pass-through (config.fourier_init="identity"): CL1 / CL2 get the complex bias 1 + 0i (gates ~ 1,
        so Fv' ~ Fv; the bias of CL is (b_re - b_im) + i (b_re + b_im)), CL3 the identity added to its real weight
        (Dco ~ Dv + Dt); the random weights stay."""
        for cl in (self.cl_v, self.cl_t):
            if cl is not None:
                cl.lin_re.bias.fill_(0.5)
                cl.lin_im.bias.fill_(-0.5)
        if self.cl_co is not None:
            w = self.cl_co.lin_re.weight
            w.add_(torch.eye(w.shape[0], dtype=w.dtype, device=w.device))

    def forward(self, Dv, Dt, mask):
        Fv = torch.fft.rfft(Dv, n=self.max_len, norm="ortho")
        Ft = torch.fft.rfft(Dt, n=self.max_len, norm="ortho")
        if self.cl_v is not None:
            Fv, Ft = self.cl_v(Fv) * Fv, self.cl_t(Ft) * Ft
        fused = Fv + Ft
        if self.cl_co is not None:
            fused = self.cl_co(fused)
        Dco = torch.fft.irfft(fused, n=self.max_len, norm="ortho")
        return Dco if mask is None else Dco * mask[:, None, :].to(Dco.dtype)


class FeedForward(nn.Module):
    """h -> LN(Dropout(fc2(Dropout(Hardswish(fc1 h)))) + h).  [b, L, N] -> [b, L, N]."""

    def __init__(self, hidden: int, inner: int, dropout: float, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h):
        return self.norm(self.dropout(self.fc2(self.dropout(F.hardswish(self.fc1(h))))) + h)


class StreamLayer(nn.Module):
    """Per-stream wrapper around a (possibly shared) TiSSD: h = LN(Dropout(out) + h); h = FFN(h) if with_ffn.

    The TiSSD is passed in at call time so that the text and image streams can apply ONE module (shared weights)
    while keeping their own LayerNorm (and FFN).  The official vision stream has no FFN (with_ffn=False).
    forward(tissd, h, D, mask, lengths) -> (h, D_next)."""

    def __init__(self, config: MMM4RecConfig, with_ffn: bool = True):
        super().__init__()
        c = config
        self.dropout = Dropout(c.dropout)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ffn = FeedForward(c.hidden_size, c.ffn_inner, c.dropout, c.layer_norm_eps) if with_ffn else None

    def forward(self, tissd: TiSSD, h, D, mask, lengths):
        out, D_next = tissd(h, D, mask, lengths)
        return self.residual(out, h), D_next

    def residual(self, out, h):
        """The wrapper alone, for a TiSSD output computed elsewhere: FFN(LN(Dropout(out) + h))."""
        h = self.norm(self.dropout(out) + h)
        return h if self.ffn is None else self.ffn(h)


# ------------------------------------------------------------------------------------------------ optimizer groups
TIME_PATH_MODULES = (TimeEncoder, TimeModulation, FourierFilter)


def time_path_parameters(model: nn.Module):
    """[(name, parameter)] of the time path: the L-axis time LayerNorms (TimeEncoder), every TimeModulation (time MLP,
    causal convs, gate, update LayerNorm) and every FourierFilter; each parameter once."""
    seen, out = set(), []
    for prefix, m in model.named_modules():
        if isinstance(m, TIME_PATH_MODULES):
            for name, p in m.named_parameters(prefix=prefix):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
    return out


def param_groups(model: nn.Module, weight_decay: float):
    """Optimizer parameter groups: everything at `weight_decay`, except the time path at 0 when
    model.config.time_weight_decay is False (one group then holds all parameters when it is True, the official
    setting: the optimizer behaves exactly as with model.parameters()).
    Use: torch.optim.NAdam(param_groups(model, wd), lr=lr, weight_decay=wd)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "time_weight_decay", True):
        return [{"params": [p for p in model.parameters()], "weight_decay": weight_decay}]
    time_ids = {id(p) for _, p in time_path_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in time_ids]
    time_params = [p for p in model.parameters() if id(p) in time_ids]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if time_params:
        groups.append({"params": time_params, "weight_decay": 0.0})
    return groups
