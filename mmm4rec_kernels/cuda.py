"""CUDA backend of the quadratic TiSSD path: thin wrappers over the compiled extension `mmm4rec_kernels._cuda`
(sources in csrc/; built by `pip install --no-build-isolation .` when torch has CUDA and nvcc is found).

Both functions follow mmm4rec_kernels/CONTRACT.md (token layout, no autograd). The extension is imported lazily:
importing this module never fails; calling a kernel without the extension raises a RuntimeError saying how to build.

What the build and the kernels do (csrc/tissd_quadratic.cu):
- nvcc flags `-O3 -std=c++20 -lineinfo` for sm_80 and sm_90 (`TORCH_CUDA_ARCH_LIST`, default "8.0;9.0"; sm_80 is the
  minimum). No `--use_fast_math`: IEEE division and square root, denormals kept, accurate `expf` / `log1pf`; nvcc's
  default FMA contraction stays on. No fast-math intrinsics (`__expf` ...) in the kernels either.
- Products: the L x L scores (C_i . B_j, dy_i . x_j) and the L x P / L x n products run on tensor cores (WMMA),
  fp32 accumulate: bf16 inputs as bf16 MMAs (scores, Delta_j x_j and dG rounded to bf16 before their product), fp16
  inputs as TF32 MMAs (fp16 is exact in TF32; the fp32 range keeps Delta x finite after time gaps), fp32 inputs as
  TF32 MMAs only with `allow_tf32=True`; with `allow_tf32=False` (default) fp32 runs exact fp32 FMA loops.
- The cumulative sum of A Delta is float64; results are bitwise deterministic run to run.
Accuracy vs float64 (relative norm, CPU emulator check `csrc/standalone/emulate_check.sh --full`): exact fp32
<= 6e-6, TF32 <= 2.3e-3, bf16 <= 2.5e-3, fp16 <= 4e-4.
"""
from __future__ import annotations

import torch

from .limits import QUADRATIC_MAX_LEN

_ext = None
_import_error: Exception | None = None


def _load():
    """The compiled extension module, or None (the ImportError is kept for the error message)."""
    global _ext, _import_error
    if _ext is None and _import_error is None:
        try:
            from mmm4rec_kernels import _cuda
            _ext = _cuda
        except ImportError as e:  # not built, or built against another torch
            _import_error = e
    return _ext


def built() -> bool:
    """True if the extension imports (it may still lack a device to run on)."""
    return _load() is not None


def available() -> bool:
    """True if the extension imports and a CUDA device is present."""
    return built() and torch.cuda.is_available()


def _ext_or_raise():
    ext = _load()
    if ext is None:
        raise RuntimeError(
            "mmm4rec_kernels._cuda is not built (" + str(_import_error) + "). Build it on a machine with CUDA torch "
            "and nvcc: `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`.")
    return ext


def _check_len(max_len):
    if max_len > QUADRATIC_MAX_LEN:     # csrc/tissd_quadratic.cuh: kTissdMaxLen
        raise ValueError(f"CUDA quadratic TiSSD supports max_len <= {QUADRATIC_MAX_LEN}, got {max_len}; use the "
                         f"chunked path")


def tissd_quadratic_fwd(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                        d_skip_delta: bool, dt_softplus: bool, allow_tf32: bool = False):
    """y [T, H, P] = sum_{j<=i} (C_i . B_j) exp(min(cs_i - cs_j, 0)) Delta_j x_j + D s_i x_i  (x's dtype).
    allow_tf32: fp32 inputs use TF32 tensor cores (True) or exact fp32 FMA (False); ignored for bf16 / fp16."""
    _check_len(max_len)
    return _ext_or_raise().tissd_quadratic_fwd(x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, int(max_len),
                                               bool(d_skip_delta), bool(dt_softplus), bool(allow_tf32))


def tissd_quadratic_bwd(dy, x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, max_len, *,
                        d_skip_delta: bool, dt_softplus: bool, allow_tf32: bool = False):
    """(dx, ddt, dA, dB, dC, dE, ddt_bias, dD): dx, dB, dC in x's dtype, the rest float32; None for a None input.
    allow_tf32 as in tissd_quadratic_fwd."""
    _check_len(max_len)
    dx, ddt, dA, dB, dC, dE, ddt_bias, dD = _ext_or_raise().tissd_quadratic_bwd(
        dy.contiguous(), x, dt, A, B, C, E, dt_bias, D, seq_start, seq_len, int(max_len), bool(d_skip_delta),
        bool(dt_softplus), bool(allow_tf32))
    return (dx, ddt, dA, dB, dC,
            None if E is None else dE,
            None if dt_bias is None else ddt_bias,
            None if D is None else dD)
