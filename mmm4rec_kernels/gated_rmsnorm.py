"""Gated RMSNorm epilogue: out = RMSNorm(y * SiLU(z)) * weight (norm after gate, as Mamba-2 / MMM4Rec step 7)."""
from __future__ import annotations

import torch

from .dispatch import triton_usable
from .reference import gated_rmsnorm_ref


class _GatedRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size):
        from .triton.gated_rmsnorm import gated_rmsnorm_fwd
        shape = y.shape
        y2 = y.reshape(-1, shape[-1]).contiguous()
        z2 = None if z is None else z.reshape(-1, shape[-1]).contiguous()
        out, rstd = gated_rmsnorm_fwd(y2, z2, weight.contiguous(), eps, group_size)
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.eps, ctx.group_size, ctx.shape = eps, group_size, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        from .triton.gated_rmsnorm import gated_rmsnorm_bwd
        y2, z2, weight, rstd = ctx.saved_tensors
        dy, dz, dw = gated_rmsnorm_bwd(dout.reshape(y2.shape).contiguous(), y2, z2, weight, rstd, ctx.eps,
                                       ctx.group_size)
        return dy.view(ctx.shape), None if dz is None else dz.view(ctx.shape), dw, None, None


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
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if z is not None:
        z = z.to(y.dtype)
    use_triton = backend == "triton" or (backend == "auto" and y.device.type == "cuda" and triton_usable(y.device))
    if use_triton and y.dtype != torch.float64:
        return _GatedRMSNormTriton.apply(y, z, weight, eps, group_size if group_size is not None else d)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    up = lambda t: None if t is None else t.to(cd)  # noqa: E731
    return gated_rmsnorm_ref(up(y), up(z), up(weight), eps, group_size).to(y.dtype)
