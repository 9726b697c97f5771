"""CPU paths of TimeAwareSSD in few calls: inference in 4 torch ops + 3 native calls, training as one autograd node.
Eager only (torch.compile / export trace the general path).

A layer call at batch 1-8 runs ~150 small torch ops forward (and as many backward nodes) on the general path
(argument handling, the time encoding's prefix statistics and MLPs, NaN bookkeeping, masks, the gated norm), which
costs more than the math.  On CPU (float32 / float64, native kernels loaded, the default norm and skip):
  inference (no_grad / inference_mode), `forward` runs
    zxbcdt = in_proj(u)                                   (F.linear)
    xBC = SiLU(causal conv(xBC_in))                       (native conv, reads the in_proj slice in place)
    time_scale = CausalTimeEncoding(timestamps)           (native, tissd_layer.cpp; Log1p / custom encodings: torch)
    y = RMSNorm(tissd(x, dt, A, B, C, time_scale) * SiLU(z)) * w     (native core, tissd_layer.cpp)
    out = out_proj(y)                                     (F.linear; rows past each length are exactly 0)
  training (autograd on): the same as ONE autograd node (_LayerTrain), its backward native except out_proj's and
    in_proj's matmuls.
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
from ..dispatch import CPU_CLASS, CPU_INFER_MAX_LEN, cpu_crossover_length
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
            table = f"{'CPU_CROSSOVER' if training else 'CPU_INFER_MAX_LEN'} of the {CPU_CLASS} table"
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


def _native_time(enc, dtype) -> bool:
    """Does the native causal time encoding compute this layer's time scale (else its own module runs)?"""
    return isinstance(enc, CausalTimeEncoding) and enc.scale.dtype == dtype


def _time_input(enc, timestamps, time_gaps):
    """(t [b, L] float64 contiguous, is_gaps) for the native encoding: the timestamps, or the gaps (given, or with
    dropout on them, drawn by torch exactly as the module draws it)."""
    if enc.training and enc.dropout.p > 0:
        t, is_gaps = enc.dropout(enc._gaps(timestamps, time_gaps)), 1
    else:
        t, is_gaps = (time_gaps, 1) if time_gaps is not None else (timestamps, 0)
    return t.to(torch.float64).contiguous(), is_gaps


def _time_scale(layer, timestamps, time_gaps, dtype):
    """[b, L, H] in dtype without autograd: the native causal encoding, or the layer's own module for other
    encodings."""
    enc = layer.time_encoding
    if not _native_time(enc, dtype):
        return enc(timestamps, time_gaps, None).to(dtype)
    t, is_gaps = _time_input(enc, timestamps, time_gaps)

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


class _LayerTrain(torch.autograd.Function):
    """The whole layer as ONE autograd node (each extra node, with its Python and bookkeeping, costs about as much as
    a small layer's arithmetic at batch 1-8):
        ts = CausalTimeEncoding(t)   (native; or ts_in: another encoding's output, differentiated through; or none)
        zxbcdt = u W_in^T + b_in;  xBC = SiLU(conv(zxbcdt's xBC piece));  A = -exp(A_log)
        y = RMSNorm(tissd(x, dt, A, B, C, ts) * SiLU(z)) * norm_w      [b, L, d_inner], 0 past each length
        out = y W_out^T + b_out                                         [b, L, d_model], 0 past each length
    Backward: out_proj's two matmuls, the core's native backward (tissd_layer.cpp), the conv's (causal_conv.cpp),
    the in_proj's from its output's gradient, which the core (dz, ddt) and the conv (dxBC) write into one buffer, the
    time encoding's native backward; dA_log = dA * A.  params: in_proj weight / bias, conv weight / bias, A_log,
    dt_bias, D, norm weight, out_proj weight / bias, then the time encoding's 10 (_time_params) when t is given
    (_train)."""

    @staticmethod
    def forward(ctx, u, t, is_gaps, ts_in, layer, lens, *params):
        w_in, b_in, conv_w, conv_b, A_log, dt_bias, D, norm_w, w_out, b_out, *tparams = params
        b, L = u.shape[:2]
        ts = ts_in
        if t is not None:                                                       # native causal time encoding
            enc = layer.time_encoding
            ts = torch.empty(b, L, enc.nheads, dtype=u.dtype)
            _time_fn("mmm4rec_time_encoding_fwd", u.dtype)(
                t.data_ptr(), is_gaps, b, L, enc.nheads, tparams[6].shape[-1], _pointers(tparams), float(enc.eps),
                ts.data_ptr(), torch.get_num_threads())
        d_inner, conv_dim = layer.d_inner, layer.conv_dim
        zxbcdt = F.linear(u, w_in, b_in)                                        # [b, L, d_inner + conv_dim + H]
        w2 = conv_w.reshape(conv_dim, -1)
        xbc = native.conv_forward(zxbcdt[..., d_inner:d_inner + conv_dim], w2, conv_b, True)   # [b, L, conv_dim]
        A = -torch.exp(A_log)
        y = torch.empty(b, L, d_inner, dtype=u.dtype)
        core = _core_fwd(layer, xbc, zxbcdt, zxbcdt[..., d_inner + conv_dim:], zxbcdt.shape[-1], ts, A, dt_bias, D,
                         norm_w, lens, y)
        out = F.linear(core, w_out, b_out)
        pad = None
        if b_out is not None and lens is not None:                              # padded rows: 0, not the bias
            pad = (torch.arange(L)[None, :] >= lens[:, None])[..., None]
            out.masked_fill_(pad, 0.0)
        ctx.save_for_backward(u, w_in, zxbcdt, w2, conv_b, xbc, ts, A, dt_bias, D, norm_w, y, core, w_out, t,
                              *tparams)
        ctx.layer, ctx.lens, ctx.pad, ctx.is_gaps = layer, lens, pad, is_gaps
        ctx.has_bias, ctx.has_out_bias = b_in is not None, b_out is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        u, w_in, zxbcdt, w2, conv_b, xbc, ts, A, dt_bias, D, norm_w, y, core, w_out, t, *tparams = ctx.saved_tensors
        layer = ctx.layer
        b, L, H, P, G, n = _dims(layer, xbc)
        d_inner, conv_dim, width = layer.d_inner, layer.conv_dim, zxbcdt.shape[-1]
        # out_proj: the padded rows' output is a constant 0 (their gradient reaches nothing; core is 0 there)
        dout = dout if ctx.pad is None else dout.masked_fill(ctx.pad, 0.0)
        d2, c2 = dout.reshape(-1, dout.shape[-1]), core.reshape(-1, d_inner)
        dw_out = d2.t().mm(c2)
        db_out = d2.sum(0) if ctx.has_out_bias else None
        dcore = d2.mm(w_out)                                                    # [b L, d_inner] contiguous
        # the in_proj output's gradient g = [dz | dxBC_in | ddt] in ONE buffer: the core writes dz and ddt into it,
        # the conv's backward dxBC_in, so in_proj's backward is two matmuls (no per-piece products)
        g = torch.empty(b, L, width, dtype=xbc.dtype)
        dxbc, dts = torch.empty_like(xbc), None if ts is None else torch.empty_like(ts)
        ddt_bias, dA, dD, dw = (torch.empty_like(p) for p in (dt_bias, A, D, norm_w))
        lib = native.library()
        item = g.element_size()
        (lib.mmm4rec_ssd_core_bwd_f32 if xbc.dtype == torch.float32 else lib.mmm4rec_ssd_core_bwd_f64)(
            dcore.data_ptr(), xbc.data_ptr(), xbc.stride(1), zxbcdt.data_ptr(),
            zxbcdt[..., d_inner + conv_dim:].data_ptr(), width, _ptr(ts), dt_bias.data_ptr(), A.data_ptr(),
            D.data_ptr(), int(layer.d_skip == "delta"), norm_w.data_ptr(), d_inner // G, float(layer.norm.eps),
            _ptr(ctx.lens), b, L, H, P, G, n, y.data_ptr(), dxbc.data_ptr(), g.data_ptr(),
            g.data_ptr() + (d_inner + conv_dim) * item, width, _ptr(dts), ddt_bias.data_ptr(), dA.data_ptr(),
            dD.data_ptr(), dw.data_ptr(), torch.get_num_threads())
        _, dconv_w, dconv_b = native.conv_backward(zxbcdt[..., d_inner:d_inner + conv_dim], w2, conv_b, True,
                                                   [(0, conv_dim, dxbc)], dx_out=g[..., d_inner:d_inner + conv_dim])
        g2 = g.view(-1, width)
        du = g2.mm(w_in).view(u.shape)
        dw_in = g2.t().mm(u.reshape(-1, u.shape[-1]))
        db_in = g2.sum(0) if ctx.has_bias else None
        dtparams, dts_in = [], None
        if t is not None:                                                       # native time encoding's backward
            dtparams = [torch.empty_like(p) for p in tparams]
            _time_fn("mmm4rec_time_encoding_bwd", dts.dtype)(
                t.data_ptr(), ctx.is_gaps, b, L, H, tparams[6].shape[-1], _pointers(tparams),
                float(layer.time_encoding.eps), dts.data_ptr(), _pointers(dtparams), torch.get_num_threads())
        else:
            dts_in = dts
        return (du, None, None, dts_in, None, None, dw_in, db_in, dconv_w.reshape(w2.shape[0], 1, -1), dconv_b,
                dA * A, ddt_bias, dD, dw, dw_out, db_out, *dtparams)


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
    t, is_gaps, ts_in, tparams = None, 0, None, ()
    if _time_inputs(layer, timestamps, time_gaps):
        enc = layer.time_encoding
        if _native_time(enc, u.dtype):
            t, is_gaps = _time_input(enc, timestamps, time_gaps)
            tparams = [p.contiguous() for p in _time_params(enc)]
        else:                                        # another encoding: its module, differentiated through
            ts_in = enc(timestamps, time_gaps, None).to(u.dtype).contiguous()
    conv, out_proj = layer.conv1d, layer.out_proj
    return _LayerTrain.apply(u.contiguous(), t, is_gaps, ts_in, layer, lens, layer.in_proj.weight,
                             layer.in_proj.bias, conv.weight, conv.bias, layer.A_log, layer.dt_bias, layer.D,
                             layer.norm.weight, out_proj.weight, out_proj.bias, *tparams)


def forward(layer, u, timestamps, time_gaps, lengths, return_state):
    """(out [b, L, d_model] with 0 past each length, None) on the CPU paths, or (None, why) when the general path must
    run.  u: the right-padded working batch [b, L, d_model]; lengths [b] or None."""
    why = reason_not_covered(layer, u, lengths, return_state, time_gaps if time_gaps is not None else timestamps)
    if why is not None:
        return None, why
    lens = None if lengths is None else lengths.to(torch.int64).contiguous()
    try:
        if torch.is_grad_enabled():
            return _train(layer, u, timestamps, time_gaps, lens), None
        out = _infer(layer, u, timestamps, time_gaps, lens)
    except _NonFinite:
        return None, "NaN / inf input"
    if layer.out_proj.bias is not None and lens is not None:          # padded rows: 0, not the bias
        out.masked_fill_((torch.arange(u.shape[1])[None, :] >= lens[:, None])[..., None], 0.0)
    return out, None
