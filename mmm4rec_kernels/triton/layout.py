"""Checks of the token layout shared by the Triton paths (CONTRACT.md)."""
from __future__ import annotations

import torch

# dtype code passed to the kernels as a constexpr (which tl.dot precision / output cast to use)
DOT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def check_token_layout(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, dy=None, *, where=""):
    """Validate x [T, H, P], dt/E [T, H], A/dt_bias/D [H] (any float dtype), B/C [T, G, n], seq_start int64 / seq_len
    int32 [nseq], max_len int >= 0, dy like x.  Returns (T, H, P, G, n, nseq)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [T, H, P], got shape {tuple(x.shape)}")
    T, H, P = x.shape
    if x.dtype not in DOT_CODE:
        raise ValueError(f"x must be float32, bfloat16 or float16 for {where}, got {x.dtype}")
    if B.dim() != 3 or B.shape != C.shape or B.shape[0] != T:
        raise ValueError(f"B and C must both be [T={T}, G, n], got B {tuple(B.shape)}, C {tuple(C.shape)}")
    G, N = B.shape[1], B.shape[2]
    if G < 1 or H % G:
        raise ValueError(f"the number of groups G={G} must divide the number of heads H={H}")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"B and C must have x's dtype {x.dtype}, got {B.dtype}, {C.dtype}")
    for name, t, shape in (("dt", dt, (T, H)), ("E", E, (T, H)), ("A", A, (H,)), ("dt_bias", dt_bias, (H,)),
                           ("D", D, (H,))):
        if t is None:
            if name in ("dt", "A"):
                raise ValueError(f"{name} is required")
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor (cast to float32 in the kernels), got {t.dtype}")
    if dy is not None and tuple(dy.shape) != (T, H, P):
        raise ValueError(f"dy must have x's shape {(T, H, P)}, got {tuple(dy.shape)}")
    if seq_start.dim() != 1 or seq_len.shape != seq_start.shape:
        raise ValueError(f"seq_start and seq_len must be 1-d of equal length, got {tuple(seq_start.shape)}, "
                         f"{tuple(seq_len.shape)}")
    if seq_start.dtype != torch.int64 or seq_len.dtype != torch.int32:
        raise ValueError(f"seq_start must be int64 and seq_len int32, got {seq_start.dtype}, {seq_len.dtype}")
    if not isinstance(max_len, int) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative python int, got {max_len!r}")
    return T, H, P, G, N, seq_start.shape[0]
