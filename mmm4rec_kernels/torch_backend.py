"""The torch backend of the time-aware SSD: what `tissd(..., backend="torch")` runs (CPU tensors, float64, no triton).

Unlike `reference.py` (the float64 oracle the tests trust), this is product code, built for robustness and speed:
- decays are segment sums of the per-step log-decays a_t = A Delta_t, computed as *masked cumulative sums in float64*
  (seg[i, j] = sum_{k=j+1..i} a_k summed directly over the steps it covers, never cs_i - cs_j): a time gap of 1e9
  cannot swamp the small steps after it, and autograd then sums d a_k over exactly the pairs (i >= k > j) it touches,
  so no cancellation reaches dA / ddt / dE either;
- padded steps (t >= lengths[i]) are removed with torch.where before any arithmetic, so NaN / inf written there never
  reaches a valid output or a gradient of a valid input (NaN * 0 = NaN, where(mask, NaN, 0) = 0);
- fp16 / bf16 inputs are computed in float32, float64 inputs in float64; y comes back in x's dtype, states in the
  compute dtype (float32 for fp32/half inputs);
- no Python loop over time steps: the quadratic form is batched matmuls, the chunked form batches all chunks and passes
  the states between chunks with one (nchunks+1)^2 decay matrix.

Shapes (padded batch): x [b, L, H, P], dt / time_scale [b, L, H], A / dt_bias [H], D [H] or [H, P],
B, C [b, L, G, n] (head h reads group h // (H // G)), lengths [b]; packed: x [1, T, H, P] with cu_seqlens [nseq+1].
initial_states / final states [nseq, H, P, n].  Autograd runs through plain torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


# ------------------------------------------------------------------------------------------------------- helpers
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; fp32 / fp16 / bf16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sum_stable(a):
    """a [..., L] (float64) -> [..., L, L] with out[i, j] = sum_{k=j+1..i} a_k for j <= i and 0 above the diagonal.

    Summed directly over the covered steps (a masked cumulative sum), so no difference of two large prefix sums."""
    L = a.shape[-1]
    idx = torch.arange(L, device=a.device)
    below = idx[:, None] > idx[None, :]                                   # [k, j]: step k lies after column j
    terms = torch.where(below, a[..., :, None], a.new_zeros(()))          # [..., k, j] = a_k (k > j)
    return torch.cumsum(terms, dim=-2)                                    # [..., i, j] = sum_{j<k<=i} a_k


def decay_matrix(a, out_dtype):
    """a [..., L] float64 -> lower-triangular exp(seg) [..., L, L] in out_dtype (0 above the diagonal)."""
    L = a.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    return torch.where(causal, torch.exp(segment_sum_stable(a).to(out_dtype)), 0.0)


def exclusive_tail_sum(a):
    """a [..., L] -> tail[..., j] = sum_{k=j+1..L-1} a_k (the decay from step j to the end), summed directly."""
    rev = torch.flip(torch.cumsum(torch.flip(a, (-1,)), dim=-1), (-1,))  # inclusive: sum_{k>=j}
    return F.pad(rev[..., 1:], (0, 1))


def step_sizes(dt, E, dt_bias, dt_softplus, mask):
    """Delta = softplus(dt * E + dt_bias) [b, L, H] (no softplus when dt_softplus=False), 0 on padded steps.
    Inputs must already be clean (padded steps zeroed with where)."""
    v = dt if E is None else dt * E
    if dt_bias is not None:
        v = v + dt_bias
    delta = F.softplus(v) if dt_softplus else v
    return torch.where(mask[..., None], delta, 0.0)


# ------------------------------------------------------------------------------------------------ the two forms
def _intra(Cg, Bg, u, a64, H):
    """Quadratic form on blocks: sum_{j<=i} (C_i . B_j) exp(seg_ij) u_j.

    Cg, Bg [N, G, Q, n]; u [N, H, Q, P]; a64 [N, H, Q] float64.  Returns [N, H, Q, P]."""
    N, G, Q, _ = Cg.shape
    P = u.shape[-1]
    cb = torch.matmul(Cg, Bg.transpose(-1, -2))                            # [N, G, Q, Q]  C_i . B_j
    decay = decay_matrix(a64, u.dtype).view(N, G, H // G, Q, Q)            # [N, G, H/G, Q, Q]
    scores = (cb[:, :, None] * decay).view(N, H, Q, Q)
    return torch.matmul(scores, u)                                        # [N, H, Q, P]


def _heads_first(x, delta, B, C):
    """[b, L, ...] -> head-major: u = Delta x [b, H, L, P], B, C [b, G, L, n]."""
    u = (x * delta[..., None]).transpose(1, 2)
    return u, B.transpose(1, 2), C.transpose(1, 2)


def quadratic_form(x, delta, a64, B, C, initial_states=None, return_final_states=False):
    """y [b, L, H, P] (without the D skip) of the quadratic form; optional states h0 / h_T [b, H, P, n]."""
    b, L, H, P = x.shape
    G = B.shape[2]
    u, Bg, Cg = _heads_first(x, delta, B, C)
    y = _intra(Cg, Bg, u, a64.transpose(1, 2), H)                         # [b, H, L, P]
    if initial_states is None and not return_final_states:
        return y.transpose(1, 2), None
    cs = torch.cumsum(a64, dim=1).transpose(1, 2)                          # [b, H, L] float64, decay from step 0
    h0 = initial_states
    if h0 is not None:                                                    # y_i += exp(cs_i) C_i . h0
        Ch = Cg.repeat_interleave(H // G, dim=1)                          # [b, H, L, n]
        y = y + torch.exp(cs.to(x.dtype))[..., None] * torch.matmul(Ch, h0.transpose(-1, -2))
    final = None
    if return_final_states:                                               # h_T = sum_j exp(tail_j) u_j B_j^T (+ h0)
        w = torch.exp(exclusive_tail_sum(a64.transpose(1, 2)).to(x.dtype))  # [b, H, L]
        Bh = Bg.repeat_interleave(H // G, dim=1)
        final = torch.matmul((u * w[..., None]).transpose(-1, -2), Bh)    # [b, H, P, n]
        if h0 is not None:
            final = final + torch.exp(a64.sum(1).to(x.dtype))[..., None, None] * h0
    return y.transpose(1, 2), final


def chunked_form(x, delta, a64, B, C, chunk_size, initial_states=None, return_final_states=False):
    """y [b, L, H, P] (without the D skip) of the chunked form; h0 / h_T [b, H, P, n].

    Inside chunks of Q steps: the quadratic form.  Between chunks: state_c = sum_{j in c} exp(tail_j) u_j B_j^T,
    entering state of chunk c = sum_{c' < c} exp(total decay of chunks c'+1..c-1) state_c' (+ the decayed h0),
    all chunks at once through one (nc+1) x (nc+1) decay matrix over chunk totals."""
    b, L, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    Q = min(chunk_size, L)                                                # the chunk length does not change the math
    nc = -(-L // Q)
    if nc == 1:                                                           # one chunk: exactly the quadratic form
        return quadratic_form(x, delta, a64, B, C, initial_states, return_final_states)
    pad = nc * Q - L                                                      # padded tail steps: a = 0, u = 0, B = C = 0
    if pad:
        x, delta, a64, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, delta, a64, B, C))
    u, Bg, Cg = _heads_first(x, delta, B, C)                       # u [b, H, Lp, P], Bg/Cg [b, G, Lp, n]
    # blocks [b, nc, head, Q, ...] -> flatten (b, nc) into the batch of the quadratic form
    blk = lambda t: t.reshape(b, t.shape[1], nc, Q, t.shape[-1]).transpose(1, 2)  # noqa: E731
    ub, Bb, Cb = blk(u), blk(Bg), blk(Cg)                                 # [b, nc, *, Q, *]
    ab = a64.transpose(1, 2).reshape(b, H, nc, Q).transpose(1, 2)         # [b, nc, H, Q] float64
    y = _intra(Cb.reshape(b * nc, G, Q, n), Bb.reshape(b * nc, G, Q, n), ub.reshape(b * nc, H, Q, P),
               ab.reshape(b * nc, H, Q), H).view(b, nc, H, Q, P)
    # state written by each chunk (at its end)
    w = torch.exp(exclusive_tail_sum(ab).to(x.dtype))                     # [b, nc, H, Q]
    Bh = Bb.repeat_interleave(H // G, dim=2)                              # [b, nc, H, Q, n]
    Ch = Cb.repeat_interleave(H // G, dim=2)
    states = torch.matmul((ub * w[..., None]).transpose(-1, -2), Bh)      # [b, nc, H, P, n]
    h0 = initial_states if initial_states is not None else states.new_zeros(b, H, P, n)
    states = torch.cat([h0[:, None], states], dim=1)                      # [b, nc+1, H, P, n]
    totals = F.pad(ab.sum(-1).transpose(1, 2), (1, 0))                    # [b, H, nc+1]: 0, chunk totals
    passing = decay_matrix(totals, x.dtype)                               # [b, H, nc+1, nc+1]
    # entering[c] = sum_{c' <= c} passing[c, c'] states[c']  (c indexes the state before chunk c, c = nc: final)
    entering = torch.einsum("bhcd,bdhpn->bchpn", passing, states)        # [b, nc+1, H, P, n]
    cs = torch.exp(torch.cumsum(ab, dim=-1).to(x.dtype))                  # [b, nc, H, Q] decay from chunk start
    y = y + cs[..., None] * torch.matmul(Ch, entering[:, :nc].transpose(-1, -2))
    y = y.transpose(1, 2).reshape(b, H, nc * Q, P)[:, :, :L].transpose(1, 2)
    return y, (entering[:, nc] if return_final_states else None)


# --------------------------------------------------------------------------------------------------- entry point
def _packed_gather(cu, T):
    """Packed offsets cu [nseq+1] -> (gather index [nseq, max_len] into the T tokens, valid [nseq, max_len])."""
    lens = cu[1:] - cu[:-1]
    max_len = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(max_len, device=cu.device)
    idx = (cu[:-1, None] + pos[None, :]).clamp(min=0, max=max(T - 1, 0))
    return idx, pos[None, :] < lens[:, None]


def tissd_torch(x, dt, A, B, C, *, time_scale=None, dt_bias=None, D=None, d_skip="delta", dt_softplus=True,
                lengths=None, cu_seqlens=None, initial_states=None, return_final_states=False, path="quadratic",
                chunk_size=64):
    """Time-aware SSD in torch (see module docstring).  Arguments as `mmm4rec_kernels.tissd` (already validated).

    path: 'quadratic' | 'chunked' | 'reference' (the naive float64 recurrence of reference.py, for debugging).
    Returns y [b, L, H, P] in x's dtype, or (y, final_states [nseq, H, P, n]) when return_final_states."""
    b, L, H, P = x.shape
    n = B.shape[-1]
    cd = torch.float64 if path == "reference" else compute_dtype(x.dtype)
    dev = x.device
    if cu_seqlens is not None:                                            # packed -> [nseq, max_len] padded
        idx, mask = _packed_gather(cu_seqlens.to(device=dev, dtype=torch.int64), L)
        gather = lambda t: None if t is None else t[0][idx]  # noqa: E731
        x_, dt_, B_, C_, E_ = (gather(t) for t in (x, dt, B, C, time_scale))
    else:
        mask = reference.valid_mask(lengths, b, L, dev)
        x_, dt_, B_, C_, E_ = x, dt, B, C, time_scale
    nseq = mask.shape[0]

    def clean(t):  # cast to the compute dtype and zero the padded steps with where (NaN-proof)
        if t is None:
            return None
        m = mask.view(*mask.shape, *([1] * (t.dim() - 2)))
        return torch.where(m, t.to(cd), 0.0)

    x_, dt_, B_, C_, E_ = (clean(t) for t in (x_, dt_, B_, C_, E_))
    A_ = A.to(cd)
    bias_ = None if dt_bias is None else dt_bias.to(cd)
    h0 = None if initial_states is None else initial_states.to(cd)

    if mask.shape[1] == 0 or nseq == 0:                                  # L = 0 or no sequences: nothing to scan
        y = x_.new_zeros(x_.shape)
        final = None
        if return_final_states:
            final = h0 if h0 is not None else x_.new_zeros(nseq, H, P, n)
    elif path == "reference":
        out = reference.tissd_recurrent_ref(x_, dt_, A_, B_, C_, time_scale=E_, dt_bias=bias_, D=None,
                                            dt_softplus=dt_softplus, lengths=mask.sum(1), initial_states=h0,
                                            return_final_states=return_final_states)
        y, final = out if return_final_states else (out, None)
    else:
        delta = step_sizes(dt_, E_, bias_, dt_softplus, mask)
        a64 = delta.double() * A_.double()                                # log-decays, float64 for the sums
        if path == "quadratic":
            y, final = quadratic_form(x_, delta, a64, B_, C_, h0, return_final_states)
        elif path == "chunked":
            y, final = chunked_form(x_, delta, a64, B_, C_, chunk_size, h0, return_final_states)
        else:
            raise ValueError(f"path must be 'quadratic', 'chunked' or 'reference' for the torch backend, got {path!r}")
    if D is not None and mask.shape[1] > 0 and nseq > 0:                  # skip: D * s_i * x_i, D [H] or [H, P]
        D_ = D.to(cd)
        D_ = D_[:, None] if D_.dim() == 1 else D_
        if d_skip == "delta":
            delta_skip = step_sizes(dt_, E_, bias_, dt_softplus, mask) if path == "reference" else delta
            y = y + D_ * delta_skip[..., None] * x_
        else:
            y = y + D_ * x_
    # y is already exactly 0 on padded steps (C and x were zeroed there): no mask pass needed
    y = y.to(x.dtype)
    if cu_seqlens is not None:
        y = y[mask].unsqueeze(0)                                          # back to [1, T, H, P] (in order)
    return (y, final) if return_final_states else y
