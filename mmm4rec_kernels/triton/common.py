"""@triton.jit helpers shared by the TiSSD kernels (quadratic.py, chunked.py).

Dot operand code DOT (a constexpr of every kernel): 0 = float32 (tl.dot input_precision PRECISION: "ieee",
"tf32" or "tf32x3"), 1 = bfloat16, 2 = float16; accumulation is float32 in every case.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_dot", "_softplus", "_split", "_nonfinite", "_first_nonfinite_row"]


@triton.jit
def _dot(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] -> float32 [M, N].  16-bit DOT: both operands rounded to that type first (tensor cores,
    fp32 accumulation); float32: input_precision PRECISION."""
    if DOT == 1:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == 2:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return out


@triton.jit
def _softplus(v):
    """softplus(v) = log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)) (no overflow for large |v|), and v itself above
    20 (torch's threshold).  log1p(e) is computed as log(w) * e / (w - 1) with w = 1 + e rounded: the rounding error
    of w cancels in the ratio, so it stays accurate when e is tiny (and w == 1 exactly gives log1p(e) = e)."""
    e = tl.exp(-tl.abs(v))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p_e)


@triton.jit
def _split(cs):
    """float64 cs -> (hi, lo) float32 with hi = cs rounded and lo = cs - hi: hi + lo = cs to ~1e-16 relative, so a
    difference of two cumsums, (hi_i - hi_j) + (lo_i - lo_j), stays accurate when |cs| is large."""
    hi = cs.to(tl.float32)
    return hi, (cs - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _nonfinite(v):
    """True where v is NaN (the only value with v != v) or +-inf."""
    return (v != v) | (tl.abs(v.to(tl.float32)) == float("inf"))


@triton.jit
def _first_nonfinite_row(v, steps):
    """v [K, N], row k at step steps[k] -> the first step whose row holds a NaN / inf (2**31 - 1 if none)."""
    bad = tl.max(_nonfinite(v).to(tl.int32), axis=1) > 0
    return tl.min(tl.where(bad, steps, 2147483647), axis=0)
