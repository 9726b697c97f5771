"""Load mamba_ssm's SSD ops (our reference and rival) without running mamba_ssm/__init__.py, which imports a
compiled extension that a `MAMBA_SKIP_CUDA_BUILD=TRUE` install lacks."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


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
