"""CPU inference path of TimeAwareSSD: the whole layer in 4 torch ops and 3 native calls (no autograd).

A layer call at batch 1-8 runs ~150 small torch ops on the general path (argument handling, the time encoding's
prefix statistics and MLPs, NaN bookkeeping, the gated norm), which costs more than the math.  Under no_grad /
inference_mode on CPU with the native kernels loaded, `infer` runs instead:
    zxbcdt = in_proj(u)                                   (F.linear)
    xBC = SiLU(causal conv(xBC_in))                       (native conv, reads the in_proj slice in place)
    time_scale = CausalTimeEncoding(timestamps)           (native, layer_infer.cpp; Log1p / custom encodings: torch)
    y = RMSNorm(tissd(x, dt, A, B, C, time_scale) * SiLU(z)) * w     (native, layer_infer.cpp + the quadratic scan)
    out = out_proj(y)                                     (F.linear; rows past each length are exactly 0)
The values equal the general path's to rounding (tests/test_infer_cpu.py).  `infer` returns None, and the caller
runs the general path, when the layer or call is outside what it covers (`reason_not_covered` says why) or when an
input step is NaN / inf (the general path's NaN-causality rule then applies).  Which path ran is logged at DEBUG
level ("mmm4rec_kernels" logger), like every dispatch decision.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .. import cpu as native
from ..dispatch import CPU_INFER_MAX_LEN
from .time_encoding import CausalTimeEncoding

logger = logging.getLogger("mmm4rec_kernels")


def reason_not_covered(layer, hidden, lengths, return_state) -> str | None:
    """None when `infer` covers this call, else a short reason (the general path runs)."""
    if torch.is_grad_enabled():
        return "autograd on"
    if torch.compiler.is_compiling():
        return "tracing"
    if hidden.device.type != "cpu" or hidden.dtype not in (torch.float32, torch.float64):
        return f"{hidden.device.type} {hidden.dtype}"
    if return_state:
        return "return_state"
    if layer.backend not in ("auto", "torch") or layer.path not in ("auto", "quadratic"):
        return f"backend={layer.backend!r} path={layer.path!r} requested"
    if not layer.rmsnorm or layer.norm_before_gate or layer.D_has_hdim:
        return "norm / skip variant"
    enc = layer.time_encoding
    if enc is not None and enc.training and isinstance(enc, CausalTimeEncoding) and enc.dropout.p > 0:
        return "time dropout active"
    if layer.path == "auto" and hidden.shape[1] > CPU_INFER_MAX_LEN:
        longest = hidden.shape[1] if lengths is None or not lengths.numel() else int(lengths.max())
        if longest > CPU_INFER_MAX_LEN:
            return f"longest sequence {longest} > CPU_INFER_MAX_LEN={CPU_INFER_MAX_LEN} (chunked is faster there)"
    if not native.available():
        return "no native library"
    return None


def _cached(layer, name, params, make):
    """make(), cached on the layer until one of `params` (a function returning the parameters it reads) changes
    (another storage or an in-place update): transposed / contiguous weights built once, not per call."""
    cache = layer.__dict__.setdefault("_infer_cache", {})
    hit = cache.get(name)
    if hit is not None and all(p.data_ptr() == ptr and p._version == v for p, (ptr, v) in zip(hit[0], hit[1])):
        return hit[2]
    ps = params()
    value = make()
    cache[name] = (ps, [(p.data_ptr(), p._version) for p in ps], value)
    return value


def _ptr(t):
    return None if t is None else t.data_ptr()


def _time_scale(layer, timestamps, time_gaps, dtype):
    """[b, L, H] in dtype: the native causal encoding, or the layer's own module for other encodings."""
    enc = layer.time_encoding
    if not isinstance(enc, CausalTimeEncoding) or enc.scale.dtype != dtype:
        return enc(timestamps, time_gaps, None).to(dtype)
    t = (time_gaps if time_gaps is not None else timestamps).to(torch.float64).contiguous()
    b, L = t.shape
    H, k = enc.nheads, enc.conv1.kernel_size[0]
    params = lambda: (enc.scale, enc.shift, enc.mix1.weight, enc.mix1.bias, enc.mix2.weight,  # noqa: E731
                      enc.mix2.bias, enc.conv1.weight, enc.conv1.bias, enc.conv2.weight, enc.conv2.bias)
    ps = _cached(layer, "time", params, lambda: [p.detach().reshape(H, k).contiguous() if p.dim() == 3
                                                 else p.detach().contiguous() for p in params()])
    out = torch.empty(b, L, H, dtype=dtype)
    lib = native.library()
    fn = lib.mmm4rec_time_encoding_fwd_f32 if dtype == torch.float32 else lib.mmm4rec_time_encoding_fwd_f64
    fn(t.data_ptr(), int(time_gaps is not None), b, L, H, k, *[_ptr(p) for p in ps], float(enc.eps), out.data_ptr(),
       torch.get_num_threads())
    return out


def infer(layer, u, timestamps, time_gaps, lengths):
    """Right-padded working batch u [b, L, d_model] (lengths [b] or None) -> out [b, L, d_model] (0 past each
    length), or None when an input step is NaN / inf (the caller runs the general path)."""
    b, L, _ = u.shape
    H, P, G, n = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    d_inner, conv_dim, dtype = layer.d_inner, layer.conv_dim, u.dtype
    zxbcdt = F.linear(u, layer.in_proj.weight, layer.in_proj.bias)         # [b, L, d_inner + conv_dim + H]
    width = zxbcdt.shape[-1]
    conv = layer.conv1d
    wt, cb = _cached(layer, "conv", lambda: [p for p in (conv.weight, conv.bias) if p is not None], lambda: (
        conv.weight.detach().reshape(conv_dim, -1).t().contiguous(),
        None if conv.bias is None else conv.bias.detach().contiguous()))
    lib = native.library()
    f32 = dtype == torch.float32
    xbc = torch.empty(b, L, conv_dim, dtype=dtype)
    base = zxbcdt.data_ptr() + zxbcdt.element_size() * d_inner
    (lib.mmm4rec_conv_fwd_f32 if f32 else lib.mmm4rec_conv_fwd_f64)(
        base, L * width, width, wt.data_ptr(), _ptr(cb), xbc.data_ptr(), b, L, conv_dim, wt.shape[0], 1,
        torch.get_num_threads())
    ts = None
    if layer.time_encoding is not None and (timestamps is not None or time_gaps is not None):
        ts = _time_scale(layer, timestamps, time_gaps, dtype)
    A, dt_bias, D, norm_w = _cached(layer, "ssd", lambda: (layer.A_log, layer.dt_bias, layer.D, layer.norm.weight),
                                    lambda: (-torch.exp(layer.A_log.detach().to(dtype)),
                                             layer.dt_bias.detach().to(dtype).contiguous(),
                                             layer.D.detach().to(dtype).contiguous(),
                                             layer.norm.weight.detach().to(dtype).contiguous()))
    lens = None if lengths is None else lengths.to(torch.int64).contiguous()
    y = torch.empty(b, L, d_inner, dtype=dtype)
    elt = zxbcdt.element_size()
    bad = (lib.mmm4rec_ssd_infer_f32 if f32 else lib.mmm4rec_ssd_infer_f64)(
        xbc.data_ptr(), conv_dim, zxbcdt.data_ptr(), zxbcdt.data_ptr() + elt * (d_inner + conv_dim), width,
        _ptr(ts), dt_bias.data_ptr(), A.data_ptr(), D.data_ptr(), int(layer.d_skip == "delta"), norm_w.data_ptr(),
        d_inner // G, float(layer.norm.eps), _ptr(lens), b, L, H, P, G, n, y.data_ptr(), torch.get_num_threads())
    if bad:
        return None
    out = F.linear(y, layer.out_proj.weight, layer.out_proj.bias)
    if layer.out_proj.bias is not None and lengths is not None:          # padded rows: 0, not the bias
        out = out.masked_fill((torch.arange(L)[None, :] >= lens[:, None])[..., None], 0.0)
    return out
