"""CPU paths of TimeAwareSSD in few calls: inference in 4 torch ops + 3 native calls, training in two autograd nodes
(the time encoding; in_proj up to the gated norm).  Eager only (torch.compile / export trace the general path).

A layer call at batch 1-8 runs ~150 small torch ops forward (and as many backward nodes) on the general path
(argument handling, the time encoding's prefix statistics and MLPs, NaN bookkeeping, masks, the gated norm), which
costs more than the math.  On CPU (float32 / float64, native kernels loaded, the default norm and skip):
  inference (no_grad / inference_mode), `forward` runs
    zxbcdt = in_proj(u)                                   (F.linear)
    xBC = SiLU(causal conv(xBC_in))                       (native conv, reads the in_proj slice in place)
    time_scale = CausalTimeEncoding(timestamps)           (native, tissd_layer.cpp; Log1p / custom encodings: torch)
    y = RMSNorm(tissd(x, dt, A, B, C, time_scale) * SiLU(z)) * w     (native core, tissd_layer.cpp)
    out = out_proj(y)                                     (F.linear; rows past each length are exactly 0)
  training (autograd on): the same in two autograd nodes, the time encoding and the rest up to out_proj (in_proj,
    conv, step sizes, quadratic scan, gated norm), each with a native backward.
The values and gradients equal the general path's to rounding (tests/test_layer_cpu.py).  `forward` returns
(None, reason) when the call is outside what it covers, e.g. `path="auto"` beyond the length the quadratic form wins
on CPU (CPU_INFER_MAX_LEN for inference, the CPU_CROSSOVER table for training), and (None, "NaN / inf input") when
an input step is NaN / inf: the caller then runs the general path (its NaN-causality rule).  The caller logs which
path ran at DEBUG level ("mmm4rec_kernels" logger), like every dispatch decision.
"""
from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from .. import cpu as native
from ..dispatch import CPU_INFER_MAX_LEN, cpu_crossover_length
from .linear_split import linear_split_backward
from .time_encoding import CausalTimeEncoding

logger = logging.getLogger("mmm4rec_kernels")


def reason_not_covered(layer, hidden, lengths, return_state, times=None) -> str | None:
    """None when `forward` covers this call, else a short reason (the general path runs).  times: the timestamps /
    time gaps tensor (the CPU paths give no gradient to them)."""
    if torch.compiler.is_compiling():
        return "tracing"
    if hidden.device.type != "cpu" or hidden.dtype not in (torch.float32, torch.float64):
        return f"{hidden.device.type} {hidden.dtype}"
    if layer.A_log.dtype != hidden.dtype or torch.is_autocast_enabled("cpu"):
        return "autocast / parameter dtype"
    if return_state:
        return "return_state"
    if layer.backend not in ("auto", "torch") or layer.path not in ("auto", "quadratic"):
        return f"backend={layer.backend!r} path={layer.path!r} requested"
    if not layer.rmsnorm or layer.norm_before_gate or layer.D_has_hdim:
        return "norm / skip variant"
    training = torch.is_grad_enabled()
    if training and times is not None and times.requires_grad:
        return "timestamps / time_gaps require grad"
    enc = layer.time_encoding
    if not training and enc is not None and enc.training and isinstance(enc, CausalTimeEncoding) \
            and enc.dropout.p > 0:
        return "time dropout active without autograd"
    limit = cpu_crossover_length(layer.headdim, layer.d_state) if training else CPU_INFER_MAX_LEN
    if layer.path == "auto" and hidden.shape[1] > limit:
        longest = hidden.shape[1] if lengths is None or not lengths.numel() else int(lengths.max())
        if longest > limit:
            table = "CPU_CROSSOVER" if training else "CPU_INFER_MAX_LEN"
            return f"longest sequence {longest} > {limit} ({table}: chunked is faster there)"
    if not native.available():
        return "no native library"
    return None


def _cached(layer, name, params, make):
    """make(), cached on the layer until one of `params` (a function returning the parameters it reads) changes
    (another storage or an in-place update): transposed / contiguous weights built once, not per call."""
    cache = layer.__dict__.setdefault("_infer_cache", {})
    hit = cache.get(name)
    if hit is not None and [p._version for p in hit[0]] == hit[1] and [p.data_ptr() for p in hit[0]] == hit[2]:
        return hit[3]
    ps = params()
    value = make()
    cache[name] = (ps, [p._version for p in ps], [p.data_ptr() for p in ps], value)
    return value


def _ptr(t):
    return None if t is None else t.data_ptr()


def _time_params(enc):
    """CausalTimeEncoding's 10 parameters in the native kernels' order (conv taps [H, 1, k] read as [H, k])."""
    return (enc.scale, enc.shift, enc.mix1.weight, enc.mix1.bias, enc.mix2.weight, enc.mix2.bias, enc.conv1.weight,
            enc.conv1.bias, enc.conv2.weight, enc.conv2.bias)


def _pointers(tensors):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _time_fn(name, dtype):
    return getattr(native.library(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


class _TimeEncodingCPU(torch.autograd.Function):
    """CausalTimeEncoding.forward as one autograd node: t [b, L] float64 timestamps (is_gaps=0) or gaps (is_gaps=1,
    dropout already applied) -> time_scale [b, L, H]; the backward gives the 10 parameters' gradients (native)."""

    @staticmethod
    def forward(ctx, t, is_gaps, eps, *params):
        b, L = t.shape
        H, k = params[0].shape[0], params[6].shape[-1]
        out = torch.empty(b, L, H, dtype=params[0].dtype)
        _time_fn("mmm4rec_time_encoding_fwd", out.dtype)(t.data_ptr(), is_gaps, b, L, H, k, _pointers(params),
                                                          eps, out.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(t, *params)
        ctx.is_gaps, ctx.eps = is_gaps, eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        t, *params = ctx.saved_tensors
        b, L = t.shape
        H, k = params[0].shape[0], params[6].shape[-1]
        grads = [torch.empty_like(p) for p in params]
        _time_fn("mmm4rec_time_encoding_bwd", dout.dtype)(
            t.data_ptr(), ctx.is_gaps, b, L, H, k, _pointers(params), ctx.eps, dout.contiguous().data_ptr(),
            _pointers(grads), torch.get_num_threads())
        return (None, None, None, *grads)


def _time_scale(layer, timestamps, time_gaps, dtype):
    """[b, L, H] in dtype: the native causal encoding (one autograd node when autograd is on), or the layer's own
    module for other encodings."""
    enc = layer.time_encoding
    if not isinstance(enc, CausalTimeEncoding) or enc.scale.dtype != dtype:
        return enc(timestamps, time_gaps, None).to(dtype)
    if enc.training and enc.dropout.p > 0:          # dropout on the gaps, drawn by torch exactly as the module does
        t, is_gaps = enc.dropout(enc._gaps(timestamps, time_gaps)), 1
    else:
        t, is_gaps = (time_gaps, 1) if time_gaps is not None else (timestamps, 0)
    t = t.to(torch.float64).contiguous()
    if torch.is_grad_enabled():
        return _TimeEncodingCPU.apply(t, is_gaps, float(enc.eps), *[p.contiguous() for p in _time_params(enc)])

    def make():                                 # the contiguous tensors and their pointer array, kept together
        tensors = [p.detach().contiguous() for p in _time_params(enc)]
        return tensors, _pointers(tensors)
    _, ptrs = _cached(layer, "time", lambda: _time_params(enc), make)
    b, L = t.shape
    out = torch.empty(b, L, enc.nheads, dtype=dtype)                    # no autograd: the kernel, no Function
    _time_fn("mmm4rec_time_encoding_fwd", dtype)(t.data_ptr(), is_gaps, b, L, enc.nheads, enc.conv1.kernel_size[0],
                                                  ptrs, float(enc.eps), out.data_ptr(), torch.get_num_threads())
    return out


class _NonFinite(Exception):
    """A valid input step holds NaN / inf: the general path (and its NaN-causality rule) must run."""


def _core_args(layer, dtype):
    """The core's per-call constants: A = -exp(A_log), dt_bias, D, norm weight (contiguous, the compute dtype)."""
    return _cached(layer, "ssd", lambda: (layer.A_log, layer.dt_bias, layer.D, layer.norm.weight),
                   lambda: (-torch.exp(layer.A_log.detach().to(dtype)), layer.dt_bias.detach().to(dtype).contiguous(),
                            layer.D.detach().to(dtype).contiguous(), layer.norm.weight.detach().to(dtype).contiguous()))


def _dims(layer, xbc):
    b, L = xbc.shape[:2]
    return b, L, layer.nheads, layer.headdim, layer.ngroups, layer.d_state


def _core_fwd(layer, xbc, z, dt, s_zdt, ts, A, dt_bias, D, norm_w, lens, y_out=None):
    """out [b, L, d_inner] of the native core (step sizes, scan, gated norm); raises _NonFinite."""
    b, L, H, P, G, n = _dims(layer, xbc)
    out = torch.empty(b, L, layer.d_inner, dtype=xbc.dtype)
    f32 = xbc.dtype == torch.float32
    lib = native.library()
    bad = (lib.mmm4rec_ssd_core_fwd_f32 if f32 else lib.mmm4rec_ssd_core_fwd_f64)(
        xbc.data_ptr(), xbc.stride(1), z.data_ptr(), dt.data_ptr(), s_zdt, _ptr(ts), dt_bias.data_ptr(),
        A.data_ptr(), D.data_ptr(), int(layer.d_skip == "delta"), norm_w.data_ptr(), layer.d_inner // G,
        float(layer.norm.eps), _ptr(lens), b, L, H, P, G, n, out.data_ptr(), _ptr(y_out), torch.get_num_threads())
    if bad:
        raise _NonFinite
    return out


class _LayerCore(torch.autograd.Function):
    """in_proj -> causal conv + SiLU -> step sizes, quadratic scan, gated RMSNorm as ONE autograd node:
        zxbcdt = u W_in^T + b_in;  xBC = SiLU(conv(zxbcdt's xBC piece));  A = -exp(A_log)
        out [b, L, d_inner] = RMSNorm(tissd(x, dt, A, B, C, ts) * SiLU(z)) * norm_w   (0 past each length)
    Backward: the core's native backward (tissd_layer.cpp), the conv's (causal_conv.cpp), then the in_proj's from the
    three pieces' gradients without concatenating them (linear_split_backward); dA_log = dA * A."""

    @staticmethod
    def forward(ctx, u, w_in, b_in, conv_w, conv_b, ts, A_log, dt_bias, D, norm_w, layer, lens):
        d_inner, conv_dim = layer.d_inner, layer.conv_dim
        zxbcdt = F.linear(u, w_in, b_in)                                        # [b, L, d_inner + conv_dim + H]
        x_in = zxbcdt[..., d_inner:d_inner + conv_dim]
        w2 = conv_w.reshape(conv_dim, -1)
        xbc = native.conv_forward(x_in, w2, conv_b, True)                       # [b, L, conv_dim] contiguous
        A = -torch.exp(A_log)
        y = torch.empty(u.shape[0], u.shape[1], d_inner, dtype=u.dtype)
        width = zxbcdt.shape[-1]
        out = _core_fwd(layer, xbc, zxbcdt, zxbcdt[..., d_inner + conv_dim:], width, ts, A, dt_bias, D, norm_w,
                        lens, y)
        ctx.save_for_backward(u, w_in, zxbcdt, w2, conv_b, xbc, ts, A, dt_bias, D, norm_w, y)
        ctx.layer, ctx.lens, ctx.has_bias = layer, lens, b_in is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        u, w_in, zxbcdt, w2, conv_b, xbc, ts, A, dt_bias, D, norm_w, y = ctx.saved_tensors
        layer = ctx.layer
        b, L, H, P, G, n = _dims(layer, xbc)
        d_inner, conv_dim, width = layer.d_inner, layer.conv_dim, zxbcdt.shape[-1]
        dxbc, dz = torch.empty_like(xbc), torch.empty(b, L, d_inner, dtype=xbc.dtype)
        ddt, dts = torch.empty(b, L, H, dtype=xbc.dtype), None if ts is None else torch.empty_like(ts)
        ddt_bias, dA, dD, dw = (torch.empty_like(t) for t in (dt_bias, A, D, norm_w))
        lib = native.library()
        (lib.mmm4rec_ssd_core_bwd_f32 if xbc.dtype == torch.float32 else lib.mmm4rec_ssd_core_bwd_f64)(
            dout.contiguous().data_ptr(), xbc.data_ptr(), xbc.stride(1), zxbcdt.data_ptr(),
            zxbcdt[..., d_inner + conv_dim:].data_ptr(), width, _ptr(ts), dt_bias.data_ptr(), A.data_ptr(),
            D.data_ptr(), int(layer.d_skip == "delta"), norm_w.data_ptr(), d_inner // G, float(layer.norm.eps),
            _ptr(ctx.lens), b, L, H, P, G, n, y.data_ptr(), dxbc.data_ptr(), dz.data_ptr(), ddt.data_ptr(),
            _ptr(dts), ddt_bias.data_ptr(), dA.data_ptr(), dD.data_ptr(), dw.data_ptr(), torch.get_num_threads())
        dx_in, dconv_w, dconv_b = native.conv_backward(zxbcdt[..., d_inner:d_inner + conv_dim], w2, conv_b, True,
                                                       [(0, conv_dim, dxbc)])
        du, dw_in, db_in = linear_split_backward(u, w_in, ctx.has_bias, (d_inner, conv_dim, H), (dz, dx_in, ddt))
        return (du, dw_in, db_in, dconv_w.reshape(w2.shape[0], 1, -1), dconv_b, dts, dA * A, ddt_bias, dD, dw,
                None, None)


def _time_inputs(layer, timestamps, time_gaps):
    return layer.time_encoding is not None and (timestamps is not None or time_gaps is not None)


def _infer(layer, u, timestamps, time_gaps, lens):
    dtype = u.dtype
    zxbcdt = F.linear(u, layer.in_proj.weight, layer.in_proj.bias)         # [b, L, d_inner + conv_dim + H]
    width, d_inner, conv_dim = zxbcdt.shape[-1], layer.d_inner, layer.conv_dim
    conv = layer.conv1d                                                     # reads the in_proj slice in place
    xbc = native.conv_forward(zxbcdt[..., d_inner:d_inner + conv_dim], conv.weight.detach().reshape(conv_dim, -1),
                              None if conv.bias is None else conv.bias.detach(), True)
    ts = _time_scale(layer, timestamps, time_gaps, dtype) if _time_inputs(layer, timestamps, time_gaps) else None
    A, dt_bias, D, norm_w = _core_args(layer, dtype)
    dt = zxbcdt[..., d_inner + conv_dim:]
    y = _core_fwd(layer, xbc, zxbcdt, dt, width, ts, A, dt_bias, D, norm_w, lens)
    return F.linear(y, layer.out_proj.weight, layer.out_proj.bias)


def _train(layer, u, timestamps, time_gaps, lens):
    ts = _time_scale(layer, timestamps, time_gaps, u.dtype).contiguous() if _time_inputs(
        layer, timestamps, time_gaps) else None
    conv = layer.conv1d
    y = _LayerCore.apply(u.contiguous(), layer.in_proj.weight, layer.in_proj.bias, conv.weight, conv.bias, ts,
                         layer.A_log, layer.dt_bias, layer.D, layer.norm.weight, layer, lens)
    return F.linear(y, layer.out_proj.weight, layer.out_proj.bias)


def forward(layer, u, timestamps, time_gaps, lengths, return_state):
    """(out [b, L, d_model] with 0 past each length, None) on the CPU paths, or (None, why) when the general path must
    run.  u: the right-padded working batch [b, L, d_model]; lengths [b] or None."""
    why = reason_not_covered(layer, u, lengths, return_state, time_gaps if time_gaps is not None else timestamps)
    if why is not None:
        return None, why
    lens = None if lengths is None else lengths.to(torch.int64).contiguous()
    try:
        out = (_train if torch.is_grad_enabled() else _infer)(layer, u, timestamps, time_gaps, lens)
    except _NonFinite:
        return None, "NaN / inf input"
    if layer.out_proj.bias is not None and lens is not None:          # padded rows: 0, not the bias
        out = out.masked_fill((torch.arange(u.shape[1])[None, :] >= lens[:, None])[..., None], 0.0)
    return out, None
