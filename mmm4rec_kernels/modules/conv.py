"""Causal depthwise 1-D convolution with a one-position `step` for incremental inference.

`causal_conv1d_channels_last` is the same convolution on [b, L, C] activations (the layout the SSD blocks produce),
optionally fused with SiLU and optionally split into channel pieces (whose gradients are never concatenated):
- CPU float32 / float64 with a C++ compiler present: the native kernel of `mmm4rec_kernels.cpu` (the registered op
  torch.ops.mmm4rec.causal_conv_cpu), one pass over memory forward and one backward (~3.5x faster than the torch
  path at [256, 20, 384], benchmarks/bench_cpu_kernels.py);
- otherwise the torch path: k shifted multiply-adds forward and backward plus k reductions for the weight gradient,
  hand-written backward in eager (~1.5-2x faster than nn.Conv1d's depthwise backward on CPU), no transposes; plain
  torch ops while torch.compile traces (the compiler fuses them).
`mmm4rec_kernels.cpu.status()` (and `python -m mmm4rec_kernels`) says which one runs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cpu as native
from .. import ops
from ..dispatch import choose_causal_conv, log_choice, logger


class _CausalConvChannelsLast(torch.autograd.Function):
    """pre[:, t] = bias + sum_j w[:, j] * x[:, t - (k-1) + j] (x = 0 before t = 0); y = SiLU(pre) if silu else pre.

    x [b, L, C], w [C, k], bias [C] or None.  Backward: with g = dL/dpre,
        dx[:, s] = sum_j w[:, j] g[:, s + (k-1) - j]  (g = 0 past the end),  dw[:, j] = sum_{b,t} g[:, t] xpad[:, t+j],
        dbias = sum_{b,t} g."""

    @staticmethod
    def forward(ctx, x, w, bias, silu, sizes):
        ctx.set_materialize_grads(False)
        k, L = w.shape[1], x.shape[1]
        xp = F.pad(x, (0, 0, k - 1, 0))                                   # [b, L+k-1, C], k-1 zeros in front
        pre = xp[:, k - 1:] * w[:, k - 1]
        if bias is not None:
            pre += bias
        for j in range(k - 1):
            pre.addcmul_(xp[:, j:j + L], w[:, j])
        ctx.save_for_backward(xp, w, pre)
        ctx.silu, ctx.has_bias, ctx.sizes = silu, bias is not None, sizes
        y = F.silu(pre) if silu else pre
        return y if sizes is None else tuple(y.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *gys):
        xp, w, pre = ctx.saved_tensors
        k, L = w.shape[1], pre.shape[1]
        # Few fresh [b, L, C] buffers: on CPU every new large tensor costs page faults, often more than the math.
        gp = pre.new_empty(pre.shape[0], L + k - 1, pre.shape[2])         # g padded with k-1 zeros behind
        gp[:, L:].zero_()                                                 # (zeroing only the tail: fewer writes)
        g = gp[:, :L]
        if ctx.silu:                                                      # SiLU'(p) = s (1 + p - p s), s = sigmoid(p)
            s = torch.sigmoid(pre)
            torch.mul(pre, s, out=g)
            g.neg_().add_(pre).add_(1).mul_(s)
            tmp = s                                                       # reused below
        else:
            tmp = torch.empty_like(g)
        # times the output's gradient, piece by piece when the output was split (never concatenated); None = unused
        sizes = (pre.shape[2],) if ctx.sizes is None else ctx.sizes
        start = 0
        for size, gy in zip(sizes, gys):
            piece = g[..., start:start + size]
            start += size
            if gy is None:
                piece.zero_()
            elif ctx.silu:
                piece.mul_(gy)
            else:
                piece.copy_(gy)
        gx = gp[:, :L] * w[:, k - 1]
        for j in range(k - 1):
            gx.addcmul_(gp[:, k - 1 - j:k - 1 - j + L], w[:, j])
        gw = w.new_empty(w.shape)
        for j in range(k):
            gw[:, j] = torch.mul(g, xp[:, j:j + L], out=tmp).sum((0, 1))
        return gx, gw, (g.sum((0, 1)) if ctx.has_bias else None), None, None


def _causal_conv_traced(x, w, bias, silu, sizes):
    """The torch path as plain differentiable torch ops, for torch.compile / export to trace and fuse (the eager
    path's hand-written backward is an autograd.Function the compiler would only call)."""
    k, L = w.shape[1], x.shape[1]
    xp = F.pad(x, (0, 0, k - 1, 0))
    pre = xp[:, k - 1:] * w[:, k - 1]
    for j in range(k - 1):
        pre = pre + xp[:, j:j + L] * w[:, j]
    if bias is not None:
        pre = pre + bias
    y = F.silu(pre) if silu else pre
    return y if sizes is None else tuple(y.split(list(sizes), dim=-1))


def explain_causal_conv(x: torch.Tensor, weight=None) -> dict:
    """Which backend `causal_conv1d_channels_last` would run on x [b, L, C], and why: {'path', 'backend', 'reason',
    'table'}."""
    return choose_causal_conv(x.device, x.dtype).as_dict()


def causal_conv1d_channels_last(x: torch.Tensor, weight: torch.Tensor, bias=None, silu: bool = False, split=None):
    """Causal depthwise conv over the L axis of x [b, L, C] (weight [C, 1, k] or [C, k], bias [C] or None), then
    SiLU when silu=True.  Returns [b, L, C]: the same values as CausalDepthwiseConv1d on x.transpose(1, 2).
    split: channel sizes summing to C -> a tuple of [b, L, size_k] pieces instead (torch.split of the output, but the
    backward takes the pieces' gradients without concatenating them).
    CPU float32 / float64 with the native library: torch.ops.mmm4rec.causal_conv_cpu; otherwise torch ops."""
    if x.dim() != 3:
        raise ValueError(f"x must be [b, L, C], got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[2]:
        raise ValueError(f"weight has {weight.shape[0]} channels, x has {x.shape[2]} (x must be [b, L, C])")
    if split is not None:
        split = tuple(int(c) for c in split)
        if sum(split) != x.shape[2]:
            raise ValueError(f"split {list(split)} sums to {sum(split)}, x has {x.shape[2]} channels")
    if weight.dim() != 2 and not (weight.dim() == 3 and weight.shape[1] == 1):
        weight = weight.reshape(weight.shape[0], -1)          # [C, k] (the native node takes [C, 1, k] as it is)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    choice = choose_causal_conv(x.device, x.dtype)
    if not torch.compiler.is_compiling() and logger.isEnabledFor(10):   # logging.DEBUG
        log_choice("causal_conv", f"{tuple(x.shape)} {x.dtype} k={weight.shape[-1]} silu={silu}", choice)
    if choice.backend == "native":                     # (weight [C, 1, k] as it is: no view node in autograd)
        return ops.causal_conv(native.rows(x), weight, bias, bool(silu), split or (x.shape[2],))
    w = weight.reshape(weight.shape[0], -1)
    if torch.compiler.is_compiling():
        return _causal_conv_traced(x, w, bias, bool(silu), split)
    return _CausalConvChannelsLast.apply(x, w, bias, bool(silu), split)


class CausalDepthwiseConv1d(nn.Conv1d):
    """Depthwise causal conv over the last axis: y[:, c, t] = bias[c] + sum_j weight[c, 0, j] x[:, c, t - (k-1) + j].

    A plain nn.Conv1d(channels, channels, k, groups=channels, padding=k-1) (state_dict keys `weight` [C, 1, k] and
    `bias` [C]) whose output is cut to the input length, so position t sees inputs t-k+1..t only.
        forward(x [b, C, L]) -> [b, C, L]
        step(x_t [b, C], window [b, C, k-1]) -> (y_t [b, C], new window)   one new position, O(k C)
        window_from(x [b, C, L], lengths [b] or None) -> the window after position lengths-1 (zeros before t=0)
    The window holds the last k-1 inputs, oldest first."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, device=None, dtype=None):
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad k-1 zeros on the left only (not both sides then slice): the same values, and autograd keeps no
        # [b, C, L+k-1] output alive
        return F.conv1d(F.pad(x, (self.kernel_size[0] - 1, 0)), self.weight, self.bias, groups=self.groups)

    def forward_channels_last(self, x: torch.Tensor, silu: bool = False, split=None):
        """x [b, L, C] -> [b, L, C] (SiLU applied when silu=True): forward(x.transpose(1, 2)).transpose(1, 2) without
        the transposes, through `causal_conv1d_channels_last` (hand-written backward); split: channel sizes -> a
        tuple of pieces (see there)."""
        return causal_conv1d_channels_last(x, self.weight, self.bias, silu, split)

    def allocate_window(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        """Zero window [batch, C, k-1] (nothing seen yet)."""
        w = self.weight
        return torch.zeros(batch, self.in_channels, self.kernel_size[0] - 1, device=device or w.device,
                           dtype=dtype or w.dtype)

    def step(self, x_t: torch.Tensor, window: torch.Tensor):
        """y_t = bias + sum_j weight[:, 0, j] * [window | x_t][:, :, j].  Returns (y_t [b, C], new window)."""
        full = torch.cat([window.to(x_t.dtype), x_t[..., None]], dim=-1)           # [b, C, k]
        y = (full * self.weight[:, 0, :]).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y, full[..., 1:]

    def window_from(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        """The last k-1 inputs x[:, :, lengths-k+1 .. lengths-1] (zeros where the index is < 0): [b, C, k-1]."""
        b, C, L = x.shape
        k1 = self.kernel_size[0] - 1
        end = torch.full((b,), L, device=x.device, dtype=torch.long) if lengths is None else \
            lengths.to(device=x.device, dtype=torch.long)
        pos = end[:, None] - k1 + torch.arange(k1, device=x.device)[None, :]       # [b, k-1]
        picked = x.gather(2, pos.clamp(0, max(L - 1, 0))[:, None, :].expand(b, C, k1))
        return picked * (pos >= 0)[:, None, :].to(x.dtype)
