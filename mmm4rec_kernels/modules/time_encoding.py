"""Timestamps -> per-head time modulation `time_scale [b, L, H]` for `tissd(time_scale=...)`.

Both encodings work on right-padded working batches (see layout.py) of any length L, take timestamps of any
int/float dtype in any unit (seconds in the examples) and compute the gaps in float64:
    gap_0 = 0,  gap_i = max(t_i - t_{i-1}, 0)        (an out-of-order event counts as simultaneous)
Everything is causal: position i reads positions <= i only, so padding after a sequence never reaches it and
`step` (one new event at a time) reproduces `forward` exactly.

CausalTimeEncoding (default, "paper"): MMM4Rec's TiSSD time path (docs/design.md, TiSSD steps 3-4) made causal and length-free.
    1. gap_i (dropout in training, like the paper's time dropout)
    2. causal standardisation over the sequence so far (prefix statistics over positions 0..i, float64):
           mu_i = mean(gap_0..gap_i),  var_i = mean(gap_0^2..gap_i^2) - mu_i^2,
           s_i  = (gap_i - mu_i) / sqrt(max(var_i, 0) + eps * m2_i + 1e-30),   m2_i = mean(gap_0^2..gap_i^2)
       eps = 1e-5 is relative to the mean squared gap, so s is exactly unit-free: seconds, days or min-max
       normalised times (RecBole's normalize_all) give the same s.  Equal gaps give s = 0; s_0 = 0 always.
       The paper normalises with a LayerNorm over the whole padded sequence (future positions included); prefix
       statistics give a scale-free signal without looking ahead.
    3. per-head affine D_h,i = s_i * scale_h + shift_h            (replaces the paper's per-position affine)
    4. alpha = Tanhshrink(mix2(SiLU(mix1(D))))  with mix1, mix2 Linear(H, H) per position   (the paper's L x L
       linears mix positions; here the mixing is across heads, so nothing depends on max_len or the future)
    5. E = D * alpha;  time_scale = SiLU(conv2(SiLU(conv1(E))))    conv1, conv2 causal depthwise over time, k = d_conv
Log1pTimeEncoding ("log1p"): time_scale_h,i = weight_h * log1p(gap_i / time_unit) + bias_h, weight 0 and bias 1
at init (starts as "no modulation").

forward(timestamps [b, L] or None, time_gaps [b, L] or None, lengths [b] or None, return_state=False)
    -> time_scale [b, L, H] (module dtype)  [, state]   (time_gaps replaces the timestamp differences as given)
allocate_state(batch) -> state;  step(t [b], state) -> (time_scale_t [b, H], state).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import CausalDepthwiseConv1d

STD_EPS = 1e-5      # relative to the mean squared gap (see step 2 above)


@dataclass
class TimeState:
    """Per sequence: last timestamp (float64), count of events seen, prefix sums of gap and gap^2 (float64), and
    the windows of the causal convs (CausalTimeEncoding only)."""
    last_t: torch.Tensor          # [b] float64
    count: torch.Tensor           # [b] int64
    gap_sum: torch.Tensor         # [b] float64
    gap_sq_sum: torch.Tensor      # [b] float64
    conv1: torch.Tensor | None = None    # [b, H, k-1]
    conv2: torch.Tensor | None = None    # [b, H, k-1]


def time_gaps_from(timestamps: torch.Tensor) -> torch.Tensor:
    """timestamps [b, L] (any dtype) -> gaps [b, L] float64: gap_0 = 0, gap_i = max(t_i - t_{i-1}, 0)."""
    if timestamps.dim() != 2:
        raise ValueError(f"timestamps must have shape [b, L], got {tuple(timestamps.shape)}")
    t = timestamps.to(torch.float64)
    gaps = torch.zeros_like(t)
    gaps[:, 1:] = (t[:, 1:] - t[:, :-1]).clamp(min=0.0)
    return gaps


def _gather_last(v: torch.Tensor, lengths, default: float = 0.0):
    """v [b, L] -> v[b, lengths-1] ([b]); `default` where lengths == 0."""
    b, L = v.shape
    if lengths is None:
        return v[:, -1] if L else v.new_full((b,), default)
    idx = (lengths.to(v.device, torch.long) - 1).clamp(min=0)
    out = v.gather(1, idx[:, None])[:, 0] if L else v.new_full((b,), default)
    return torch.where(lengths.to(v.device) > 0, out, torch.full_like(out, default))


class _TimeEncodingBase(nn.Module):
    def __init__(self, nheads: int):
        super().__init__()
        self.nheads = nheads

    def _gaps(self, timestamps, time_gaps):
        if time_gaps is not None:
            if time_gaps.dim() != 2:
                raise ValueError(f"time_gaps must have shape [b, L], got {tuple(time_gaps.shape)}")
            return time_gaps.to(torch.float64)
        return time_gaps_from(timestamps)

    def _base_state(self, gaps, timestamps, lengths, dev):
        cum = gaps.cumsum(1)
        last_t = _gather_last(timestamps.to(torch.float64), lengths) if timestamps is not None else \
            _gather_last(cum, lengths)                     # with gaps only, time is measured from the first event
        count = lengths.to(dev, torch.long) if lengths is not None else \
            torch.full((gaps.shape[0],), gaps.shape[1], device=dev, dtype=torch.long)
        return TimeState(last_t, count, _gather_last(cum, lengths), _gather_last((gaps * gaps).cumsum(1), lengths))

    def allocate_state(self, batch: int, device=None) -> TimeState:
        dev = device or next(self.parameters()).device
        z = torch.zeros(batch, device=dev, dtype=torch.float64)
        return TimeState(z.clone(), torch.zeros(batch, device=dev, dtype=torch.long), z.clone(), z.clone())

    def _step_gap(self, t, state: TimeState):
        """(gap [b] float64, updated base state) for one new event at time t [b]."""
        t = t.to(device=state.last_t.device, dtype=torch.float64).reshape(-1)
        gap = torch.where(state.count > 0, (t - state.last_t).clamp(min=0.0), torch.zeros_like(t))
        new = TimeState(t, state.count + 1, state.gap_sum + gap, state.gap_sq_sum + gap * gap)
        return gap, new


class CausalTimeEncoding(_TimeEncodingBase):
    """MMM4Rec's time path, causal (prefix standardisation, head mixing, causal depthwise convs); see module doc."""

    def __init__(self, nheads: int, d_conv: int = 4, dropout: float = 0.0, eps: float = STD_EPS, device=None,
                 dtype=None):
        super().__init__(nheads)
        kw = dict(device=device, dtype=dtype)
        self.eps = eps
        self.dropout = nn.Dropout(dropout)
        self.scale = nn.Parameter(torch.ones(nheads, **kw))
        self.shift = nn.Parameter(torch.zeros(nheads, **kw))
        self.mix1 = nn.Linear(nheads, nheads, **kw)
        self.mix2 = nn.Linear(nheads, nheads, **kw)
        self.conv1 = CausalDepthwiseConv1d(nheads, d_conv, **kw)
        self.conv2 = CausalDepthwiseConv1d(nheads, d_conv, **kw)

    def reset_parameters(self) -> None:
        """The construction-time initialisation: scale 1, shift 0, nn.Linear / nn.Conv1d defaults."""
        with torch.no_grad():
            self.scale.fill_(1.0)
            self.shift.zero_()
        for m in (self.mix1, self.mix2, self.conv1, self.conv2):
            m.reset_parameters()

    def _standardise(self, gap, count, gap_sum, gap_sq_sum):
        mean, mean_sq = gap_sum / count, gap_sq_sum / count
        var = (mean_sq - mean * mean).clamp(min=0.0)
        return (gap - mean) / torch.sqrt(var + self.eps * mean_sq + 1e-30)

    def _modulation(self, s):
        """s [..., 1] float -> E [..., H] (steps 3-4 without the convs)."""
        D = s * self.scale + self.shift
        return D * F.tanhshrink(self.mix2(F.silu(self.mix1(D))))

    def forward(self, timestamps=None, time_gaps=None, lengths=None, return_state=False):
        if timestamps is None and time_gaps is None:
            raise ValueError("pass timestamps or time_gaps")
        gaps = self.dropout(self._gaps(timestamps, time_gaps))                     # [b, L] float64
        b, L = gaps.shape
        count = torch.arange(1, L + 1, device=gaps.device, dtype=torch.float64)
        s = self._standardise(gaps, count, gaps.cumsum(1), (gaps * gaps).cumsum(1))
        E = self._modulation(s.to(self.scale.dtype)[..., None])                    # [b, L, H]
        h1 = self.conv1.forward_channels_last(E, silu=True)                       # [b, L, H]
        time_scale = self.conv2.forward_channels_last(h1, silu=True)
        if not return_state:
            return time_scale
        state = self._base_state(gaps, timestamps, lengths, gaps.device)
        state.conv1 = self.conv1.window_from(E.transpose(1, 2), lengths)
        state.conv2 = self.conv2.window_from(h1.transpose(1, 2), lengths)
        return time_scale, state

    def allocate_state(self, batch: int, device=None) -> TimeState:
        state = super().allocate_state(batch, device)
        state.conv1 = self.conv1.allocate_window(batch, device=device)
        state.conv2 = self.conv2.allocate_window(batch, device=device)
        return state

    def step(self, t, state: TimeState):
        gap, new = self._step_gap(t, state)
        s = self._standardise(gap, new.count.to(torch.float64), new.gap_sum, new.gap_sq_sum)
        E = self._modulation(s.to(self.scale.dtype)[:, None])                      # [b, H]
        c1, new.conv1 = self.conv1.step(E, state.conv1)
        h1 = F.silu(c1)
        c2, new.conv2 = self.conv2.step(h1, state.conv2)
        return F.silu(c2), new


class Log1pTimeEncoding(_TimeEncodingBase):
    """time_scale_h,i = weight_h * log1p(gap_i / time_unit) + bias_h (weight 0, bias 1 at init)."""

    def __init__(self, nheads: int, time_unit: float = 1.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__(nheads)
        if time_unit <= 0:
            raise ValueError(f"time_unit must be > 0, got {time_unit}")
        self.time_unit = float(time_unit)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.zeros(nheads, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.ones(nheads, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """weight 0, bias 1: no modulation at init."""
        with torch.no_grad():
            self.weight.zero_()
            self.bias.fill_(1.0)

    def _encode(self, gap):
        return torch.log1p(gap / self.time_unit).to(self.weight.dtype)[..., None] * self.weight + self.bias

    def forward(self, timestamps=None, time_gaps=None, lengths=None, return_state=False):
        if timestamps is None and time_gaps is None:
            raise ValueError("pass timestamps or time_gaps")
        gaps = self.dropout(self._gaps(timestamps, time_gaps))
        time_scale = self._encode(gaps)
        if not return_state:
            return time_scale
        return time_scale, self._base_state(gaps, timestamps, lengths, gaps.device)

    def step(self, t, state: TimeState):
        gap, new = self._step_gap(t, state)
        return self._encode(gap), new


def make_time_encoding(kind, nheads: int, d_conv: int, dropout: float = 0.0, device=None, dtype=None):
    """'paper' -> CausalTimeEncoding, 'log1p' -> Log1pTimeEncoding, None -> None, an nn.Module -> itself."""
    if kind is None or isinstance(kind, nn.Module):
        return kind
    if kind == "paper":
        return CausalTimeEncoding(nheads, d_conv, dropout, device=device, dtype=dtype)
    if kind == "log1p":
        return Log1pTimeEncoding(nheads, dropout=dropout, device=device, dtype=dtype)
    raise ValueError(f"time_encoding must be 'paper', 'log1p', None or an nn.Module, got {kind!r}")
