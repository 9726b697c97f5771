"""Public time-aware SSD ops: argument checks, token layout, dispatch and the autograd.Function.

    y = tissd(x, dt, A, B, C, time_scale=E, dt_bias=b, D=D, lengths=lengths)
    x [b, L, H, P], dt [b, L, H] (raw, pre-softplus), A [H] (< 0), B, C [b, L, G, n] (G divides H),
    E [b, L, H] (time modulation, None = none), dt_bias [H], D [H], lengths [b] (right padding).
    Delta = softplus(dt * E + dt_bias);  y_i = sum_{j<=i} (C_i . B_j) exp(sum_{k=j+1..i} A Delta_k) Delta_j x_j
            + D * Delta_i * x_i   (d_skip="delta", official MMM4Rec)   or   + D * x_i   (d_skip="plain", mamba_ssm).
The discretization is fused into the Triton/CUDA kernels. Packed variable-length input: x [1, T, H, P] with
cu_seqlens [nseq + 1] (int, cu_seqlens[0] = 0, cu_seqlens[-1] = T), as in mamba_ssm.
"""
from __future__ import annotations

import importlib
import logging

import torch

from . import reference
from .dispatch import Choice, choose
from .gated_rmsnorm import gated_rmsnorm

logger = logging.getLogger("mmm4rec_kernels")

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GRAD_NAMES = ("x", "dt", "A", "B", "C", "time_scale", "dt_bias", "D")


# ----------------------------------------------------------------------------------------------------- validation
def _expect(t, name, ndim, *, float_=True):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if float_ and t.dtype not in _FLOAT:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _same_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}: move all inputs to one device")


def check_inputs(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, lengths, cu_seqlens, initial_states):
    """Raise a ValueError naming the first bad argument. Returns (b, L, H, P, G, n)."""
    _expect(x, "x", 4)
    b, L, H, P = x.shape
    _expect(dt, "dt", 3)
    if tuple(dt.shape) != (b, L, H):
        raise ValueError(f"dt must have shape {(b, L, H)} = x.shape[:3], got {tuple(dt.shape)}")
    _expect(A, "A", 1)
    if A.shape[0] != H:
        raise ValueError(f"A must have shape ({H},) (one decay rate per head), got {tuple(A.shape)}")
    _expect(B, "B", 4)
    _expect(C, "C", 4)
    if B.shape[:2] != (b, L) or B.shape != C.shape:
        raise ValueError(f"B and C must both have shape ({b}, {L}, G, n), got B {tuple(B.shape)}, C {tuple(C.shape)}")
    G, n = B.shape[2], B.shape[3]
    if G < 1 or H % G:
        raise ValueError(f"the number of groups G={G} of B/C must divide the number of heads H={H}")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"B and C must have x's dtype {x.dtype}, got B {B.dtype}, C {C.dtype}")
    if time_scale is not None:
        _expect(time_scale, "time_scale", 3)
        if time_scale.shape != dt.shape:
            raise ValueError(f"time_scale must have dt's shape {tuple(dt.shape)}, got {tuple(time_scale.shape)}")
    for name, t in (("dt_bias", dt_bias), ("D", D)):
        if t is not None:
            _expect(t, name, 1)
            if t.shape[0] != H:
                raise ValueError(f"{name} must have shape ({H},), got {tuple(t.shape)}")
    if d_skip not in ("delta", "plain"):
        raise ValueError(f"d_skip must be 'delta' (D * Delta * x, MMM4Rec) or 'plain' (D * x, mamba_ssm), got {d_skip!r}")
    if lengths is not None and cu_seqlens is not None:
        raise ValueError("pass either lengths (right-padded batch) or cu_seqlens (packed batch), not both")
    if lengths is not None:
        _expect(lengths, "lengths", 1, float_=False)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.shape[0] != b:
            raise ValueError(f"lengths must be an integer tensor of shape ({b},), got {lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device.type == "cpu" and lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > L):
            raise ValueError(f"lengths must lie in [0, L={L}], got min {int(lengths.min())} max {int(lengths.max())}")
    nseq = b
    if cu_seqlens is not None:
        _expect(cu_seqlens, "cu_seqlens", 1, float_=False)
        if cu_seqlens.dtype.is_floating_point or b != 1:
            raise ValueError("cu_seqlens needs an integer tensor and a packed batch x of shape [1, T, H, P]")
        cu = cu_seqlens.detach().cpu()
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != L or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={L}, got {cu.tolist()[:8]}...")
        nseq = cu.numel() - 1
    if initial_states is not None:
        _expect(initial_states, "initial_states", 4)
        if tuple(initial_states.shape) != (nseq, H, P, n):
            raise ValueError(f"initial_states must have shape {(nseq, H, P, n)}, got {tuple(initial_states.shape)}")
    _same_device(x.device, dt=dt, A=A, B=B, C=C, time_scale=time_scale, dt_bias=dt_bias, D=D, lengths=lengths,
                 cu_seqlens=cu_seqlens, initial_states=initial_states)
    return b, L, H, P, G, n


# --------------------------------------------------------------------------------------------- fused-kernel autograd
def _backend_module(choice: Choice):
    if choice.backend == "cuda":
        return importlib.import_module("mmm4rec_kernels.cuda")
    return importlib.import_module(f"mmm4rec_kernels.triton.{choice.path}")


@torch.compiler.disable
def _apply_fused(*args):
    """The fused kernels are opaque to torch.compile: a compiled model calls them as they are."""
    return _FusedTiSSD.apply(*args)


class _FusedTiSSD(torch.autograd.Function):
    """Autograd over the token-layout kernels of one backend path (see CONTRACT.md)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, meta):
        mod, path, max_len, opts = meta["module"], meta["path"], meta["max_len"], meta["opts"]
        f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731  small per-head/per-token params
        args = (x.contiguous(), f32(dt), f32(A), B.contiguous(), C.contiguous(), f32(E), f32(dt_bias), f32(D),
                seq_start, seq_len, max_len)
        h0_f32 = f32(h0)
        if path == "quadratic":
            y, final = mod.tissd_quadratic_fwd(*args, **opts), None
        else:
            y, final = mod.tissd_chunked_fwd(*args, initial_states=h0_f32,
                                             return_final_states=meta["return_final_states"],
                                             chunk_size=meta["chunk_size"], **opts)
        ctx.save_for_backward(*args[:10], h0_f32)
        ctx.meta = meta
        ctx.dtypes = [None if t is None else t.dtype for t in (x, dt, A, B, C, E, dt_bias, D, h0)]
        if final is not None:
            return y, final
        return y

    @staticmethod
    def backward(ctx, dy, dfinal=None):
        *saved, h0 = ctx.saved_tensors
        x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len = saved
        meta = ctx.meta
        mod, opts = meta["module"], meta["opts"]
        args = (x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, meta["max_len"])
        dy = dy.contiguous()
        if meta["path"] == "quadratic":
            grads = tuple(mod.tissd_quadratic_bwd(dy, *args, **opts)) + (None,)
        else:
            dfinal = None if dfinal is None else dfinal.float().contiguous()
            grads = tuple(mod.tissd_chunked_bwd(dy, dfinal, *args, initial_states=h0,
                                                chunk_size=meta["chunk_size"], **opts))
        out = [None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*out, None, None, None)


def _token_layout(b, L, lengths, cu_seqlens, device):
    """seq_start [nseq] int64, seq_len [nseq] int32 and max_len for a padded or packed batch."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seq_len = (cu[1:] - cu[:-1]).to(torch.int32)
        max_len = int(seq_len.max()) if seq_len.numel() else 0
        return cu[:-1].contiguous(), seq_len.contiguous(), max_len
    seq_start = torch.arange(b, device=device, dtype=torch.int64) * L
    if lengths is None:
        seq_len = torch.full((b,), L, device=device, dtype=torch.int32)
    else:
        seq_len = lengths.to(device=device, dtype=torch.int32).clamp(0, L)  # no host sync on GPU
    return seq_start, seq_len.contiguous(), L


# ------------------------------------------------------------------------------------------------- torch backend
def _packed_layout(cu, T):
    """Packed offsets cu [nseq+1] -> (gather index [nseq, max_len] into the T tokens, valid mask, lengths [nseq])."""
    lens = cu[1:] - cu[:-1]
    max_len = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(max_len, device=cu.device)
    idx = (cu[:-1, None] + pos[None, :]).clamp(max=max(T - 1, 0))
    return idx, pos[None, :] < lens[:, None], lens


def _run_torch(choice, x, dt, A, B, C, kw, lengths, cu_seqlens, chunk_size):
    fn = {"quadratic": reference.tissd_quadratic_ref, "chunked": reference.tissd_chunked_ref,
          "reference": reference.tissd_recurrent_ref}[choice.path]
    if choice.path == "chunked":
        kw = dict(kw, chunk_size=chunk_size)
    if x.dtype in (torch.float16, torch.bfloat16):  # compute in fp32 like the kernels, return x's dtype
        up = lambda t: None if t is None else t.float()  # noqa: E731
        kw = dict(kw, **{k: up(kw[k]) for k in ("time_scale", "dt_bias", "D", "initial_states")})
        out = _run_torch(choice, up(x), up(dt), up(A), up(B), up(C), kw, lengths, cu_seqlens, chunk_size)
        return (out[0].to(x.dtype), out[1]) if isinstance(out, tuple) else out.to(x.dtype)
    if cu_seqlens is None:
        return fn(x, dt, A, B, C, lengths=lengths, **kw)
    idx, valid, lens = _packed_layout(cu_seqlens.to(device=x.device, dtype=torch.int64), x.shape[1])

    def pad(t):  # [1, T, ...] packed -> [nseq, max_len, ...], zeros past each sequence
        return None if t is None else t[0][idx] * valid.view(*valid.shape, *([1] * (t.dim() - 2))).to(t.dtype)

    kw = dict(kw, time_scale=pad(kw.get("time_scale")))
    out = fn(pad(x), pad(dt), A, pad(B), pad(C), lengths=lens, **kw)
    y, final = (out if isinstance(out, tuple) else (out, None))
    y = y[valid].unsqueeze(0)  # back to [1, T, H, P] (sequences are contiguous and in order)
    return (y, final) if final is not None else y


# ---------------------------------------------------------------------------------------------------- public API
def explain(x, dt, A, B, C, *, initial_states=None, return_final_states=False, path="auto", backend="auto",
            **_ignored):
    """Which path and backend `tissd` would run for these inputs, and why: {'path', 'backend', 'reason'}."""
    b, L, H, P = x.shape
    n = B.shape[-1]
    return choose(L, P, n, H, x.dtype, x.device, has_states=initial_states is not None or return_final_states,
                  path=path, backend=backend).as_dict()


def tissd(x, dt, A, B, C, *, time_scale=None, dt_bias=None, D=None, d_skip="delta", dt_softplus=True,
          lengths=None, cu_seqlens=None, initial_states=None, return_final_states=False,
          z=None, norm_weight=None, norm_eps=1e-5, norm_group_size=None,
          path="auto", backend="auto", chunk_size=64, allow_tf32=False):
    """Time-aware SSD (TiSSD), fused discretization.  Drop-in for mamba_ssm's mamba_chunk_scan_combined.

    Args:
        x: [b, L, H, P] inputs (fp32/bf16/fp16; fp64 with backend='torch').
        dt: [b, L, H] raw step (softplus is applied inside when dt_softplus=True, the default).
        A: [H] decay rates (negative, A = -exp(A_log)).
        B, C: [b, L, G, n] input / output projections; G divides H (head h uses group h // (H // G)).
        time_scale: [b, L, H] time modulation E: Delta = softplus(dt * E + dt_bias). None = no modulation.
        dt_bias: [H]. D: [H] skip weights; d_skip 'delta' adds D*Delta*x (MMM4Rec), 'plain' adds D*x (mamba_ssm).
        lengths: [b] valid steps per sequence (right padding); padded outputs are 0 and influence nothing.
        cu_seqlens: [nseq + 1] offsets of a packed batch x [1, T, H, P] (instead of lengths).
        initial_states: [nseq, H, P, n]; return_final_states: also return the states [nseq, H, P, n] (fp32).
        z, norm_weight: optional gated-RMSNorm epilogue out = RMSNorm(y * SiLU(z)) * norm_weight over H*P channels
            (groups of norm_group_size), z [b, L, H, P] or None, norm_weight [H*P].
        path: 'auto' | 'quadratic' (O(L^2 N), fused, L <= 256) | 'chunked' (O(L N^2)) | 'reference' (naive loop).
        backend: 'auto' | 'triton' | 'cuda' (quadratic only) | 'torch'.  `explain(...)` tells what auto picks.
        chunk_size: chunk length Q of the chunked path.  allow_tf32: let fp32 dot products use TF32 on GPU.
    Returns:
        y [b, L, H, P] in x's dtype, or (y, final_states) when return_final_states.
    """
    b, L, H, P, G, n = check_inputs(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, lengths, cu_seqlens,
                                    initial_states)
    if norm_weight is not None and z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    choice = choose(L, P, n, H, x.dtype, x.device, has_states=initial_states is not None or return_final_states,
                    path=path, backend=backend)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("tissd b=%d L=%d H=%d P=%d G=%d n=%d %s -> path=%s backend=%s (%s)", b, L, H, P, G, n,
                     x.dtype, choice.path, choice.backend, choice.reason)

    if choice.backend == "torch":
        kw = dict(time_scale=time_scale, dt_bias=dt_bias, D=D, d_skip=d_skip, dt_softplus=dt_softplus,
                  initial_states=initial_states, return_final_states=return_final_states)
        out = _run_torch(choice, x, dt, A, B, C, kw, lengths, cu_seqlens, chunk_size)
    else:
        seq_start, seq_len, max_len = _token_layout(b, L, lengths, cu_seqlens, x.device)
        T = b * L
        meta = dict(module=_backend_module(choice), path=choice.path, max_len=max_len, chunk_size=chunk_size,
                    return_final_states=return_final_states,
                    opts=dict(d_skip_delta=d_skip == "delta", dt_softplus=dt_softplus, allow_tf32=allow_tf32))
        if choice.backend == "triton" and choice.path == "quadratic" and cu_seqlens is None:
            meta["opts"]["padded"] = True  # right-padded layout: the kernels write the padding zeros themselves
        tok = lambda t, *s: None if t is None else t.reshape(T, *s)  # noqa: E731
        out = _apply_fused(tok(x, H, P), tok(dt, H), A, tok(B, G, n), tok(C, G, n), tok(time_scale, H),
                                dt_bias, D, initial_states, seq_start, seq_len, meta)
        if isinstance(out, tuple):
            out = (out[0].view(b, L, H, P), out[1])
        else:
            out = out.view(b, L, H, P)

    if norm_weight is None:
        return out
    y, final = (out if isinstance(out, tuple) else (out, None))
    zz = None if z is None else z.reshape(b, L, H * P)
    y = gated_rmsnorm(y.reshape(b, L, H * P), zz, norm_weight, eps=norm_eps, group_size=norm_group_size,
                      backend="torch" if choice.backend == "torch" else "triton").view(b, L, H, P)
    return (y, final) if final is not None else y


def ticossd(x, dt, A, B, C, **kwargs):
    """Time-aware cross-SSD (TiCoSSD): the same op fed from two streams — x, dt, B from one modality (text in
    MMM4Rec) and C from the other (vision).  Shapes and keywords exactly as `tissd`."""
    return tissd(x, dt, A, B, C, **kwargs)
