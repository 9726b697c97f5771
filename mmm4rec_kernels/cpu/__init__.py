"""Native CPU kernels: C++ sources in this folder, compiled on first use with the system C++ compiler and loaded with
ctypes (no torch headers: the build takes a few seconds, once, and works with any installed torch).

    causal_conv.cpp      causal depthwise conv over L on channels-last [b, L, C] (+ SiLU), forward and backward in
                         one pass over memory each (the torch path walks the activations ~7 and ~20 times)
    tissd_quadratic.cpp  the time-aware SSD's quadratic form without states (torch_backend.quadratic_form's
                         training case): per sequence and head over its valid steps only, no intermediate tensors
    tissd_layer.cpp      a TimeAwareSSD layer's core in few calls (the causal time encoding; step sizes + scan + gated
                         RMSNorm, forward and backward): modules/layer_cpu.py
    gated_rmsnorm.cpp    RMSNorm(y * SiLU(z)) * w over channel groups, forward and backward in one pass each
    thread_sums.h        per-thread partial sums reduced in a fixed order (weight gradients)
    activations.h        overflow-free sigmoid / SiLU / softplus and the SSD's decay exp shared by the kernels
    memory.py            retain_freed_memory(): glibc keeps freed memory for reuse (no page faults per training step)
    autograd_nodes.cpp   the eager conv and tissd() calls' autograd nodes in C++ around the C entries above, built with
                         torch's headers by nodes.py (in the background at first use; the Python nodes until then)

The library is built into MMM4REC_CACHE_DIR (default ~/.cache/mmm4rec_kernels; the temp dir if that is not
writable), named by a hash of the source, the compiler, the flags and the CPU, with `-O3 -march=native`,
the value-safe subset of fast math (no errno, no traps, reassociation; NOT finite-math-only: NaN / inf are handled,
and no flush-to-zero is switched on for the process), glibc's vector exp, and OpenMP when the compiler has it.  MMM4REC_NATIVE_CPU=0
turns it off.  When it cannot be built or loaded, callers use the torch path and one warning says why (`status()`
returns the same line).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

logger = logging.getLogger("mmm4rec_kernels")

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, f) for f in ("causal_conv.cpp", "tissd_quadratic.cpp", "tissd_layer.cpp",
                                                "gated_rmsnorm.cpp")]
_HEADERS = [os.path.join(_HERE, f) for f in ("thread_sums.h", "activations.h")]                 # part of the build's identity (the hash)
# fast math without its two hazards: -ffinite-math-only (NaN / inf assumed away: SiLU gave NaN below -89) and
# crtfastmath.o (linked with -ffast-math: flush-to-zero for the whole process on load); libmvec: thread_sums.h
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
          "-freciprocal-math", "-std=c++17", "-shared", "-fPIC"]
# tried in order until one builds: -march=native (AVX2 / AVX-512 and libmvec's vector exp) and OpenMP are optional
_OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_lock = threading.Lock()
_lib = None
_status: str | None = None          # one line: what was loaded, or why not
_folder: str | None = None          # where the loaded library is


def _cpu_signature() -> str:
    """CPU model and feature flags (the library is built with -march=native: one build per kind of CPU)."""
    sig = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return sig


def _compile(compiler: str, out: str) -> str | None:
    """Build the shared library at `out` (atomically); returns None on success or the compiler's last error line."""
    err = "no attempt"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for extra in _OPTIONAL_FLAGS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
        os.close(fd)
        cmd = [compiler, *_FLAGS, *extra, *_SOURCES, "-o", tmp]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            r, err = None, str(e)
        if r is not None and r.returncode == 0:
            os.replace(tmp, out)                         # atomic: a concurrent process sees all or nothing
            return None
        if r is not None:
            lines = (r.stderr or r.stdout).strip().splitlines()
            err = lines[-1] if lines else f"exit {r.returncode}"
        os.unlink(tmp)
    return err


def _bind(lib):
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for dt in ("f32", "f64"):
        fwd = getattr(lib, f"mmm4rec_conv_fwd_{dt}")
        fwd.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, i64, i64, i64, i32, i32]
        fwd.restype = None
        bwd = getattr(lib, f"mmm4rec_conv_bwd_{dt}")
        bwd.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, i64, i64, i32, i32, p, p, i64, p, p, i32]
        bwd.restype = None
        fwd = getattr(lib, f"mmm4rec_ssd_quadratic_fwd_{dt}")
        fwd.argtypes = [p] * 7 + [i32, p] + [i64] * 6 + [i32]
        fwd.restype = None
        bwd = getattr(lib, f"mmm4rec_ssd_quadratic_bwd_{dt}")
        bwd.argtypes = [p] * 7 + [i32] + [p] * 7 + [i64] * 6 + [i32]
        bwd.restype = None
        enc = getattr(lib, f"mmm4rec_time_encoding_fwd_{dt}")            # tissd_layer.cpp
        enc.argtypes = [p, i32] + [i64] * 4 + [p, ctypes.c_double, p, i32]
        enc.restype = None
        enc = getattr(lib, f"mmm4rec_time_encoding_bwd_{dt}")
        enc.argtypes = [p, i32] + [i64] * 4 + [p, ctypes.c_double, p, p, i32]
        enc.restype = None
        core = getattr(lib, f"mmm4rec_ssd_core_fwd_{dt}")
        core.argtypes = [p, i64, p, p, i64] + [p] * 4 + [i32, p, i64, ctypes.c_double, p] + [i64] * 6 + [p, p, i32]
        core.restype = i32
        core = getattr(lib, f"mmm4rec_ssd_core_bwd_{dt}")
        core.argtypes = ([p, p, i64, p, p, i64] + [p] * 4 + [i32, p, i64, ctypes.c_double, p] + [i64] * 6 + [p] * 4
                         + [i64] + [p] * 5 + [i32])
        core.restype = None
        call = getattr(lib, f"mmm4rec_tissd_fwd_{dt}")                   # tissd_layer.cpp: one tissd() call
        call.argtypes = [p] * 6 + [i32, i32, i32, p, p, p] + [i64] * 6 + [p, i32]
        call.restype = i32
        call = getattr(lib, f"mmm4rec_tissd_bwd_{dt}")
        call.argtypes = [p] * 7 + [i32, i32, i32, p, p, p] + [i64] * 6 + [p] * 8 + [i32]
        call.restype = None
        norm = getattr(lib, f"mmm4rec_gated_rmsnorm_fwd_{dt}")          # gated_rmsnorm.cpp
        norm.argtypes = [p, p, i64, p, i64, i64, i64, ctypes.c_double, p, i64, p, i32]
        norm.restype = None
        norm = getattr(lib, f"mmm4rec_gated_rmsnorm_bwd_{dt}")
        norm.argtypes = [p, p, p, i64, p, i64, i64, i64, ctypes.c_double, p, i64, p, p, i64, p, i32]
        norm.restype = None
    lib.mmm4rec_conv_has_openmp.restype = i32
    return lib


def _compiler() -> str | None:
    """The C++ compiler: $CXX, else g++ / c++ / clang++ on PATH (None: none found)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def library_folder() -> str | None:
    """The folder the loaded library was built in (None: not loaded); the C++ nodes (nodes.py) are built there too."""
    library()
    return _folder


def library():
    """The loaded ctypes library, or None (status() says why).  Builds it on the first call if needed."""
    global _lib, _status, _folder
    if _status is not None:
        return _lib
    with _lock:
        if _status is not None:
            return _lib
        if os.environ.get("MMM4REC_NATIVE_CPU", "1") == "0":
            _status = "native CPU kernels off (MMM4REC_NATIVE_CPU=0): torch path"
            return None
        compiler = _compiler()
        if compiler is None:
            _status = "native CPU kernels unavailable (no C++ compiler: set CXX): torch path"
            logger.warning("mmm4rec_kernels: %s", _status)
            return None
        h = hashlib.sha256(repr((compiler, _FLAGS, _OPTIONAL_FLAGS)).encode() + _cpu_signature().encode())
        for src in _SOURCES + _HEADERS:
            with open(src, "rb") as f:
                h.update(f.read())
        key = h.hexdigest()[:16]
        cache = os.environ.get("MMM4REC_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mmm4rec_kernels")
        fallback = os.path.join(tempfile.gettempdir(), f"mmm4rec_kernels-{getattr(os, 'getuid', lambda: 0)()}")
        err = None
        for folder in (cache, fallback):
            path = os.path.join(folder, f"mmm4rec_cpu-{key}.so")
            try:                                         # an unwritable cache falls back to the temp dir
                err = None if os.path.exists(path) else _compile(compiler, path)
                if err is None:
                    _lib = _bind(ctypes.CDLL(path))
                    _folder = folder
                    break
            except OSError as e:
                err = str(e)
        if _lib is None:
            _status = f"native CPU kernels unavailable ({compiler}: {err}): torch path"
            logger.warning("mmm4rec_kernels: %s", _status)
            return None
        omp = "OpenMP" if _lib.mmm4rec_conv_has_openmp() else "no OpenMP"
        _status = f"native CPU kernels: {path} ({omp})"
        logger.info("mmm4rec_kernels: %s", _status)
        return _lib


def status() -> str:
    """One line: the native library in use, or why the torch path runs (builds the library if not tried yet)."""
    library()
    return _status


@torch.compiler.assume_constant_result
def available() -> bool:
    """Is the native library loaded (built on the first call)?  A constant of the process: torch.compile evaluates
    it once while tracing instead of tracing the build."""
    return library() is not None


def supports(x: torch.Tensor, dtype=None) -> bool:
    """Can the native kernels run on x (CPU; float32 / float64, or computed in `dtype`) and is the library loaded?"""
    return x.is_cpu and (dtype or x.dtype) in (torch.float32, torch.float64) and available()


def _ptr(t):
    return None if t is None else t.data_ptr()        # an int: the c_void_p argtypes take it as it is


def rows(t: torch.Tensor) -> torch.Tensor:
    """t [b, L, c] with unit channel stride (a copy only if needed)."""
    return t if t.stride(2) == 1 else t.contiguous()


def conv_forward(x: torch.Tensor, w: torch.Tensor, bias, silu: bool) -> torch.Tensor:
    """x [b, L, C] (channel stride 1), w [C, k] (any strides), bias [C] or None (x's dtype) -> y [b, L, C]
    contiguous."""
    b, L, C = x.shape
    y = torch.empty(b, L, C, dtype=x.dtype)
    if y.numel():
        bias = None if bias is None else bias.contiguous()
        _fn("mmm4rec_conv_fwd", x.dtype)(
            x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), w.stride(0), w.stride(1),
            None if bias is None else bias.data_ptr(), y.data_ptr(), b, L, C, w.shape[1], int(silu),
            torch.get_num_threads())
    return y


def conv_backward(x: torch.Tensor, w: torch.Tensor, bias, silu: bool, pieces, dx_out=None):
    """Gradients of conv_forward: pieces = [(start, size, gy [b, L, size] or None)] covering the C channels.
    Returns (dx [b, L, C], dw [C, k], dbias [C] or None), all written by the kernel; dx_out: where dx goes, a [b, L, C]
    view with unit channel stride and batch stride L * row stride (a slice of a wider tensor's last axis)."""
    b, L, C = x.shape
    k = w.shape[1]
    if dx_out is not None and (tuple(dx_out.shape) != (b, L, C) or dx_out.stride(2) != 1
                               or dx_out.stride(0) != L * dx_out.stride(1) or dx_out.dtype != x.dtype):
        raise ValueError(f"dx_out must be a {x.dtype} [{b}, {L}, {C}] view with unit channel stride and batch stride "
                         f"L * row stride, got shape {tuple(dx_out.shape)}, strides {dx_out.stride()}")
    dx = torch.empty(b, L, C, dtype=x.dtype) if dx_out is None else dx_out
    if not dx.numel():
        return dx, torch.zeros(C, k, dtype=x.dtype), None if bias is None else torch.zeros(C, dtype=x.dtype)
    dw = torch.empty(C, k, dtype=x.dtype)
    bias = None if bias is None else bias.contiguous()
    db = None if bias is None else torch.empty(C, dtype=x.dtype)
    gys = [None if g is None else rows(g) for _, _, g in pieces]
    flat = []                                   # per piece: gy's address (0: unused), start, size, gy's strides
    for (start, size, _), g in zip(pieces, gys):
        flat += (0, start, size, 0, 0) if g is None else (g.data_ptr(), start, size, g.stride(0), g.stride(1))
    _fn("mmm4rec_conv_bwd", x.dtype)(
        x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), w.stride(0), w.stride(1),
        None if bias is None else bias.data_ptr(), b, L, C, k, int(silu), len(pieces),
        (ctypes.c_int64 * len(flat))(*flat), dx.data_ptr(), dx.stride(1), dw.data_ptr(),
        None if db is None else db.data_ptr(), torch.get_num_threads())
    return dx, dw, db


# ------------------------------------------------------------------------------------ time-aware SSD, quadratic form
def scan_forward(x, delta, log_decay, B, C, D, valid_len, skip_delta: bool) -> torch.Tensor:
    """The quadratic form over each sequence's first valid_len steps (rows past them are 0):
        y_i = sum_{j<=i} (C_i . B_j) exp(sum_{j<k<=i} a_k) delta_j x_j  +  D s_i x_i   (s = delta if skip_delta else 1)
    x [b, L, H, P], delta / log_decay [b, L, H], B / C [b, L, G, n], D [H, P] or None, valid_len [b] (int); CPU
    float32 / float64, one dtype, contiguous (supports(x) must be True).  Padded steps are never read.  No autograd:
    mmm4rec_kernels.ops registers it (torch.ops.mmm4rec.ssd_scan_cpu) with its backward `scan_backward`."""
    b, L, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    y = torch.empty(b, L, H, P, dtype=x.dtype)
    if y.numel():
        lib = library()
        fn = lib.mmm4rec_ssd_quadratic_fwd_f32 if x.dtype == torch.float32 else lib.mmm4rec_ssd_quadratic_fwd_f64
        fn(*[_ptr(t) for t in (x, delta, log_decay, B, C)], _ptr(valid_len.to(torch.int64).contiguous()), _ptr(D),
           int(skip_delta), _ptr(y), b, L, H, P, G, n, torch.get_num_threads())
    return y


def scan_backward(gy, x, delta, log_decay, B, C, D, valid_len, skip_delta: bool):
    """Gradients of scan_forward: (dx, ddelta, dlog_decay, dB, dC, dD or None), each like its input (0 on padded
    steps).  Same argument rules as scan_forward; gy [b, L, H, P]."""
    b, L, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    grads = [torch.empty_like(t) for t in (x, delta, log_decay, B, C)]
    dD = None if D is None else torch.zeros_like(D)
    if gy.numel():
        lib = library()
        fn = lib.mmm4rec_ssd_quadratic_bwd_f32 if x.dtype == torch.float32 else lib.mmm4rec_ssd_quadratic_bwd_f64
        fn(*[_ptr(t) for t in (x, delta, log_decay, B, C, valid_len.to(torch.int64).contiguous(), D)],
           int(skip_delta), _ptr(gy.contiguous()), *[_ptr(t) for t in grads], _ptr(dD), b, L, H, P, G, n,
           torch.get_num_threads())
    return (*grads, dD)


# ------------------------------------------------------------------------------------ one tissd() call (no states)
def tissd_forward(x, dt, A, B, C, ts, dt_bias, D, valid_len, skip_delta: bool, softplus: bool):
    """y [b, L, H, P] of the time-aware SSD with its step sizes, or None when a valid row of y is not finite (a NaN /
    inf input at a valid step: the caller runs the general path).  Step sizes Delta = softplus(dt * ts + dt_bias)
    (softplus: else no softplus; ts [b, L, H] / dt_bias [H] optional), a = A Delta, then scan_forward's form with
    D [H] or [H, P] (optional).  x [b, L, H, P], dt [b, L, H], B / C [b, L, G, n], valid_len [b] int64: contiguous,
    one float dtype (supports(x) must be True); padded steps are never read and rows past valid_len are 0."""
    b, L, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    y = torch.empty(b, L, H, P, dtype=x.dtype)
    if y.numel() and _fn("mmm4rec_tissd_fwd", x.dtype)(
            *[_ptr(t) for t in (x, dt, ts, dt_bias, A, D)], int(D is not None and D.dim() == 1), int(skip_delta),
            int(softplus), _ptr(B), _ptr(C), _ptr(valid_len), b, L, H, P, G, n, _ptr(y), torch.get_num_threads()):
        return None
    return y


def tissd_backward(gy, x, dt, A, B, C, ts, dt_bias, D, valid_len, skip_delta: bool, softplus: bool):
    """Gradients of tissd_forward: (dx, ddt, dA, dB, dC, dts or None, ddt_bias or None, dD like D or None), 0 on
    padded steps; gy [b, L, H, P] contiguous, the other arguments as tissd_forward's."""
    b, L, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    dx, ddt, dA, dB, dC = (torch.empty_like(t) for t in (x, dt, A, B, C))
    dts, ddt_bias, dD = (None if t is None else torch.empty_like(t) for t in (ts, dt_bias, D))
    if gy.numel():
        _fn("mmm4rec_tissd_bwd", x.dtype)(
            *[_ptr(t) for t in (gy, x, dt, ts, dt_bias, A, D)], int(D is not None and D.dim() == 1),
            int(skip_delta), int(softplus), _ptr(B), _ptr(C), _ptr(valid_len), b, L, H, P, G, n,
            *[_ptr(t) for t in (dx, ddt, dts, ddt_bias, dA, dB, dC, dD)], torch.get_num_threads())
    else:
        for t in (dA, ddt_bias, dD):
            if t is not None:
                t.zero_()
    return dx, ddt, dA, dB, dC, dts, ddt_bias, dD


# ------------------------------------------------------------------------------------------------- gated RMSNorm
_fns: dict = {}


def _fn(name, dtype):
    """The bound C function `name` for dtype (float32 -> _f32, float64 -> _f64), looked up once."""
    fn = _fns.get((name, dtype))
    if fn is None:
        fn = _fns[(name, dtype)] = getattr(library(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")
    return fn


def norm_forward(y, z, w, eps: float, group: int) -> torch.Tensor:
    """out [R, d] = RMSNorm(y * SiLU(z)) * w over groups of `group` channels: y [R, d] contiguous, z (or None) [R, d]
    with unit channel stride, w [d]; one float dtype (float32 / float64).  (The C function also takes row lengths,
    used by tissd_layer.cpp; every row is valid here.)"""
    R, d = y.shape
    out = torch.empty_like(y)
    if out.numel():
        _fn("mmm4rec_gated_rmsnorm_fwd", y.dtype)(
            y.data_ptr(), None if z is None else z.data_ptr(), 0 if z is None else z.stride(0), w.data_ptr(), R, d,
            group, float(eps), None, R, out.data_ptr(), torch.get_num_threads())
    return out


def norm_backward(dout, y, z, w, eps: float, group: int):
    """Gradients of norm_forward: (dy, dz or None, dw); dout [R, d] contiguous."""
    R, d = y.shape
    dy, dz, dw = torch.empty_like(y), None if z is None else torch.empty(R, d, dtype=y.dtype), torch.zeros_like(w)
    if dy.numel():
        _fn("mmm4rec_gated_rmsnorm_bwd", y.dtype)(
            dout.data_ptr(), y.data_ptr(), None if z is None else z.data_ptr(), 0 if z is None else z.stride(0),
            w.data_ptr(), R, d, group, float(eps), None, R, dy.data_ptr(), None if dz is None else dz.data_ptr(), d,
            dw.data_ptr(), torch.get_num_threads())
    return dy, dz, dw


from .memory import retain_freed_memory  # noqa: E402,F401  (process-wide allocator setting for training loops)
