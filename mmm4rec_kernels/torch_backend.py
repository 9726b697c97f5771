"""The torch backend of the time-aware SSD: what `tissd(..., backend="torch")` runs (CPU or any device, no triton).

Unlike `reference.py` (the float64 oracle the tests trust), this is product code, built for robustness and speed:
- decays are segment sums of the per-step log-decays a_t = A Delta_t, *summed directly* over the steps each segment
  covers (seg[i, j] = sum_{k=j+1..i} a_k, never cs_i - cs_j): a time gap of 1e9 cannot swamp the small steps after
  it, and autograd then sums d a_k over exactly the pairs (i >= k > j) it touches, so no cancellation reaches
  dA / ddt / dE either.  Every a_k has the same sign (A < 0, Delta >= 0), so a direct sum in the compute dtype
  (float32 for fp32 inputs) is accurate to ~L ulp: no float64 detour is needed (the difference of two fp32
  cumulative sums is what loses accuracy, see CONTRACT.md);
- padded steps (t >= lengths[i]) are removed with torch.where before any arithmetic, so NaN / inf written there never
  reaches a valid output or a gradient of a valid input (NaN * 0 = NaN, where(mask, NaN, 0) = 0);
- fp16 / bf16 inputs are computed in float32, float64 inputs in float64; y comes back in x's dtype, states in the
  compute dtype (float32 for fp32/half inputs);
- no Python loop over time steps: the quadratic form is batched einsums, the chunked form batches all chunks and passes
  the states between chunks with one (nchunks+1)^2 decay matrix;
- on CPU (float32 / float64 compute) the quadratic form without states, D skip included, runs the native C++ kernel
  `mmm4rec_kernels.ops.ssd_scan` (torch.ops.mmm4rec.ssd_scan_cpu) instead (same sums, each sequence over its valid steps only, no intermediate
  tensors; it never reads padded x / B / C, so only dt and E are cleaned); without a C++ compiler, the einsums.
  Eager (not traced), with every tensor in x's float32 / float64 dtype and no packing, the whole call (step sizes,
  scan, D skip, and their backward) is ONE native autograd node instead (~30 torch ops and nodes fewer; in C++ once
  mmm4rec_kernels.cpu.nodes has built it, else `_TiSSDCPU`: the same C entries, equal values); a NaN / inf input
  sends it back to the path above (its NaN-causality rule).

Shapes (padded batch): x [b, L, H, P], dt / time_scale [b, L, H], A / dt_bias [H], D [H] or [H, P],
B, C [b, L, G, n] (head h reads group h // (H // G)), lengths [b]; packed: x [1, T, H, P] with cu_seqlens [nseq+1].
initial_states / final states [nseq, H, P, n].  Autograd runs through plain torch ops (and the native kernel's own
backward).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu as native
from .cpu import nodes as native_nodes
from . import ops


# ------------------------------------------------------------------------------------------------------- helpers
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; fp32 / fp16 / bf16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(lengths, b, L, device):
    """[b, L] bool, True where t < lengths[b] (all True without lengths).  No host sync."""
    if lengths is None:
        return torch.ones(b, L, dtype=torch.bool, device=device)
    return torch.arange(L, device=device)[None, :] < lengths.to(device)[:, None]


# Up to this length the segment sums are one matmul with a constant 0/1 "cover" matrix [L, L*L] (L^3 entries: 262k
# at 64); longer sequences use the masked cumulative sum (same sums, more memory traffic).
COVER_MAX_LEN = 64


@functools.lru_cache(maxsize=16)
def _cover(L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[L, L*L] with cover[k, i*L + j] = 1 when j < k <= i (step k lies inside segment (j, i]), else 0."""
    with torch.inference_mode(False):            # cached: must stay usable by autograd after an inference_mode call
        idx = torch.arange(L, device=device)
        k, i, j = idx[:, None, None], idx[None, :, None], idx[None, None, :]
        return ((j < k) & (k <= i)).to(dtype).reshape(L, L * L)


def _constant(builder, L, device, dtype):
    """builder(L, device, dtype), cached in eager; built in the graph while torch.compile traces (the cache is not
    traceable, and the compiler folds the constant itself)."""
    if torch.compiler.is_compiling():
        return builder.__wrapped__(L, device, dtype)
    return builder(L, device, dtype)


def segment_sum_stable(a):
    """a [..., L] -> [..., L, L] with out[i, j] = sum_{k=j+1..i} a_k for j <= i and 0 above the diagonal.

    Summed directly over the covered steps (never a difference of two large prefix sums): for L <= COVER_MAX_LEN as
    a @ cover (0/1 coefficients: every output is the plain sum of its own terms, and autograd sends d out[i, j] to
    exactly the a_k it covers), beyond that as a masked cumulative sum."""
    L = a.shape[-1]
    if L <= COVER_MAX_LEN:
        return (a.reshape(-1, L) @ _constant(_cover, L, a.device, a.dtype)).reshape(*a.shape[:-1], L, L)
    idx = torch.arange(L, device=a.device)
    below = idx[:, None] > idx[None, :]                                   # [k, j]: step k lies after column j
    terms = torch.where(below, a[..., :, None], a.new_zeros(()))          # [..., k, j] = a_k (k > j)
    return torch.cumsum(terms, dim=-2)                                    # [..., i, j] = sum_{j<k<=i} a_k


@functools.lru_cache(maxsize=16)
def _minus_inf_above_diagonal(L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[L*L]: -inf at (i, j) with j > i, else 0 (added to the segment sums, exp then gives the causal zeros)."""
    with torch.inference_mode(False):            # cached: see _cover
        idx = torch.arange(L, device=device)
        return torch.where(idx[None, :] > idx[:, None], float("-inf"), 0.0).to(dtype).reshape(L * L)


def decay_matrix(a, out_dtype):
    """a [..., L] -> lower-triangular exp(seg) [..., L, L] in out_dtype (0 above the diagonal)."""
    L = a.shape[-1]
    if L <= COVER_MAX_LEN:            # one addmm: segment sums with -inf above the diagonal, then exp (exactly 0 there)
        seg = torch.addmm(_constant(_minus_inf_above_diagonal, L, a.device, a.dtype), a.reshape(-1, L),
                          _constant(_cover, L, a.device, a.dtype))
        return torch.exp(seg.reshape(*a.shape[:-1], L, L).to(out_dtype))
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
# All tensors stay in the natural [batch, step, head, ...] layout; heads are viewed as (G, H/G) so B and C are never
# repeated per head.  Contractions are einsums: unlike matmul on transposed views, their backward stays fast when
# the incoming gradient is an expanded tensor (e.g. from y.sum()), where matmul fell back to one GEMM per matrix.
def _intra(C, B, u, log_decay):
    """Quadratic form on blocks: y_i = sum_{j<=i} (C_i . B_j) exp(seg_ij) u_j.

    C, B [N, Q, G, n]; u [N, Q, H, P]; log_decay [N, Q, H] (compute dtype).  Returns [N, Q, H, P]."""
    N, Q, G, _ = C.shape
    H, P = u.shape[2], u.shape[3]
    cb = torch.einsum("zign,zjgn->zgij", C, B)                            # [N, G, Q, Q]  C_i . B_j
    decay = decay_matrix(log_decay.transpose(1, 2), u.dtype).reshape(N, G, H // G, Q, Q)
    y = torch.einsum("zghij,zjghp->zighp", cb[:, :, None] * decay, u.reshape(N, Q, G, H // G, P))
    return y.reshape(N, Q, H, P)


def _state_term(C, h, decay_from_start):
    """exp(cs_i) C_i . h  for C [N, Q, G, n], h [N, H, P, n], decay_from_start [N, Q, H] -> [N, Q, H, P]."""
    N, Q, G, n = C.shape
    H, P = h.shape[1], h.shape[2]
    y = torch.einsum("zign,zghpn->zighp", C, h.reshape(N, G, H // G, P, n)).reshape(N, Q, H, P)
    return y * decay_from_start[..., None]


def _written_state(u, B, w):
    """sum_j w_j u_j B_j^T for u [N, Q, H, P], B [N, Q, G, n], w [N, Q, H] -> [N, H, P, n]."""
    N, Q, H, P = u.shape
    G, n = B.shape[2], B.shape[3]
    uw = (u * w[..., None]).reshape(N, Q, G, H // G, P)
    return torch.einsum("zjghp,zjgn->zghpn", uw, B).reshape(N, H, P, n)


def quadratic_form(x, delta, log_decay, B, C, initial_states=None, return_final_states=False):
    """y [b, L, H, P] (without the D skip) of the quadratic form; optional states h0 / h_T [b, H, P, n]."""
    u = x * delta[..., None]                                              # Delta_j x_j
    y = _intra(C, B, u, log_decay)
    h0 = initial_states
    if h0 is not None:                                                    # y_i += exp(cs_i) C_i . h0
        y = y + _state_term(C, h0, torch.exp(torch.cumsum(log_decay, dim=1).to(x.dtype)))
    final = None
    if return_final_states:                                               # h_T = sum_j exp(tail_j) u_j B_j^T (+ h0)
        tail = exclusive_tail_sum(log_decay.transpose(1, 2)).transpose(1, 2)    # [b, L, H] decay from j to the end
        final = _written_state(u, B, torch.exp(tail.to(x.dtype)))
        if h0 is not None:
            final = final + torch.exp(log_decay.sum(1).to(x.dtype))[..., None, None] * h0
    return y, final


def chunked_form(x, delta, log_decay, B, C, chunk_size, initial_states=None, return_final_states=False):
    """y [b, L, H, P] (without the D skip) of the chunked form; h0 / h_T [b, H, P, n].

    Inside chunks of Q steps: the quadratic form.  Between chunks: state_c = sum_{j in c} exp(tail_j) u_j B_j^T,
    entering state of chunk c = sum_{c' < c} exp(total decay of chunks c'+1..c-1) state_c' (+ the decayed h0),
    all chunks at once through one (nc+1) x (nc+1) decay matrix over chunk totals."""
    b, L, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    Q = min(chunk_size, L)                                                # the chunk length does not change the math
    nc = -(-L // Q)
    if nc == 1:                                                           # one chunk: exactly the quadratic form
        return quadratic_form(x, delta, log_decay, B, C, initial_states, return_final_states)
    pad = nc * Q - L                                                      # padded tail steps: a = 0, u = 0, B = C = 0
    if pad:
        x, delta, log_decay, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, delta, log_decay, B, C))
    N = b * nc                                                            # chunks flattened into the batch
    u = (x * delta[..., None]).reshape(N, Q, H, P)
    Bc, Cc, ac = B.reshape(N, Q, G, n), C.reshape(N, Q, G, n), log_decay.reshape(N, Q, H)
    y = _intra(Cc, Bc, u, ac)                                             # [N, Q, H, P]
    tail = exclusive_tail_sum(ac.transpose(1, 2)).transpose(1, 2)         # [N, Q, H] decay from j to chunk end
    states = _written_state(u, Bc, torch.exp(tail.to(x.dtype))).reshape(b, nc, H, P, n)
    h0 = initial_states if initial_states is not None else states.new_zeros(b, H, P, n)
    states = torch.cat([h0[:, None], states], dim=1)                      # [b, nc+1, H, P, n]
    totals = F.pad(ac.sum(1).reshape(b, nc, H).transpose(1, 2), (1, 0))     # [b, H, nc+1]: 0, chunk totals
    passing = decay_matrix(totals, x.dtype)                               # [b, H, nc+1, nc+1]
    # entering[c] = sum_{c' <= c} passing[c, c'] states[c']  (the state before chunk c; c = nc: the final state)
    entering = torch.einsum("bhcd,bdhpn->bchpn", passing, states)        # [b, nc+1, H, P, n]
    from_start = torch.exp(torch.cumsum(ac, dim=1).to(x.dtype))           # [N, Q, H] decay from chunk start
    y = y + _state_term(Cc, entering[:, :nc].reshape(N, H, P, n), from_start)
    y = y.reshape(b, nc * Q, H, P)[:, :L]
    return y, (entering[:, nc] if return_final_states else None)


# --------------------------------------------------------------------------------------------------- entry point
def _packed_gather(cu, T):
    """Packed offsets cu [nseq+1] -> (gather index [nseq, max_len] into the T tokens, valid [nseq, max_len])."""
    lens = cu[1:] - cu[:-1]
    max_len = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(max_len, device=cu.device)
    idx = (cu[:-1, None] + pos[None, :]).clamp(min=0, max=max(T - 1, 0))
    return idx, pos[None, :] < lens[:, None]


class _NonFinite(Exception):
    """A valid row of the native call's output is NaN / inf: the general path (and its NaN rule) must run."""


class _TiSSDCPU(torch.autograd.Function):
    """One eager CPU tissd() call without states as one autograd node (mmm4rec_kernels.cpu.tissd_forward /
    tissd_backward): Delta = softplus(dt * E + dt_bias), a = A Delta, y = quadratic form + D skip (D [H] or [H, P],
    contiguous, as every tensor here).  Raises _NonFinite from forward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, E, dt_bias, D, valid_len, skip_delta, softplus):
        y = native.tissd_forward(x, dt, A, B, C, E, dt_bias, D, valid_len, skip_delta, softplus)
        if y is None:
            raise _NonFinite
        ctx.save_for_backward(x, dt, A, B, C, E, dt_bias, D, valid_len)
        ctx.skip_delta, ctx.softplus = skip_delta, softplus
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, dt, A, B, C, E, dt_bias, D, valid_len = ctx.saved_tensors
        grads = native.tissd_backward(gy.contiguous(), x, dt, A, B, C, E, dt_bias, D, valid_len, ctx.skip_delta,
                                      ctx.softplus)
        return (*grads, None, None, None)


def _native_call(x, dt, A, B, C, E, dt_bias, D, d_skip, dt_softplus, lengths):
    """y of an eager CPU call through _TiSSDCPU, or None when it does not apply (traced, packed, another dtype or
    device among the tensors, empty, no native library) or an input is NaN / inf (the general path runs)."""
    if torch.compiler.is_compiling() or not native.supports(x) or x.numel() == 0 or B.shape[-1] == 0 \
            or (lengths is not None and not lengths.is_cpu):
        return None
    for t in (dt, A, B, C, E, dt_bias, D):                   # one device, one dtype (is_cpu: no device object)
        if t is not None and (not t.is_cpu or t.dtype != x.dtype):
            return None
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    valid_len = None if lengths is None else lengths.to(torch.int64).contiguous()
    args = (c(x), c(dt), c(A), c(B), c(C), c(E), c(dt_bias), c(D), valid_len, d_skip == "delta", bool(dt_softplus))
    cpp = native_nodes.get()                 # the same node in C++ (cpu/nodes.py), once built; else the Python one
    if cpp is not None:
        return cpp.tissd(*args)              # (None when a valid row is not finite)
    try:
        return _TiSSDCPU.apply(*args)
    except _NonFinite:
        return None


def tissd_torch(x, dt, A, B, C, *, time_scale=None, dt_bias=None, D=None, d_skip="delta", dt_softplus=True,
                lengths=None, cu_seqlens=None, initial_states=None, return_final_states=False, path="quadratic",
                chunk_size=64):
    """Time-aware SSD in torch (see module docstring).  Arguments as `mmm4rec_kernels.tissd` (already validated).

    path: 'quadratic' | 'chunked' | 'reference' (the naive float64 recurrence of reference.py, for debugging).
    Returns y [b, L, H, P] in x's dtype, or (y, final_states [nseq, H, P, n]) when return_final_states."""
    if path == "quadratic" and cu_seqlens is None and initial_states is None and not return_final_states:
        y = _native_call(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, dt_softplus, lengths)
        if y is not None:
            return y
    b, L, H, P = x.shape
    n = B.shape[-1]
    cd = torch.float64 if path == "reference" else compute_dtype(x.dtype)
    dev = x.device
    if cu_seqlens is not None:                                            # packed -> [nseq, max_len] padded
        idx, mask = _packed_gather(cu_seqlens.to(device=dev, dtype=torch.int64), L)
        gather = lambda t: None if t is None else t[0][idx]  # noqa: E731
        x_, dt_, B_, C_, E_ = (gather(t) for t in (x, dt, B, C, time_scale))
    else:
        mask = valid_mask(lengths, b, L, dev)
        x_, dt_, B_, C_, E_ = x, dt, B, C, time_scale
    nseq = mask.shape[0]

    def clean(t):  # cast to the compute dtype and zero the padded steps with where (NaN-proof)
        if t is None:
            return None
        m = mask.view(*mask.shape, *([1] * (t.dim() - 2)))
        return torch.where(m, t.to(cd), 0.0)

    # CPU quadratic form without states: the native kernel (mmm4rec_kernels.cpu), D skip included.  It reads valid
    # steps only, so x, B, C need no cleaning; dt and E still do (their padded values would reach d dt_bias).
    native_scan = (path == "quadratic" and initial_states is None and not return_final_states and mask.shape[1] > 0
                   and nseq > 0 and native.supports(x, dtype=cd))
    if native_scan:
        x_, B_, C_ = (t.to(cd) for t in (x_, B_, C_))
        dt_, E_ = clean(dt_), clean(E_)
    else:
        x_, dt_, B_, C_, E_ = (clean(t) for t in (x_, dt_, B_, C_, E_))
    # NaN causality: non-finite inputs are replaced by 0 (with where: no 0 * NaN reaches a valid output or a
    # gradient), and NaN is added at the end to the outputs from the first such step of a sequence and head on (a
    # constant: the gradients of the finite inputs are those of the recurrence, whose outputs are linear in x and B).
    # Traced (compile / export): the marking is the registered op mmm4rec::nonfinite_onward, opaque to the compiler,
    # which skips the per-step work itself when its sums are finite on CPU.  Inlined, inductor fused the marking into
    # its neighbours and the x / B / C replacement saved bool masks (slow to store in its CPU code): the paper-width
    # CPU training step measured 1.5x slower compiled than eager with both, 0.92-1.0x with the op and no x / B / C
    # replacement on the native path.
    marked = None
    if path != "reference" and mask.shape[1] > 0 and nseq > 0:
        if torch.compiler.is_compiling():
            marked = ops.nonfinite_onward(x_, dt_, E_, B_, C_, mask)
        elif ops.may_hold_nonfinite(x_, dt_, E_, B_, C_):
            marked = ops.nonfinite_onward_steps(x_, dt_, E_, B_, C_, mask)
    if marked is not None:
        finite = lambda t: None if t is None else torch.where(torch.isfinite(t), t, 0.0)  # noqa: E731
        dt_, E_ = finite(dt_), finite(E_)
        if not native_scan:   # the native kernel needs no clean x, B, C: it sums pairs j <= i only and its backward
            x_, B_, C_ = finite(x_), finite(B_), finite(C_)   # skips rows whose gradient is 0 (no 0 * NaN)
    A_ = A.to(cd)
    bias_ = None if dt_bias is None else dt_bias.to(cd)
    h0 = None if initial_states is None else initial_states.to(cd)

    if native_scan:
        delta = step_sizes(dt_, E_, bias_, dt_softplus, mask)
        D_ = None if D is None else D.to(cd)
        D_ = D_[:, None].expand(H, P) if D_ is not None and D_.dim() == 1 else D_
        y = ops.ssd_scan(x_, delta, delta * A_, B_, C_, mask.sum(1), D_, skip_delta=d_skip == "delta")
        final = None
    elif mask.shape[1] == 0 or nseq == 0:                                # L = 0 or no sequences: nothing to scan
        y = x_.new_zeros(x_.shape)
        final = None
        if return_final_states:
            final = h0 if h0 is not None else x_.new_zeros(nseq, H, P, n)
    elif path == "reference":
        from .reference import tissd_recurrent_ref     # path="reference": the float64 oracle, on request only
        out = tissd_recurrent_ref(x_, dt_, A_, B_, C_, time_scale=E_, dt_bias=bias_, D=None,
                                            dt_softplus=dt_softplus, lengths=mask.sum(1), initial_states=h0,
                                            return_final_states=return_final_states)
        y, final = out if return_final_states else (out, None)
    else:
        delta = step_sizes(dt_, E_, bias_, dt_softplus, mask)
        log_decay = delta * A_                                                   # log-decays a_t = A Delta_t (all <= 0)
        if path == "quadratic":
            y, final = quadratic_form(x_, delta, log_decay, B_, C_, h0, return_final_states)
        elif path == "chunked":
            y, final = chunked_form(x_, delta, log_decay, B_, C_, chunk_size, h0, return_final_states)
        else:
            raise ValueError(f"path must be 'quadratic', 'chunked' or 'reference' for the torch backend, got {path!r}")
    if D is not None and mask.shape[1] > 0 and nseq > 0 and not native_scan:   # skip: D s_i x_i, D [H] or [H, P]
        D_ = D.to(cd)
        D_ = D_[:, None] if D_.dim() == 1 else D_
        if d_skip == "delta":
            delta_skip = step_sizes(dt_, E_, bias_, dt_softplus, mask) if path == "reference" else delta
            y = y + D_ * delta_skip[..., None] * x_
        else:
            y = y + D_ * x_
    # y is already exactly 0 on padded steps (C and x were zeroed there; the native kernel writes 0): no mask pass
    if marked is not None:
        y = y + torch.where(marked[..., None], float("nan"), 0.0).to(y.dtype)
        if final is not None:
            final = final + torch.where(marked.any(1)[..., None, None], float("nan"), 0.0).to(final.dtype)
    y = y.to(x.dtype)
    if cu_seqlens is not None:
        y = y[mask].unsqueeze(0)                                          # back to [1, T, H, P] (in order)
    return (y, final) if return_final_states else y
