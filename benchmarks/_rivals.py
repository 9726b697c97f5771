"""Rival kernels we time against, each loaded without side effects: `load_mamba()` -> (fn or None, reason).

mamba_ssm's package `__init__` imports its compiled selective-scan extension, which a build with
MAMBA_SKIP_CUDA_BUILD=TRUE does not have. Its Triton SSD (`mamba_ssm/ops/triton/ssd_combined.py`) needs none of that,
so we register a bare stand-in for the `mamba_ssm` package (its real __path__, no __init__ run) and import the
submodule through it.

The call we time: mamba_chunk_scan_combined(x, dt * E, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True).
mamba has no time input, so the time scale E is folded into dt beforehand (softplus(dt*E + dt_bias) is the same
Delta); its skip is D * x (our d_skip="plain").
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_CACHE: dict = {}


def _mamba_package_dir():
    """The mamba_ssm package's search path, or None when it is not installed."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)


def load_mamba():
    """Return (mamba_chunk_scan_combined, "") or (None, why not)."""
    if "mamba" in _CACHE:
        return _CACHE["mamba"]
    result = (None, "unknown")
    try:
        paths = None if "mamba_ssm" in sys.modules else _mamba_package_dir()
        if paths is None and "mamba_ssm" not in sys.modules:
            result = (None, "mamba_ssm not installed (see benchmarks/README.md)")
        else:
            if "mamba_ssm" not in sys.modules:
                stub = types.ModuleType("mamba_ssm")
                stub.__path__ = paths          # a namespace-like package: submodules import, __init__ never runs
                stub.__file__ = None
                sys.modules["mamba_ssm"] = stub
            mod = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
            result = (mod.mamba_chunk_scan_combined, "")
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip the rival, not to crash
        result = (None, f"mamba_ssm import failed: {type(e).__name__}: {e}")
    _CACHE["mamba"] = result
    return result


def mamba_call(fn, x, dt, A, B, C, E, dt_bias, D, chunk_size):
    """Our argument set mapped onto mamba's: time scale folded into dt, softplus inside the kernel."""
    dt_in = dt if E is None else dt * E
    return fn(x, dt_in, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)


if __name__ == "__main__":
    fn, why = load_mamba()
    print("mamba_chunk_scan_combined:", "available" if fn is not None else f"unavailable ({why})")
