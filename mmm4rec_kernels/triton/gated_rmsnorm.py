"""Triton gated RMSNorm (norm after the gate, as Mamba-2 / MMM4Rec step 7).

    v   = y * SiLU(z)                    (v = y when z is None)
    out = v * rstd * w,   rstd = 1 / sqrt(mean_group(v^2) + eps)

over groups of `group_size` consecutive channels of the last dim d; rows = product of the leading dims.
Backward, per row and group (xh = v * rstd, g = dout * w):
    dv = rstd * (g - xh * mean_group(g * xh));   dy = dv * SiLU(z);   dz = dv * y * sig(z) * (1 + z (1 - sig(z)))
    dw = sum_rows dout * xh   (per-program partial rows, summed with torch: deterministic)
One program handles BLOCK_R rows x one group (whole group in one tile); accumulation in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gated_rmsnorm_fwd", "gated_rmsnorm_bwd"]

_MAX_GROUP = 65536          # one group must fit one tile
_TILE = 2048                # elements per program tile (BLOCK_R * BLOCK_G): ~8 per thread at 8 warps
_ROW_BLOCKS = 4             # row blocks per backward program (static loop): fewer dweight partial rows


@triton.jit
def _gate(y, z, HAS_Z: tl.constexpr):
    """(v, sig(z)) with v = y * z * sig(z); float32 tiles."""
    if HAS_Z:
        sig = 1.0 / (1.0 + tl.exp(-z))
        v = y * z * sig
    else:
        sig = z
        v = y
    return v, sig


@triton.jit
def _fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, R, D, GS, NG, eps,
                HAS_Z: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = tl.program_id(1)
    cols = grp * GS + tl.arange(0, BLOCK_G)
    row_ok = rows < R
    col_ok = tl.arange(0, BLOCK_G) < GS
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]                                   # int64
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        z = y
    v, _ = _gate(y, z, HAS_Z)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / GS + eps)                     # [BLOCK_R]
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (v * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + rows * NG + grp, rstd, mask=row_ok)


@triton.jit
def _bwd_kernel(dout_ptr, y_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_ptr, R, D, GS, NG,
                HAS_Z: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    grp = tl.program_id(1)
    cols = grp * GS + tl.arange(0, BLOCK_G)
    col_ok = tl.arange(0, BLOCK_G) < GS
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_G], dtype=tl.float32)
    for k in range(ROW_BLOCKS):
        rows = (tl.program_id(0).to(tl.int64) * ROW_BLOCKS + k) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            z = y
        v, sig = _gate(y, z, HAS_Z)
        rstd = tl.load(rstd_ptr + rows * NG + grp, mask=row_ok, other=0.0)
        dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xh = v * rstd[:, None]
        g = dout * w[None, :]
        dv = rstd[:, None] * (g - xh * (tl.sum(g * xh, axis=1) / GS)[:, None])
        dw += tl.sum(dout * xh, axis=0)
        if HAS_Z:
            tl.store(dy_ptr + offs, (dv * z * sig).to(dy_ptr.dtype.element_ty), mask=ok)
            dz = dv * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(dy_ptr + offs, dv.to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + tl.program_id(0).to(tl.int64) * D + cols, dw, mask=col_ok)


def _layout(y, z, weight, group_size):
    """Validate; returns (y2 [R, d], z2 or None, d, group_size, ngroups, BLOCK_R, BLOCK_G)."""
    if y.dim() < 1 or y.shape[-1] < 1:
        raise ValueError(f"y must be [..., d] with d >= 1, got shape {tuple(y.shape)}")
    d = y.shape[-1]
    gs = d if group_size is None else int(group_size)
    if gs < 1 or d % gs:
        raise ValueError(f"group_size={group_size} must divide the channel count d={d}")
    if gs > _MAX_GROUP:
        raise ValueError(f"group_size={gs} exceeds the {_MAX_GROUP} channels one tile holds")
    if d // gs > 65535:
        raise ValueError(f"at most 65535 groups per row (grid axis 1), got d // group_size = {d // gs}")
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape ({d},), got {tuple(weight.shape)}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    for name, t in (("y", y), ("z", z), ("weight", weight)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    y2 = y.reshape(-1, d).contiguous()
    z2 = None if z is None else z.reshape(-1, d).contiguous()
    block_g = triton.next_power_of_2(gs)
    block_r = max(1, min(64, _TILE // block_g))
    return y2, z2, d, gs, d // gs, block_r, block_g


def _warps(block_r, block_g):
    return 8 if block_r * block_g >= 2048 else 4


def gated_rmsnorm_fwd(y, z, weight, eps, group_size=None):
    """out = RMSNorm(y * SiLU(z)) * weight over groups of group_size channels of the last dim (None = d).

    y, z: [..., d] (z may be None), weight [d].  Returns (out [..., d] in y's dtype, rstd [rows, d // group_size]
    float32) with rows = y.numel() // d."""
    y2, z2, d, gs, ng, block_r, block_g = _layout(y, z, weight, group_size)
    R = y2.shape[0]
    out = torch.empty_like(y2)
    rstd = torch.empty(R, ng, dtype=torch.float32, device=y.device)
    if R > 0:
        _fwd_kernel[(triton.cdiv(R, block_r), ng)](
            y2, y2 if z2 is None else z2, weight.contiguous(), out, rstd, R, d, gs, ng, float(eps),
            HAS_Z=z2 is not None, BLOCK_R=block_r, BLOCK_G=block_g, num_warps=_warps(block_r, block_g))
    return out.view(y.shape), rstd


def gated_rmsnorm_bwd(dout, y, z, weight, rstd, eps, group_size=None):
    """Gradients of `gated_rmsnorm_fwd` given its rstd [rows, d // group_size].

    Returns (dy in y's dtype, dz in z's dtype or None, dweight in weight's dtype), shaped like the inputs."""
    y2, z2, d, gs, ng, block_r, block_g = _layout(y, z, weight, group_size)
    R = y2.shape[0]
    if dout.shape != y.shape:
        raise ValueError(f"dout must have y's shape {tuple(y.shape)}, got {tuple(dout.shape)}")
    if rstd.shape != (R, ng) or rstd.dtype != torch.float32:
        raise ValueError(f"rstd must be float32 of shape {(R, ng)}, got {rstd.dtype} {tuple(rstd.shape)}")
    dout2 = dout.reshape(-1, d).contiguous()
    dy = torch.empty_like(y2)
    dz = None if z2 is None else torch.empty_like(z2)
    n_prog = triton.cdiv(triton.cdiv(R, block_r), _ROW_BLOCKS)
    dw_part = torch.empty(n_prog, d, dtype=torch.float32, device=y.device)
    if R > 0:
        _bwd_kernel[(n_prog, ng)](
            dout2, y2, y2 if z2 is None else z2, weight.contiguous(), rstd.contiguous(), dy,
            dy if dz is None else dz, dw_part, R, d, gs, ng,
            HAS_Z=z2 is not None, BLOCK_R=block_r, BLOCK_G=block_g, ROW_BLOCKS=_ROW_BLOCKS,
            num_warps=_warps(block_r, block_g))
    dw = dw_part.sum(0).to(weight.dtype)
    return dy.view(y.shape), None if dz is None else dz.view(z.shape), dw
