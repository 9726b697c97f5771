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


def load_mamba_module(name: str):
    """Import `mamba_ssm.<name>` (e.g. 'ops.triton.ssd_combined', 'modules.ssd_minimal').

    Returns (module, None) or (None, reason) when mamba_ssm is not installed or fails to import."""
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if "mamba_ssm" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            return None, "mamba_ssm is not installed"
        pkg = types.ModuleType("mamba_ssm")  # a bare package: submodules import, __init__ does not run
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
    try:
        return importlib.import_module(f"mamba_ssm.{name}"), None
    except Exception as exc:  # pragma: no cover - depends on the install
        return None, f"mamba_ssm.{name} failed to import: {type(exc).__name__}: {exc}"


def load_mamba():
    """Return (mamba_chunk_scan_combined, "") or (None, why not)."""
    if "mamba" not in _CACHE:
        mod, why = load_mamba_module("ops.triton.ssd_combined")
        _CACHE["mamba"] = (mod.mamba_chunk_scan_combined, "") if mod is not None else (None, why)
    return _CACHE["mamba"]


def mamba_call(fn, x, dt, A, B, C, E, dt_bias, D, chunk_size):
    """Our argument set mapped onto mamba's: time scale folded into dt, softplus inside the kernel."""
    dt_in = dt if E is None else dt * E
    return fn(x, dt_in, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)


if __name__ == "__main__":
    fn, why = load_mamba()
    print("mamba_chunk_scan_combined:", "available" if fn is not None else f"unavailable ({why})")
