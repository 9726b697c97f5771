"""Triton chunked path of the time-aware SSD (TiSSD): O(T (Q + n) P) work, for long sequences.

Token layout and math: see ../CONTRACT.md.  Per sequence and head (Delta, a, cs as in the contract, cs restarted at
every chunk of Q steps, h the [P, n] state entering the chunk):

    y_i   = sum_{j<=i in chunk} (C_i . B_j) exp(min(cs_i - cs_j, 0)) Delta_j x_j + exp(cs_i) C_i . h[p, :] + skip
    h_out = exp(cs_L) h + sum_j exp(min(cs_L - cs_j, 0)) Delta_j x_j B_j^T          (L = last step of the chunk)

Kernels (one program per (sequence, head, block of BLOCK_P state rows); rows p of the state are independent, so
P-blocks never talk to each other; the program walks the chunks of its sequence in order, state in registers):
    _fwd_kernel     discretization + quadratic form inside the chunk (tl.dot) + state passing; writes y (+ h_T).
    _bwd_kernel     pass 1 walks forward and stores the chunk-start states and every chunk's C B^T [Q, Q] (scratch,
                    fp32: the K = n dot is not redone in pass 2, whose tiles are what fill the registers), pass 2
                    walks backward carrying dh [BLOCK_P, n]; writes dx, per-P-block partial dDelta / dB / dC and
                    dA / dD sums.  Exact fp32 (tf32x3 dots, three products each) runs pass 2 twice (SPLIT_BC):
                    dx / dDelta first, then dB / dC (+ the dh recurrence again, adding its dDelta terms), so that
                    no sweep holds every tile at once (spill-free on sm_90 with triton 3.6-3.9; with C B^T redone in
                    pass 2 it spilled 12+12 B with 3.7.1, and one sweep with everything 36+32 B).
    _bwd_dt_kernel  sums the dDelta partials, applies d softplus, writes ddt, dE and per-(sequence, head) ddt_bias.
Partial buffers are reduced with torch sums (deterministic, no atomics).

Numerics: the chunk cumsum is taken in float64 and kept as an unevaluated pair hi + lo of float32, so that
cs_i - cs_j = (hi_i - hi_j) + (lo_i - lo_j) stays exact after huge steps (E ~ 1e4 gives |cs| ~ 1e5, where a plain
float32 difference would lose ~1e-3 absolute); decays of pairs are exp of clamped differences, never
exp(cs_i) exp(-cs_j).  For the same reason the backward sums d a_t directly over the decays that contain a_t (no
reverse cumsum of large cancelling terms).  Everything accumulates in float32; fp32 dots use "tf32x3" (~fp32
accurate on tensor cores), "tf32" with allow_tf32; 16-bit inputs round the dot operands to their dtype.

Non-finite inputs: a NaN / inf at valid step t reaches only the outputs at steps >= t (the chunk's rows from t on
and every later chunk, through the state), and padding stays exactly 0.  Masks are selects (tl.where), never
products with 0.  The forward's S @ (Delta x), a dot over the steps of a chunk that would meet a masked 0 with a
non-finite Delta_j x_j, is checked: a non-finite result (never in a real run) is recomputed with the bad rows zeroed
and the rows from the first bad step on set to NaN.  In the backward, dC_i = sum_j dG_ij B_j reads B as 0 from the
first step t with a NaN / inf B on (pass 1 finds it with a min-reduction) and sets the rows i >= t of dC to NaN, so
the rows before t are exact whatever dy holds at the rows >= t.  The backward runs on the live prefix of each
(sequence, head, P-block): rows after the last one with a nonzero dy (and no dfinal) have exact-zero gradients and
are not processed, so a loss over the rows before t gets exactly the gradients of the run without the bad value;
_bwd_dt_kernel treats a zero dDelta as an exact zero (0 * NaN = 0 there).

Interpreter: the Triton interpreter (numpy >= 2) cannot range() over a runtime scalar, so under TRITON_INTERPRET the
chunk loops get a fixed trip count (ITERS constexpr, see _iters) and chunks past a sequence are masked no-ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import _dot, _first_nonfinite_row, _nonfinite, _softplus, _split
from .layout import DOT_CODE, check_token_layout

__all__ = ["tissd_chunked_fwd", "tissd_chunked_bwd"]

_INTERPRET = configs.INTERPRET

# dot operand code DOT: see common.py (_dot, _softplus, _split, _nonfinite are shared with quadratic.py)


# fp32 dots: "tf32x3" (three TF32 tensor-core products, ~fp32 accurate) unless allow_tf32 asks for plain "tf32";
# "ieee" lowers to FMA loops that spill heavily at these tile sizes (checked by compiling for sm_90).
_FP32_PRECISION = "tf32x3"


# ----------------------------------------------------------------------------------------------------------------
# jit helpers of this path (the ones shared with quadratic.py are in common.py)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_v(dt_ptrs, E_ptrs, bias_ptr, offs, ok, HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr):
    """v_t = dt_t * E_t + dt_bias at dt_ptrs + offs ([Q] steps of one head); 0 * E + bias where not ok."""
    v = tl.load(dt_ptrs + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_E:
        v *= tl.load(E_ptrs + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr).to(tl.float32)
    return v


@triton.jit
def _delta(v, ok, DT_SOFTPLUS: tl.constexpr):
    """Delta = softplus(v) (or v), forced to 0 on padding steps (they neither decay nor write)."""
    if DT_SOFTPLUS:
        d = _softplus(v)
    else:
        d = v
    return tl.where(ok, d, 0.0)


@triton.jit
def _chunk_cumsum(a, Q: tl.constexpr):
    """a [Q] fp32 -> (hi, lo, hi_L, lo_L): inclusive cumsum cs = hi + lo (float64 scan split into two float32),
    and its last element cs_L = hi_L + lo_L."""
    hi, lo = _split(tl.cumsum(a.to(tl.float64), axis=0))
    last = tl.arange(0, Q) == Q - 1
    hi_L = tl.sum(tl.where(last, hi, 0.0), axis=0)
    lo_L = tl.sum(tl.where(last, lo, 0.0), axis=0)
    return hi, lo, hi_L, lo_L


@triton.jit
def _any_nonfinite(t):
    """Does the 2-d tile t hold a NaN or inf?"""
    return tl.max(tl.max(_nonfinite(t).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _guarded_dot(acc, coef, rows, row_ok, cols, v, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + coef @ v for coef [M, K] that is 0 outside the causal pairs cols[k] <= rows[m] of valid steps (masked
    pairs, padding: v is 0 on invalid steps) and v [K, N] that holds NaN / inf: in a plain dot a masked 0 times inf is
    NaN, which would leak a bad v[k, :] backwards in time and into padding.  Here v's non-finite entries are zeroed
    for the product and the valid rows at or after the first bad step become NaN (non-finite may reach them).
    Slow path: the kernels run it only after the plain result came out non-finite."""
    bad = _nonfinite(v)
    first = tl.min(tl.where(tl.max(bad.to(tl.int32), axis=1) > 0, cols, 2147483647), axis=0)  # first bad step
    acc += _dot(coef, tl.where(bad, 0.0, v), DOT, PRECISION)
    return tl.where(((rows >= first) & row_ok)[:, None], float("nan"), acc)


@triton.jit
def _skip(x, delta, Dh, HAS_D: tl.constexpr, D_SKIP_DELTA: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr):
    """The skip term D s_i x_i of a chunk [Q, BP] (s = Delta or 1; zeros without D)."""
    if HAS_D:
        if D_SKIP_DELTA:
            out = (Dh * delta)[:, None] * x
        else:
            out = Dh * x
    else:
        out = tl.zeros([Q, BLOCK_P], dtype=tl.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@configs.autotune("chunked_fwd", key=["H", "G", "P", "N", "Q", "BLOCK_N", "DOT", "PRECISION"],
                  prune=lambda cs, named_args, **kw: [c for c in cs if c.kwargs["BLOCK_P"] <= max(
                      16, triton.next_power_of_2(named_args["P"]))] or cs[:1])
@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, D_ptr, start_ptr, len_ptr, h0_ptr, y_ptr, hT_ptr,
    H, G, P, N,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr, ITERS: tl.constexpr, D_SKIP_DELTA: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program -> (sequence, head, P-block); P-block fastest so neighbours share B, C, dt in L2
    pid = tl.program_id(0)
    n_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % n_pb
    h = (pid // n_pb) % H
    seq = (pid // (n_pb * H)).to(tl.int64)
    g = h // (H // G)
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    A = tl.load(A_ptr + h).to(tl.float32)

    rq = tl.arange(0, Q)
    rp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    p_ok = rp < P
    n_ok = rn < N
    # state, transposed: hT [BLOCK_N, BLOCK_P], hT[k, p] = h[p, k]; stored as [nseq, H, P, N]
    s_off = (seq * H + h) * P * N
    s_idx = rp[None, :] * N + rn[:, None]
    s_mask = n_ok[:, None] & p_ok[None, :]
    if HAS_H0:
        hT = tl.load(h0_ptr + s_off + s_idx, mask=s_mask, other=0.0).to(tl.float32)
    else:
        hT = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    Dh = A                                                                         # unused without D
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    # chunks of this sequence; ITERS > 0: fixed trip count instead (see _iters), extra chunks are masked no-ops
    for c in range(0, ITERS if ITERS > 0 else tl.cdiv(length, Q)):
        ok = c * Q + rq < length                                                   # [Q] valid steps
        tok0 = start + c * Q                                                       # first token (int64)
        v = _load_v(dt_ptr + tok0 * H + h, E_ptr + tok0 * H + h, bias_ptr + h, rq * H, ok, HAS_E, HAS_BIAS)
        delta = _delta(v, ok, DT_SOFTPLUS)                                         # [Q]
        hi, lo, hi_L, lo_L = _chunk_cumsum(A * delta, Q)
        # decay M_ij = exp(min(cs_i - cs_j, 0)) for j <= i, times C_i . B_j
        bc_off = rq[:, None] * (G * N) + rn[None, :]
        bn_ok = ok[:, None] & n_ok[None, :]
        Bm = tl.load(B_ptr + (tok0 * G + g) * N + bc_off, mask=bn_ok, other=0.0)   # [Q, BN]
        Cm = tl.load(C_ptr + (tok0 * G + g) * N + bc_off, mask=bn_ok, other=0.0)   # [Q, BN]
        diff = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
        keep = (rq[:, None] >= rq[None, :]) & ok[:, None] & ok[None, :]          # pairs j <= i, both valid
        # selected, never multiplied by a masked 0: a NaN / inf in B_j or cs stays in the pairs it belongs to
        S = tl.where(keep, tl.exp(tl.minimum(diff, 0.0)) * _dot(Cm, tl.trans(Bm), DOT, PRECISION), 0.0)  # [Q, Q]

        x_off = rq[:, None] * (H * P) + rp[None, :]
        xp_ok = ok[:, None] & p_ok[None, :]
        x = tl.load(x_ptr + (tok0 * H + h) * P + x_off, mask=xp_ok, other=0.0).to(tl.float32)  # [Q, BP]
        u = x * delta[:, None]                                                     # [Q, BP] Delta_j x_j
        y = _skip(x, delta, Dh, HAS_D, D_SKIP_DELTA, Q, BLOCK_P)
        y += _dot(S, u, DOT, PRECISION)
        # a finite result met no NaN / inf; otherwise (never in a real run) again, guarded: a non-finite u_j
        # reaches rows i >= j only, never the rows before it or the padding through a masked 0 of S
        if _any_nonfinite(y):
            y = _guarded_dot(_skip(x, delta, Dh, HAS_D, D_SKIP_DELTA, Q, BLOCK_P), S, rq, ok, rq, u, DOT, PRECISION)
        y += tl.exp(hi + lo)[:, None] * _dot(Cm, hT, DOT, PRECISION)               # exp(cs_i) C_i . h[p, :]
        tl.store(y_ptr + (tok0 * H + h) * P + x_off, y.to(y_ptr.dtype.element_ty), mask=xp_ok)

        # h <- exp(cs_L) h + sum_j exp(min(cs_L - cs_j, 0)) u_j B_j^T   (as hT += B_w^T [BN, Q] @ u [Q, BP])
        w = tl.exp(tl.minimum((hi_L - hi) + (lo_L - lo), 0.0))                     # [Q]
        hT = tl.exp(hi_L + lo_L) * hT + _dot(tl.trans(Bm.to(tl.float32) * w[:, None]), u, DOT, PRECISION)

    if STORE_FINAL:
        tl.store(hT_ptr + s_off + s_idx, hT, mask=s_mask)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@configs.autotune("chunked_bwd", key=["H", "G", "P", "N", "Q", "BLOCK_P", "BLOCK_N", "DOT", "PRECISION"])
@triton.jit
def _bwd_kernel(
    dy_ptr, dhT_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, E_ptr, bias_ptr, D_ptr, start_ptr, len_ptr, h0_ptr,
    states_ptr, cb_ptr, dx_ptr, ddelta_ptr, dB_ptr, dC_ptr, dh0_ptr, dA_ptr, dD_ptr,
    T, H, G, P, N, n_pb, n_chunks,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DFINAL: tl.constexpr, ITERS: tl.constexpr, D_SKIP_DELTA: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_BC: tl.constexpr,
):
    """Outputs (fp32 unless said): dx [T, H, P] (x dtype); ddelta [n_pb, T, H] partial dDelta per P-block;
    dB, dC [n_pb * H/G, T, G, N] partials (slot pb * H/G + head-in-group); dh0 [nseq, H, P, N];
    dA, dD [nseq * H * n_pb] partial sums; states [nseq, H, n_chunks, P, N] scratch.
    Strong zeros of dy: the reverse sweep finds the last step whose dy row (this P-block) is nonzero (all of them
    when dfinal is nonzero) and runs on the prefix that ends there; the rows after it contribute exactly nothing, so
    a NaN / inf input at a later step never meets a 0 of dy (0 * NaN).  Everything this program computes depends
    on dy only through its own P-block, so a per-P-block prefix is exact."""
    pid = tl.program_id(0)
    pb = pid % n_pb
    h = (pid // n_pb) % H
    seq = (pid // (n_pb * H)).to(tl.int64)
    R = H // G
    g = h // R
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    nc = tl.cdiv(length, Q)  # chunks of this sequence (ITERS > 0: fixed trip count instead, see _iters)
    A = tl.load(A_ptr + h).to(tl.float32)

    rq = tl.arange(0, Q)
    rp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    p_ok = rp < P
    n_ok = rn < N
    s_off = (seq * H + h) * P * N                                                  # [P, N] block of (seq, h)
    s_idx = rp[None, :] * N + rn[:, None]                                          # hT [BN, BP] inside it
    s_mask = n_ok[:, None] & p_ok[None, :]
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)

    # ---- pass 1: forward state passing, store the state entering every chunk ----
    if HAS_H0:
        hT = tl.load(h0_ptr + s_off + s_idx, mask=s_mask, other=0.0).to(tl.float32)
    else:
        hT = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    first_b = tl.full([1], 2147483647, tl.int32).min(axis=0)                    # first step with a NaN / inf B
    for c in range(0, ITERS if ITERS > 0 else nc):
        tl.store(states_ptr + ((seq * H + h) * n_chunks + c) * (P * N) + s_idx, hT, mask=s_mask)  # chunk start
        ok = c * Q + rq < length
        tok0 = start + c * Q
        v = _load_v(dt_ptr + tok0 * H + h, E_ptr + tok0 * H + h, bias_ptr + h, rq * H, ok, HAS_E, HAS_BIAS)
        delta = _delta(v, ok, DT_SOFTPLUS)
        hi, lo, hi_L, lo_L = _chunk_cumsum(A * delta, Q)
        w = tl.exp(tl.minimum((hi_L - hi) + (lo_L - lo), 0.0)) * delta            # decay to chunk end * Delta
        Bm = tl.load(B_ptr + (tok0 * G + g) * N + rq[:, None] * (G * N) + rn[None, :],
                     mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        first_b = tl.minimum(first_b, _first_nonfinite_row(Bm, c * Q + rq))
        x = tl.load(x_ptr + (tok0 * H + h) * P + rq[:, None] * (H * P) + rp[None, :],
                    mask=ok[:, None] & p_ok[None, :], other=0.0)
        # the chunk's C_i . B_j for pass 2 (B read as 0 from its first non-finite step on, as there)
        Cm = tl.load(C_ptr + (tok0 * G + g) * N + rq[:, None] * (G * N) + rn[None, :],
                     mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        CB = _dot(Cm, tl.trans(tl.where((c * Q + rq < first_b)[:, None], Bm, 0.0)), DOT, PRECISION)
        tl.store(cb_ptr + (pid.to(tl.int64) * n_chunks + c) * (Q * Q) + rq[:, None] * Q + rq[None, :], CB)
        hT = tl.exp(hi_L + lo_L) * hT + _dot(tl.trans(Bm * w[:, None]), x, DOT, PRECISION)
    tl.debug_barrier()  # the states written above are read back below by other threads of this program

    # ---- pass 2: reverse sweep carrying dhT [BN, BP] = d loss / d (state leaving the chunk), transposed ----
    # SPLIT_BC: two sweeps, 0 = dx, dDelta (du and written-state terms), dD; 1 = dB, dC and the other dDelta terms
    dA_acc = tl.zeros([Q], dtype=tl.float32)                                       # per-step partial sums
    dD_acc = tl.zeros([Q], dtype=tl.float32)
    part_off = (pb * R + h % R).to(tl.int64) * T * G * N                           # dB / dC partial slot
    for sweep in tl.static_range(2 if SPLIT_BC else 1):
        if sweep == 1:
            tl.debug_barrier()  # sweep 1 adds to the dDelta partials that sweep 0 stored (other threads)
        if HAS_DFINAL:
            dhT = tl.load(dhT_ptr + s_off + s_idx, mask=s_mask, other=0.0).to(tl.float32)
            live = tl.where(tl.max(tl.max((dhT != 0.0).to(tl.int32), axis=1), axis=0) > 0, length, 0)
        else:
            dhT = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
            live = tl.zeros([1], dtype=tl.int32).sum(axis=0)                           # live prefix so far
        for i in range(0, ITERS if ITERS > 0 else nc):
            c = (ITERS if ITERS > 0 else nc) - 1 - i
            in_seq = c * Q + rq < length
            tok0 = start + c * Q
            x_off = (tok0 * H + h) * P + rq[:, None] * (H * P) + rp[None, :]
            dy = tl.load(dy_ptr + x_off, mask=in_seq[:, None] & p_ok[None, :], other=0.0).to(tl.float32)  # [Q, BP]
            row_live = tl.max((dy != 0.0).to(tl.int32), axis=1) > 0
            live = tl.maximum(live, tl.max(tl.where(row_live, c * Q + rq + 1, 0), axis=0))
            ok = in_seq & (c * Q + rq < live)                                          # steps of the live prefix
            v = _load_v(dt_ptr + tok0 * H + h, E_ptr + tok0 * H + h, bias_ptr + h, rq * H, ok, HAS_E, HAS_BIAS)
            delta = _delta(v, ok, DT_SOFTPLUS)
            hi, lo, hi_L, lo_L = _chunk_cumsum(A * delta, Q)
            dL = (hi_L - hi) + (lo_L - lo)
            w = tl.exp(tl.minimum(dL, 0.0))                                            # decay j -> chunk end, [Q]
            wg = tl.where(dL <= 0.0, w, 0.0)                                           # its derivative (clamp off)
            ecs = tl.exp(hi + lo)                                                      # exp(cs_i), [Q]
            ecs_L = tl.exp(hi_L + lo_L)
            xp_ok = ok[:, None] & p_ok[None, :]
            x = tl.load(x_ptr + x_off, mask=xp_ok, other=0.0).to(tl.float32)           # [Q, BP]
            u = x * delta[:, None]                                                     # [Q, BP] Delta_j x_j
            bc_off = (tok0 * G + g) * N + rq[:, None] * (G * N) + rn[None, :]
            bn_ok = ok[:, None] & n_ok[None, :]
            # B read as 0 from the first step with a NaN / inf B on (pass 1 found it): dC_i = sum_j dG_ij B_j would
            # meet the masked zeros of the rows i < t; the rows of dC from that step on are set to NaN below
            Bm = tl.load(B_ptr + bc_off, mask=bn_ok & (c * Q + rq < first_b)[:, None], other=0.0).to(tl.float32)
            Cm = tl.load(C_ptr + bc_off, mask=bn_ok, other=0.0).to(tl.float32)         # [Q, BN]

            # decay M_ij = exp(min(cs_i - cs_j, 0)) (j <= i); S_ij = (C_i . B_j) M_ij; both selected on the kept
            # pairs (j <= i, both live), never multiplied by a masked 0
            diff = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
            keep = (rq[:, None] >= rq[None, :]) & ok[:, None] & ok[None, :]
            M = tl.where(keep, tl.exp(tl.minimum(diff, 0.0)), 0.0)
            CB = tl.load(cb_ptr + (pid.to(tl.int64) * n_chunks + c) * (Q * Q) + rq[:, None] * Q + rq[None, :])
            S = tl.where(keep, M * CB, 0.0)                                            # [Q, Q], CB from pass 1
            # da_t (a_t enters cs_i for all i >= t of the chunk), summed directly over the decays that contain a_t, so
            # that large terms of decays not containing it never cancel (stable after huge steps):
            #   pairs j < t <= i:       sum_{i >= t} sum_{j < t} W_ij,  W_ij = (dy_i . u_j) S_ij where the clamp is off
            #   written state (j < t):  sum_{j < t} dw_j r_j,           r_j = u_j . (dh B_j)
            #   read state (i >= t):    sum_{i >= t} exp(cs_i) dy_i . (h C_i) ;  plus exp(cs_L) <dh, h> for every t
            # `before`[s] collects the first two at s = t - 1; da is linear in them, so split sweeps add their parts
            before = tl.zeros([Q], dtype=tl.float32)
            da = tl.zeros([Q], dtype=tl.float32)
            if sweep == 0 or not SPLIT_BC:  # dx, dDelta, written-state term of da, dD
                # du_j = sum_i S_ij dy_i + w_j dh B_j ;  dx = Delta du + skip ;  dDelta_j += du_j . x_j
                Bdh = _dot(Bm, dhT, DOT, PRECISION)                                    # [Q, BP] (dh B_j)_p
                du = _dot(tl.trans(S), dy, DOT, PRECISION) + w[:, None] * Bdh
                r = tl.sum(u * Bdh, axis=1)                                            # u_j . (dh B_j)
                before += tl.cumsum(wg * r, axis=0)
                ddelta = tl.sum(du * x, axis=1)
                dx = delta[:, None] * du
                if HAS_D:
                    xdy = tl.sum(x * dy, axis=1)                                       # [Q] x_t . dy_t (this block)
                    if D_SKIP_DELTA:
                        dx += (Dh * delta)[:, None] * dy
                        ddelta += Dh * xdy
                        dD_acc += delta * xdy
                    else:
                        dx += Dh * dy
                        dD_acc += xdy
                tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=xp_ok)
            if sweep == 1 or not SPLIT_BC:  # dB, dC, pairs and read-state terms of da
                dyu = _dot(dy, tl.trans(u), DOT, PRECISION)                            # [Q, Q] dy_i . u_j
                W = tl.where(keep & (rq[:, None] > rq[None, :]) & (diff <= 0.0), dyu * S, 0.0)
                F = tl.cumsum(W, axis=1)                                               # F[i, s] = sum_{j <= s} W_ij
                before += tl.sum(tl.where(rq[:, None] > rq[None, :], F, 0.0), axis=0)  # [Q] pairs j <= s < i
                dG = tl.where(keep, dyu * M, 0.0)                                      # d loss / d (C_i . B_j)
                # dC_i = sum_j dG_ij B_j + exp(cs_i) h dy_i ;  dB_j = sum_i dG_ij C_i + w_j dh^T u_j
                # (a chunk that starts past the live prefix reads a zero state: the stored one may be NaN)
                hT = tl.load(states_ptr + ((seq * H + h) * n_chunks + c) * (P * N) + s_idx,
                             mask=s_mask & (c * Q < live), other=0.0)
                dyh = _dot(dy, tl.trans(hT), DOT, PRECISION)                           # [Q, BN] sum_p dy_ip h[p, k]
                dC = _dot(dG, Bm, DOT, PRECISION) + ecs[:, None] * dyh
                dC = tl.where((c * Q + rq >= first_b)[:, None], float("nan"), dC)     # from the first bad B on
                tl.store(dC_ptr + part_off + bc_off, dC.to(dC_ptr.dtype.element_ty), mask=bn_ok)
                dB = _dot(tl.trans(dG), Cm, DOT, PRECISION) + w[:, None] * _dot(u, tl.trans(dhT), DOT, PRECISION)
                tl.store(dB_ptr + part_off + bc_off, dB.to(dB_ptr.dtype.element_ty), mask=bn_ok)
                da += tl.cumsum(ecs * tl.sum(Cm * dyh, axis=1), axis=0, reverse=True)
                da += ecs_L * tl.sum(tl.sum(dhT * hT, axis=1), axis=0)
            # da += (value at s = t - 1 of `before`);  dDelta += A da ;  dA += Delta da
            da += tl.sum(tl.where(rq[:, None] == rq[None, :] + 1, before[None, :], 0.0), axis=1)
            dd_ptrs = ddelta_ptr + pb.to(tl.int64) * T * H + (tok0 + rq) * H + h
            if SPLIT_BC and sweep == 1:
                ddelta = tl.load(dd_ptrs, mask=ok, other=0.0)                          # sweep 0's part
            ddelta += A * da
            tl.store(dd_ptrs, tl.where(ok, ddelta, 0.0), mask=in_seq)                  # 0 past the live prefix
            dA_acc += delta * da

            # dh (entering the chunk) = exp(cs_L) dh + sum_i exp(cs_i) dy_i C_i^T
            dhT = ecs_L * dhT + _dot(tl.trans(Cm * ecs[:, None]), dy, DOT, PRECISION)

    if HAS_H0:
        tl.store(dh0_ptr + s_off + s_idx, dhT, mask=s_mask)
    tl.store(dA_ptr + pid, tl.sum(dA_acc, axis=0))
    tl.store(dD_ptr + pid, tl.sum(dD_acc, axis=0))


@triton.jit
def _bwd_dt_kernel(
    ddelta_ptr, dt_ptr, E_ptr, bias_ptr, start_ptr, len_ptr, ddt_ptr, dE_ptr, dbias_ptr,
    TH, H, N_PB: tl.constexpr,
    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ITERS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per (sequence, head): dDelta = sum of the P-block partials [N_PB, T, H]; dv = dDelta * sigmoid(v) (softplus);
    ddt = dv E, dE = dv dt, dbias[seq, h] = sum_t dv.  A zero gradient is a strong zero: dDelta = 0 gives dv = 0 and
    dv = 0 gives ddt = dE = 0 even where v, dt or E is NaN / inf (steps past the live prefix of _bwd_kernel)."""
    pid = tl.program_id(0)
    h = pid % H
    seq = (pid // H).to(tl.int64)
    start = tl.load(start_ptr + seq).to(tl.int64)
    length = tl.load(len_ptr + seq).to(tl.int32)
    rt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c in range(0, ITERS if ITERS > 0 else tl.cdiv(length, BLOCK_T)):  # ITERS: see _iters
        ok = c * BLOCK_T + rt < length
        off = (start + c * BLOCK_T) * H + h + rt * H                              # token-head offsets
        dd = tl.zeros([BLOCK_T], dtype=tl.float32)
        parts = ddelta_ptr + off
        for k in range(0, N_PB):
            dd += tl.load(parts, mask=ok, other=0.0)
            parts += TH
        dt = tl.load(dt_ptr + off, mask=ok, other=0.0).to(tl.float32)
        E = tl.load(E_ptr + off, mask=ok, other=0.0).to(tl.float32) if HAS_E else 1.0
        v = dt * E
        if HAS_BIAS:
            v += tl.load(bias_ptr + h).to(tl.float32)
        if DT_SOFTPLUS:
            dv = dd / (1.0 + tl.exp(-v))                                           # d softplus / dv = sigmoid
        else:
            dv = dd
        dv = tl.where(ok & (dd != 0.0), dv, 0.0)
        tl.store(ddt_ptr + off, tl.where(dv != 0.0, dv * E, 0.0), mask=ok)         # v = dt * E + bias
        if HAS_E:
            tl.store(dE_ptr + off, tl.where(dv != 0.0, dv * dt, 0.0), mask=ok)
        acc += dv
    tl.store(dbias_ptr + pid, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------
def _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, initial_states, chunk_size, dy=None,
           dfinal=None):
    """Validate the token layout (CONTRACT.md) and this path's options; returns (T, H, P, G, N, nseq)."""
    T, H, P, G, N, nseq = check_token_layout(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, dy,
                                             where="the triton chunked path")
    if not (isinstance(chunk_size, int) and 16 <= chunk_size <= 128 and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of 2 in [16, 128], got {chunk_size!r}")
    if initial_states is not None and tuple(initial_states.shape) != (nseq, H, P, N):
        raise ValueError(f"initial_states must be [nseq, H, P, n] = {(nseq, H, P, N)}, "
                         f"got {tuple(initial_states.shape)}")
    if dfinal is not None and tuple(dfinal.shape) != (nseq, H, P, N):
        raise ValueError(f"dfinal_states must be [nseq, H, P, n] = {(nseq, H, P, N)}, got {tuple(dfinal.shape)}")
    devs = {t.device for t in (x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, initial_states, dy, dfinal)
            if t is not None}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")
    return T, H, P, G, N, nseq


def _block_n(N):
    """The whole state width n in one tile, padded to a power of 2 >= 16 (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(N))


def _plan(kernel, x, P, N, chunk_size, precision):
    """(Q, BLOCK_P or None, launch config) from configs.pick: the kernels run chunks of Q = min(chunk_size, Q_MAX)
    steps (the result does not depend on the chunk size, only rounding does; smaller chunks keep the Q x Q tiles
    of the backward in registers), BLOCK_P state rows per program (backward: fixed, the partial dB / dC / dDelta
    buffers have one slot per P-block)."""
    cfg = configs.pick(kernel, P=P, N=_block_n(N), PREC=_prec_class(x, precision), Q=chunk_size)
    q = min(chunk_size, cfg.pop("Q_MAX", chunk_size))
    bp = cfg.pop("BLOCK_P", None) if kernel == "chunked_bwd" else None
    return q, None if bp is None else min(bp, max(16, triton.next_power_of_2(P))), cfg


def _precision(allow_tf32, fp32_precision=None):
    """fp32 dot precision: fp32_precision when given ("ieee" | "tf32" | "tf32x3"), else "tf32" with allow_tf32
    and "tf32x3" without (~fp32 accurate on tensor cores)."""
    if fp32_precision is None:
        return "tf32" if allow_tf32 else _FP32_PRECISION
    if fp32_precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"fp32_precision must be 'ieee', 'tf32', 'tf32x3' or None, got {fp32_precision!r}")
    return fp32_precision


def _prec_class(x, precision):
    """configs.pick's PREC: "bf16" / "fp16" for 16-bit inputs, else the fp32 dot precision."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x.dtype, precision)


def _iters(max_len, block):
    """ITERS constexpr: 0 on GPU (each program loops over its own chunks); under the interpreter, which cannot
    range() over a runtime scalar, a fixed trip count cdiv(max_len, block) (chunks past a sequence are no-ops)."""
    return max(1, triton.cdiv(max_len, block)) if _INTERPRET else 0


def _c(t):
    return None if t is None else t.contiguous()


def tissd_chunked_fwd(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *, initial_states=None,
                      return_final_states=False, chunk_size=64, d_skip_delta, dt_softplus, allow_tf32=False,
                      fp32_precision=None):
    """Chunked TiSSD forward on the token layout.

    x [T, H, P], dt [T, H], A [H], B/C [T, G, n], E [T, H] or None, dt_bias [H] or None, D [H] or None,
    seq_start [nseq] int64, seq_len [nseq] int32, max_len int, initial_states [nseq, H, P, n] or None.
    Returns (y [T, H, P] in x's dtype, final_states [nseq, H, P, n] float32 or None)."""
    T, H, P, G, N, nseq = _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, initial_states,
                                 chunk_size)
    x, dt, A, B, C, E, dt_bias, D = map(_c, (x, dt, A, B, C, E, dt_bias, D))
    seq_start, seq_len = seq_start.contiguous(), seq_len.contiguous()
    h0 = None if initial_states is None else initial_states.contiguous().float()
    y = torch.zeros_like(x)
    final = torch.empty(nseq, H, P, N, device=x.device, dtype=torch.float32) if return_final_states else None
    if nseq == 0 or H == 0 or P == 0:
        return y, final
    dummy = x  # stands in for absent optional pointers (never read: guarded by constexpr flags)
    precision = _precision(allow_tf32, fp32_precision)
    Q, _, cfg = _plan("chunked_fwd", x, P, N, chunk_size, precision)
    meta = dict(HAS_E=E is not None, HAS_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_H0=h0 is not None,
                STORE_FINAL=final is not None, ITERS=_iters(max_len, Q), D_SKIP_DELTA=bool(d_skip_delta),
                DT_SOFTPLUS=bool(dt_softplus), DOT=DOT_CODE[x.dtype], PRECISION=precision, Q=Q,
                BLOCK_N=_block_n(N))
    configs.launch(
        _fwd_kernel, lambda m: (nseq * H * triton.cdiv(P, m["BLOCK_P"]),),
        (x, dt, A, B, C, dummy if E is None else E, dummy if dt_bias is None else dt_bias, dummy if D is None else D,
         seq_start, seq_len, dummy if h0 is None else h0, y, dummy if final is None else final, H, G, P, N),
        meta, cfg)
    return y, final


def tissd_chunked_bwd(dy, dfinal_states, x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                      initial_states=None, chunk_size=64, d_skip_delta, dt_softplus, allow_tf32=False,
                      fp32_precision=None):
    """Chunked TiSSD backward (recomputes everything from the inputs).

    dy [T, H, P] (x's dtype or float32), dfinal_states [nseq, H, P, n] or None; other arguments as the forward.
    Returns (dx, ddt, dA, dB, dC, dE, ddt_bias, dD, dinitial_states): dx/dB/dC in x's dtype, the rest float32,
    None for an input that was None."""
    T, H, P, G, N, nseq = _check(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, initial_states,
                                 chunk_size, dy=dy, dfinal=dfinal_states)
    x, dt, A, B, C, E, dt_bias, D, dy = map(_c, (x, dt, A, B, C, E, dt_bias, D, dy))
    seq_start, seq_len = seq_start.contiguous(), seq_len.contiguous()
    h0 = None if initial_states is None else initial_states.contiguous().float()
    dfin = None if dfinal_states is None else dfinal_states.contiguous().float()
    dev, f32 = x.device, torch.float32
    precision = _precision(allow_tf32, fp32_precision)
    Q, block_p, cfg = _plan("chunked_bwd", x, P, N, chunk_size, precision)
    n_pb = triton.cdiv(P, block_p)
    R = H // G
    n_chunks = max(1, triton.cdiv(max_len, Q))

    dx = torch.zeros_like(x)
    ddt = torch.zeros(T, H, device=dev, dtype=f32)
    dE = torch.zeros(T, H, device=dev, dtype=f32) if E is not None else None
    if nseq == 0 or H == 0 or P == 0:
        zH = torch.zeros(H, device=dev, dtype=f32)
        return (dx, ddt, zH, torch.zeros_like(B), torch.zeros_like(C), dE,
                None if dt_bias is None else zH.clone(), None if D is None else zH.clone(),
                None if h0 is None else torch.zeros(nseq, H, P, N, device=dev, dtype=f32))
    dh0 = torch.empty(nseq, H, P, N, device=dev, dtype=f32) if h0 is not None else None  # every block written

    ddelta = torch.empty(n_pb, T, H, device=dev, dtype=f32)     # read back only on valid tokens
    # dB / dC partials (zeros: padding tokens are never written); one slot -> straight in x's dtype, no reduce
    part_dtype = x.dtype if n_pb * R == 1 else f32
    dB_part = torch.zeros(n_pb * R, T, G, N, device=dev, dtype=part_dtype)
    dC_part = torch.zeros(n_pb * R, T, G, N, device=dev, dtype=part_dtype)
    dA_part = torch.empty(nseq * H * n_pb, device=dev, dtype=f32)
    dD_part = torch.empty(nseq * H * n_pb, device=dev, dtype=f32)
    states = torch.empty(nseq * H * n_chunks * P * N, device=dev, dtype=f32)
    cbs = torch.empty(nseq * H * n_pb * n_chunks * Q * Q, device=dev, dtype=f32)   # C B^T per chunk and program
    dummy = x
    meta = dict(HAS_E=E is not None, HAS_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_H0=h0 is not None,
                HAS_DFINAL=dfin is not None, ITERS=_iters(max_len, Q), D_SKIP_DELTA=bool(d_skip_delta),
                DT_SOFTPLUS=bool(dt_softplus), DOT=DOT_CODE[x.dtype],
                PRECISION=precision, Q=Q, BLOCK_P=block_p, BLOCK_N=_block_n(N),
                SPLIT_BC=_prec_class(x, precision) == "tf32x3")   # registers: see _bwd_kernel
    configs.launch(
        _bwd_kernel, (nseq * H * n_pb,),
        (dy, dummy if dfin is None else dfin, x, dt, A, B, C, dummy if E is None else E,
         dummy if dt_bias is None else dt_bias, dummy if D is None else D, seq_start, seq_len,
         dummy if h0 is None else h0, states, cbs, dx, ddelta, dB_part, dC_part, dummy if dh0 is None else dh0,
         dA_part, dD_part, T, H, G, P, N, n_pb, n_chunks),
        meta, cfg)
    dbias_part = torch.empty(nseq * H, device=dev, dtype=f32)
    _bwd_dt_kernel[(nseq * H,)](
        ddelta, dt, dummy if E is None else E, dummy if dt_bias is None else dt_bias, seq_start, seq_len,
        ddt, dummy if dE is None else dE, dbias_part, T * H, H, n_pb,
        HAS_E=E is not None, HAS_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        ITERS=_iters(max_len, 128), BLOCK_T=128,
    )
    # reduce partials: over P-blocks and the heads of a group (dB, dC), over sequences and P-blocks (dA, dD)
    dB = (dB_part[0] if dB_part.shape[0] == 1 else dB_part.sum(0)).to(x.dtype)
    dC = (dC_part[0] if dC_part.shape[0] == 1 else dC_part.sum(0)).to(x.dtype)
    dA = dA_part.view(nseq, H, n_pb).sum((0, 2))
    dD = dD_part.view(nseq, H, n_pb).sum((0, 2)) if D is not None else None
    ddt_bias = dbias_part.view(nseq, H).sum(0) if dt_bias is not None else None
    return dx, ddt, dA, dB, dC, dE, ddt_bias, dD, dh0
