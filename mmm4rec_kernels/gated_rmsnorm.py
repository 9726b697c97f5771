"""Gated RMSNorm epilogue: out = RMSNorm(y * SiLU(z)) * weight (norm after gate, as Mamba-2 / MMM4Rec step 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import logging

from . import cpu as native
from . import ops
from .dispatch import choose_gated_rmsnorm, log_choice

logger = logging.getLogger("mmm4rec_kernels")


def gated_rmsnorm_torch(y, z, weight, eps, group_size=None):
    """The torch path (any device; plain torch ops, so torch.compile fuses it): y, z [..., d] in the compute dtype,
    weight [d].  v = y * SiLU(z);  out = v / sqrt(mean_group(v^2) + eps) * weight."""
    d = y.shape[-1]
    g = d if group_size is None else group_size
    v = y * F.silu(z) if z is not None else y
    vg = v.reshape(*v.shape[:-1], d // g, g)
    return (vg * torch.rsqrt(vg.square().mean(-1, keepdim=True) + eps)).reshape(v.shape) * weight


class _GatedRMSNormCPU(torch.autograd.Function):
    """The native CPU kernels (mmm4rec_kernels/cpu/gated_rmsnorm.cpp) with autograd; y, z [R, d] contiguous."""

    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size):
        ctx.save_for_backward(y, z, weight)
        ctx.eps, ctx.group_size = eps, group_size
        return native.norm_forward(y, z, weight, eps, group_size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        y, z, weight = ctx.saved_tensors
        dy, dz, dw = native.norm_backward(dout.contiguous(), y, z, weight, ctx.eps, ctx.group_size)
        return dy, dz, dw, None, None


def explain_gated_rmsnorm(y, z=None, weight=None, eps=1e-5, group_size=None, backend="auto"):
    """Which backend `gated_rmsnorm` would run for these arguments, and why: {'path', 'backend', 'reason', 'table'}."""
    return choose_gated_rmsnorm(y.device, y.dtype, backend).as_dict()


def gated_rmsnorm(y, z, weight, eps=1e-5, group_size=None, backend="auto"):
    """out = RMSNorm(y * SiLU(z)) * weight over groups of `group_size` channels (None = all d).

    y, z: [..., d] (z may be None: plain RMSNorm); weight [d]. backend 'auto' | 'triton' | 'torch'.
    dtypes: z and weight may be any float dtype (z is cast to y's dtype); the result has y's dtype; the torch path
    computes fp16/bf16 in float32."""
    d = y.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape ({d},), got {tuple(weight.shape)}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    if group_size is not None and (group_size < 1 or d % group_size):
        raise ValueError(f"group_size={group_size} must divide the channel count {d}")
    choice = choose_gated_rmsnorm(y.device, y.dtype, backend)
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        log_choice("gated_rmsnorm", f"{tuple(y.shape)} {y.dtype} group {group_size}", choice)
    if z is not None:
        z = z.to(y.dtype)
    if choice.backend == "triton":
        out = ops.gated_rmsnorm_triton(y.reshape(-1, d).contiguous(), None if z is None else z.reshape(-1, d).contiguous(),
                                       weight, eps, group_size if group_size is not None else d)
        return out.view(y.shape)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    if choice.backend == "native":                      # eager CPU only (traced: the torch ops below, fused)
        g = d if group_size is None else group_size
        row = lambda t: None if t is None else t.reshape(-1, d).to(cd).contiguous()  # noqa: E731
        out = _GatedRMSNormCPU.apply(row(y), row(z), weight.to(cd).contiguous(), float(eps), int(g))
        return out.view(y.shape).to(y.dtype)
    up = lambda t: None if t is None else t.to(cd)  # noqa: E731
    return gated_rmsnorm_torch(up(y), up(z), up(weight), eps, group_size).to(y.dtype)
