"""Every kernel of the package as a registered torch op in the `mmm4rec` namespace (torch.ops.mmm4rec.*).

    ssd_scan_cpu(x, delta, log_decay, B, C, D?, valid_len, skip_delta) -> y        native C++ quadratic TiSSD scan
    ssd_scan_cpu_bwd(gy, x, delta, log_decay, B, C, D?, valid_len, skip_delta) -> (dx, ddelta, dlog_decay, dB, dC, dD)
    causal_conv_cpu(x, w, bias?, silu) -> y                                 native C++ causal conv (+ SiLU)
    causal_conv_cpu_bwd(gy, x, w, bias?, silu) -> (dx, dw, dbias)
    tissd_fused(x, dt, A, B, C, E?, dt_bias?, D?, h0?, seq_start, seq_len, max_len, backend, path, ...) -> (y, final)
    tissd_fused_bwd(dy, dfinal?, ...) -> (dx, ddt, dA, dB, dC, dE, ddt_bias, dD, dh0)   Triton / CUDA TiSSD kernels
    gated_rmsnorm_fused(y, z?, weight, eps, group_size) -> (out, rstd)        Triton gated RMSNorm
    gated_rmsnorm_fused_bwd(dout, y, z?, weight, rstd, eps, group_size) -> (dy, dz, dweight)
    nonfinite_onward(x, dt, E?, B, C, mask) -> marked [nseq, L, H] bool     the torch backend's NaN-causality marks

Each op has a fake (meta) implementation, so torch.compile(fullgraph=True), torch.export and CUDA graphs see its
output shapes without running it, and a registered autograd formula (the *_bwd op; nonfinite_onward has none: a bool
output).  None of them mutates an input or syncs with a device (nonfinite_onward reads one scalar of CPU tensors
only).  A `Tensor?` input that is None gives an empty (numel 0) gradient output, mapped back to
None by the autograd formula (op outputs cannot be None).

Eager calls skip the op dispatcher: `call(...)` runs the same forward/backward functions through a plain
autograd.Function, ~20 us cheaper per call on CPU (measured: 33 vs 11 us forward, 86 vs 57 us forward + backward
for a trivial op), which matters for batch-1 inference.  While torch.compile / export trace, `call` emits the
registered op.  The pure-torch paths (the torch backend's einsums, the torch gated RMSNorm, the torch conv) are
ordinary torch code that the compiler traces and fuses itself; they are not ops.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import cpu as native
from .cpu import nodes as native_nodes

_EMPTY = (0,)


def _none_to_empty(t, like):
    return like.new_empty(_EMPTY, dtype=torch.float32) if t is None else t


def _empty_to_none(t, given):
    return None if given is None else t


def _distinct(outputs, inputs=()):
    """Op outputs may not share storage with each other or with an input (e.g. rows of one partial-sum buffer):
    copy any that does (small tensors in practice)."""
    seen = {t.untyped_storage()._cdata for t in inputs if isinstance(t, torch.Tensor)}
    out = []
    for t in outputs:
        key = t.untyped_storage()._cdata
        out.append(t.clone() if key in seen and t.numel() else t)
        seen.add(key)
    return tuple(out)


def call(op, function, *args):
    """op(*args) while torch.compile / export trace (the registered op), else function.apply(*args) (eager)."""
    if torch.compiler.is_compiling():
        return op(*args)
    return function.apply(*args)


# --------------------------------------------------------------------------------- native CPU: quadratic TiSSD scan
@torch.library.custom_op("mmm4rec::ssd_scan_cpu", mutates_args=(), device_types="cpu")
def ssd_scan_cpu(x: Tensor, delta: Tensor, log_decay: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 valid_len: Tensor, skip_delta: bool) -> Tensor:
    """y [b, L, H, P]: see mmm4rec_kernels.cpu.scan_forward (inputs contiguous, one float dtype)."""
    return native.scan_forward(x, delta, log_decay, B, C, D, valid_len, skip_delta)


@ssd_scan_cpu.register_fake
def _(x, delta, log_decay, B, C, D, valid_len, skip_delta):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mmm4rec::ssd_scan_cpu_bwd", mutates_args=(), device_types="cpu")
def ssd_scan_cpu_bwd(gy: Tensor, x: Tensor, delta: Tensor, log_decay: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], valid_len: Tensor, skip_delta: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dd, da, dB, dC, dD = native.scan_backward(gy, x, delta, log_decay, B, C, D, valid_len, skip_delta)
    return dx, dd, da, dB, dC, _none_to_empty(dD, x).to(x.dtype)


@ssd_scan_cpu_bwd.register_fake
def _(gy, x, delta, log_decay, B, C, D, valid_len, skip_delta):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return (like(x), like(delta), like(log_decay), like(B), like(C),
            x.new_empty(_EMPTY) if D is None else like(D))


def _scan_setup(ctx, inputs, output):
    x, delta, log_decay, B, C, D, valid_len, skip_delta = inputs
    ctx.save_for_backward(x, delta, log_decay, B, C, D, valid_len)
    ctx.skip_delta = skip_delta


def _scan_backward(ctx, gy):
    x, delta, log_decay, B, C, D, valid_len = ctx.saved_tensors
    dx, dd, da, dB, dC, dD = torch.ops.mmm4rec.ssd_scan_cpu_bwd(gy.contiguous(), x, delta, log_decay, B, C, D,
                                                                valid_len, ctx.skip_delta)
    return dx, dd, da, dB, dC, _empty_to_none(dD, D), None, None


ssd_scan_cpu.register_autograd(_scan_backward, setup_context=_scan_setup)


class _ScanCPU(torch.autograd.Function):
    """Eager twin of torch.ops.mmm4rec.ssd_scan_cpu (same functions, no dispatcher)."""

    @staticmethod
    def forward(ctx, x, delta, log_decay, B, C, D, valid_len, skip_delta):
        ctx.save_for_backward(x, delta, log_decay, B, C, D, valid_len)
        ctx.skip_delta = skip_delta
        return native.scan_forward(x, delta, log_decay, B, C, D, valid_len, skip_delta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, delta, log_decay, B, C, D, valid_len = ctx.saved_tensors
        grads = native.scan_backward(gy.contiguous(), x, delta, log_decay, B, C, D, valid_len, ctx.skip_delta)
        return (*grads, None, None)


def ssd_scan(x, delta, log_decay, B, C, valid_len, D=None, skip_delta=True):
    """The native quadratic scan with autograd (see mmm4rec_kernels.cpu.scan_forward); inputs are made contiguous.
    x [b, L, H, P], delta / log_decay [b, L, H], B / C [b, L, G, n], valid_len [b] int64, D [H, P] or None."""
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return call(torch.ops.mmm4rec.ssd_scan_cpu, _ScanCPU, c(x), c(delta), c(log_decay), c(B), c(C), c(D),
                valid_len.to(torch.int64).contiguous(), bool(skip_delta))


# ------------------------------------------------------------------------------------ native CPU: causal conv + SiLU
@torch.library.custom_op("mmm4rec::causal_conv_cpu", mutates_args=(), device_types="cpu")
def causal_conv_cpu(x: Tensor, w: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """Causal depthwise conv over L of x [b, L, C] (channel stride 1), w [C, k], bias [C]; SiLU when silu."""
    return native.conv_forward(x, w, bias, silu)


@causal_conv_cpu.register_fake
def _(x, w, bias, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("mmm4rec::causal_conv_cpu_bwd", mutates_args=(), device_types="cpu")
def causal_conv_cpu_bwd(gy: Tensor, x: Tensor, w: Tensor, bias: Optional[Tensor],
                        silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = native.conv_backward(x, w, bias, silu, [(0, x.shape[2], native.rows(gy))])
    return dx, dw, _none_to_empty(db, x).to(x.dtype)


@causal_conv_cpu_bwd.register_fake
def _(gy, x, w, bias, silu):
    return (x.new_empty(x.shape), w.new_empty(w.shape), x.new_empty(_EMPTY) if bias is None else bias.new_empty(
        bias.shape))


def _conv_setup(ctx, inputs, output):
    x, w, bias, silu = inputs
    ctx.save_for_backward(x, w, bias)
    ctx.silu = silu


def _conv_backward(ctx, gy):
    x, w, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.mmm4rec.causal_conv_cpu_bwd(gy, x, w, bias, ctx.silu)
    return dx, dw, _empty_to_none(db, bias), None


causal_conv_cpu.register_autograd(_conv_backward, setup_context=_conv_setup)


class _ConvCPU(torch.autograd.Function):
    """Eager twin of torch.ops.mmm4rec.causal_conv_cpu: unused pieces' gradients stay None (never materialised)."""

    @staticmethod
    def forward(ctx, x, w, bias, silu, sizes):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, bias)
        ctx.silu, ctx.sizes = silu, sizes
        y = native.conv_forward(x, w, bias, silu)
        return tuple(y.split(list(sizes), dim=-1)) if len(sizes) > 1 else y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gys):
        x, w, bias = ctx.saved_tensors
        starts = [sum(ctx.sizes[:i]) for i in range(len(ctx.sizes))]
        dx, dw, db = native.conv_backward(x, w, bias, ctx.silu, list(zip(starts, ctx.sizes, gys)))
        return dx, dw, db, None, None


def causal_conv(x, w, bias, silu, sizes):
    """The native conv with autograd: x [b, L, C] (channel stride 1), w [C, k] or [C, 1, k], bias [C] or None, sizes:
    channel pieces -> a tuple of [b, L, size] (one piece: a tensor)."""
    if not torch.compiler.is_compiling():
        cpp = native_nodes.get()             # the same node in C++ (cpu/nodes.py), once built; else the Python one
        if cpp is not None:                  # (it takes w [C, 1, k] by its strides: no reshape node)
            y = cpp.causal_conv(x, w, bias, silu, sizes)
            return tuple(y) if len(sizes) > 1 else y[0]
    w = w.reshape(w.shape[0], -1).contiguous()
    bias = None if bias is None else bias.contiguous()
    sizes = tuple(int(s) for s in sizes)
    if torch.compiler.is_compiling():    # one output; split as views (the compiler fuses the backward's concat)
        y = torch.ops.mmm4rec.causal_conv_cpu(x, w, bias, silu)
        return tuple(y.split(list(sizes), dim=-1)) if len(sizes) > 1 else y
    return _ConvCPU.apply(x, w, bias, silu, sizes)


# -------------------------------------------------------------------------------- Triton / CUDA fused TiSSD kernels
def _fused_module(backend: str, path: str):
    if backend == "cuda":
        return importlib.import_module("mmm4rec_kernels.cuda")
    return importlib.import_module(f"mmm4rec_kernels.triton.{path}")


def _fused_args(backend, x, dt, A, B, C, E, dt_bias, D):
    """The kernels' arguments: the Triton kernels cast the small per-head / per-token inputs on load; the CUDA
    extension takes them in float32."""
    if backend == "triton":
        small = lambda t: None if t is None else t.contiguous()  # noqa: E731
    else:
        small = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    return x.contiguous(), small(dt), small(A), B.contiguous(), C.contiguous(), small(E), small(dt_bias), small(D)


def _opts(backend, path, d_skip_delta, dt_softplus, allow_tf32, padded):
    opts = dict(d_skip_delta=d_skip_delta, dt_softplus=dt_softplus, allow_tf32=allow_tf32)
    if backend == "triton" and path == "quadratic" and padded:
        opts["padded"] = True   # right-padded layout: the kernels write the padding zeros themselves
    return opts


def fused_forward(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path, d_skip_delta,
                  dt_softplus, allow_tf32, padded, return_final_states, chunk_size):
    """(y [T, H, P] in x's dtype, final states [nseq, H, P, n] float32 or None) of one backend's kernels."""
    mod = _fused_module(backend, path)
    args = _fused_args(backend, x, dt, A, B, C, E, dt_bias, D) + (seq_start, seq_len, max_len)
    opts = _opts(backend, path, d_skip_delta, dt_softplus, allow_tf32, padded)
    if path == "quadratic":
        return mod.tissd_quadratic_fwd(*args, **opts), None
    return mod.tissd_chunked_fwd(*args, initial_states=None if h0 is None else h0.float().contiguous(),
                                 return_final_states=return_final_states, chunk_size=chunk_size, **opts)


def fused_backward(dy, dfinal, x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path,
                   d_skip_delta, dt_softplus, allow_tf32, padded, chunk_size):
    """(dx, ddt, dA, dB, dC, dE, ddt_bias, dD, dh0) of fused_forward; None for None inputs; dx, dB, dC in x's
    dtype, the rest float32."""
    mod = _fused_module(backend, path)
    args = _fused_args(backend, x, dt, A, B, C, E, dt_bias, D) + (seq_start, seq_len, max_len)
    opts = _opts(backend, path, d_skip_delta, dt_softplus, allow_tf32, padded)
    dy = dy.contiguous()
    if path == "quadratic":
        return tuple(mod.tissd_quadratic_bwd(dy, *args, **opts)) + (None,)
    return tuple(mod.tissd_chunked_bwd(dy, None if dfinal is None else dfinal.float().contiguous(), *args,
                                       initial_states=None if h0 is None else h0.float().contiguous(),
                                       chunk_size=chunk_size, **opts))


@torch.library.custom_op("mmm4rec::tissd_fused", mutates_args=())
def tissd_fused(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, E: Optional[Tensor],
                dt_bias: Optional[Tensor], D: Optional[Tensor], h0: Optional[Tensor], seq_start: Tensor,
                seq_len: Tensor, max_len: int, backend: str, path: str, d_skip_delta: bool, dt_softplus: bool,
                allow_tf32: bool, padded: bool, return_final_states: bool, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Token layout (x [T, H, P], dt / E [T, H], B / C [T, G, n], seq_start [nseq] int64, seq_len [nseq] int32):
    (y [T, H, P], final states [nseq, H, P, n] float32, numel 0 unless return_final_states)."""
    y, final = fused_forward(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path,
                             d_skip_delta, dt_softplus, allow_tf32, padded, return_final_states, chunk_size)
    return y, _none_to_empty(final, x)


@tissd_fused.register_fake
def _(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path, d_skip_delta, dt_softplus,
      allow_tf32, padded, return_final_states, chunk_size):
    nseq, H, P, n = seq_start.shape[0], x.shape[1], x.shape[2], B.shape[2]
    final = x.new_empty((nseq, H, P, B.shape[-1]) if return_final_states else _EMPTY, dtype=torch.float32)
    del n
    return torch.empty_like(x, memory_format=torch.contiguous_format), final


@torch.library.custom_op("mmm4rec::tissd_fused_bwd", mutates_args=())
def tissd_fused_bwd(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    E: Optional[Tensor], dt_bias: Optional[Tensor], D: Optional[Tensor], h0: Optional[Tensor],
                    seq_start: Tensor, seq_len: Tensor, max_len: int, backend: str, path: str, d_skip_delta: bool,
                    dt_softplus: bool, allow_tf32: bool, padded: bool, chunk_size: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = fused_backward(dy, dfinal, x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend,
                           path, d_skip_delta, dt_softplus, allow_tf32, padded, chunk_size)
    return _distinct([_none_to_empty(g, x) for g in grads], (dy, dfinal, x, dt, A, B, C, E, dt_bias, D, h0))


@tissd_fused_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path, d_skip_delta,
      dt_softplus, allow_tf32, padded, chunk_size):
    f32 = lambda t: x.new_empty(_EMPTY, dtype=torch.float32) if t is None else \
        x.new_empty(t.shape, dtype=torch.float32)  # noqa: E731
    same = lambda t: x.new_empty(t.shape)  # noqa: E731
    return (same(x), f32(dt), f32(A), same(B), same(C), f32(E), f32(dt_bias), f32(D),
            f32(h0) if path != "quadratic" else x.new_empty(_EMPTY, dtype=torch.float32))


_FUSED_STATIC = ("max_len", "backend", "path", "d_skip_delta", "dt_softplus", "allow_tf32", "padded")


def _fused_setup(ctx, inputs, output):
    (x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path, d_skip_delta, dt_softplus,
     allow_tf32, padded, return_final_states, chunk_size) = inputs
    ctx.save_for_backward(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len)
    ctx.static = (max_len, backend, path, d_skip_delta, dt_softplus, allow_tf32, padded)
    ctx.return_final_states, ctx.chunk_size = return_final_states, chunk_size


def _fused_backward(ctx, dy, dfinal):
    x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len = ctx.saved_tensors
    grads = torch.ops.mmm4rec.tissd_fused_bwd(dy, dfinal if ctx.return_final_states else None, x, dt, A, B, C, E,
                                              dt_bias, D, h0, seq_start, seq_len, *ctx.static, ctx.chunk_size)
    given = (x, dt, A, B, C, E, dt_bias, D, h0)
    out = [None if t is None else g.to(t.dtype) for g, t in zip(grads, given)]
    return (*out, None, None, None, None, None, None, None, None, None, None, None)


tissd_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


class _FusedTiSSD(torch.autograd.Function):
    """Eager twin of torch.ops.mmm4rec.tissd_fused."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path, d_skip_delta,
                dt_softplus, allow_tf32, padded, return_final_states, chunk_size):
        y, final = fused_forward(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path,
                                 d_skip_delta, dt_softplus, allow_tf32, padded, return_final_states, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len)
        ctx.static = (max_len, backend, path, d_skip_delta, dt_softplus, allow_tf32, padded)
        ctx.chunk_size = chunk_size
        return y, _none_to_empty(final, x)

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len = ctx.saved_tensors
        dfinal = dfinal if dfinal is not None and dfinal.numel() else None
        grads = fused_backward(dy, dfinal, x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, *ctx.static,
                               ctx.chunk_size)
        given = (x, dt, A, B, C, E, dt_bias, D, h0)
        out = [None if g is None or t is None else g.to(t.dtype) for g, t in zip(grads, given)]
        return (*out, None, None, None, None, None, None, None, None, None, None, None)


def tissd_fused_call(x, dt, A, B, C, E, dt_bias, D, h0, seq_start, seq_len, max_len, backend, path, d_skip_delta,
                     dt_softplus, allow_tf32, padded, return_final_states, chunk_size):
    """(y, final or None) through the registered op (tracing) or its eager twin."""
    y, final = call(torch.ops.mmm4rec.tissd_fused, _FusedTiSSD, x, dt, A, B, C, E, dt_bias, D, h0, seq_start,
                    seq_len, max_len, backend, path, d_skip_delta, dt_softplus, allow_tf32, padded,
                    return_final_states, chunk_size)
    return y, (final if return_final_states else None)


# ------------------------------------------------------------------------------------------ Triton gated RMSNorm
@torch.library.custom_op("mmm4rec::gated_rmsnorm_fused", mutates_args=())
def gated_rmsnorm_fused(y: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int
                        ) -> tuple[Tensor, Tensor]:
    """y, z [R, d] (z may be None), weight [d] -> (out [R, d] in y's dtype, rstd [R, d // group_size] float32)."""
    from .triton.gated_rmsnorm import gated_rmsnorm_fwd
    return gated_rmsnorm_fwd(y, z, weight, eps, group_size)


@gated_rmsnorm_fused.register_fake
def _(y, z, weight, eps, group_size):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], y.shape[1] // group_size), dtype=torch.float32)


@torch.library.custom_op("mmm4rec::gated_rmsnorm_fused_bwd", mutates_args=())
def gated_rmsnorm_fused_bwd(dout: Tensor, y: Tensor, z: Optional[Tensor], weight: Tensor, rstd: Tensor, eps: float,
                            group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    from .triton.gated_rmsnorm import gated_rmsnorm_bwd
    dy, dz, dw = gated_rmsnorm_bwd(dout, y, z, weight, rstd, eps, group_size)
    return dy, _none_to_empty(dz, y).to(y.dtype), dw


@gated_rmsnorm_fused_bwd.register_fake
def _(dout, y, z, weight, rstd, eps, group_size):
    return y.new_empty(y.shape), y.new_empty(_EMPTY) if z is None else z.new_empty(z.shape), weight.new_empty(
        weight.shape)


def _norm_setup(ctx, inputs, output):
    y, z, weight, eps, group_size = inputs
    ctx.save_for_backward(y, z, weight, output[1])
    ctx.eps, ctx.group_size = eps, group_size


def _norm_backward(ctx, dout, _drstd):
    y, z, weight, rstd = ctx.saved_tensors
    dy, dz, dw = torch.ops.mmm4rec.gated_rmsnorm_fused_bwd(dout.contiguous(), y, z, weight, rstd, ctx.eps,
                                                           ctx.group_size)
    return dy, _empty_to_none(dz, z), dw, None, None


gated_rmsnorm_fused.register_autograd(_norm_backward, setup_context=_norm_setup)


class _GatedRMSNormTriton(torch.autograd.Function):
    """Eager twin of torch.ops.mmm4rec.gated_rmsnorm_fused."""

    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size):
        from .triton.gated_rmsnorm import gated_rmsnorm_fwd
        out, rstd = gated_rmsnorm_fwd(y, z, weight, eps, group_size)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.eps, ctx.group_size = eps, group_size
        return out, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _drstd):
        from .triton.gated_rmsnorm import gated_rmsnorm_bwd
        y, z, weight, rstd = ctx.saved_tensors
        dy, dz, dw = gated_rmsnorm_bwd(dout.contiguous(), y, z, weight, rstd, ctx.eps, ctx.group_size)
        return dy, dz, dw, None, None


def gated_rmsnorm_triton(y2, z2, weight, eps, group_size):
    """out [R, d] of the Triton gated RMSNorm with autograd (y2, z2 [R, d] contiguous, weight [d])."""
    out, _ = call(torch.ops.mmm4rec.gated_rmsnorm_fused, _GatedRMSNormTriton, y2, z2, weight.contiguous(),
                  float(eps), int(group_size))
    return out


# ------------------------------------------------------------------------ NaN causality marks (torch backend)
def may_hold_nonfinite(*tensors) -> bool:
    """Could any of the tensors (None skipped) hold a NaN / inf?  One sum per tensor and one host read: a finite sum
    proves there is none; an overflowing one only sends the caller down the exact per-step marking."""
    total = sum(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors
                if t is not None)
    return not bool(torch.isfinite(total))


def nonfinite_onward_steps(x, dt, E, B, C, mask):
    """[nseq, L, H] bool: True on the valid steps of a sequence and head from its first non-finite input on (x, dt,
    E at that head; B, C of its group).  The recurrence turns every later output of that head NaN, never an earlier
    one.  x [nseq, L, H, P], dt / E [nseq, L, H], B / C [nseq, L, G, n], mask [nseq, L] bool (valid steps)."""
    H, G = x.shape[2], B.shape[2]
    bad = ~torch.isfinite(x).all(-1) | ~torch.isfinite(dt)
    if E is not None:
        bad = bad | ~torch.isfinite(E)
    bad = bad | ~(torch.isfinite(B).all(-1) & torch.isfinite(C).all(-1)).repeat_interleave(H // G, dim=2)
    valid = mask[..., None]
    # the first bad step of each (sequence, head) by a min-reduction (no scan)
    steps = torch.arange(bad.shape[1], device=bad.device)[None, :, None]
    first = torch.where(bad & valid, steps, bad.shape[1]).amin(1, keepdim=True)
    return (steps >= first) & valid


@torch.library.custom_op("mmm4rec::nonfinite_onward", mutates_args=())
def nonfinite_onward(x: Tensor, dt: Tensor, E: Optional[Tensor], B: Tensor, C: Tensor, mask: Tensor) -> Tensor:
    """nonfinite_onward_steps as one op, so that a compiled graph runs it as one opaque call.  On CPU it first sums
    each input (a finite sum proves there is nothing to mark: all False, the common case); on other devices it always
    marks (no host read: CUDA graphs stay capturable).  Not differentiable (a bool output)."""
    if x.device.type == "cpu" and not may_hold_nonfinite(x, dt, E, B, C):
        return torch.zeros(x.shape[:3], dtype=torch.bool, device=x.device)
    return nonfinite_onward_steps(x, dt, E, B, C, mask)


@nonfinite_onward.register_fake
def _(x, dt, E, B, C, mask):
    return x.new_empty(x.shape[:3], dtype=torch.bool)


OPS = ("ssd_scan_cpu", "ssd_scan_cpu_bwd", "causal_conv_cpu", "causal_conv_cpu_bwd", "tissd_fused",
       "tissd_fused_bwd", "gated_rmsnorm_fused", "gated_rmsnorm_fused_bwd", "nonfinite_onward")
