"""Path and backend choice for every op of the package: the TiSSD / TiCoSSD scan (`choose`), the gated RMSNorm
(`choose_gated_rmsnorm`) and the causal conv + SiLU (`choose_causal_conv`).  One module decides; each Choice says
which table decided (docs/kernels.md, "How the path is chosen").

TiSSD path tables (path='auto', no states):
  gpu-cost-model   CUDA tensors (and CPU tensors without the native kernels): work per sequence and head, chunk Q,
                       quadratic = QUADRATIC_DISCOUNT * L^2 (P + n)     one fused kernel, no intermediate traffic
                       chunked   = L Q (P + n) + 4 L P n                 state carried across chunks
                   quadratic while its cost is not larger: L* = (Q (P + n) + 4 P n) / (QUADRATIC_DISCOUNT (P + n)),
                   capped by QUADRATIC_MAX_LEN (limits.py).  QUADRATIC_DISCOUNT = 0.75 until measured on H100/H200
                   (tools/gpu_check.py prints the crossover).
  cpu-measured     CPU tensors with the native kernels: CPU_CROSSOVER, the longest L at which the native quadratic
                   scan measured no slower than the chunked einsums (benchmarks/bench_cpu_crossover.py), by P + n,
                   from the table of this CPU's class (CPU_TABLES: by vendor; MMM4REC_CPU_CLASS picks one).
  env              MMM4REC_QUADRATIC_MAX_L: a fixed threshold for every device (MMM4REC_QUADRATIC_DISCOUNT changes
                   the GPU model's constant).
Initial / final states always take the chunked path.

While torch.compile / export trace, a Choice carries no reason text (it would format symbolic sizes); the choice
itself depends only on shapes, dtypes, device and the static arguments (guards on L where a table compares it).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

import torch

from . import cpu as native
from .limits import BACKENDS, PATHS, QUADRATIC_MAX_LEN

logger = logging.getLogger("mmm4rec_kernels")

NORM_BACKENDS = ("auto", "triton", "torch")             # the gated RMSNorm's backends

# GPU cost model: discount of the quadratic cost (no intermediate traffic); default until measured on H100/H200.
QUADRATIC_DISCOUNT = float(os.environ.get("MMM4REC_QUADRATIC_DISCOUNT", "0.75"))
# Optional fixed threshold that replaces both tables (None: use the tables).
FORCED_CROSSOVER = int(os.environ["MMM4REC_QUADRATIC_MAX_L"]) if os.environ.get("MMM4REC_QUADRATIC_MAX_L") else None
# Chunk length the GPU cost model assumes for the chunked path.
COST_CHUNK = 64
# CPU tables, one per class of CPU (its vendor: where the native scan and torch's einsums measured different speeds
# relative to each other), each (CPU_CROSSOVER, CPU_INFER_MAX_LEN); values and commands in benchmarks/RESULTS.md.
#   CPU_CROSSOVER: (P + n, longest L where the native quadratic scan measured no slower than the chunked einsums), fp32
#     fwd+bwd, 1 thread, 8192 tokens (benchmarks/bench_cpu_crossover.py); between the points interpolated linearly in
#     P + n, clamped outside them.
#   CPU_INFER_MAX_LEN: under no_grad, TimeAwareSSD's native inference path (quadratic form, modules/layer_cpu.py) runs
#     up to this longest length with path="auto" (benchmarks/bench_layer_vs_attention.py --infer-crossover: eval,
#     1 thread, for_recsys(64), b 8).
# GenuineIntel (the 2-vCPU Xeon AVX-512 box, 2026-12-06): quadratic / chunked 0.94 at L 256, 1.24 at 320 (H 4, P 16,
#   n 16); 0.98 at 320, 1.63 at 384 (H 2, P 64, n 64); inference 0.54 at L 400, 1.55 at 800.
# AuthenticAMD (the 2-vCPU EPYC Zen 5 box, 2026-12-07): 0.88 at L 1024, 1.36 at 1536 (P 16, n 16); 0.93 at 768
#   (P 64, n 64); inference 0.72 at L 1600, 0.97 at 2400.
# Other CPUs take the Intel table (the shorter lengths: the native scan is the one measured everywhere);
# MMM4REC_CPU_CLASS=<a key> picks a table by hand (run the two benchmarks above to see which fits).
CPU_TABLES = {
    "GenuineIntel": (((32, 256), (128, 320)), 512),
    "AuthenticAMD": (((32, 1024), (128, 768)), 2048),
}
CPU_DEFAULT_CLASS = "GenuineIntel"


def cpu_vendor() -> str:
    """This CPU's vendor_id (/proc/cpuinfo: 'GenuineIntel', 'AuthenticAMD', ...); '' where none is readable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_class(vendor: str, env: str | None = None) -> str:
    """The CPU_TABLES key for a CPU of `vendor`: `env` (MMM4REC_CPU_CLASS) if set, else the vendor's own table, else
    CPU_DEFAULT_CLASS."""
    if env:
        if env not in CPU_TABLES:
            raise ValueError(f"MMM4REC_CPU_CLASS={env!r}: expected one of {', '.join(CPU_TABLES)}")
        return env
    return vendor if vendor in CPU_TABLES else CPU_DEFAULT_CLASS


CPU_CLASS = cpu_class(cpu_vendor(), os.environ.get("MMM4REC_CPU_CLASS"))
CPU_CROSSOVER, CPU_INFER_MAX_LEN = CPU_TABLES[CPU_CLASS]
# Per (device class, path): which fused GPU backend measured faster.  Empty until GPU measurements land in
# benchmarks/RESULTS.md; then e.g. {("H100", "quadratic"): "cuda"}.
MEASURED_FASTEST: dict = {}


@dataclass(frozen=True)
class Choice:
    path: str
    backend: str
    reason: str
    table: str = "request"      # which table decided: gpu-cost-model | cpu-measured | env | request | fixed

    def as_dict(self):
        return {"path": self.path, "backend": self.backend, "reason": self.reason, "table": self.table}


class _Reasons:
    """Reason text, built in eager only (while tracing, sizes are symbolic and the text is never read)."""

    def __init__(self):
        self.on = not torch.compiler.is_compiling()
        self.parts = []

    def add(self, fmt, *args):
        if self.on:
            self.parts.append(fmt.format(*args))

    def text(self):
        return "; ".join(self.parts) if self.on else "traced"


# ------------------------------------------------------------------------------------------- what can run here
@torch.compiler.assume_constant_result
def interpreter_on() -> bool:
    """True when Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORTABLE: list = []


@torch.compiler.assume_constant_result
def _triton_importable() -> bool:
    if not _TRITON_IMPORTABLE:                # tried once per process
        try:
            importlib.import_module("triton")
            _TRITON_IMPORTABLE.append(True)
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_IMPORTABLE.append(False)
    return _TRITON_IMPORTABLE[0]


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
    return device.type == "cuda" and _cuda_extension_available()


@torch.compiler.assume_constant_result
def _cuda_extension_available() -> bool:
    try:
        from . import cuda as cuda_backend
    except Exception:  # pragma: no cover
        return False
    return cuda_backend.available()


def _native_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """The native CPU kernels run on this device and compute dtype (float32 / float64)?"""
    if device.type != "cpu":
        return False
    return native.available()             # computes float32 (fp16/bf16/fp32 inputs) or float64


# ----------------------------------------------------------------------------------------------- TiSSD tables
def crossover_length(P: int, n: int) -> int:
    """Longest L for which `auto` picks the quadratic path on the GPU cost model (head dim P, state size n)."""
    if FORCED_CROSSOVER is not None:
        return min(FORCED_CROSSOVER, QUADRATIC_MAX_LEN)
    L_star = (COST_CHUNK * (P + n) + 4 * P * n) / (QUADRATIC_DISCOUNT * (P + n))
    return min(int(L_star), QUADRATIC_MAX_LEN)


def cpu_crossover_length(P: int, n: int) -> int:
    """Longest L for which `auto` picks the native quadratic scan on CPU (the measured CPU_CROSSOVER table)."""
    if FORCED_CROSSOVER is not None:
        return FORCED_CROSSOVER
    width = P + n
    (w0, l0), (w1, l1) = CPU_CROSSOVER[0], CPU_CROSSOVER[-1]
    if width <= w0:
        return l0
    if width >= w1:
        return l1
    for (wa, la), (wb, lb) in zip(CPU_CROSSOVER, CPU_CROSSOVER[1:]):
        if wa <= width <= wb:
            return int(la + (lb - la) * (width - wa) / (wb - wa))
    return l1  # pragma: no cover


def _device_class(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device)
    for tag in ("H200", "H100", "A100", "L40", "4090"):
        if tag in name:
            return tag
    return name


def _auto_path(L, P, n, dtype, device, has_states, why):
    """(path, table) for path='auto'."""
    if has_states:
        why.add("initial/final states requested -> chunked")
        return "chunked", "fixed"
    if FORCED_CROSSOVER is not None:
        L_star, table = (FORCED_CROSSOVER if device.type == "cpu" else crossover_length(P, n)), "env"
        rule = f"MMM4REC_QUADRATIC_MAX_L={FORCED_CROSSOVER}"
    elif _native_cpu(device, dtype):
        L_star, table = cpu_crossover_length(P, n), "cpu-measured"
        rule = f"CPU table {CPU_CLASS}: native quadratic scan vs chunked einsums (benchmarks/bench_cpu_crossover.py)"
    else:
        L_star, table = crossover_length(P, n), "gpu-cost-model"
        rule = f"cost model: {QUADRATIC_DISCOUNT}*L^2(P+n) vs LQ(P+n)+4LPn, P={P} n={n} Q={COST_CHUNK}"
    path = "quadratic" if L <= L_star else "chunked"
    why.add("L={} {} crossover {} ({}) -> {}", L, "<=" if path == "quadratic" else ">", L_star, rule, path)
    return path, table


def choose(L: int, P: int, n: int, H: int, dtype: torch.dtype, device: torch.device, *, has_states: bool,
           path: str = "auto", backend: str = "auto") -> Choice:
    """Pick the TiSSD's (path, backend) for one call; raises ValueError for impossible explicit requests."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    why = _Reasons()
    table = "request"
    if path == "auto":
        path, table = _auto_path(L, P, n, dtype, device, has_states, why)
    else:
        why.add("path={} requested", path)
    if path == "quadratic" and has_states:
        raise ValueError("path='quadratic' does not carry states: initial_states/return_final_states need "
                         "path='chunked' (or 'auto'/'reference')")

    if path == "reference":
        if backend not in ("auto", "torch"):
            raise ValueError("path='reference' is the naive torch recurrence: use backend='auto' or 'torch'")
        why.add("naive recurrence in torch")
        return Choice("reference", "torch", why.text(), table)

    if dtype == torch.float64 and backend in ("triton", "cuda"):
        raise ValueError(f"backend={backend!r} supports float32/bfloat16/float16 inputs; float64 needs backend='torch'")

    if backend == "auto":
        if device.type != "cuda":
            backend = "torch"
            why.add("{} tensors -> torch{}", device.type,
                    " (native CPU scan)" if path == "quadratic" and _native_cpu(device, dtype) else "")
        elif dtype == torch.float64:
            backend = "torch"
            why.add("float64 -> torch")
        else:
            measured = MEASURED_FASTEST.get((_device_class(device), path)) if MEASURED_FASTEST else None
            if measured == "cuda" and path == "quadratic" and cuda_usable(device):
                backend = "cuda"
                why.add("CUDA kernel measured fastest on this device class")
            elif triton_usable(device):
                backend = "triton"
                why.add("triton (fused)" if measured is None else f"{measured} measured fastest")
            else:
                backend = "torch"
                why.add("triton not importable -> torch (SLOW: install triton)")
                if why.on:
                    logger.warning("mmm4rec_kernels: triton is not importable, falling back to the torch path (slow)")
    else:
        why.add("backend={} requested", backend)
        if backend == "triton" and not triton_usable(device):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and triton installed")
        if backend == "cuda":
            if path != "quadratic":
                raise ValueError("backend='cuda' implements the quadratic path only; use path='quadratic' or "
                                 "backend='triton' for the chunked path")
            if not cuda_usable(device):
                raise ValueError("backend='cuda' needs CUDA tensors and the compiled extension "
                                 "mmm4rec_kernels._cuda (pip install --no-build-isolation . with nvcc present)")
    if path == "quadratic" and backend != "torch" and L > QUADRATIC_MAX_LEN:
        raise ValueError(f"the quadratic kernels hold the whole sequence in one tile (L <= {QUADRATIC_MAX_LEN}), "
                         f"got L={L}: use path='chunked' or 'auto'")
    return Choice(path, backend, why.text(), table)


# ---------------------------------------------------------------------------------------- the two other ops
def choose_gated_rmsnorm(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> Choice:
    """The gated RMSNorm's backend: Triton on CUDA (fp16/bf16/fp32); the native CPU kernel in eager on CPU (any
    float dtype, computed in float32 / float64) with the library loaded; else torch ops."""
    if backend not in NORM_BACKENDS:
        raise ValueError(f"backend must be one of {NORM_BACKENDS}, got {backend!r}")
    why = _Reasons()
    if backend == "triton":
        if dtype == torch.float64:
            why.add("backend=triton requested, float64 -> torch (the kernel computes in fp32)")
            return Choice("fused", "torch", why.text(), "fixed")
        if not triton_usable(device):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and triton installed")
        why.add("backend=triton requested")
        return Choice("fused", "triton", why.text())
    if backend == "auto" and device.type == "cuda" and dtype != torch.float64 and triton_usable(device):
        why.add("CUDA tensors -> triton (one fused kernel each way)")
        return Choice("fused", "triton", why.text(), "fixed")
    if (backend == "auto" and device.type == "cpu" and not torch.compiler.is_compiling()
            and _native_cpu(device, torch.float64 if dtype == torch.float64 else torch.float32)):
        why.add("CPU {} eager -> native kernel (one pass each way; traced: torch ops, fused by the compiler)", dtype)
        return Choice("fused", "native", why.text(), "fixed")
    why.add("backend=torch requested" if backend == "torch" else "{} {} -> torch ops", device.type, dtype)
    return Choice("fused", "torch", why.text(), "request" if backend == "torch" else "fixed")


_CONV_CHOICES: dict = {}          # (device type, dtype, native kernels usable) -> the eager Choice (one per key)


def choose_causal_conv(device: torch.device, dtype: torch.dtype) -> Choice:
    """The causal conv + SiLU's backend: the native CPU kernel (CPU float32 / float64 with the library loaded),
    else torch ops (hand-written backward in eager; plain ops, fused by the compiler, while tracing).  Eager choices
    are kept per (device type, dtype, library loaded): the same answer, without rebuilding its text every call."""
    native_ok = device.type == "cpu" and dtype in (torch.float32, torch.float64) and _native_cpu(device, dtype)
    key = (device.type, dtype, native_ok)
    eager = not torch.compiler.is_compiling()
    if eager and key in _CONV_CHOICES:
        return _CONV_CHOICES[key]
    why = _Reasons()
    if native_ok:
        why.add("CPU {} -> native kernel", dtype)
        choice = Choice("channels_last", "native", why.text(), "fixed")
    else:
        why.add("{} {} -> torch ops{}", device.type, dtype,
                "" if device.type != "cpu" else " (native CPU kernels unavailable: mmm4rec_kernels.cpu.status())")
        choice = Choice("channels_last", "torch", why.text(), "fixed")
    if eager:
        _CONV_CHOICES[key] = choice
    return choice


def log_choice(op: str, shape: str, choice: Choice) -> None:
    """DEBUG log line of one call's choice (callers check logger.isEnabledFor(logging.DEBUG) and that nothing is
    being traced first, so eager calls build no text)."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s %s -> path=%s backend=%s [%s] (%s)", op, shape, choice.path, choice.backend, choice.table,
                     choice.reason)
