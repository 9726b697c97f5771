"""Dropout with a cheaper random mask on CPU.

nn.Dropout draws its CPU mask with bernoulli_, element by element; a uniform draw compared with p is ~3x faster
there, and multiplying by one float mask keeps the backward a single multiply.  Same distribution and scaling
(each element kept with probability 1 - p and scaled by 1 / (1 - p)), a different random stream.  On other devices
(CUDA's fused dropout kernel is already fast) and for inplace=True it is nn.Dropout itself.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Dropout(nn.Dropout):
    """nn.Dropout(p); forward(x [any shape]) -> same shape.  CPU training: x * (U > p) / (1 - p), U ~ Uniform[0, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0 or not x.is_floating_point():
            return F.dropout(x, self.p, True, self.inplace)
        u = torch.rand_like(x)
        if torch.compiler.is_compiling():
            # the same mask without a bool tensor: inductor saves a bool mask for the backward, and its CPU code
            # stores bool vectors slowly (measured: dropout fwd+bwd of [5120, 256] 38.6 ms compiled with the bool
            # mask, 11.2 ms with this form, 13.9 ms eager)
            keep = torch.sign(torch.relu(u - self.p)) * (1.0 / (1.0 - self.p))
        else:
            keep = (u > self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep
