"""Public time-aware SSD ops: argument checks, token layout, dispatch and the autograd.Function.

    y = tissd(x, dt, A, B, C, time_scale=E, dt_bias=b, D=D, lengths=lengths)
    x [b, L, H, P], dt [b, L, H] (raw, pre-softplus), A [H] (< 0), B, C [b, L, G, n] (G divides H),
    E [b, L, H] (time modulation, None = none), dt_bias [H], D [H] or [H, P], lengths [b] (right padding).
    Delta = softplus(dt * E + dt_bias);  y_i = sum_{j<=i} (C_i . B_j) exp(sum_{k=j+1..i} A Delta_k) Delta_j x_j
            + D * Delta_i * x_i   (d_skip="delta", official MMM4Rec)   or   + D * x_i   (d_skip="plain", mamba_ssm).
The discretization is fused into the Triton/CUDA kernels; backend="torch" runs torch_backend.py (direct decay
sums, where-masking; on CPU the native C++ scan of mmm4rec_kernels.cpu for the quadratic form without states).  Every backend goes through the same checks (`_plan`, shared with `explain`).
Packed variable-length input: x [1, T, H, P] with cu_seqlens [nseq + 1] (int, cu_seqlens[0] = 0,
cu_seqlens[-1] = T), as in mamba_ssm.
"""
from __future__ import annotations

import functools
import logging

import torch

from . import ops, torch_backend
from .dispatch import choose, log_choice, torch_allows_tf32
from .gated_rmsnorm import gated_rmsnorm

logger = logging.getLogger("mmm4rec_kernels")

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------- validation
def _expect(t, name, ndim, *, float_=True):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if float_ and t.dtype not in _FLOAT:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _same_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}: move all inputs to one device")


def check_inputs(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, lengths, cu_seqlens, initial_states):
    """Shapes, dtypes and devices; raise a ValueError naming the first bad argument.

    dtype rule: x is fp16/bf16/fp32/fp64 and fixes the result dtype; B, C (and z) may be any float dtype and are
    cast to x's dtype; dt, time_scale, A, dt_bias, D, initial_states may be any float dtype and are cast to the
    compute dtype (float32; float64 for float64 x on the torch backend).  Returns (b, L, H, P, G, n, nseq, longest)
    with `longest` the longest sequence (max of cu_seqlens diffs; max of lengths for CPU lengths; else L)."""
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
    if time_scale is not None:
        _expect(time_scale, "time_scale", 3)
        if time_scale.shape != dt.shape:
            raise ValueError(f"time_scale must have dt's shape {tuple(dt.shape)}, got {tuple(time_scale.shape)}")
    if dt_bias is not None:
        _expect(dt_bias, "dt_bias", 1)
        if dt_bias.shape[0] != H:
            raise ValueError(f"dt_bias must have shape ({H},), got {tuple(dt_bias.shape)}")
    if D is not None:
        _expect(D, "D", (1, 2))
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"D must have shape ({H},) or ({H}, {P}) (per head or per channel), got {tuple(D.shape)}")
    if d_skip not in ("delta", "plain"):
        raise ValueError(f"d_skip must be 'delta' (D * Delta * x, MMM4Rec) or 'plain' (D * x, mamba_ssm), got {d_skip!r}")
    if lengths is not None and cu_seqlens is not None:
        raise ValueError("pass either lengths (right-padded batch) or cu_seqlens (packed batch), not both")
    longest = L
    tracing = torch.compiler.is_compiling()   # value checks read tensors (host syncs): eager only
    if lengths is not None:
        _expect(lengths, "lengths", 1, float_=False)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool \
                or lengths.shape[0] != b:
            raise ValueError(f"lengths must be an integer tensor of shape ({b},), got {lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device.type == "cpu" and not tracing:  # no host sync for GPU lengths: dispatch on L there
            longest = int(lengths.max()) if lengths.numel() else 0
            if lengths.numel() and (int(lengths.min()) < 0 or longest > L):
                raise ValueError(f"lengths must lie in [0, L={L}], got min {int(lengths.min())} max {longest}")
    nseq = b
    if cu_seqlens is not None:
        _expect(cu_seqlens, "cu_seqlens", 1, float_=False)
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or b != 1:
            raise ValueError("cu_seqlens needs an integer tensor and a packed batch x of shape [1, T, H, P]")
        nseq = cu_seqlens.shape[0] - 1
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must hold at least one offset (0)")
        if not tracing:          # traced: the longest sequence is taken as T (no host sync; the grid covers T)
            cu = cu_seqlens.detach().cpu()
            if int(cu[0]) != 0 or int(cu[-1]) != L or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={L}, "
                                 f"got {cu.tolist()[:8]}...")
            longest = int((cu[1:] - cu[:-1]).max()) if nseq else 0
    if initial_states is not None:
        _expect(initial_states, "initial_states", 4)
        if tuple(initial_states.shape) != (nseq, H, P, n):
            raise ValueError(f"initial_states must have shape {(nseq, H, P, n)}, got {tuple(initial_states.shape)}")
    _same_device(x.device, dt=dt, A=A, B=B, C=C, time_scale=time_scale, dt_bias=dt_bias, D=D, lengths=lengths,
                 cu_seqlens=cu_seqlens, initial_states=initial_states)
    return b, L, H, P, G, n, nseq, longest


def _check_values(A, dt, time_scale, dt_bias, dt_softplus, lengths, L):
    """Value rules, checked on CPU tensors in eager only (a check on GPU tensors, or while torch.compile traces, would
    cost a host sync per call): A < 0 (A = -exp(A_log)); with dt_softplus=False the caller passes Delta itself, which
    must be > 0 on valid steps."""
    if torch.compiler.is_compiling():
        return
    if A.device.type == "cpu" and A.numel() and not bool((A < 0).all()):
        raise ValueError(f"A must be negative on every head (A = -exp(A_log)), got max {A.max().item():.4g}")
    if dt_softplus or dt.device.type != "cpu" or not dt.numel():
        return
    with torch.no_grad():
        v = dt.double() if time_scale is None else dt.double() * time_scale.double()
        if dt_bias is not None:
            v = v + dt_bias.double()
        valid = torch_backend.valid_mask(lengths, dt.shape[0], L, dt.device)[..., None].expand_as(v)
        if not bool((v[valid] > 0).all()):
            raise ValueError("dt_softplus=False passes Delta = dt * time_scale + dt_bias directly, which must be > 0 "
                             "on every valid step; got a value <= 0 (or NaN) in dt")


def _check_options(x, z, norm_weight, norm_eps, path, backend, chunk_size, allow_tf32, return_final_states,
                   dt_softplus):
    H, P = x.shape[2], x.shape[3]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (chunk length Q of the chunked path), got {chunk_size!r}")
    if allow_tf32 is not None and not isinstance(allow_tf32, bool):
        raise ValueError(f"allow_tf32 must be None (follow torch.backends.cuda.matmul.allow_tf32) or a bool, "
                         f"got {allow_tf32!r}")
    for name, v in (("return_final_states", return_final_states), ("dt_softplus", dt_softplus)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    if z is not None:
        _expect(z, "z", 4)
        if z.shape != x.shape:
            raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
        _same_device(x.device, z=z)
    if norm_weight is not None:
        _expect(norm_weight, "norm_weight", 1)
        if norm_weight.shape[0] != H * P:
            raise ValueError(f"norm_weight must have shape ({H * P},) = (H * P,), got {tuple(norm_weight.shape)}")
        _same_device(x.device, norm_weight=norm_weight)
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")


def _plan(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, dt_softplus, lengths, cu_seqlens, initial_states,
          return_final_states, z, norm_weight, norm_eps, path, backend, chunk_size, allow_tf32):
    """Every check of `tissd` (shared with `explain`), then the (path, backend) choice on the longest sequence."""
    b, L, H, P, G, n, nseq, longest = check_inputs(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, lengths,
                                                   cu_seqlens, initial_states)
    _check_options(x, z, norm_weight, norm_eps, path, backend, chunk_size, allow_tf32, return_final_states,
                   dt_softplus)
    _check_values(A, dt, time_scale, dt_bias, dt_softplus, lengths, L)
    choice = choose(longest, P, n, H, x.dtype, x.device,
                    has_states=initial_states is not None or return_final_states, path=path, backend=backend)
    if choice.backend == "triton" and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"x is {x.dtype} on CPU: the Triton interpreter (TRITON_INTERPRET=1) computes half-precision "
                         f"dots wrongly; use float32 inputs, backend='torch', or a CUDA device")
    return choice, (b, L, H, P, G, n, nseq, longest)

# ---------------------------------------------------------------------------------------------- fused kernels
def _token_layout(b, L, lengths, cu_seqlens, longest, device):
    """seq_start [nseq] int64, seq_len [nseq] int32, max_len (the longest sequence: the kernels' grid) and whether
    the batch is exactly the right-padded layout seq_start = arange(b) * max_len."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        return cu[:-1].contiguous(), (cu[1:] - cu[:-1]).to(torch.int32).contiguous(), longest, False
    seq_start, full_len = _padded_layout(b, L, device)
    if lengths is None:
        seq_len = full_len
    else:
        seq_len = lengths.to(device=device, dtype=torch.int32).clamp(0, L).contiguous()  # no host sync on GPU
    return seq_start, seq_len, longest, longest == L


def _padded_layout_values(b, L, device):
    return (torch.arange(b, device=device, dtype=torch.int64) * L,
            torch.full((b,), L, device=device, dtype=torch.int32))


_padded_layout_cached = functools.lru_cache(maxsize=64)(_padded_layout_values)


def _padded_layout(b, L, device):
    """seq_start = arange(b) * L (int64) and seq_len = L (int32) for a [b, L] batch: built once per shape in eager
    (never written to: the kernels and autograd only read them), in the graph while torch.compile traces."""
    if torch.compiler.is_compiling():
        return _padded_layout_values(b, L, device)
    return _padded_layout_cached(b, L, device)


def _token_mask(b, L, lengths, device):
    """[b, L] bool, True on valid steps (None when every step is valid: packed or unpadded).  No host sync."""
    if lengths is None:
        return None
    return torch_backend.valid_mask(lengths, b, L, device)


def _run_fused(choice, x, dt, A, B, C, time_scale, dt_bias, D, d_skip, dt_softplus, lengths, cu_seqlens,
               initial_states, return_final_states, chunk_size, allow_tf32, shapes):
    b, L, H, P, G, n, nseq, longest = shapes
    seq_start, seq_len, max_len, exact_padded = _token_layout(b, L, lengths, cu_seqlens, longest, x.device)
    T = b * L
    tok = lambda t, *s: None if t is None else t.reshape(T, *s)  # noqa: E731
    y, final = ops.tissd_fused_call(tok(x, H, P), tok(dt, H), A, tok(B, G, n), tok(C, G, n), tok(time_scale, H),
                                    dt_bias, D, initial_states, seq_start, seq_len, max_len, choice.backend,
                                    choice.path, d_skip == "delta", dt_softplus, allow_tf32, exact_padded,
                                    return_final_states, chunk_size)
    return y.view(b, L, H, P), final


def _norm_backend(ssd_backend, device):
    """The fused norm follows the SSD's backend: Triton kernels -> Triton norm; torch backend -> torch ops, except
    on CPU, where 'auto' runs the native CPU norm in eager (torch ops while tracing)."""
    if ssd_backend != "torch":
        return "triton"
    return "auto" if device.type == "cpu" else "torch"


def _skip_per_channel(y, x, dt, time_scale, dt_bias, D, d_skip, dt_softplus, mask):
    """y + D[h, p] * s_t * x_t for a per-channel D [H, P] (outside the fused kernels; autograd does dD).
    s_t = Delta_t (delta) or 1 (plain); zero on padded steps (masked with where, NaN-proof)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
    xc = torch.where(m[..., None, None], x.to(cd), 0.0)
    if d_skip == "delta":
        clean = lambda t: None if t is None else torch.where(m[..., None], t.to(cd), 0.0)  # noqa: E731
        delta = torch_backend.step_sizes(clean(dt), clean(time_scale), None if dt_bias is None else dt_bias.to(cd),
                                         dt_softplus, m)
        xc = xc * delta[..., None]
    return (y.to(cd) + D.to(cd) * xc).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- public API
def explain(x, dt, A, B, C, *, time_scale=None, dt_bias=None, D=None, d_skip="delta", dt_softplus=True,
            lengths=None, cu_seqlens=None, initial_states=None, return_final_states=False,
            z=None, norm_weight=None, norm_eps=1e-5, norm_group_size=None,
            path="auto", backend="auto", chunk_size=64, allow_tf32=None):
    """Which path and backend `tissd` would run for exactly these arguments, and why:
    {'path', 'backend', 'reason', 'table'} (table: which dispatch table decided, see mmm4rec_kernels.dispatch).
    Same signature and the same argument checks as `tissd` (a bad argument raises the same error)."""
    choice, _ = _plan(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, dt_softplus, lengths, cu_seqlens,
                      initial_states, return_final_states, z, norm_weight, norm_eps, path, backend, chunk_size,
                      allow_tf32)
    return choice.as_dict()


def tissd(x, dt, A, B, C, *, time_scale=None, dt_bias=None, D=None, d_skip="delta", dt_softplus=True,
          lengths=None, cu_seqlens=None, initial_states=None, return_final_states=False,
          z=None, norm_weight=None, norm_eps=1e-5, norm_group_size=None,
          path="auto", backend="auto", chunk_size=64, allow_tf32=None):
    """Time-aware SSD (TiSSD), fused discretization.  Drop-in for mamba_ssm's mamba_chunk_scan_combined.

    Args:
        x: [b, L, H, P] inputs (fp32/bf16/fp16; fp64 with backend='torch').  The result has x's dtype.
        dt: [b, L, H] raw step (softplus is applied inside when dt_softplus=True, the default).  With
            dt_softplus=False, Delta = dt * time_scale + dt_bias is used as is and must be > 0 on valid steps
            (checked for CPU tensors only).
        A: [H] decay rates, negative (A = -exp(A_log)); A >= 0 raises ValueError (checked for CPU tensors only).
        B, C: [b, L, G, n] input / output projections; G divides H (head h uses group h // (H // G)).
        time_scale: [b, L, H] time modulation E: Delta = softplus(dt * E + dt_bias). None = no modulation.
        dt_bias: [H].  D: [H] or [H, P] skip weights; d_skip 'delta' adds D*Delta*x (MMM4Rec), 'plain' D*x (mamba).
        dtypes: B, C, z any float (cast to x's dtype); dt, time_scale, A, dt_bias, D, initial_states any float
            (cast to float32, or float64 for float64 x on the torch backend).  Gradients come back in each input's
            own dtype.
        lengths: [b] valid steps per sequence (right padding); padded outputs are 0 and padded inputs (even NaN/inf)
            influence nothing.
        cu_seqlens: [nseq + 1] offsets of a packed batch x [1, T, H, P] (instead of lengths).
        initial_states: [nseq, H, P, n]; return_final_states: also return the states [nseq, H, P, n] (fp32).
        z: [b, L, H, P] gate.  With norm_weight [H*P]: out = RMSNorm(y * SiLU(z)) * norm_weight over groups of
            norm_group_size channels; without norm_weight: out = y * SiLU(z) (as mamba_ssm).
        path: 'auto' | 'quadratic' (O(L^2 N), fused, longest sequence <= QUADRATIC_MAX_LEN) | 'chunked' |
            'reference' (naive float64 recurrence).  Dispatch uses the longest sequence (packed / CPU lengths).
        backend: 'auto' | 'triton' | 'cuda' (quadratic only) | 'torch'.  `explain(...)` tells what auto picks.
        chunk_size: positive int, chunk length Q of the chunked path (Triton: a power of 2 in [16, 128]).
        allow_tf32: None (default) follows torch's matmul setting (torch.backends.cuda.matmul.allow_tf32 /
            fp32_precision == 'tf32'; the official MMM4Rec trains fp32 with TF32 on); True lets fp32 dots use plain
            TF32 on GPU; False keeps them ~fp32-exact.
    Returns:
        y [b, L, H, P] in x's dtype, or (y, final_states) when return_final_states.
    """
    choice, shapes = _plan(x, dt, A, B, C, time_scale, dt_bias, D, d_skip, dt_softplus, lengths, cu_seqlens,
                           initial_states, return_final_states, z, norm_weight, norm_eps, path, backend, chunk_size,
                           allow_tf32)
    b, L, H, P, G, n, nseq, longest = shapes
    if allow_tf32 is None:
        allow_tf32 = torch_allows_tf32()
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        log_choice("tissd", f"b={b} L={L} (longest {longest}) H={H} P={P} G={G} n={n} {x.dtype}", choice)
    B, C = B.to(x.dtype), C.to(x.dtype)
    D_kernel = D if D is None or D.dim() == 1 else None  # per-channel D [H, P]: skip term added here in torch

    if choice.backend == "torch":
        trim = cu_seqlens is None and longest < L  # CPU lengths all shorter than L: scan only the longest prefix
        cut = (lambda t: None if t is None else t[:, :longest]) if trim else (lambda t: t)  # noqa: E731
        out = torch_backend.tissd_torch(
            cut(x), cut(dt), A, cut(B), cut(C), time_scale=cut(time_scale), dt_bias=dt_bias, D=D_kernel,
            d_skip=d_skip, dt_softplus=dt_softplus, lengths=lengths, cu_seqlens=cu_seqlens,
            initial_states=initial_states, return_final_states=return_final_states, path=choice.path,
            chunk_size=chunk_size)
        y, final = out if return_final_states else (out, None)
        if trim:
            y = torch.nn.functional.pad(y, (0, 0, 0, 0, 0, L - longest))
    else:
        y, final = _run_fused(choice, x, dt, A, B, C, time_scale, dt_bias, D_kernel, d_skip, dt_softplus, lengths,
                              cu_seqlens, initial_states, return_final_states, chunk_size, allow_tf32, shapes)

    need_mask = (D is not None and D.dim() == 2) or z is not None
    mask = _token_mask(b, L, lengths, x.device) if need_mask else None  # no extra launch on the plain GPU path
    if D is not None and D.dim() == 2:
        y = _skip_per_channel(y, x, dt, time_scale, dt_bias, D, d_skip, dt_softplus, mask)
    if z is not None:
        z = z.to(x.dtype)
        if mask is not None:  # garbage in padded z must not reach norm_weight's gradient
            z = torch.where(mask[..., None, None], z, 0.0)
    if norm_weight is not None:
        y = gated_rmsnorm(y.reshape(b, L, H * P), None if z is None else z.reshape(b, L, H * P), norm_weight,
                          eps=norm_eps, group_size=norm_group_size,
                          backend=_norm_backend(choice.backend, x.device)).view(b, L, H, P).to(x.dtype)
    elif z is not None:  # mamba_ssm semantics: the gate applies without a norm too (y * SiLU(z))
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = (y.to(cd) * torch.nn.functional.silu(z.to(cd))).to(x.dtype)
    return (y, final) if return_final_states else y


def ticossd(x, dt, A, B, C, **kwargs):
    """Time-aware cross-SSD (TiCoSSD): the same op fed from two streams — x, dt, B from one modality (text in
    MMM4Rec) and C from the other (vision).  Shapes and keywords exactly as `tissd`."""
    return tissd(x, dt, A, B, C, **kwargs)
