#!/usr/bin/env bash
# On a GPU box with CUDA torch and nvcc: build the torch extension in place, build + run the standalone CUDA check
# (correctness vs a float64 CPU loop, and timings), then the pytest comparison with the float64 reference.
#   bash benchmarks/cuda_build_check.sh            (from anywhere; PYTHON=... to pick the interpreter)
# Env: CUDA_ARCH (default: the visible GPU's, e.g. 90), PYTHON (default: python), MAX_JOBS (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
gpu_arch() { nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.' || true; }
CUDA_ARCH=${CUDA_ARCH:-$(gpu_arch)}
CUDA_ARCH=${CUDA_ARCH:-90}
export MAX_JOBS=${MAX_JOBS:-4}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"${CUDA_ARCH:0:-1}.${CUDA_ARCH: -1}"}

echo "== 1/3 torch extension mmm4rec_kernels._cuda (arch $TORCH_CUDA_ARCH_LIST)"
time "$PYTHON" setup.py build_ext --inplace
"$PYTHON" -c "import torch; from mmm4rec_kernels import cuda
assert cuda.available(), 'extension or GPU missing'
print('mmm4rec_kernels._cuda OK on', torch.cuda.get_device_name())"

echo "== 2/3 standalone CMake build + ./build/tissd_cuda_check (arch $CUDA_ARCH)"
time cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" > /dev/null
time cmake --build build -j "$MAX_JOBS"
./build/tissd_cuda_check

echo "== 3/3 pytest tests/test_tissd_cuda.py"
"$PYTHON" -m pytest tests/test_tissd_cuda.py -q
