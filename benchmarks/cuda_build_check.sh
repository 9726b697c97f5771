#!/usr/bin/env bash
# On a GPU box with CUDA torch and nvcc: build the torch extension in place, build + run the standalone CUDA check
# (correctness vs a float64 CPU loop for fp32 exact, fp32 TF32, bf16 and fp16, and timings), then the pytest
# comparison with the float64 reference.
#   bash benchmarks/cuda_build_check.sh               (from anywhere; PYTHON=... to pick the interpreter)
#   bash benchmarks/cuda_build_check.sh --build-only  no GPU needed: build the extension in a scratch copy of the
#                                                     repo, import it, and build the standalone checker
# Without a GPU, a CUDA torch in its own venv works for --build-only (never in the project's CPU venv), e.g.
#   python3 -m venv /work/venv-cuda && /work/venv-cuda/bin/pip install torch==2.14.1 numpy ninja setuptools wheel
#   PYTHON=/work/venv-cuda/bin/python bash benchmarks/cuda_build_check.sh --build-only
# (CUDA_HOME defaults to nvcc's parent; CPATH / LIBRARY_PATH get torch's nvidia/cu13 headers and libraries, which a
# bare nvcc install lacks: cusparse.h etc.)
# Env: CUDA_ARCH (default: the visible GPU's, e.g. 90), PYTHON (default: python), MAX_JOBS (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_ONLY=0
[ "${1:-}" = "--build-only" ] && BUILD_ONLY=1
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
# CUDA_HOME: the toolkit root; a wrapper script on PATH (e.g. /usr/local/bin/nvcc) does not tell it, so prefer
# /usr/local/cuda when it has nvcc
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda; else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")"); fi
fi
export CUDA_HOME
SITE=$("$PYTHON" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
if [ -d "$SITE/nvidia/cu13/include" ]; then
    export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
    export LIBRARY_PATH="$SITE/nvidia/cu13/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
gpu_arch() { nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.' || true; }
CUDA_ARCH=${CUDA_ARCH:-$(gpu_arch)}
CUDA_ARCH=${CUDA_ARCH:-90}
export MAX_JOBS=${MAX_JOBS:-4}
if [ "$BUILD_ONLY" = 1 ]; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
else
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"${CUDA_ARCH:0:-1}.${CUDA_ARCH: -1}"}
fi

echo "== 1/3 torch extension mmm4rec_kernels._cuda (arch $TORCH_CUDA_ARCH_LIST, torch $("$PYTHON" -c \
'import torch; print(torch.__version__)'))"
if [ "$BUILD_ONLY" = 1 ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    cp -r setup.py README.md csrc mmm4rec_kernels "$scratch/"
    cd "$scratch"
fi
time "$PYTHON" setup.py build_ext --inplace
if [ "$BUILD_ONLY" = 1 ]; then
    "$PYTHON" -c "import inspect; from mmm4rec_kernels import _cuda, cuda
assert cuda.built(), 'extension does not import'
assert 'allow_tf32' in _cuda.tissd_quadratic_fwd.__doc__ and 'allow_tf32' in _cuda.tissd_quadratic_bwd.__doc__
print('mmm4rec_kernels._cuda builds and imports; kernels not run (no GPU)')"
    cd "$ROOT"
else
    "$PYTHON" -c "import torch; from mmm4rec_kernels import cuda
assert cuda.available(), 'extension or GPU missing'
print('mmm4rec_kernels._cuda OK on', torch.cuda.get_device_name())"
fi

echo "== 2/3 standalone CMake build + ./build/tissd_cuda_check (arch $CUDA_ARCH)"
BUILD_DIR=build
[ "$BUILD_ONLY" = 1 ] && BUILD_DIR="$scratch/build-cmake"
time cmake -S . -B "$BUILD_DIR" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" > /dev/null
time cmake --build "$BUILD_DIR" -j "$MAX_JOBS"
if [ "$BUILD_ONLY" = 1 ]; then
    echo "== 3/3 skipped (--build-only): $BUILD_DIR/tissd_cuda_check and pytest need a GPU"
    exit 0
fi
"./$BUILD_DIR/tissd_cuda_check"

echo "== 3/3 pytest tests/test_tissd_cuda.py"
"$PYTHON" -m pytest tests/test_tissd_cuda.py -q
