"""`python -m mmm4rec_kernels`: which backends this install can use, and what `auto` would pick."""
import torch

from . import cpu as native_cpu
from . import ops
from . import cuda as cuda_backend
from .dispatch import (CPU_CLASS, CPU_INFER_MAX_LEN, _triton_importable, cpu_crossover_length, cpu_vendor,
                       crossover_length, interpreter_on, torch_allows_tf32)
from .limits import QUADRATIC_MAX_LEN


def main():
    has_gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), GPU present: {has_gpu}")
    if _triton_importable():
        import triton
        mode = "GPU" if has_gpu else ("interpreter (TRITON_INTERPRET=1)" if interpreter_on() else "needs a GPU")
        print(f"triton {triton.__version__}: {mode}")
    else:
        print("triton: not installed (CUDA tensors fall back to the SLOW torch path; pip install triton)")
    if cuda_backend.built():
        print(f"CUDA extension mmm4rec_kernels._cuda: built, {'usable' if has_gpu else 'no GPU to run it'}")
    else:
        print("CUDA extension mmm4rec_kernels._cuda: not built (Triton/torch paths only; build it with "
              "`pip install --no-build-isolation .` where torch has CUDA and nvcc is found)")
    print("torch backend: always available (CPU tensors, float64, or no triton; direct decay sums, where-masking)")
    print(f"CPU quadratic scan and causal conv + SiLU (torch backend, SSD blocks): "
          f"{native_cpu.status()}")
    if native_cpu.library() is not None:              # builds them now if needed (~20 s, once per torch build)
        from .cpu import nodes
        nodes.get(wait=True)
        print(f"eager CPU conv and tissd() calls' autograd nodes: {nodes.status()}")
    print(f"path='auto' on GPU: quadratic up to a longest sequence of {crossover_length(64, 64)} at P = n = 64 "
          f"({crossover_length(512, 64)} at P = 512; kernel limit {QUADRATIC_MAX_LEN}), chunked above or with states "
          f"(cost model)")
    print(f"path='auto' on CPU: native quadratic scan up to {cpu_crossover_length(64, 64)} at P = n = 64 "
          f"({cpu_crossover_length(16, 16)} at P = n = 16), chunked einsums above; inference path up to "
          f"{CPU_INFER_MAX_LEN} (measured tables of class {CPU_CLASS}; this CPU: {cpu_vendor() or 'vendor unknown'})")
    print(f"registered ops: {', '.join('torch.ops.mmm4rec.' + name for name in ops.OPS)}")
    print(f"allow_tf32=None follows torch's matmul TF32 setting: currently {torch_allows_tf32()}")


if __name__ == "__main__":
    main()
