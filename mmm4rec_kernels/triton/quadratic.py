"""Triton quadratic (attention-like) path of the time-aware SSD (TiSSD), for short sequences.

Token layout and math: ../CONTRACT.md.  Per sequence and head, with Delta, a, cs as in the contract:

    K_ij = (C_i . B_j) * exp(min(cs_i - cs_j, 0)) * Delta_j          (j <= i, both steps valid)
    y_i  = sum_j K_ij x_j + D * s_i * x_i                            (s_i = Delta_i or 1)

Kernels (BLOCK_L = next power of 2 >= max_len, at least 16; one block of 32 covers the paper's L = 20):
    _fwd_kernel   grid (sequence, head, P-block x row block).  Flash-style: a program owns BLOCK_T rows and walks
                  the column blocks up to the diagonal.  Discretization, C B^T, decay, K @ x and the skip are fused:
                  x, B, C, dt, E are read from HBM once (short L) and y is written once.
    _bwd_kernel   grid (sequence, head).  All BLOCK_L rows live in one tile; the program walks the column blocks
                  (BLOCK_J) and, per block, recomputes K, loops over P for dS = dy u^T and du = S^T dy, and finishes
                  dx, dB and everything per token (dDelta -> ddt, dE, and d a_t); dC accumulates over the blocks.
                  Heads that share a group write per-head dB/dC partials; dA, ddt_bias, dD are per-(sequence, head)
                  partials.  All partials are reduced with torch sums (deterministic, no atomics).

Numerics: cs is a float64 scan kept as hi + lo float32, so cs_i - cs_j = (hi_i - hi_j) + (lo_i - lo_j) stays
accurate after huge steps (E ~ 1e4); decays are exp of clamped differences, never exp(cs_i) * exp(-cs_j).
d a_t is summed directly over the pairs it touches (j < t <= i), without cancelling row/column sums.
Accumulation is float32; fp32 dots use input_precision="ieee" unless allow_tf32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import DOT_CODE, check_token_layout

__all__ = ["tissd_quadratic_fwd", "tissd_quadratic_bwd", "QUADRATIC_MAX_LEN"]

# Longest sequence these kernels accept: the rows of a whole sequence share one tile.  Longer: the chunked path.
QUADRATIC_MAX_LEN = 256

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# dot operand code: 0 = float32 (input_precision PRECISION), 1 = bfloat16, 2 = float16 (fp32 accumulation)


# ----------------------------------------------------------------------------------------------------------------
# autotune configs (one config under the interpreter)
# ----------------------------------------------------------------------------------------------------------------
def _configs(tile, block_ps, block_ts, warps):
    """Configs over BLOCK_P and the sequence tile `tile` (BLOCK_T rows/cols in the forward, BLOCK_J columns in the
    backward); _prune keeps the 16-warp ones for long sequences only."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_P": 64, tile: 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_P": bp, tile: bt}, num_warps=w, num_stages=s)
            for bp in block_ps for bt in block_ts for w in warps + (16,) for s in (1, 2)]


def _prune(configs, named_args, **kwargs):
    """Clamp tiles to the problem (sequence tile <= BLOCK_L, BLOCK_P <= P rounded up), drop duplicates, and keep
    16 warps only for long sequences (BLOCK_L >= 128), where the backward's full-row tiles need the registers."""
    args = {**named_args, **kwargs}
    bl, bp_max = args["BLOCK_L"], max(16, triton.next_power_of_2(args["P"]))
    kept, seen = [], set()
    for c in configs:
        (tile,) = [k for k in c.kwargs if k != "BLOCK_P"]
        bp, bt = min(c.kwargs["BLOCK_P"], bp_max), min(c.kwargs[tile], bl)
        key = (bp, bt, c.num_warps, c.num_stages)
        if key in seen or (c.num_warps == 16 and bl < 128):
            continue
        seen.add(key)
        kept.append(triton.Config({"BLOCK_P": bp, tile: bt}, num_warps=c.num_warps, num_stages=c.num_stages))
    return kept


_KEY = ["BLOCK_L", "H", "G", "P", "N", "DOT"]


# ----------------------------------------------------------------------------------------------------------------
# shared jit helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] -> float32 [M, N]; 16-bit inputs: operands rounded to that type (tensor cores)."""
    if DOT == 1:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == 2:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return out


@triton.jit
def _softplus(v):
    """softplus(v) = max(v, 0) + log1p(exp(-|v|)), = v above 20 (torch's threshold).
    log1p(e) is taken as log(w) * e / (w - 1) with w = 1 + e, exact also when e is tiny."""
    e = tl.exp(-tl.abs(v))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p_e)


@triton.jit
def _softplus_grad(v):
    """d softplus / dv = sigmoid(v) (exactly 1 above the threshold 20, as torch)."""
    e = tl.exp(-tl.abs(v))
    sig = tl.where(v >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
    return tl.where(v > 20.0, 1.0, sig)


@triton.jit
def _discretize(dt_ptr, E_ptr, bias_ptr, tok, ok, h, H, HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr,
                DT_SOFTPLUS: tl.constexpr):
    """Tokens tok [M] (int64) of head h -> (v, dt, E, Delta) [M] float32; Delta = 0 where not ok
    (padding neither decays nor writes).  v = dt * E + dt_bias, Delta = softplus(v) or v."""
    dt = tl.load(dt_ptr + tok * H + h, mask=ok, other=0.0).to(tl.float32)
    if HAS_E:
        E = tl.load(E_ptr + tok * H + h, mask=ok, other=0.0).to(tl.float32)
    else:
        E = tl.full(dt.shape, 1.0, tl.float32)
    v = dt * E
    if HAS_BIAS:
        v += tl.load(bias_ptr + h).to(tl.float32)
    if DT_SOFTPLUS:
        delta = _softplus(v)
    else:
        delta = v
    return v, dt, E, tl.where(ok, delta, 0.0)


@triton.jit
def _split(cs):
    """float64 cs -> (hi, lo) float32 with hi + lo = cs to ~1e-16 relative."""
    hi = cs.to(tl.float32)
    return hi, (cs - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _decay(hi_r, lo_r, rows, hi_c, lo_c, cols, col_ok):
    """M [BL, BJ] = exp(min(cs_i - cs_j, 0)) for j <= i and j valid, else 0; and the mask of the pairs j < i whose
    decay moves with a (unclamped difference: the clamp's gradient is 0, as torch's)."""
    diff = (hi_r[:, None] - hi_c[None, :]) + (lo_r[:, None] - lo_c[None, :])
    keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
    M = tl.where(keep, tl.exp(tl.minimum(diff, 0.0)), 0.0)
    return M, keep & (cols[None, :] < rows[:, None]) & (diff <= 0.0)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs("BLOCK_T", (32, 64, 128), (16, 32, 64), (4, 8)), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, D_ptr, start_ptr, len_ptr, y_ptr,
    H, G, N, MAX_LEN, PAD_TO, P: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, D_SKIP_DELTA: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """y [T, H, P] for one (sequence, head, P-block, block of BT rows): loops over the column blocks j0 <= i0.
    Rows [length, PAD_TO) get explicit zeros."""
    BT: tl.constexpr = BLOCK_T if BLOCK_T < BLOCK_L else BLOCK_L
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n_ib = tl.cdiv(MAX_LEN, BT)
    i0 = (tl.program_id(2) % n_ib) * BT
    rp = (tl.program_id(2) // n_ib) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = rp < P
    g = h // (H // G)
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    A = tl.load(A_ptr + h).to(tl.float32)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N

    # cs before row i0 (float64, summed block by block as the column loop below does)
    carry_r = tl.zeros([1], dtype=tl.float64).sum(axis=0)
    for j0 in range(0, BLOCK_L, BT):
        if j0 < i0:
            cols = j0 + tl.arange(0, BT)
            v_b, dt_b, E_b, delta_b = _discretize(dt_ptr, E_ptr, bias_ptr, start + cols, cols < length, h, H,
                                                  HAS_E, HAS_BIAS, DT_SOFTPLUS)
            carry_r += tl.sum((A * delta_b).to(tl.float64), axis=0)
    rows = i0 + tl.arange(0, BT)
    row_ok = rows < length
    tok_r = start + rows                                                            # [BT] int64
    v_r, dt_r, E_r, delta_r = _discretize(dt_ptr, E_ptr, bias_ptr, tok_r, row_ok, h, H, HAS_E, HAS_BIAS,
                                          DT_SOFTPLUS)
    hi_r, lo_r = _split(carry_r + tl.cumsum((A * delta_r).to(tl.float64), axis=0))  # cs_i
    C = tl.load(C_ptr + tok_r[:, None] * (G * N) + g * N + rn[None, :],
                mask=row_ok[:, None] & n_ok[None, :], other=0.0)                    # [BT, BN]

    acc = tl.zeros([BT, BLOCK_P], dtype=tl.float32)
    carry = tl.zeros([1], dtype=tl.float64).sum(axis=0)                             # cs before column j0
    for j0 in range(0, BLOCK_L, BT):                        # static bounds; blocks past i0 / the end skipped
        if (j0 <= i0) & (j0 < length):
            cols = j0 + tl.arange(0, BT)
            col_ok = cols < length
            tok_c = start + cols
            v_c, dt_c, E_c, delta_c = _discretize(dt_ptr, E_ptr, bias_ptr, tok_c, col_ok, h, H, HAS_E, HAS_BIAS,
                                                  DT_SOFTPLUS)
            a_c = (A * delta_c).to(tl.float64)
            hi_c, lo_c = _split(carry + tl.cumsum(a_c, axis=0))                     # cs_j
            carry += tl.sum(a_c, axis=0)

            Bj = tl.load(B_ptr + tok_c[:, None] * (G * N) + g * N + rn[None, :],
                         mask=col_ok[:, None] & n_ok[None, :], other=0.0)          # [BT, BN]
            M, flows = _decay(hi_r, lo_r, rows, hi_c, lo_c, cols, col_ok)           # [BT, BT]
            K = _dot(C, tl.trans(Bj), DOT, PRECISION) * M * delta_c[None, :]        # (C_i . B_j) M_ij Delta_j
            xj = tl.load(x_ptr + tok_c[:, None] * (H * P) + h * P + rp[None, :],
                         mask=col_ok[:, None] & p_ok[None, :], other=0.0)          # [BT, BP]
            acc += _dot(K, xj, DOT, PRECISION)
            if HAS_D:
                if j0 == i0:                                                        # diagonal block: y_i += D s_i x_i
                    if D_SKIP_DELTA:
                        acc += (Dh * delta_c)[:, None] * xj.to(tl.float32)
                    else:
                        acc += Dh * xj.to(tl.float32)

    # rows past the length hold exact zeros (C, x masked there): stored too when the caller asks (PAD_TO)
    y_ok = (rows < tl.maximum(length, PAD_TO))[:, None] & p_ok[None, :]
    tl.store(y_ptr + tok_r[:, None] * (H * P) + h * P + rp[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs("BLOCK_J", (32, 64, 128), (16, 32, 64), (4, 8)), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_kernel(
    dy_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, D_ptr, start_ptr, len_ptr,
    dx_ptr, ddt_ptr, dE_ptr, dB_ptr, dC_ptr, part_ptr,
    H, G, N, PAD_TO, P: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, D_SKIP_DELTA: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Per (sequence, head), with S_ij = (C_i . B_j) M_ij, u_j = Delta_j x_j, dS_ij = dy_i . u_j:
        dx_j = Delta_j (S^T dy)_j + D s_j dy_j       dC_i = sum_j dS_ij M_ij B_j       dB_j = sum_i dS_ij M_ij C_i
        da_t = sum_{i >= t > j} dS_ij S_ij           dDelta_j = (S^T dy)_j . x_j + A da_j (+ D x_j . dy_j)
    dB, dC go to [T, G, N] (group g), or to per-head partials [T, H, N] when PER_HEAD; part [3, nseq, H] gets
    the per-(sequence, head) sums of Delta da (dA), dv (ddt_bias) and s x . dy (dD).  Tokens [length, PAD_TO)
    get explicit zeros."""
    BJ: tl.constexpr = BLOCK_J if BLOCK_J < BLOCK_L else BLOCK_L
    ONE_BLOCK: tl.constexpr = BJ == BLOCK_L
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    nseq = tl.num_programs(0).to(tl.int64)
    g = h // (H // G)
    if PER_HEAD:                                            # heads share a group: per-head partial slots
        NBC = H
        slot = h
    else:
        NBC = G
        slot = g
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    fill = tl.maximum(length, PAD_TO)                       # tokens this program writes (zeros past length)
    A = tl.load(A_ptr + h).to(tl.float32)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N

    rows = tl.arange(0, BLOCK_L)
    row_ok = rows < length
    tok_r = start + rows
    v_r, dt_r, E_r, delta_r = _discretize(dt_ptr, E_ptr, bias_ptr, tok_r, row_ok, h, H, HAS_E, HAS_BIAS,
                                          DT_SOFTPLUS)
    hi_r, lo_r = _split(tl.cumsum((A * delta_r).to(tl.float64), axis=0))
    C = tl.load(C_ptr + tok_r[:, None] * (G * N) + g * N + rn[None, :],
                mask=row_ok[:, None] & n_ok[None, :], other=0.0)                    # [BL, BN]

    dC = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    w_before = tl.zeros([BLOCK_L], dtype=tl.float32)        # sum_{j < j0} W_ij  (W_ij = dS_ij S_ij)
    dA_acc = tl.zeros([1], dtype=tl.float32).sum(axis=0)
    dbias_acc = tl.zeros([1], dtype=tl.float32).sum(axis=0)
    dD_acc = tl.zeros([1], dtype=tl.float32).sum(axis=0)
    carry = tl.zeros([1], dtype=tl.float64).sum(axis=0)
    for j0 in range(0, BLOCK_L, BJ):                        # static bounds; blocks past the end are skipped
        if j0 < fill:
            cols = j0 + tl.arange(0, BJ)
            col_ok = cols < length
            col_out = cols < fill
            tok_c = start + cols
            v_c, dt_c, E_c, delta_c = _discretize(dt_ptr, E_ptr, bias_ptr, tok_c, col_ok, h, H, HAS_E, HAS_BIAS,
                                                  DT_SOFTPLUS)
            a_c = (A * delta_c).to(tl.float64)
            hi_c, lo_c = _split(carry + tl.cumsum(a_c, axis=0))
            carry += tl.sum(a_c, axis=0)

            Bj = tl.load(B_ptr + tok_c[:, None] * (G * N) + g * N + rn[None, :],
                         mask=col_ok[:, None] & n_ok[None, :], other=0.0)          # [BJ, BN]
            M, flows = _decay(hi_r, lo_r, rows, hi_c, lo_c, cols, col_ok)
            S = _dot(C, tl.trans(Bj), DOT, PRECISION) * M                           # [BL, BJ]

            # P loop: dS = dy u^T needs all of P; du = S^T dy (-> dx, dDelta) is done per P-block
            dS = tl.zeros([BLOCK_L, BJ], dtype=tl.float32)
            ddelta_c = tl.zeros([BJ], dtype=tl.float32)
            for p0 in range(0, P, BLOCK_P):
                rp = p0 + tl.arange(0, BLOCK_P)
                p_ok = rp < P
                dyi = tl.load(dy_ptr + tok_r[:, None] * (H * P) + h * P + rp[None, :],
                              mask=row_ok[:, None] & p_ok[None, :], other=0.0)     # [BL, BP]
                xj_off = tok_c[:, None] * (H * P) + h * P + rp[None, :]
                xj_ok = col_ok[:, None] & p_ok[None, :]
                xj = tl.load(x_ptr + xj_off, mask=xj_ok, other=0.0).to(tl.float32)  # [BJ, BP]
                dS += _dot(dyi, tl.trans(xj * delta_c[:, None]), DOT, PRECISION)
                du = _dot(tl.trans(S), dyi, DOT, PRECISION)                         # [BJ, BP]
                dxj = du * delta_c[:, None]
                ddelta_c += tl.sum(du * xj, axis=1)
                if HAS_D:
                    if ONE_BLOCK:
                        dyj = dyi.to(tl.float32)
                    else:
                        dyj = tl.load(dy_ptr + xj_off, mask=xj_ok, other=0.0).to(tl.float32)
                    xdy = tl.sum(xj * dyj, axis=1)                                  # x_j . dy_j  [BJ]
                    if D_SKIP_DELTA:
                        dxj += (Dh * delta_c)[:, None] * dyj
                        dD_acc += tl.sum(delta_c * xdy, axis=0)
                        ddelta_c += Dh * xdy
                    else:
                        dxj += Dh * dyj
                        dD_acc += tl.sum(xdy, axis=0)
                tl.store(dx_ptr + xj_off, dxj.to(dx_ptr.dtype.element_ty), mask=col_out[:, None] & p_ok[None, :])

            # B, C through C_i . B_j
            dCB = dS * M
            dC += _dot(dCB, Bj, DOT, PRECISION)                                     # [BL, BN]
            dBj = _dot(tl.trans(dCB), C, DOT, PRECISION)                            # [BJ, BN]
            tl.store(dB_ptr + tok_c[:, None] * (NBC * N) + slot * N + rn[None, :],
                     dBj.to(dB_ptr.dtype.element_ty), mask=col_out[:, None] & n_ok[None, :])

            # a_t moves seg_ij for j < t <= i:  da_t = sum_{i >= t} sum_{j < t} W_ij  (t in this block)
            W = tl.where(flows, dS * S, 0.0)
            w_lt = w_before[:, None] + (tl.cumsum(W, axis=1) - W)                   # [BL, BJ] sum_{j < t} W_ij
            da_c = tl.sum(tl.where(rows[:, None] >= cols[None, :], w_lt, 0.0), axis=0)
            w_before += tl.sum(W, axis=1)

            # per token: dDelta -> dv -> ddt, dE, ddt_bias; dA = sum_t Delta_t da_t
            ddelta_c += A * da_c
            dA_acc += tl.sum(delta_c * da_c, axis=0)
            if DT_SOFTPLUS:
                dv = ddelta_c * _softplus_grad(v_c)
            else:
                dv = ddelta_c
            dv = tl.where(col_ok, dv, 0.0)
            dbias_acc += tl.sum(dv, axis=0)
            tl.store(ddt_ptr + tok_c * H + h, dv * E_c, mask=col_out)
            if HAS_E:
                tl.store(dE_ptr + tok_c * H + h, dv * dt_c, mask=col_out)

    tl.store(dC_ptr + tok_r[:, None] * (NBC * N) + slot * N + rn[None, :],
             dC.to(dC_ptr.dtype.element_ty), mask=(rows < fill)[:, None] & n_ok[None, :])
    part = seq * H + h
    tl.store(part_ptr + part, dA_acc)
    tl.store(part_ptr + nseq * H + part, dbias_acc)
    tl.store(part_ptr + 2 * nseq * H + part, dD_acc)


# ----------------------------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------------------------
def _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, dy=None):
    """Validate the token layout (CONTRACT.md) and this path's limits; returns (T, H, P, G, N, nseq)."""
    T, H, P, G, N, nseq = check_token_layout(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, dy,
                                             where="the triton quadratic path")
    if N > 256:
        raise ValueError(f"the triton quadratic path supports d_state n <= 256, got {N}")
    if max_len > QUADRATIC_MAX_LEN:
        raise ValueError(f"the triton quadratic path holds a whole sequence in one tile and supports "
                         f"max_len <= {QUADRATIC_MAX_LEN}, got {max_len}: use the chunked path (tissd_chunked_fwd)")
    for name, t in (("x", x), ("B", B), ("C", C), ("dt", dt), ("E", E), ("dy", dy)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if H > 65535:
        raise ValueError(f"at most 65535 heads (grid axis 1), got H={H}")
    return T, H, P, G, N, nseq


def _meta(x, max_len, N, E, dt_bias, D, d_skip_delta, dt_softplus, allow_tf32):
    return dict(HAS_E=E is not None, HAS_BIAS=dt_bias is not None, HAS_D=D is not None,
                D_SKIP_DELTA=bool(d_skip_delta), DT_SOFTPLUS=bool(dt_softplus), DOT=DOT_CODE[x.dtype],
                PRECISION="tf32" if allow_tf32 else "ieee",
                BLOCK_L=max(16, triton.next_power_of_2(max_len)), BLOCK_N=max(16, triton.next_power_of_2(N)))


def _alloc(padded, T, nseq, max_len):
    """Output allocator: torch.empty when the kernels write every token themselves (padded layout), else zeros."""
    if padded and T != nseq * max_len:
        raise ValueError(f"padded=True needs the right-padded layout T = nseq * max_len, got T={T}, "
                         f"nseq={nseq}, max_len={max_len}")
    return torch.empty if padded else torch.zeros


def tissd_quadratic_fwd(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                        d_skip_delta: bool, dt_softplus: bool, allow_tf32: bool = False, padded: bool = False):
    """Fused quadratic forward on the token layout (CONTRACT.md).

    x [T, H, P], dt [T, H], A [H], B/C [T, G, n], E [T, H] or None, dt_bias [H] or None, D [H] or None,
    seq_start [nseq] int64, seq_len [nseq] int32, max_len >= every seq_len (<= QUADRATIC_MAX_LEN; not checked on
    the device).  padded=True: the caller guarantees seq_start = arange(nseq) * max_len (T = nseq * max_len), so the
    kernel writes the padding zeros itself instead of a separate memset.
    Returns y [T, H, P] in x's dtype, 0 on padding tokens."""
    T, H, P, G, N, nseq = _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len)
    y = _alloc(padded, T, nseq, max_len)(x.shape, dtype=x.dtype, device=x.device)
    if nseq == 0 or T == 0 or max_len == 0:
        return y
    meta = _meta(x, max_len, N, E, dt_bias, D, d_skip_delta, dt_softplus, allow_tf32)
    n_ib = lambda m: triton.cdiv(max_len, min(m["BLOCK_T"], m["BLOCK_L"]))  # noqa: E731  row blocks
    grid = lambda m: (nseq, H, n_ib(m) * triton.cdiv(P, m["BLOCK_P"]))  # noqa: E731
    _fwd_kernel[grid](x, dt, A, B, C, dt if E is None else E, A if dt_bias is None else dt_bias,
                      A if D is None else D, seq_start, seq_len, y, H, G, N, max_len, max_len if padded else 0, P,
                      **meta)
    return y


def tissd_quadratic_bwd(dy, x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                        d_skip_delta: bool, dt_softplus: bool, allow_tf32: bool = False, padded: bool = False):
    """Backward of `tissd_quadratic_fwd` (recomputes everything from the inputs; no saved intermediates).

    dy [T, H, P] (cast to x's dtype).  Returns (dx, ddt, dA, dB, dC, dE, ddt_bias, dD): dx, dB, dC in x's dtype,
    the rest float32; None for an input that was None.  Padding tokens get zero gradients.  One kernel launch;
    when heads share a group (G < H) dB/dC are per-head float32 partials summed here, and dA, ddt_bias, dD are
    summed from per-(sequence, head) partials (deterministic)."""
    dy = dy.to(x.dtype).contiguous()
    T, H, P, G, N, nseq = _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, dy)
    new = _alloc(padded, T, nseq, max_len)
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = new(x.shape, dtype=x.dtype, device=x.device)
    ddt = new((T, H), **f32)
    dE = new((T, H), **f32) if E is not None else None
    part = torch.zeros(3, nseq, H, **f32)          # per (sequence, head): dA, ddt_bias, dD
    shared = H != G
    if shared:
        dB, dC = new((T, H, N), **f32), new((T, H, N), **f32)
    else:
        dB, dC = new(B.shape, dtype=B.dtype, device=x.device), new(C.shape, dtype=C.dtype, device=x.device)
    if nseq > 0 and T > 0 and max_len > 0:
        meta = _meta(x, max_len, N, E, dt_bias, D, d_skip_delta, dt_softplus, allow_tf32)
        _bwd_kernel[(nseq, H)](dy, x, dt, A, B, C, dt if E is None else E, A if dt_bias is None else dt_bias,
                               A if D is None else D, seq_start, seq_len,
                               dx, ddt, ddt if dE is None else dE, dB, dC, part,
                               H, G, N, max_len if padded else 0, P, PER_HEAD=shared, **meta)
    if shared:
        dB = dB.view(T, G, H // G, N).sum(2).to(x.dtype)
        dC = dC.view(T, G, H // G, N).sum(2).to(x.dtype)
    dA, dbias, dD = part.sum(1)
    return (dx, ddt, dA, dB, dC, dE, dbias if dt_bias is not None else None, dD if D is not None else None)
