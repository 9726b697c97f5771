"""TimeAwareSSD: a Mamba2-style mixer block whose scan is the time-aware SSD (`mmm4rec_kernels.tissd`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tissd import tissd
from . import layer_cpu
from .conv import CausalDepthwiseConv1d
from .layout import SequenceLayout
from .linear_split import linear_split
from .norm import GatedRMSNorm
from .params import init_ssd_params
from .time_encoding import TimeState, make_time_encoding

RMSNORM_EPS = 1e-5
logger = logging.getLogger("mmm4rec_kernels")


@dataclass
class SSDState:
    """Incremental-inference state of one TimeAwareSSD for a batch of b sequences (O(1) in the sequence length).

    conv [b, conv_dim, d_conv-1]: the last inputs of the causal conv; ssm [b, H, P, n]: the SSD state (fp32, fp64
    for an fp64 module);
    time: the time encoding's state (last timestamp, prefix statistics, its conv windows) or None."""
    conv: torch.Tensor
    ssm: torch.Tensor
    time: TimeState | None


class TimeAwareSSD(nn.Module):
    """Mamba2-like mixer with a time-aware SSD: hidden [b, L, d_model] (+ timestamps [b, L]) -> [b, L, d_model].

        in_proj: d_model -> [z (d_inner) | xBC (d_inner + 2 G n) | dt (H)],  d_inner = expand * d_model, H = d_inner/P
        xBC = SiLU(causal depthwise conv_k(xBC));  x [b, L, H, P], B, C [b, L, G, n]
        time_scale = time_encoding(timestamps) [b, L, H]   (None without timestamps: a plain Mamba2 mixer)
        y = tissd(x, dt, A=-exp(A_log), B, C, time_scale, dt_bias, D):  Delta = softplus(dt * time_scale + dt_bias),
            skip D * Delta * x (d_skip="delta", MMM4Rec) or D * x (d_skip="plain", Mamba2)
        y = RMSNorm(y * SiLU(z)) * w  (norm_before_gate=False) | RMSNorm(y) * w * SiLU(z) | y * SiLU(z) (rmsnorm=False)
        out = out_proj(y)
    Parameter names follow mamba_ssm's Mamba2 (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), with
    Mamba2's shapes and initialisation: with timestamps=None and d_skip="plain" a Mamba2 state_dict loads with
    strict=False (only time_encoding.* is extra) and computes the same mixer.  A_log, dt_bias, D carry
    `_no_weight_decay = True`.  D is [H], or [H * P] (viewed as [H, P]) with D_has_hdim=True.

    time_encoding: 'paper' (CausalTimeEncoding, default), 'log1p', None (ignore timestamps) or an nn.Module with the
    same interface (see time_encoding.py).  path / backend / chunk_size are passed to `tissd` (backend 'auto' picks
    Triton on CUDA, torch on CPU; `mmm4rec_kernels.explain` tells why).

    forward(hidden, timestamps=None, *, lengths=None | attention_mask=None | cu_seqlens=None, time_gaps=None,
            return_state=False)
        hidden [b, L, d_model]; timestamps [b, L] any int/float dtype (event times; gaps in float64 inside);
        lengths [b] (right padding) or attention_mask [b, L] (1 = valid; right OR left padding) or
        cu_seqlens [nseq+1] with hidden [1, T, d_model] (packed); time_gaps [b, L] instead of timestamps.
        Returns [b, L, d_model] with 0 on padded positions; with return_state=True also the SSDState after each
        sequence's last valid event (for `step`; one row per sequence, also for left-padded and packed input).
    allocate_state(batch) -> SSDState (empty history);  step(x_t [b, d_model], t_t [b] or None, state)
        -> (y_t [b, d_model], new state): one new event per sequence, O(1), equal to the full forward."""

    def __init__(self, d_model: int, d_state: int = 64, headdim: int = 64, ngroups: int = 1, expand: int = 2,
                 d_conv: int = 4, chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, A_init_range=(1.0, 16.0), D_has_hdim: bool = False,
                 d_skip: str = "delta", rmsnorm: bool = True, norm_before_gate: bool = False, bias: bool = False,
                 conv_bias: bool = True, time_encoding="paper", time_dropout: float = 0.0, path: str = "auto",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.d_state, self.headdim, self.ngroups = d_model, d_state, headdim, ngroups
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model = {self.d_inner} must be a multiple of headdim={headdim}")
        self.nheads = self.d_inner // headdim
        if ngroups < 1 or self.nheads % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {self.nheads}")
        if d_skip not in ("delta", "plain"):
            raise ValueError(f"d_skip must be 'delta' (D * Delta * x, MMM4Rec) or 'plain' (D * x, Mamba2), "
                             f"got {d_skip!r}")
        self.d_conv, self.chunk_size, self.D_has_hdim, self.d_skip = d_conv, chunk_size, D_has_hdim, d_skip
        self.rmsnorm, self.norm_before_gate, self.path, self.backend = rmsnorm, norm_before_gate, path, backend
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **kw)
        self.conv1d = CausalDepthwiseConv1d(self.conv_dim, d_conv, bias=conv_bias, **kw)
        self._ssd_init = dict(A_init_range=A_init_range, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                              D_shape=self.d_inner if D_has_hdim else self.nheads)
        self.A_log, self.dt_bias, self.D = init_ssd_params(self.nheads, **self._ssd_init, **kw)
        if rmsnorm:
            self.norm = GatedRMSNorm(self.d_inner, RMSNORM_EPS, norm_before_gate, self.d_inner // ngroups,
                                     backend="auto" if backend == "cuda" else backend, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        self.time_encoding = make_time_encoding(time_encoding, self.nheads, d_conv, time_dropout, **kw)
        self._timestamps_checked = False

    @classmethod
    def for_recsys(cls, d_model: int, **kwargs) -> "TimeAwareSSD":
        """Sizes that fit sequential-recommendation widths (d_model 32..256, any value with an even 2 * d_model):
        expand 2, d_state 16, one group, and the largest head size <= 32 that gives at least 4 heads (d_model 64:
        4 heads of 32; d_model 50: 4 heads of 25).  Mamba2's defaults (headdim 64, d_state 64) need d_model to be a
        multiple of 32 and cost ~4x more per step at these widths.  Keyword arguments override any default."""
        d_inner = kwargs.get("expand", 2) * d_model
        heads = [p for p in range(min(32, d_inner // 4), 0, -1) if d_inner % p == 0]
        if not heads:
            raise ValueError(f"d_model={d_model}: expand * d_model = {d_inner} is too small for 4 heads")
        defaults = dict(d_state=16, headdim=heads[0], ngroups=1, expand=2)
        return cls(d_model, **{**defaults, **kwargs})

    def reset_parameters(self) -> None:
        """Re-draw every parameter with this layer's own initialisation (Mamba2's): nn.Linear / nn.Conv1d defaults,
        A_log = log U(A_init_range), dt_bias = softplus^-1(log-uniform dt), D = 1, norm weight 1, and the time
        encoding's own init.  Host models that re-initialise every Linear (e.g. a xavier loop over modules) should
        call this afterwards for the layer's dynamics to start where Mamba2's do."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        kw = dict(device=self.A_log.device, dtype=self.A_log.dtype)
        with torch.no_grad():
            for param, value in zip((self.A_log, self.dt_bias, self.D),
                                    init_ssd_params(self.nheads, **self._ssd_init, **kw)):
                param.copy_(value)
            if self.rmsnorm:
                self.norm.weight.fill_(1.0)
        if self.time_encoding is not None and hasattr(self.time_encoding, "reset_parameters"):
            self.time_encoding.reset_parameters()

    # ------------------------------------------------------------------------------------------------- forward
    def _inputs(self, hidden, timestamps, lengths, attention_mask, key_padding_mask, cu_seqlens, time_gaps):
        """Argument checks with one-line errors naming the argument; numpy arrays become tensors on hidden's
        device (all but hidden, which must be a torch.Tensor)."""
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be a torch.Tensor [b, L, d_model={self.d_model}], got "
                            f"{type(hidden).__module__}.{type(hidden).__name__}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must have shape [b, L, d_model={self.d_model}], got {tuple(hidden.shape)}")
        weight = self.in_proj.weight
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise ValueError(f"hidden is {hidden.dtype} but the layer's parameters are {weight.dtype}: cast one of "
                             f"them (e.g. layer.to({hidden.dtype}) or hidden.to({weight.dtype}))")
        named = dict(timestamps=timestamps, lengths=lengths, attention_mask=attention_mask,
                     key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, time_gaps=time_gaps)
        for name, value in named.items():
            if value is None or isinstance(value, torch.Tensor):
                continue
            if type(value).__module__ == "numpy":
                named[name] = torch.as_tensor(value, device=hidden.device)
            else:
                raise TypeError(f"{name} must be a torch.Tensor (or a numpy array), got {type(value).__name__}")
        b, L, _ = hidden.shape
        for name in ("timestamps", "time_gaps"):
            t = named[name]
            if t is not None and tuple(t.shape) != (b, L):
                raise ValueError(f"{name} must have shape ({b}, {L}) = hidden.shape[:2], got {tuple(t.shape)}")
        if timestamps is not None and time_gaps is not None:
            raise ValueError("pass timestamps or time_gaps, not both")
        return named

    def _check_timestamps_once(self, timestamps, layout):
        """Warn (once per layer) when timestamps no mask covers look like padding: zeros after a non-zero time, or
        times that go backwards.  Eager only (it reads values)."""
        self._timestamps_checked = True
        t = timestamps.detach()
        if layout.lengths is not None or t.shape[1] < 2:
            return
        back = bool((t[:, 1:] < t[:, :-1]).any())
        lead_zero = bool(((t[:, :-1] == 0) & (t[:, 1:] != 0)).any())
        if back or lead_zero:
            import warnings
            what = "zeros before non-zero times (left padding?)" if lead_zero else "times that go backwards"
            warnings.warn(f"TimeAwareSSD: timestamps hold {what} and no lengths / attention_mask / key_padding_mask "
                          f"was given, so every position is read as a valid event: pass the padding mask (shown "
                          f"once per layer)", stacklevel=3)

    def forward(self, hidden, timestamps=None, *, lengths=None, attention_mask=None, key_padding_mask=None,
                cu_seqlens=None, time_gaps=None, return_state=False):
        named = self._inputs(hidden, timestamps, lengths, attention_mask, key_padding_mask, cu_seqlens, time_gaps)
        timestamps, time_gaps = named["timestamps"], named["time_gaps"]
        b, L, _ = hidden.shape
        layout = SequenceLayout.build(b, L, hidden.device, named["lengths"], named["attention_mask"],
                                      named["cu_seqlens"], named["key_padding_mask"])
        if timestamps is not None and not self._timestamps_checked and not torch.compiler.is_compiling():
            self._check_timestamps_once(timestamps, layout)
        u, timestamps, time_gaps = layout.pad(hidden), layout.pad(timestamps), layout.pad(time_gaps)
        if not torch.compiler.is_compiling():                     # eager CPU: few ops (modules/layer_cpu.py)
            out, why = layer_cpu.forward(self, u, timestamps, time_gaps, layout.lengths, return_state)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("TimeAwareSSD %s: %s", tuple(hidden.shape), f"general path ({why})" if out is None
                             else "CPU " + ("training" if torch.is_grad_enabled() else "inference") + " path")
            if out is not None:       # rows past each length are already 0: only a gather layout needs unpad
                return out if layout.index is None else layout.unpad(out)
        out, state = self._forward_working(u, timestamps, time_gaps, layout.lengths, return_state)
        out = layout.unpad(out)
        return (out, state) if return_state else out

    def _forward_working(self, u, timestamps, time_gaps, lengths, return_state):
        """Right-padded working batch u [b, L, d_model] (lengths [b] or None) -> (out [b, L, d_model], state)."""
        b, L, _ = u.shape
        H, P, G, n = self.nheads, self.headdim, self.ngroups, self.d_state
        # split outputs whose backward never concatenates the pieces' gradients (same values as torch.split)
        z, xBC_in, dt = linear_split(u, self.in_proj.weight, self.in_proj.bias, [self.d_inner, self.conv_dim, H])
        x, B, C = self.conv1d.forward_channels_last(xBC_in, silu=True,             # causal dwconv + SiLU over L
                                                    split=[self.d_inner, G * n, G * n])
        time_scale, time_state = None, None
        if self.time_encoding is not None and (timestamps is not None or time_gaps is not None):
            enc = self.time_encoding(timestamps, time_gaps, lengths, return_state=return_state)
            time_scale, time_state = enc if return_state else (enc, None)
        x4, z4 = x.reshape(b, L, H, P), z.reshape(b, L, H, P)
        fused_norm = self.rmsnorm and not self.norm_before_gate and not self.D_has_hdim
        A = -torch.exp(self.A_log.to(self._compute_dtype()))
        out = tissd(x4, dt, A, B.reshape(b, L, G, n), C.reshape(b, L, G, n),
                    time_scale=time_scale, dt_bias=self.dt_bias, D=None if self.D_has_hdim else self.D,
                    d_skip=self.d_skip, dt_softplus=True, lengths=lengths, return_final_states=return_state,
                    z=z4 if fused_norm else None, norm_weight=self.norm.weight if fused_norm else None,
                    norm_eps=RMSNORM_EPS, norm_group_size=self.d_inner // G, path=self.path, backend=self.backend,
                    chunk_size=self.chunk_size)
        y, ssm = out if return_state else (out, None)
        if not fused_norm:
            if self.D_has_hdim:
                y = y + self._hdim_skip(x4, dt, time_scale)
            y = self._gate(y.reshape(b, L, self.d_inner), z)
        out = self.out_proj(y.reshape(b, L, self.d_inner))
        state = None
        if return_state:
            state = SSDState(self.conv1d.window_from(xBC_in.transpose(1, 2), lengths), ssm.to(self._compute_dtype()),
                             time_state)
        return out, state

    def _compute_dtype(self):
        """fp64 for an fp64 module, else fp32 (the SSD math of fp16/bf16 modules runs in fp32, as in the kernels)."""
        return torch.float64 if self.A_log.dtype == torch.float64 else torch.float32

    def _delta(self, dt, time_scale):
        ct = self._compute_dtype()
        v = dt.to(ct) if time_scale is None else dt.to(ct) * time_scale.to(ct)
        return F.softplus(v + self.dt_bias.to(ct))

    def _hdim_skip(self, x4, dt, time_scale):
        """D [H, P] skip done here (tissd takes D [H]): D * Delta * x ('delta') or D * x ('plain'); x4 [..., H, P]."""
        D = self.D.view(self.nheads, self.headdim)
        if self.d_skip == "plain":
            return (D * x4).to(x4.dtype)
        return (D * self._delta(dt, time_scale)[..., None] * x4).to(x4.dtype)

    def _gate(self, y, z):
        """[.., d_inner] y, z -> gated (and normalised) y."""
        if self.rmsnorm:
            return self.norm(y, z)
        return y * F.silu(z)

    # --------------------------------------------------------------------------------------------------- step
    def allocate_state(self, batch: int, device=None) -> SSDState:
        """Empty history for `batch` sequences."""
        dev = device or self.A_log.device
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=dev, dtype=self._compute_dtype())
        time = self.time_encoding.allocate_state(batch, device=dev) if self.time_encoding is not None else None
        return SSDState(self.conv1d.allocate_window(batch, device=dev), ssm, time)

    def step(self, x_t, t_t, state: SSDState):
        """One new event per sequence: x_t [b, d_model], t_t [b] (its timestamp; None: no time modulation) ->
        (y_t [b, d_model], new SSDState).  h = exp(A Delta) h + Delta x B^T;  y = h C + skip; gate; out_proj."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must have shape [b, d_model={self.d_model}], got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        H, P, G, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC_in, dt = torch.split(self.in_proj(x_t), [self.d_inner, self.conv_dim, H], dim=-1)
        xBC, conv = self.conv1d.step(xBC_in, state.conv)
        x, B, C = torch.split(F.silu(xBC), [self.d_inner, G * n, G * n], dim=-1)
        time_scale, time_state = None, state.time
        if t_t is not None and self.time_encoding is not None:
            if state.time is None:
                raise ValueError("state has no time-encoding state: allocate it with this module's allocate_state")
            time_scale, time_state = self.time_encoding.step(t_t, state.time)
        ct = self._compute_dtype()
        delta = self._delta(dt, time_scale)                                        # [b, H] fp32 (fp64)
        A = -torch.exp(self.A_log.to(ct))
        x3 = x.reshape(b, H, P).to(ct)
        Bh = B.reshape(b, G, n).to(ct).repeat_interleave(H // G, dim=1)           # [b, H, n]
        Ch = C.reshape(b, G, n).to(ct).repeat_interleave(H // G, dim=1)
        ssm = torch.exp(delta * A)[..., None, None] * state.ssm.to(ct) + \
            (delta[..., None] * x3)[..., None] * Bh[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", ssm, Ch)
        D = self.D.to(ct).view(H, P) if self.D_has_hdim else self.D.to(ct)[:, None]
        y = y + D * (delta[..., None] if self.d_skip == "delta" else 1.0) * x3
        y = self._gate(y.reshape(b, self.d_inner).to(x_t.dtype), z)
        return self.out_proj(y), SSDState(conv, ssm, time_state)

    def extra_repr(self):
        enc = type(self.time_encoding).__name__ if self.time_encoding is not None else None
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, heads={self.nheads}x{self.headdim}, "
                f"ngroups={self.ngroups}, d_state={self.d_state}, d_skip={self.d_skip!r}, time_encoding={enc}, "
                f"path={self.path!r}, backend={self.backend!r}")
