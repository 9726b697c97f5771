"""Path and backend choice for the time-aware SSD.

Cost model (work per sequence and head, from ../shared/DESIGN.md), with chunk length Q:
    quadratic = QUADRATIC_DISCOUNT * L^2 (P + n)     one fused kernel, no intermediate HBM traffic
    chunked   = L Q (P + n) + 4 L P n                state carried across chunks
`auto` takes the quadratic path while its cost is not larger, i.e. up to the crossover length
    L* = (Q (P + n) + 4 P n) / (QUADRATIC_DISCOUNT (P + n))        (crossover_length(P, n)),
capped by what the quadratic kernels hold in one tile (QUADRATIC_HARD_MAX_L).  QUADRATIC_DISCOUNT is a measured
constant per device class; until it is measured on H100/H200 (benchmarks/gpu_check.py prints the crossover) it is
0.75, which puts the P = n = 64 crossover at L = 256.  Environment overrides: MMM4REC_QUADRATIC_DISCOUNT, or
MMM4REC_QUADRATIC_MAX_L for a fixed threshold regardless of P and n.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("mmm4rec_kernels")

BACKENDS = ("auto", "triton", "cuda", "torch")
PATHS = ("auto", "quadratic", "chunked", "reference")

# Discount of the quadratic cost (it has no intermediate traffic); default until measured on H100/H200.
QUADRATIC_DISCOUNT = float(os.environ.get("MMM4REC_QUADRATIC_DISCOUNT", "0.75"))
# Optional fixed threshold that replaces the cost model (None: use the cost model).
QUADRATIC_MAX_L = int(os.environ["MMM4REC_QUADRATIC_MAX_L"]) if os.environ.get("MMM4REC_QUADRATIC_MAX_L") else None
# Chunk length the cost model assumes for the chunked path.
COST_CHUNK = 64
# Longest sequence the quadratic kernels accept at all (one block holds the whole L x L score tile).
QUADRATIC_HARD_MAX_L = 256
# Per (device class, path): which fused backend measured faster.  Empty until GPU measurements land in
# benchmarks/RESULTS.md; then e.g. {("H100", "quadratic"): "cuda"}.
MEASURED_FASTEST: dict = {}


@dataclass(frozen=True)
class Choice:
    path: str
    backend: str
    reason: str

    def as_dict(self):
        return {"path": self.path, "backend": self.backend, "reason": self.reason}


@torch.compiler.assume_constant_result
def interpreter_on() -> bool:
    """True when Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except Exception:  # pragma: no cover - depends on the install
        return False


@torch.compiler.assume_constant_result
def torch_allows_tf32() -> bool:
    """What torch's own fp32 matmuls do: torch.backends.cuda.matmul.fp32_precision == 'tf32' (new API) or
    allow_tf32 (legacy API).  `allow_tf32=None` in tissd follows this.  torch.compile reads it once, while tracing
    (pass allow_tf32 explicitly to a compiled model to change it later)."""
    m = torch.backends.cuda.matmul
    try:
        precision = getattr(m, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
        return bool(m.allow_tf32)
    except RuntimeError:  # torch refuses to read a mix of the legacy and the new API
        return False


def triton_usable(device: torch.device) -> bool:
    return _triton_importable() and (device.type == "cuda" or (device.type == "cpu" and interpreter_on()))


def cuda_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return _cuda_extension_available()


@torch.compiler.assume_constant_result
def _cuda_extension_available() -> bool:
    try:
        from . import cuda as cuda_backend
    except Exception:  # pragma: no cover
        return False
    return cuda_backend.available()


def crossover_length(P: int, n: int) -> int:
    """Longest L for which `auto` picks the quadratic path (head dim P, state size n)."""
    if QUADRATIC_MAX_L is not None:
        return min(QUADRATIC_MAX_L, QUADRATIC_HARD_MAX_L)
    L_star = (COST_CHUNK * (P + n) + 4 * P * n) / (QUADRATIC_DISCOUNT * (P + n))
    return min(int(L_star), QUADRATIC_HARD_MAX_L)


def _device_class(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device)
    for tag in ("H200", "H100", "A100", "L40", "4090"):
        if tag in name:
            return tag
    return name


def choose(L: int, P: int, n: int, H: int, dtype: torch.dtype, device: torch.device, *, has_states: bool,
           path: str = "auto", backend: str = "auto") -> Choice:
    """Pick (path, backend) for one call; raises ValueError for impossible explicit requests."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    reasons = []
    if path == "auto":
        if has_states:
            path = "chunked"
            reasons.append("initial/final states requested -> chunked")
        else:
            L_star = crossover_length(P, n)
            path = "quadratic" if L <= L_star else "chunked"
            rule = (f"MMM4REC_QUADRATIC_MAX_L={QUADRATIC_MAX_L}" if QUADRATIC_MAX_L is not None else
                    f"cost model: {QUADRATIC_DISCOUNT}*L^2(P+n) vs LQ(P+n)+4LPn, P={P} n={n} Q={COST_CHUNK}")
            reasons.append(f"L={L} {'<=' if path == 'quadratic' else '>'} crossover {L_star} ({rule}) -> {path}")
    else:
        reasons.append(f"path={path} requested")
    if path == "quadratic" and has_states:
        raise ValueError("path='quadratic' does not carry states: initial_states/return_final_states need "
                         "path='chunked' (or 'auto'/'reference')")

    if path == "reference":
        if backend not in ("auto", "torch"):
            raise ValueError("path='reference' is the naive torch recurrence: use backend='auto' or 'torch'")
        return Choice("reference", "torch", "; ".join(reasons + ["naive recurrence in torch"]))

    if dtype == torch.float64 and backend in ("triton", "cuda"):
        raise ValueError(f"backend={backend!r} supports float32/bfloat16/float16 inputs; float64 needs backend='torch'")

    if backend == "auto":
        if device.type != "cuda":
            backend = "torch"
            reasons.append(f"{device.type} tensors -> torch")
        elif dtype == torch.float64:
            backend = "torch"
            reasons.append("float64 -> torch")
        else:
            measured = MEASURED_FASTEST.get((_device_class(device), path)) if MEASURED_FASTEST else None
            if measured == "cuda" and path == "quadratic" and cuda_usable(device):
                backend = "cuda"
                reasons.append("CUDA kernel measured fastest on this device class")
            elif triton_usable(device):
                backend = "triton"
                reasons.append("triton (fused)" if measured is None else f"{measured} measured fastest")
            else:
                backend = "torch"
                reasons.append("triton not importable -> torch (SLOW: install triton)")
                logger.warning("mmm4rec_kernels: triton is not importable, falling back to the torch path (slow)")
    else:
        reasons.append(f"backend={backend} requested")
        if backend == "triton" and not triton_usable(device):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and triton installed")
        if backend == "cuda":
            if path != "quadratic":
                raise ValueError("backend='cuda' implements the quadratic path only; use path='quadratic' or "
                                 "backend='triton' for the chunked path")
            if not cuda_usable(device):
                raise ValueError("backend='cuda' needs CUDA tensors and the compiled extension "
                                 "mmm4rec_kernels._cuda (pip install --no-build-isolation . with nvcc present)")
    if path == "quadratic" and backend != "torch" and L > QUADRATIC_HARD_MAX_L:
        raise ValueError(f"the quadratic kernels hold the whole sequence in one tile (L <= {QUADRATIC_HARD_MAX_L}), "
                         f"got L={L}: use path='chunked' or 'auto'")
    return Choice(path, backend, "; ".join(reasons))
