"""Causal depthwise 1-D convolution with a one-position `step` for incremental inference."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
