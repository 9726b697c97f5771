"""Float64-capable pure-torch references for the time-aware SSD (TiSSD / TiCoSSD).

These are the truth the tests compare every kernel against. They favour clarity over speed.

Shapes (batched, right-padded layout):
    x  [b, L, H, P]   inputs per head
    dt [b, L, H]      raw step (pre-softplus)
    A  [H]            negative decay rate per head
    B  [b, L, G, n]   input projection, G divides H (head h uses group h // (H // G))
    C  [b, L, G, n]   output projection
    E  [b, L, H]      time modulation (time_scale); None = no modulation
    dt_bias [H], D [H] or [H, P] optional
    lengths [b]       valid prefix length per sequence (right padding); None = all L valid

Math (one sequence, one head):
    Delta_t = softplus(dt_t * E_t + dt_bias)          (dt_softplus=False: no softplus)
    a_t     = A * Delta_t,  cs_t = a_1 + ... + a_t    (inclusive cumulative sum)
    y_i     = sum_{j<=i} (C_i . B_j) * exp(cs_i - cs_j) * Delta_j * x_j  +  D * s_i * x_i
    with s_i = Delta_i for d_skip="delta" (official MMM4Rec) and s_i = 1 for d_skip="plain" (mamba_ssm).
Padded positions (t >= lengths[b]) produce y = 0 and do not influence anything else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def discretize(dt, A, time_scale=None, dt_bias=None, dt_softplus=True):
    """Delta = softplus(dt * E + dt_bias) and a = A * Delta.  dt, E: [b, L, H]; returns both [b, L, H]."""
    v = dt if time_scale is None else dt * time_scale
    if dt_bias is not None:
        v = v + dt_bias
    delta = F.softplus(v) if dt_softplus else v
    return delta, delta * A


def valid_mask(lengths, b, L, device):
    """[b, L] bool, True where t < lengths[b]."""
    if lengths is None:
        return torch.ones(b, L, dtype=torch.bool, device=device)
    return torch.arange(L, device=device)[None, :] < lengths.to(device)[:, None]


def _expand_groups(M, H):
    """[b, L, G, n] -> [b, L, H, n] (head h reads group h // (H // G))."""
    G = M.shape[2]
    return M.repeat_interleave(H // G, dim=2)


def segment_sum(a):
    """a [..., L] -> [..., L, L] with out[i, j] = sum_{k=j+1..i} a_k for j <= i, -inf above the diagonal.

    Built from differences of cumulative sums, clamped <= 0 (decays never grow)."""
    cs = torch.cumsum(a, dim=-1)
    diff = (cs[..., :, None] - cs[..., None, :]).clamp(max=0.0)
    L = a.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    # The diagonal is exactly 0 (no decay); writing it as a constant keeps its +g/-g gradient pair out of the
    # backward, where with huge steps (|cs| ~ 1e6) the cancellation would leave rounding noise in dA.
    diag = torch.eye(L, dtype=torch.bool, device=a.device)
    return diff.masked_fill(diag, 0.0).masked_fill(~causal, float("-inf"))


def _prepare(x, dt, A, B, C, time_scale, dt_bias, lengths, dt_softplus):
    b, L, H, P = x.shape
    mask = valid_mask(lengths, b, L, x.device)
    delta, a = discretize(dt, A, time_scale, dt_bias, dt_softplus)
    m = mask.to(delta.dtype)[..., None]
    delta, a = delta * m, a * m  # padded steps neither decay nor write
    xm = x * m[..., None]
    return mask, delta, a, xm, _expand_groups(B, H), _expand_groups(C, H)


def _skip(y, x, delta, D, d_skip):
    if D is None:
        return y
    scale = delta[..., None] if d_skip == "delta" else 1.0
    return y + (D[:, None] if D.dim() == 1 else D) * scale * x       # D [H] or [H, P]


def tissd_quadratic_ref(x, dt, A, B, C, time_scale=None, dt_bias=None, D=None, d_skip="delta",
                        lengths=None, dt_softplus=True, initial_states=None, return_final_states=False):
    """Quadratic (attention-like) form, O(L^2 (n + P)) per sequence and head.  Returns y [b, L, H, P]
    (and final states [b, H, P, n] if asked)."""
    mask, delta, a, xm, Bh, Ch = _prepare(x, dt, A, B, C, time_scale, dt_bias, lengths, dt_softplus)
    seg = segment_sum(a.transpose(1, 2))                          # [b, H, L, L]
    decay = torch.exp(seg)                                       # lower-triangular decay mask
    scores = torch.einsum("bihn,bjhn->bhij", Ch, Bh) * decay     # (C_i . B_j) * decay_ij
    u = xm * delta[..., None]                                    # Delta_j x_j
    y = torch.einsum("bhij,bjhp->bihp", scores, u)
    cs = torch.cumsum(a, dim=1)                                  # [b, L, H]
    if initial_states is not None:                               # y_i += exp(cs_i) C_i . h0
        y = y + torch.einsum("bihn,bhpn->bihp", Ch, initial_states) * torch.exp(cs)[..., None]
    y = _skip(y, xm, delta, D, d_skip) * mask[..., None, None].to(y.dtype)
    if not return_final_states:
        return y
    # h_T = exp(cs_T) h0 + sum_j exp(cs_T - cs_j) Delta_j x_j B_j^T ; cs_T = total decay over the valid prefix
    total = a.sum(1)                                             # cs_T (padded steps have a = 0; L = 0 -> 0)
    w = torch.exp((total[:, None, :] - cs).clamp(max=0.0))       # [b, L, H]
    final = torch.einsum("blh,blhp,blhn->bhpn", w, u, Bh)
    if initial_states is not None:
        final = final + torch.exp(total)[..., None, None] * initial_states
    return y, final


def tissd_recurrent_ref(x, dt, A, B, C, time_scale=None, dt_bias=None, D=None, d_skip="delta",
                        lengths=None, dt_softplus=True, initial_states=None, return_final_states=False):
    """Naive recurrence h_t = exp(a_t) h_{t-1} + Delta_t x_t B_t^T,  y_t = h_t C_t.  O(L P n), a Python loop."""
    mask, delta, a, xm, Bh, Ch = _prepare(x, dt, A, B, C, time_scale, dt_bias, lengths, dt_softplus)
    b, L, H, P = x.shape
    n = B.shape[-1]
    h = x.new_zeros(b, H, P, n) if initial_states is None else initial_states.to(x.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(a[:, t])[..., None, None] * h + \
            (delta[:, t, :, None] * xm[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)   # L = 0: nothing to stack
    y = _skip(y, xm, delta, D, d_skip) * mask[..., None, None].to(y.dtype)
    return (y, h) if return_final_states else y


def tissd_chunked_ref(x, dt, A, B, C, time_scale=None, dt_bias=None, D=None, d_skip="delta",
                      lengths=None, dt_softplus=True, initial_states=None, return_final_states=False,
                      chunk_size=64):
    """Chunked form, O(L Q (n + P) + L P n): quadratic inside chunks of Q steps, a state passed between chunks."""
    mask, delta, a, xm, Bh, Ch = _prepare(x, dt, A, B, C, time_scale, dt_bias, lengths, dt_softplus)
    b, L, H, P = x.shape
    n = B.shape[-1]
    h = x.new_zeros(b, H, P, n) if initial_states is None else initial_states.to(x.dtype)
    u = xm * delta[..., None]
    ys = []
    for s in range(0, L, chunk_size):
        e = min(s + chunk_size, L)
        ac, uc, Bc, Cc = a[:, s:e], u[:, s:e], Bh[:, s:e], Ch[:, s:e]
        cs = torch.cumsum(ac, dim=1)                                         # [b, Q, H]
        decay = torch.exp(segment_sum(ac.transpose(1, 2)))                   # [b, H, Q, Q]
        scores = torch.einsum("bihn,bjhn->bhij", Cc, Bc) * decay
        yc = torch.einsum("bhij,bjhp->bihp", scores, uc)
        yc = yc + torch.einsum("bihn,bhpn->bihp", Cc, h) * torch.exp(cs)[..., None]
        ys.append(yc)
        w = torch.exp((cs[:, -1:, :] - cs).clamp(max=0.0))                   # decay from j to chunk end
        h = torch.exp(cs[:, -1])[..., None, None] * h + torch.einsum("blh,blhp,blhn->bhpn", w, uc, Bc)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(x.shape)     # L = 0: nothing to concatenate
    y = _skip(y, xm, delta, D, d_skip) * mask[..., None, None].to(y.dtype)
    return (y, h) if return_final_states else y


def gated_rmsnorm_ref(y, z, weight, eps=1e-5, group_size=None):
    """out = RMSNorm(y * SiLU(z)) * weight, normalised over groups of `group_size` channels of the last dim.
    y, z: [..., d]; weight [d]; group_size divides d (None = d)."""
    d = y.shape[-1]
    g = d if group_size is None else group_size
    v = y * F.silu(z) if z is not None else y
    vg = v.reshape(*v.shape[:-1], d // g, g)
    rstd = torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + eps)
    return (vg * rstd).reshape(v.shape) * weight
