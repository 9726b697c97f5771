"""pytest-benchmark timings of the TiSSD kernels.

GPU (skipped without CUDA, with the reason): our paths/backends, the torch eager quadratic reference, torch.compile of
it and mamba_chunk_scan_combined (chunk 32/64/128) at the kernel-issue shapes, fwd and fwd+bwd, fp32 and bf16; plus
an L sweep (b = 65536 // L) of our quadratic vs chunked kernels to locate the crossover. Every timed call ends with
torch.cuda.synchronize(). extra_info carries GB/s and the ratio to the bandwidth floor: bytes of x, B, C, dt, E read
once + y written once at 3.0e12 B/s, the device-to-device copy rate measured on an H100 here (2026-11-22, docs/design.md "Kernel facts"); the
fwd+bwd floor also reads the inputs and dy once and writes their gradients once.

CPU: a small set of the torch backend paths at tiny shapes (what CI times).

    pytest benchmarks/bench_tissd.py --benchmark-only                  # full timings
    pytest benchmarks/bench_tissd.py -k "paper and fp32" --benchmark-only
    pytest benchmarks/ --benchmark-disable -q                         # CI: each body once
"""
from __future__ import annotations

import pytest
import torch

import tools.gpu_check as G

CUDA = torch.cuda.is_available()
# one compiled reference per (shape, dtype, mode): keep dynamo from falling back to eager after 8 recompiles
torch._dynamo.config.cache_size_limit = max(128, torch._dynamo.config.cache_size_limit)
if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
    torch._dynamo.config.accumulated_cache_size_limit = max(1024, torch._dynamo.config.accumulated_cache_size_limit)
gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device: GPU kernel benchmarks need a GPU "
                                          "(run `bash tools/run_gpu.sh` on one)")

_CACHE = {}


def _inputs(key, dims, dtype, device):
    """One cached input set (the last one asked for), with grad-requiring leaves and a dy."""
    if _CACHE.get("key") != key:
        _CACHE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        b, L, H, P, n, Gr = dims
        inp = G.make_inputs(b, L, H, P, n, Gr, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(b, L, H, P, dtype=dtype, device=device)
        _CACHE.update(key=key, inp=inp, dy=dy)
    return _CACHE["inp"], _CACHE["dy"]


def _variant(name):
    """name -> callable(inp) -> y, or pytest.skip with the reason."""
    if name.startswith("ours-"):
        path, backend, *tf32 = name[5:].split("-")   # "...-tf32": fp32 inputs with TF32 dot products
        try:
            from mmm4rec_kernels import explain
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"mmm4rec_kernels not importable: {e}")
        return G.ours(path, backend, allow_tf32=bool(tf32)), (path, backend, explain)
    if name == "torch-eager":
        return G.torch_reference(False), None
    if name == "torch-compile":
        return G.torch_reference(True), None
    if name.startswith("mamba-Q"):
        f, why = G.mamba(int(name[7:]))
        if f is None:
            pytest.skip(why)
        return f, None
    raise ValueError(name)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, name, dims, dtype_name, mode, group, device="cuda"):
    dtype = G.DTYPES[dtype_name]
    f, meta = _variant(name)
    inp, dy = _inputs((dims, dtype_name, device), dims, dtype, device)
    if meta is not None:  # our kernels: refuse politely where the dispatcher says no (e.g. quadratic at L > 512)
        path, backend, explain = meta
        try:
            explain(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], path=path, backend=backend)
        except ValueError as e:
            pytest.skip(str(e))
    leaves = G.grad_leaves(inp)

    def fwd():
        with torch.no_grad():
            f(inp)
        _sync()

    def fwd_bwd():
        y = f(inp)
        torch.autograd.grad(y, leaves, dy)
        _sync()

    fn = fwd if mode == "fwd" else fwd_bwd
    benchmark.group = group
    fb, fbb = G.io_bytes(inp)
    nbytes = fb if mode == "fwd" else fbb
    benchmark.extra_info.update(dims="x".join(map(str, dims)), dtype=dtype_name, mode=mode, variant=name,
                                floor_ms=float(f"{G.floor_ms(nbytes):.4g}"), floor_bytes=nbytes,
                                floor_note="bytes / 3.0e12 B/s (H100 d2d copy, docs/design.md)")
    if benchmark.enabled or device == "cuda":
        try:
            fn()  # compile / autotune outside the timing
        except Exception as e:  # noqa: BLE001  (e.g. mamba's fp32 headdim-512 OutOfResources): a result, not a crash
            pytest.skip(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    benchmark(fn)
    if benchmark.enabled and benchmark.stats is not None:
        med = benchmark.stats.stats.median
        benchmark.extra_info.update(GBps=float(f"{nbytes / med / 1e9:.4g}"), x_floor=float(f"{med / (G.floor_ms(nbytes) * 1e-3):.4g}"),
                                    pct_of_floor=float(f"{100.0 * G.floor_ms(nbytes) * 1e-3 / med:.4g}"))


# ------------------------------------------------------------------------------------------------ GPU kernels
GPU_VARIANTS = ["ours-quadratic-triton", "ours-chunked-triton", "ours-quadratic-triton-tf32",
                "ours-chunked-triton-tf32", "ours-quadratic-cuda", "ours-chunked-torch",
                "torch-eager", "torch-compile", "mamba-Q32", "mamba-Q64", "mamba-Q128"]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(G.SHAPES))
def test_kernel(benchmark, shape, dtype_name, mode, variant):
    if variant == "ours-quadratic-cuda":
        from mmm4rec_kernels.dispatch import cuda_usable
        if not cuda_usable(torch.device("cuda")):
            pytest.skip("CUDA extension mmm4rec_kernels._cuda not built")
    if variant.endswith("-tf32") and dtype_name != "fp32":
        pytest.skip("TF32 applies to fp32 inputs only")
    _run(benchmark, variant, G.SHAPES[shape], dtype_name, mode, group=f"{shape} {G.SHAPES[shape]} {dtype_name} {mode}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["ours-quadratic-triton", "ours-chunked-triton", "ours-quadratic-cuda"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("L", G.L_SWEEP)
def test_sweep(benchmark, L, dtype_name, mode, variant):
    if variant == "ours-quadratic-cuda":
        from mmm4rec_kernels.dispatch import cuda_usable
        if not cuda_usable(torch.device("cuda")):
            pytest.skip("CUDA extension mmm4rec_kernels._cuda not built")
    H, P, n, Gr = G.SWEEP_HEADS
    dims = (max(1, G.SWEEP_TOKENS // L), L, H, P, n, Gr)
    _run(benchmark, variant, dims, dtype_name, mode, group=f"sweep L={L} {dtype_name} {mode}")


# ------------------------------------------------------------------------------------------------------- CPU
CPU_SHAPES = {"cpu-paper-b16": (16, 20, 8, 64, 64, 8), "cpu-L64": (4, 64, 4, 32, 16, 2)}


@pytest.mark.parametrize("variant", ["ours-quadratic-torch", "ours-chunked-torch", "torch-eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(CPU_SHAPES))
def test_cpu(benchmark, shape, mode, variant):
    """Small CPU timings of the torch paths (fp32), what runs without a GPU."""
    _run(benchmark, variant, CPU_SHAPES[shape], "fp32", mode, group=f"{shape} fp32 {mode} (CPU)", device="cpu")
