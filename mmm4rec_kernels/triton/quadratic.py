"""Triton quadratic (attention-like) path of the time-aware SSD (TiSSD), for short sequences.

Token layout and math: ../CONTRACT.md.  Per sequence and head, with Delta, a, cs as in the contract:

    K_ij = (C_i . B_j) * exp(min(cs_i - cs_j, 0)) * Delta_j          (j <= i, both steps valid)
    y_i  = sum_j K_ij x_j + D * s_i * x_i                            (s_i = Delta_i or 1)

Kernels (BLOCK_L = next power of 2 >= max_len, at least 16; one block of 32 covers the paper's L = 20; launch
configs pinned per shape class in configs.py, from the offline sm_90 table tools/offline_sm90.py):
    _fwd_kernel   1-d grid, (sequence, head) major, row block fastest.  Flash-style: a program owns BLOCK_T rows
                  and one P-block and walks the column blocks up to the diagonal.  Discretization, C B^T, decay,
                  K @ x and the skip are fused: x, B, C, dt, E are read from HBM once (short L), y written once.
    _bwd_fused_kernel  grid (sequence, head), short sequences (uses_fused_bwd).  All BLOCK_L rows live in one tile;
                  the program walks the column blocks (BLOCK_J) and, per block, recomputes K, loops over P for
                  dS = dy u^T and du = S^T dy, and finishes dx, dB and everything per token (dDelta -> ddt, dE,
                  d a_t); dC accumulates over the blocks.
    split backward (longer sequences, wide heads), no program holds a whole sequence:
      _bwd_dx_kernel  column blocks x P-blocks, walking the row blocks at or below the diagonal (masked blocks
                      skipped): du = S^T dy -> dx, per-P-block dDelta partials, dB (P-block 0).
      _bwd_dc_kernel  row blocks walking the column blocks up to the diagonal, dy kept on chip when P <= BLOCK_P:
                      dS = dy u^T -> dC, this row block's share of d a_t.
      _bwd_dt_kernel  per (sequence, head): sums the partials, dDelta -> ddt, dE; dA, ddt_bias, dD partials.
    Heads that share a group write per-head dB/dC partials; dA, ddt_bias, dD are per-(sequence, head) partials.
    All partials are reduced with sums (deterministic, no atomics).

Numerics: cs is a float64 scan kept as hi + lo float32, so cs_i - cs_j = (hi_i - hi_j) + (lo_i - lo_j) stays
accurate after huge steps (E ~ 1e4); decays are exp of clamped differences, never exp(cs_i) * exp(-cs_j).
d a_t is summed directly over the pairs it touches (j < t <= i), without cancelling row/column sums.
Accumulation is float32; fp32 dots use input_precision="ieee" (exact) unless allow_tf32 ("tf32", tensor cores);
fp32_precision= overrides.  dt, E, A, dt_bias, D may be any float dtype (cast on load).

Non-finite inputs: a NaN / inf at valid step t of a sequence reaches only its outputs at steps >= t (and the
gradients that flow from them), and padding stays exactly 0.  Masks are selects (tl.where), never products with 0:
the decay and score tiles, and in the backward C B^T M's gradient.  A dot over steps still meets masked zeros
(0 * inf = NaN): in the forward the columns of a row block end at the first step of its own block with a bad x (the
rows from there on are set to NaN; a bad x_j below the diagonal pairs with every row of the block anyway); in the
backward dC_i = sum_j dCB_ij B_j reads B as 0 from the first step t with a NaN / inf B on (found by a min-reduction
over B: in the fused kernel before its column loop, for the split passes in _live_len_kernel) and sets the rows
i >= t of dC to NaN, so the rows before t are exact; a bad C_t meets the masked zeros of the columns j > t in
dB_j and dx_j (steps >= t), and the columns past the live prefix (padding) are stored as exact zeros.  The backward
runs on the live prefix of each (sequence, head): rows after the last one with a nonzero dy have exact-zero
gradients and are not processed, so a loss over the rows before t gets exactly the gradients of the run without the
bad value (no 0 * NaN), its parameters' included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..limits import QUADRATIC_MAX_LEN
from . import configs
from .common import _dot, _first_nonfinite_row, _nonfinite, _softplus, _split
from .layout import DOT_CODE, check_token_layout

__all__ = ["tissd_quadratic_fwd", "tissd_quadratic_bwd", "QUADRATIC_MAX_LEN", "fp32_precision_of"]

# QUADRATIC_MAX_LEN (limits.py): the longest sequence these kernels accept, the rows of a whole sequence share one
# tile.  Longer: the chunked path.

_KEY = ["BLOCK_L", "H", "G", "P", "N", "DOT", "PRECISION"]

# dot operand code DOT: see common.py (_dot, _softplus, _split, _nonfinite are shared with chunked.py)


# ----------------------------------------------------------------------------------------------------------------
# jit helpers of this path (the ones shared with chunked.py are in common.py)
# ----------------------------------------------------------------------------------------------------------------
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
def _decay(hi_r, lo_r, rows, row_ok, hi_c, lo_c, cols, col_ok):
    """keep [BL, BJ]: the pairs j <= i with both steps valid; M = exp(min(cs_i - cs_j, 0)) on them and exactly 0
    elsewhere (selected, never multiplied in: a NaN / inf in cs after a non-finite step stays in the pairs it belongs
    to); flows: the pairs j < i whose decay moves with a (unclamped difference: the clamp's gradient is 0, as
    torch's).  Returns (M, keep, flows)."""
    diff = (hi_r[:, None] - hi_c[None, :]) + (lo_r[:, None] - lo_c[None, :])
    keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :] & row_ok[:, None]
    M = tl.where(keep, tl.exp(tl.minimum(diff, 0.0)), 0.0)
    return M, keep, keep & (cols[None, :] < rows[:, None]) & (diff <= 0.0)


@triton.jit
def _first_bad_b(B_ptr, tok, ok, steps, g, G, N, BLOCK_N: tl.constexpr):
    """The first of the steps (tokens tok where ok) whose B row (group g) holds a NaN / inf; 2**31 - 1 if none."""
    rn = tl.arange(0, BLOCK_N)
    Bt = tl.load(B_ptr + tok[:, None] * (G * N) + g * N + rn[None, :], mask=ok[:, None] & (rn < N)[None, :],
                 other=0.0)
    return _first_nonfinite_row(Bt, steps)


@triton.jit
def _live_rows(dy_ptr, tok, ok, h, H, P: tl.constexpr, BLOCK_P: tl.constexpr):
    """[M] int32: 1 where the output row has a nonzero (or NaN) gradient in some of its P channels, over tokens tok."""
    live = tl.zeros(tok.shape, dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        dyt = tl.load(dy_ptr + tok[:, None] * (H * P) + h * P + rp[None, :], mask=ok[:, None] & (rp < P)[None, :],
                      other=0.0)
        live = tl.maximum(live, tl.max((dyt != 0.0).to(tl.int32), axis=1))
    return live


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@configs.autotune("quadratic_fwd", key=_KEY)
@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, D_ptr, start_ptr, len_ptr, y_ptr,
    H, G, N, MAX_LEN, PAD_TO, P: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, D_SKIP_DELTA: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """y [T, H, P] for one (sequence, head, P-block, block of BT rows): loops over the column blocks j0 <= i0.
    Rows [length, PAD_TO) get explicit zeros.  1-d grid, row block fastest, then P-block, head, sequence: the
    programs of one (sequence, head) are neighbours and share B, C, x in L2."""
    BT: tl.constexpr = BLOCK_T if BLOCK_T < BLOCK_L else BLOCK_L
    pid = tl.program_id(0)
    n_ib = tl.cdiv(MAX_LEN, BT)
    n_pb: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    i0 = (pid % n_ib) * BT
    p_base = ((pid // n_ib) % n_pb) * BLOCK_P
    rp = p_base + tl.arange(0, BLOCK_P)
    h = (pid // (n_ib * n_pb)) % H
    seq = (pid // (n_ib * n_pb * H)).to(tl.int64)
    p_ok = rp < P
    g = h // (H // G)
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    A = tl.load(A_ptr + h).to(tl.float32)
    Dh = A                                                  # unused without D
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

    # NaN / inf in x: in the diagonal block a bad x_j meets the masked zeros of K (rows i < j, padding): 0 * inf =
    # NaN would reach the rows before j.  So the columns end at the first bad step of this row block (this P-block)
    # and the rows from that step on are set to NaN at the end (non-finite may reach those): the rows before it are
    # exact (they pair with columns before it only).  Below the diagonal a bad x_j pairs with every row of the
    # block (j < i), which it may reach.
    first = tl.full([1], 2147483647, tl.int32).min(axis=0)
    XC: tl.constexpr = 32 if BLOCK_P > 32 else BLOCK_P
    x_rows = x_ptr + (start + i0) * (H * P) + h * P + p_base  # the diagonal block's x (this P-block)
    for q0 in range(0, BLOCK_P, XC):                        # XC channels at a time, flat: few registers
        e = tl.arange(0, BT * XC)
        ok = (i0 + e // XC < length) & (p_base + q0 + e % XC < P)
        xq = tl.load(x_rows + (e // XC) * (H * P) + q0 + e % XC, mask=ok, other=0.0)
        first = tl.minimum(first, tl.min(tl.where(_nonfinite(xq), i0 + e // XC, 2147483647), axis=0))

    lim = tl.minimum(length, first)                         # the columns read (rows from `first` on: NaN below)
    acc = tl.zeros([BT, BLOCK_P], dtype=tl.float32)
    carry = tl.zeros([1], dtype=tl.float64).sum(axis=0)                             # cs before column j0
    for j0 in range(0, BLOCK_L, BT):                        # static bounds; blocks past i0 / the end skipped
        if (j0 <= i0) & (j0 < lim):
            cols = j0 + tl.arange(0, BT)
            col_ok = cols < lim
            tok_c = start + cols
            v_c, dt_c, E_c, delta_c = _discretize(dt_ptr, E_ptr, bias_ptr, tok_c, col_ok, h, H, HAS_E, HAS_BIAS,
                                                  DT_SOFTPLUS)
            a_c = (A * delta_c).to(tl.float64)
            hi_c, lo_c = _split(carry + tl.cumsum(a_c, axis=0))                     # cs_j
            carry += tl.sum(a_c, axis=0)

            Bj = tl.load(B_ptr + tok_c[:, None] * (G * N) + g * N + rn[None, :],
                         mask=col_ok[:, None] & n_ok[None, :], other=0.0)          # [BT, BN]
            M, keep, flows = _decay(hi_r, lo_r, rows, row_ok, hi_c, lo_c, cols, col_ok)  # [BT, BT]
            # (C_i . B_j) M_ij Delta_j on the kept pairs, selected: a NaN / inf in B_j or Delta_j stays in column j
            K = tl.where(keep, _dot(C, tl.trans(Bj), DOT, PRECISION) * M * delta_c[None, :], 0.0)
            xj = tl.load(x_ptr + tok_c[:, None] * (H * P) + h * P + rp[None, :],
                         mask=col_ok[:, None] & p_ok[None, :], other=0.0)          # [BT, BP]
            acc += _dot(K, xj, DOT, PRECISION)
            if HAS_D:
                if j0 == i0:                                                        # diagonal block: y_i += D s_i x_i
                    if D_SKIP_DELTA:
                        acc += (Dh * delta_c)[:, None] * xj.to(tl.float32)
                    else:
                        acc += Dh * xj.to(tl.float32)

    # rows from `first` on: NaN; padded rows: exactly 0 (K's zero rows may have met a bad x_j below the diagonal)
    # (narrow P-blocks: only when some row needs it, a bad step or padding; that branch cost registers elsewhere)
    if BLOCK_P > 32:
        acc = tl.where((row_ok & (rows < first))[:, None], acc, tl.where(row_ok, float("nan"), 0.0)[:, None])
    elif (first < 2147483647) | (i0 + BT > length):
        acc = tl.where((row_ok & (rows < first))[:, None], acc, tl.where(row_ok, float("nan"), 0.0)[:, None])

    # rows past the length are stored too (zeros) when the caller asks (PAD_TO)
    y_ok = (rows < tl.maximum(length, PAD_TO))[:, None] & p_ok[None, :]
    tl.store(y_ptr + tok_r[:, None] * (H * P) + h * P + rp[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@configs.autotune("quadratic_bwd_fused", key=_KEY)
@triton.jit
def _bwd_fused_kernel(
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
    get explicit zeros.
    Strong zeros of dy: the rows after the last one with a nonzero dy contribute exactly nothing, so everything runs
    on the prefix of the sequence that ends there (`length` below); a NaN / inf at a later step never meets a 0 of
    dy (0 * NaN), so a loss that reads rows < t only gets finite, exact gradients past a non-finite input at t."""
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
    length = tl.max(tl.where(_live_rows(dy_ptr, start + rows, rows < length, h, H, P, BLOCK_P) > 0, rows + 1, 0),
                    axis=0)                                 # the live prefix (tokens past it are written as zeros)
    row_ok = rows < length
    tok_r = start + rows
    # B is read as 0 from its first step with a NaN / inf on: dC_i = sum_j dCB_ij B_j would meet the masked zeros of
    # the rows i < t; the rows of dC from that step on are set to NaN at the end
    first_b = _first_bad_b(B_ptr, tok_r, row_ok, rows, g, G, N, BLOCK_N)
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
                         mask=(col_ok & (cols < first_b))[:, None] & n_ok[None, :], other=0.0)   # [BJ, BN]
            M, keep, flows = _decay(hi_r, lo_r, rows, row_ok, hi_c, lo_c, cols, col_ok)
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
                # steps past the live prefix: exactly 0 (a bad C_t meets their masked zeros in S)
                tl.store(dx_ptr + xj_off, tl.where(col_ok[:, None], dxj, 0.0).to(dx_ptr.dtype.element_ty),
                         mask=col_out[:, None] & p_ok[None, :])

            # B, C through C_i . B_j
            dCB = tl.where(keep, dS * M, 0.0)                   # selected: a NaN / inf u_j stays in column j
            dC += _dot(dCB, Bj, DOT, PRECISION)                                     # [BL, BN]
            # a NaN / inf C_t meets the masked zeros of the columns j > t: steps >= t, but the ones past the live
            # prefix (padding) are stored as exact zeros
            dBj = tl.where(col_ok[:, None], _dot(tl.trans(dCB), C, DOT, PRECISION), 0.0)  # [BJ, BN]
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

    # rows outside the live prefix: exactly 0; rows from the first bad B step on: NaN
    dC = tl.where(row_ok[:, None], tl.where((rows < first_b)[:, None], dC, float("nan")), 0.0)
    tl.store(dC_ptr + tok_r[:, None] * (NBC * N) + slot * N + rn[None, :],
             dC.to(dC_ptr.dtype.element_ty), mask=(rows < fill)[:, None] & n_ok[None, :])
    part = seq * H + h
    tl.store(part_ptr + part, dA_acc)
    tl.store(part_ptr + nseq * H + part, dbias_acc)
    tl.store(part_ptr + 2 * nseq * H + part, dD_acc)


# ----------------------------------------------------------------------------------------------------------------
# backward, split into passes (long sequences, wide heads): no program holds a whole sequence
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _cs_before(dt_ptr, E_ptr, bias_ptr, start, length, h, H, A, stop, HAS_E: tl.constexpr,
               HAS_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr, BK: tl.constexpr):
    """cs before step `stop` (float64 sum of a_t, t < stop), summed in blocks of BK (stop a multiple of BK)."""
    carry = tl.zeros([1], dtype=tl.float64).sum(axis=0)
    for k0 in range(0, BLOCK_L, BK):
        if k0 < stop:
            kk = k0 + tl.arange(0, BK)
            v_k, dt_k, E_k, delta_k = _discretize(dt_ptr, E_ptr, bias_ptr, start + kk, kk < length, h, H, HAS_E,
                                                  HAS_BIAS, DT_SOFTPLUS)
            carry += tl.sum((A * delta_k).to(tl.float64), axis=0)
    return carry


@triton.jit
def _live_len_kernel(dy_ptr, B_ptr, start_ptr, len_ptr, live_ptr, H, G, N, P: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """live[0, seq, h] = 1 + the last step whose dy row (head h) has a nonzero (or NaN) entry, 0 if none: the split
    backward runs on that prefix.  Output rows past it have a zero gradient, so they contribute exactly nothing (the
    strong zero), and a NaN / inf input at a later step never meets a 0 of dy (0 * NaN).
    live[1, seq, h] = the first step whose B row (head h's group) holds a NaN / inf, 2**31 - 1 if none (the row
    pass reads B as 0 from there on and sets those rows of dC to NaN)."""
    pid = tl.program_id(0)
    h = pid % H
    seq = (pid // H).to(tl.int64)
    g = h // (H // G)
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    live = tl.zeros([1], dtype=tl.int32).sum(axis=0)
    first_b = tl.full([1], 2147483647, tl.int32).min(axis=0)
    for r0 in range(0, BLOCK_L, BLOCK_R):                   # static bounds; blocks past the end skipped
        if r0 < length:
            rows = r0 + tl.arange(0, BLOCK_R)
            flag = _live_rows(dy_ptr, start + rows, rows < length, h, H, P, BLOCK_P)
            live = tl.maximum(live, tl.max(tl.where(flag > 0, rows + 1, 0), axis=0))
            first_b = tl.minimum(first_b, _first_bad_b(B_ptr, start + rows, rows < length, rows, g, G, N, BLOCK_N))
    tl.store(live_ptr + pid, live)
    tl.store(live_ptr + tl.num_programs(0) + pid, first_b)


@configs.autotune("quadratic_bwd_dx", key=_KEY)
@triton.jit(do_not_specialize=["T"])  # T.to(int64): never the constexpr 1
def _bwd_dx_kernel(
    dy_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, D_ptr, start_ptr, len_ptr, live_ptr,
    dx_ptr, dB_ptr, ddelta_ptr, dD_ptr,
    T, H, G, N, MAX_LEN, PAD_TO, P: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, D_SKIP_DELTA: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Column pass, one program per (sequence, head, column block J of BJ steps, P-block), walking the row blocks
    I that reach J (fully masked causal blocks skipped), with S^T_ji = (B_j . C_i) M_ij:
        du_j = sum_i S^T_ji dy_i  ->  dx_j = Delta_j du_j + D s_j dy_j ;  ddelta[pb, j] = du_j . x_j (+ D x_j . dy_j)
        dB_j = sum_i (u_j . dy_i) M_ij C_i        (P-block 0 only; it loops over P when P > BLOCK_P)
    dD[program] = sum_j s_j x_j . dy_j over its P-block.  Tokens [length, PAD_TO) get explicit zeros (dx, dB).
    Runs on the live prefix live[seq, h] (rows past the last nonzero dy add exactly nothing: _live_len_kernel)."""
    BI: tl.constexpr = BLOCK_I if BLOCK_I < BLOCK_L else BLOCK_L
    BJ: tl.constexpr = BLOCK_J if BLOCK_J < BLOCK_L else BLOCK_L
    n_pb: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    ONE_P: tl.constexpr = n_pb == 1
    pid = tl.program_id(0)
    n_jb = tl.cdiv(MAX_LEN, BJ)
    pb = pid % n_pb
    j0 = ((pid // n_pb) % n_jb) * BJ
    h = (pid // (n_pb * n_jb)) % H
    seq = (pid // (n_pb * n_jb * H)).to(tl.int64)
    g = h // (H // G)
    if PER_HEAD:                                            # heads share a group: per-head partial slots
        NBC = H
        slot = h
    else:
        NBC = G
        slot = g
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    fill = tl.maximum(length, PAD_TO)
    length = tl.load(live_ptr + seq * H + h)                # the live prefix: everything past it is exactly 0
    A = tl.load(A_ptr + h).to(tl.float32)
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = rp < P

    cols = j0 + tl.arange(0, BJ)
    col_ok = cols < length
    tok_c = start + cols
    v_c, dt_c, E_c, delta_c = _discretize(dt_ptr, E_ptr, bias_ptr, tok_c, col_ok, h, H, HAS_E, HAS_BIAS,
                                          DT_SOFTPLUS)
    carry = _cs_before(dt_ptr, E_ptr, bias_ptr, start, length, h, H, A, j0, HAS_E, HAS_BIAS, DT_SOFTPLUS,
                       BLOCK_L, BJ)
    cs_c = carry + tl.cumsum((A * delta_c).to(tl.float64), axis=0)
    hi_c, lo_c = _split(cs_c)
    Bj = tl.load(B_ptr + tok_c[:, None] * (G * N) + g * N + rn[None, :],
                 mask=col_ok[:, None] & n_ok[None, :], other=0.0)                  # [BJ, BN]
    x_off = tok_c[:, None] * (H * P) + h * P + rp[None, :]
    xp_ok = col_ok[:, None] & p_ok[None, :]
    xj = tl.load(x_ptr + x_off, mask=xp_ok, other=0.0).to(tl.float32)             # [BJ, BP]
    uj = xj * delta_c[:, None]                                                     # Delta_j x_j

    du = tl.zeros([BJ, BLOCK_P], dtype=tl.float32)
    dB = tl.zeros([BJ, BLOCK_N], dtype=tl.float32)
    carry_r = tl.zeros([1], dtype=tl.float64).sum(axis=0)                          # cs before row block i0
    for i0 in range(0, BLOCK_L, BI):                        # static bounds; rows past the end skipped
        if i0 < length:
            rows = i0 + tl.arange(0, BI)
            row_ok = rows < length
            tok_r = start + rows
            v_r, dt_r, E_r, delta_r = _discretize(dt_ptr, E_ptr, bias_ptr, tok_r, row_ok, h, H, HAS_E, HAS_BIAS,
                                                  DT_SOFTPLUS)
            a_r = (A * delta_r).to(tl.float64)
            if (i0 + BI > j0) & (j0 < length):              # block (I, J) has pairs j <= i
                hi_r, lo_r = _split(carry_r + tl.cumsum(a_r, axis=0))
                Ci = tl.load(C_ptr + tok_r[:, None] * (G * N) + g * N + rn[None, :],
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0)      # [BI, BN]
                diff = (hi_r[None, :] - hi_c[:, None]) + (lo_r[None, :] - lo_c[:, None])
                keep = (cols[:, None] <= rows[None, :]) & col_ok[:, None]
                MT = tl.where(keep, tl.exp(tl.minimum(diff, 0.0)), 0.0)              # [BJ, BI] M_ij transposed
                ST = _dot(Bj, tl.trans(Ci), DOT, PRECISION) * MT                    # S^T [BJ, BI]
                dyi = tl.load(dy_ptr + tok_r[:, None] * (H * P) + h * P + rp[None, :],
                              mask=row_ok[:, None] & p_ok[None, :], other=0.0)      # [BI, BP]
                du += _dot(ST, dyi, DOT, PRECISION)
                if ONE_P:                                   # dS^T = u_j . dy_i from the tiles at hand
                    dB += _dot(_dot(uj, tl.trans(dyi), DOT, PRECISION) * MT, Ci, DOT, PRECISION)
                else:
                    if pb == 0:
                        dST = tl.zeros([BJ, BI], dtype=tl.float32)
                        for p0 in range(0, P, BLOCK_P):
                            rq = p0 + tl.arange(0, BLOCK_P)
                            q_ok = rq < P
                            xq = tl.load(x_ptr + tok_c[:, None] * (H * P) + h * P + rq[None, :],
                                         mask=col_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)
                            dyq = tl.load(dy_ptr + tok_r[:, None] * (H * P) + h * P + rq[None, :],
                                          mask=row_ok[:, None] & q_ok[None, :], other=0.0)
                            dST += _dot(xq * delta_c[:, None], tl.trans(dyq), DOT, PRECISION)
                        dB += _dot(dST * MT, Ci, DOT, PRECISION)
            carry_r += tl.sum(a_r, axis=0)

    dxj = du * delta_c[:, None]
    pdelta = tl.sum(du * xj, axis=1)                                               # du_j . x_j (this P-block)
    dD_acc = tl.zeros([1], dtype=tl.float32).sum(axis=0)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
        dyj = tl.load(dy_ptr + x_off, mask=xp_ok, other=0.0).to(tl.float32)
        xdy = tl.sum(xj * dyj, axis=1)                                             # x_j . dy_j
        if D_SKIP_DELTA:
            dxj += (Dh * delta_c)[:, None] * dyj
            pdelta += Dh * xdy
            dD_acc += tl.sum(delta_c * xdy, axis=0)
        else:
            dxj += Dh * dyj
            dD_acc += tl.sum(xdy, axis=0)
    col_out = cols < fill
    # steps past the live prefix (padding): exactly 0 (a NaN / inf C_t of a row block meets the masked zeros of S^T
    # and of MT in the columns j > t of the same blocks: steps >= t, but padding stays 0)
    dxj = tl.where(col_ok[:, None], dxj, 0.0)
    tl.store(dx_ptr + x_off, dxj.to(dx_ptr.dtype.element_ty), mask=col_out[:, None] & p_ok[None, :])
    tl.store(ddelta_ptr + (T.to(tl.int64) * pb + tok_c) * H + h, pdelta, mask=col_ok)
    tl.store(dD_ptr + pid, dD_acc)
    if pb == 0:
        tl.store(dB_ptr + tok_c[:, None] * (NBC * N) + slot * N + rn[None, :],
                 tl.where(col_ok[:, None], dB, 0.0).to(dB_ptr.dtype.element_ty), mask=col_out[:, None] & n_ok[None, :])


@configs.autotune("quadratic_bwd_dbc", key=_KEY)
@triton.jit(do_not_specialize=["T"])  # T.to(int64): never the constexpr 1
def _bwd_dc_kernel(
    dy_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, start_ptr, len_ptr, live_ptr, first_b_ptr,
    dC_ptr, da_ptr,
    T, H, G, N, MAX_LEN, PAD_TO, P: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Row pass, one program per (sequence, head, row block I of BI steps), walking the column blocks J <= I, with
    dS_ij = dy_i . u_j (dy_i kept on chip when P <= BLOCK_P), S_ij = (C_i . B_j) M_ij, W_ij = dS_ij S_ij:
        dC_i = sum_j dS_ij M_ij B_j ;  da[ib, t] = sum_{i in I, i >= t} sum_{j < t} W_ij  (row block I's share)
    Tokens [length, PAD_TO) get explicit zeros (dC).  Runs on the live prefix live[seq, h] (see _bwd_dx_kernel)."""
    BI: tl.constexpr = BLOCK_I if BLOCK_I < BLOCK_L else BLOCK_L
    BJ: tl.constexpr = BLOCK_J if BLOCK_J < BLOCK_L else BLOCK_L
    ONE_P: tl.constexpr = P <= BLOCK_P
    pid = tl.program_id(0)
    n_ib = tl.cdiv(MAX_LEN, BI)
    ib = pid % n_ib
    i0 = ib * BI
    h = (pid // n_ib) % H
    seq = (pid // (n_ib * H)).to(tl.int64)
    g = h // (H // G)
    if PER_HEAD:
        NBC = H
        slot = h
    else:
        NBC = G
        slot = g
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    fill = tl.maximum(length, PAD_TO)
    length = tl.load(live_ptr + seq * H + h)                # the live prefix: everything past it is exactly 0
    # B is read as 0 from its first step with a NaN / inf on (dC_i = sum_j dS_ij M_ij B_j would meet the masked zeros
    # of the rows i < t); the rows of dC from that step on are set to NaN at the end
    first_b = tl.load(first_b_ptr + seq * H + h)
    A = tl.load(A_ptr + h).to(tl.float32)
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N

    rows = i0 + tl.arange(0, BI)
    row_ok = rows < length
    tok_r = start + rows
    v_r, dt_r, E_r, delta_r = _discretize(dt_ptr, E_ptr, bias_ptr, tok_r, row_ok, h, H, HAS_E, HAS_BIAS,
                                          DT_SOFTPLUS)
    carry = _cs_before(dt_ptr, E_ptr, bias_ptr, start, length, h, H, A, i0, HAS_E, HAS_BIAS, DT_SOFTPLUS,
                       BLOCK_L, BI)
    hi_r, lo_r = _split(carry + tl.cumsum((A * delta_r).to(tl.float64), axis=0))
    Ci = tl.load(C_ptr + tok_r[:, None] * (G * N) + g * N + rn[None, :],
                 mask=row_ok[:, None] & n_ok[None, :], other=0.0)                  # [BI, BN]
    if ONE_P:
        rp = tl.arange(0, BLOCK_P)
        dyi = tl.load(dy_ptr + tok_r[:, None] * (H * P) + h * P + rp[None, :],
                      mask=row_ok[:, None] & (rp < P)[None, :], other=0.0)          # [BI, BP], on chip

    dC = tl.zeros([BI, BLOCK_N], dtype=tl.float32)
    w_before = tl.zeros([BI], dtype=tl.float32)             # sum_{j < j0} W_ij
    carry_c = tl.zeros([1], dtype=tl.float64).sum(axis=0)
    for j0 in range(0, BLOCK_L, BJ):                        # static bounds; blocks above the diagonal skipped
        if (j0 < i0 + BI) & (j0 < length):
            cols = j0 + tl.arange(0, BJ)
            col_ok = cols < length
            tok_c = start + cols
            v_c, dt_c, E_c, delta_c = _discretize(dt_ptr, E_ptr, bias_ptr, tok_c, col_ok, h, H, HAS_E, HAS_BIAS,
                                                  DT_SOFTPLUS)
            a_c = (A * delta_c).to(tl.float64)
            hi_c, lo_c = _split(carry_c + tl.cumsum(a_c, axis=0))
            carry_c += tl.sum(a_c, axis=0)
            Bj = tl.load(B_ptr + tok_c[:, None] * (G * N) + g * N + rn[None, :],
                         mask=(col_ok & (cols < first_b))[:, None] & n_ok[None, :], other=0.0)   # [BJ, BN]
            M, keep, flows = _decay(hi_r, lo_r, rows, row_ok, hi_c, lo_c, cols, col_ok)  # [BI, BJ]
            S = _dot(Ci, tl.trans(Bj), DOT, PRECISION) * M
            if ONE_P:
                xj = tl.load(x_ptr + tok_c[:, None] * (H * P) + h * P + rp[None, :],
                             mask=col_ok[:, None] & (rp < P)[None, :], other=0.0).to(tl.float32)
                dS = _dot(dyi, tl.trans(xj * delta_c[:, None]), DOT, PRECISION)      # [BI, BJ]
            else:
                dS = tl.zeros([BI, BJ], dtype=tl.float32)
                for p0 in range(0, P, BLOCK_P):
                    rq = p0 + tl.arange(0, BLOCK_P)
                    q_ok = rq < P
                    dyq = tl.load(dy_ptr + tok_r[:, None] * (H * P) + h * P + rq[None, :],
                                  mask=row_ok[:, None] & q_ok[None, :], other=0.0)
                    xq = tl.load(x_ptr + tok_c[:, None] * (H * P) + h * P + rq[None, :],
                                 mask=col_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)
                    dS += _dot(dyq, tl.trans(xq * delta_c[:, None]), DOT, PRECISION)
            dC += _dot(tl.where(keep, dS * M, 0.0), Bj, DOT, PRECISION)     # selected: a bad u_j stays in column j
            # a_t moves seg_ij for j < t <= i: this row block's share of da_t, t in block J
            W = tl.where(flows, dS * S, 0.0)
            w_lt = w_before[:, None] + (tl.cumsum(W, axis=1) - W)                   # sum_{j < t} W_ij
            da_c = tl.sum(tl.where(rows[:, None] >= cols[None, :], w_lt, 0.0), axis=0)
            w_before += tl.sum(W, axis=1)
            tl.store(da_ptr + (T.to(tl.int64) * ib + tok_c) * H + h, da_c, mask=col_ok)
    # rows outside the live prefix: exactly 0; rows from the first bad B step on: NaN
    dC = tl.where(row_ok[:, None], tl.where((rows < first_b)[:, None], dC, float("nan")), 0.0)
    tl.store(dC_ptr + tok_r[:, None] * (NBC * N) + slot * N + rn[None, :], dC.to(dC_ptr.dtype.element_ty),
             mask=(rows < fill)[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T"])  # T.to(int64): never the constexpr 1
def _bwd_dt_kernel(
    ddelta_ptr, da_ptr, dD_ptr, dt_ptr, A_ptr, E_ptr, bias_ptr, start_ptr, len_ptr, live_ptr, ddt_ptr, dE_ptr,
    part_ptr,
    T, H, PAD_TO, N_PB: tl.constexpr, BI: tl.constexpr, N_DD: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per (sequence, head): dDelta_t = sum_pb ddelta[pb, t] + A sum_{ib >= t // BI} da[ib, t];
    dv = dDelta sigmoid(v) (softplus); ddt = dv E, dE = dv dt; part [3, nseq, H] <- (sum_t Delta_t da_t,
    sum_t dv_t, sum of the N_DD dD partials of this (sequence, head)).  Tokens [live, max(length, PAD_TO)) get
    zeros (past the live prefix every gradient is exactly 0; the partials were written on the live prefix only)."""
    pid = tl.program_id(0)
    h = pid % H
    seq = (pid // H).to(tl.int64)
    nseq = tl.num_programs(0).to(tl.int64) // H
    start = tl.load(start_ptr + seq).to(tl.int64)
    fill = tl.maximum(tl.load(len_ptr + seq).to(tl.int32), PAD_TO)
    length = tl.load(live_ptr + pid)                        # the live prefix
    A = tl.load(A_ptr + h).to(tl.float32)
    rt = tl.arange(0, BLOCK_L)
    ok = rt < length
    tok = start + rt
    v, dt, E, delta = _discretize(dt_ptr, E_ptr, bias_ptr, tok, ok, h, H, HAS_E, HAS_BIAS, DT_SOFTPLUS)
    dd = tl.zeros([BLOCK_L], dtype=tl.float32)
    for k in range(0, N_PB):
        dd += tl.load(ddelta_ptr + (T.to(tl.int64) * k + tok) * H + h, mask=ok, other=0.0)
    da = tl.zeros([BLOCK_L], dtype=tl.float32)
    for ib in range(0, BLOCK_L // BI):                      # row blocks at or below t's block wrote da[ib, t]
        ib_ok = ok & (rt // BI <= ib) & (rt * 0 + ib * BI < length)   # every operand a tensor (interpreters)
        da += tl.load(da_ptr + (T.to(tl.int64) * ib + tok) * H + h, mask=ib_ok, other=0.0)
    dd += A * da
    if DT_SOFTPLUS:
        dv = dd * _softplus_grad(v)
    else:
        dv = dd
    dv = tl.where(ok, dv, 0.0)
    out = rt < fill
    tl.store(ddt_ptr + tok * H + h, dv * E, mask=out)
    if HAS_E:
        tl.store(dE_ptr + tok * H + h, dv * dt, mask=out)
    rd = tl.arange(0, 64)
    dD = tl.zeros([64], dtype=tl.float32)
    for k0 in range(0, N_DD, 64):
        dD += tl.load(dD_ptr + pid * N_DD + k0 + rd, mask=k0 + rd < N_DD, other=0.0)
    tl.store(part_ptr + pid, tl.sum(delta * da, axis=0))
    tl.store(part_ptr + nseq * H + pid, tl.sum(dv, axis=0))
    tl.store(part_ptr + 2 * nseq * H + pid, tl.sum(dD, axis=0))


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


FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


def fp32_precision_of(allow_tf32: bool, fp32_precision: str | None = None) -> str:
    """tl.dot input_precision of fp32 dots: `fp32_precision` when given, else "tf32" (tensor cores) with
    allow_tf32 and exact "ieee" without.  ("tf32x3": three TF32 products, ~fp32 accurate, on tensor cores.)"""
    if fp32_precision is None:
        return "tf32" if allow_tf32 else "ieee"
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS} or None, got {fp32_precision!r}")
    return fp32_precision


def _meta(x, max_len, N, E, dt_bias, D, d_skip_delta, dt_softplus, precision):
    return dict(HAS_E=E is not None, HAS_BIAS=dt_bias is not None, HAS_D=D is not None,
                D_SKIP_DELTA=bool(d_skip_delta), DT_SOFTPLUS=bool(dt_softplus), DOT=DOT_CODE[x.dtype],
                PRECISION=precision, BLOCK_L=block_l(max_len), BLOCK_N=max(16, triton.next_power_of_2(N)))


def block_l(max_len: int) -> int:
    """Padded sequence tile: next power of 2 >= max_len, at least 16."""
    return max(16, triton.next_power_of_2(max_len))


def uses_fused_bwd(max_len: int, P: int) -> bool:
    """The one-program-per-(sequence, head) backward runs for short sequences and narrow heads (its tiles hold the
    whole sequence): BLOCK_L <= 32 and P <= 64, the paper's class, where it is spill-free on sm_90 and reads every
    input once; otherwise the split backward (column, row and token passes).  (At BLOCK_L = 64 the fused kernel
    spills 128-172 B in bf16: offline sm_90 table.)"""
    return block_l(max_len) <= 32 and P <= 64


def _alloc(padded, T, nseq, max_len):
    """Output allocator: torch.empty when the kernels write every token themselves (padded layout), else zeros."""
    if padded and T != nseq * max_len:
        raise ValueError(f"padded=True needs the right-padded layout T = nseq * max_len, got T={T}, "
                         f"nseq={nseq}, max_len={max_len}")
    return torch.empty if padded else torch.zeros


def _shape_class(meta, P, N):
    prec = {1: "bf16", 2: "fp16"}.get(meta["DOT"], meta["PRECISION"])
    return dict(BLOCK_L=meta["BLOCK_L"], P=P, N=meta["BLOCK_N"], PREC=prec)


def tissd_quadratic_fwd(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                        d_skip_delta: bool, dt_softplus: bool, allow_tf32: bool = False, padded: bool = False,
                        fp32_precision: str | None = None):
    """Fused quadratic forward on the token layout (CONTRACT.md).

    x [T, H, P], dt [T, H], A [H], B/C [T, G, n], E [T, H] or None, dt_bias [H] or None, D [H] or None (dt, E,
    A, dt_bias, D in any float dtype: cast to float32 in the kernel), seq_start [nseq] int64, seq_len [nseq]
    int32, max_len >= every seq_len (<= QUADRATIC_MAX_LEN; not checked on the device).  padded=True: the caller
    guarantees seq_start = arange(nseq) * max_len (T = nseq * max_len), so the kernel writes the padding zeros
    itself instead of a separate memset.  allow_tf32: fp32 dots on TF32 tensor cores (else exact "ieee");
    fp32_precision overrides ("ieee" | "tf32" | "tf32x3").
    Returns y [T, H, P] in x's dtype, 0 on padding tokens."""
    T, H, P, G, N, nseq = _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len)
    y = _alloc(padded, T, nseq, max_len)(x.shape, dtype=x.dtype, device=x.device)
    if nseq == 0 or T == 0 or max_len == 0:
        return y
    meta = _meta(x, max_len, N, E, dt_bias, D, d_skip_delta, dt_softplus, fp32_precision_of(allow_tf32,
                                                                                              fp32_precision))
    cfg = configs.pick("quadratic_fwd", **_shape_class(meta, P, N))
    n_ib = lambda m: triton.cdiv(max_len, min(m["BLOCK_T"], m["BLOCK_L"]))  # noqa: E731  row blocks
    grid = lambda m: (nseq * H * n_ib(m) * triton.cdiv(P, m["BLOCK_P"]),)  # noqa: E731
    configs.launch(_fwd_kernel, grid,
                   (x, dt, A, B, C, dt if E is None else E, A if dt_bias is None else dt_bias,
                    A if D is None else D, seq_start, seq_len, y, H, G, N, max_len, max_len if padded else 0, P),
                   meta, cfg)
    return y


def tissd_quadratic_bwd(dy, x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                        d_skip_delta: bool, dt_softplus: bool, allow_tf32: bool = False, padded: bool = False,
                        fp32_precision: str | None = None, split: bool | None = None):
    """Backward of `tissd_quadratic_fwd` (recomputes everything from the inputs; no saved intermediates).

    dy [T, H, P] (cast to x's dtype).  Returns (dx, ddt, dA, dB, dC, dE, ddt_bias, dD): dx, dB, dC in x's dtype,
    the rest float32; None for an input that was None.  Padding tokens get zero gradients.
    split=None picks by shape (`uses_fused_bwd`): the fused kernel (one program per (sequence, head)), or three
    passes that never hold a whole sequence: column blocks (dx, dB, dDelta partials per P-block), row blocks
    (dC, this block's share of d a_t), tokens (ddt, dE and the per-(sequence, head) dA, ddt_bias, dD partials).
    When heads share a group (G < H) dB/dC are per-head float32 partials summed here; dA, ddt_bias, dD are
    summed from per-(sequence, head) partials (deterministic, no atomics)."""
    dy = dy.to(x.dtype).contiguous()
    T, H, P, G, N, nseq = _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, dy)
    new = _alloc(padded, T, nseq, max_len)
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = new(x.shape, dtype=x.dtype, device=x.device)
    ddt = new((T, H), **f32)
    dE = new((T, H), **f32) if E is not None else None
    part = torch.empty(3, nseq, H, **f32)          # per (sequence, head): dA, ddt_bias, dD (every slot written)
    shared = H != G
    if shared:
        dB, dC = new((T, H, N), **f32), new((T, H, N), **f32)
    else:
        dB, dC = new(B.shape, dtype=B.dtype, device=x.device), new(C.shape, dtype=C.dtype, device=x.device)
    if nseq > 0 and T > 0 and max_len > 0:
        meta = _meta(x, max_len, N, E, dt_bias, D, d_skip_delta, dt_softplus,
                     fp32_precision_of(allow_tf32, fp32_precision))
        opt = (dt if E is None else E, A if dt_bias is None else dt_bias, A if D is None else D)
        pad_to = max_len if padded else 0
        if split is None:
            split = not uses_fused_bwd(max_len, P)
        if not split:
            cfg = configs.pick("quadratic_bwd_fused", **_shape_class(meta, P, N))
            configs.launch(_bwd_fused_kernel, (nseq, H),
                           (dy, x, dt, A, B, C, *opt, seq_start, seq_len, dx, ddt, ddt if dE is None else dE, dB, dC,
                            part, H, G, N, pad_to, P), dict(meta, PER_HEAD=shared), cfg)
        else:
            _bwd_split(dy, x, dt, A, B, C, E, dt_bias, opt, seq_start, seq_len, max_len, pad_to, T, H, P, G, N,
                       nseq, shared, meta, dx, ddt, dE, dB, dC, part)
    else:
        part.zero_()
    if shared:
        dB = dB.view(T, G, H // G, N).sum(2).to(x.dtype)
        dC = dC.view(T, G, H // G, N).sum(2).to(x.dtype)
    dA, dbias, dD = part.sum(1)
    return (dx, ddt, dA, dB, dC, dE, dbias if dt_bias is not None else None, dD if D is not None else None)


def _bwd_split(dy, x, dt, A, B, C, E, dt_bias, opt, seq_start, seq_len, max_len, pad_to, T, H, P, G, N, nseq,
               shared, meta, dx, ddt, dE, dB, dC, part):
    """The three backward passes (see tissd_quadratic_bwd); partials in float32 scratch, every slot read is written."""
    f32 = dict(dtype=torch.float32, device=x.device)
    shape = _shape_class(meta, P, N)
    bl = meta["BLOCK_L"]
    cfg_dx = configs.pick("quadratic_bwd_dx", **shape)
    cfg_dc = configs.pick("quadratic_bwd_dbc", **shape)
    bj = min(cfg_dx["BLOCK_J"], bl)
    n_jb, n_pb = triton.cdiv(max_len, bj), triton.cdiv(P, cfg_dx["BLOCK_P"])
    bi = min(cfg_dc["BLOCK_I"], bl)
    n_ib = triton.cdiv(max_len, bi)
    ddelta = torch.empty(n_pb, T, H, **f32)         # du . x per P-block
    da = torch.empty(n_ib, T, H, **f32)             # row block's share of d a_t
    dD_part = torch.empty(nseq * H * n_jb * n_pb, **f32)
    # per (sequence, head): [0] the live prefix, [1] the first step with a NaN / inf B (see _live_len_kernel)
    live = torch.empty(2, nseq * H, dtype=torch.int32, device=x.device)
    _live_len_kernel[(nseq * H,)](dy, B, seq_start, seq_len, live, H, G, N, P=P, BLOCK_L=bl, BLOCK_R=min(bl, 32),
                                  BLOCK_P=min(64, max(16, triton.next_power_of_2(P))), BLOCK_N=meta["BLOCK_N"],
                                  num_warps=4)
    configs.launch(_bwd_dx_kernel, (nseq * H * n_jb * n_pb,),
                   (dy, x, dt, A, B, C, *opt, seq_start, seq_len, live, dx, dB, ddelta, dD_part,
                    T, H, G, N, max_len, pad_to, P), dict(meta, PER_HEAD=shared), cfg_dx)
    meta_dc = {k: v for k, v in meta.items() if k not in ("HAS_D", "D_SKIP_DELTA")}
    configs.launch(_bwd_dc_kernel, (nseq * H * n_ib,),
                   (dy, x, dt, A, B, C, opt[0], opt[1], seq_start, seq_len, live[0], live[1], dC, da, T, H, G, N,
                    max_len, pad_to, P),
                   dict(meta_dc, PER_HEAD=shared), cfg_dc)
    _bwd_dt_kernel[(nseq * H,)](
        ddelta, da, dD_part, dt, A, opt[0], opt[1], seq_start, seq_len, live, ddt, ddt if dE is None else dE, part,
        T, H, pad_to, N_PB=n_pb, BI=bi, N_DD=n_jb * n_pb, HAS_E=E is not None, HAS_BIAS=dt_bias is not None,
        DT_SOFTPLUS=meta["DT_SOFTPLUS"], BLOCK_L=bl, num_warps=4 if bl <= 128 else 8)
