"""Gated RMSNorm module (mamba_ssm's RMSNormGated semantics) on top of mmm4rec_kernels.gated_rmsnorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..gated_rmsnorm import gated_rmsnorm


class GatedRMSNorm(nn.Module):
    """out = RMSNorm(y * SiLU(z)) * weight (norm_before_gate=False, Mamba-2 default)
          or RMSNorm(y) * weight * SiLU(z)  (norm_before_gate=True); RMS over groups of `group_size` channels.

    forward(y [..., d], z [..., d] or None) -> [..., d]; parameter `weight` [d] (ones)."""

    def __init__(self, d: int, eps: float = 1e-5, norm_before_gate: bool = False, group_size=None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if group_size is not None and (group_size < 1 or d % group_size):
            raise ValueError(f"group_size={group_size} must divide d={d}")
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps, self.norm_before_gate, self.group_size, self.backend = eps, norm_before_gate, group_size, backend

    def forward(self, y: torch.Tensor, z=None) -> torch.Tensor:
        if self.norm_before_gate and z is not None:
            return gated_rmsnorm(y, None, self.weight, self.eps, self.group_size, self.backend) * F.silu(z)
        return gated_rmsnorm(y, z, self.weight, self.eps, self.group_size, self.backend)
