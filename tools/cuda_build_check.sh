#!/usr/bin/env bash
# On a GPU box with CUDA torch and nvcc: build the torch extension in place, build + run the standalone CUDA check
# (correctness vs a float64 CPU loop for fp32 exact, fp32 TF32, bf16 and fp16, and timings), then the pytest
# comparison with the float64 reference.
#   bash tools/cuda_build_check.sh               (from anywhere; PYTHON=... to pick the interpreter)
#   bash tools/cuda_build_check.sh --build-only  no GPU needed: build the package wheel the way the README's GPU
#                                                line does (pip --no-build-isolation, setup.py's CUDAExtension)
#                                                from a scratch copy of the repo, install it into a scratch
#                                                folder, require `python -m mmm4rec_kernels` to report the
#                                                extension built, and build the standalone checker
#        --wheel-dir DIR   (with --build-only) keep the built wheel in DIR
#        --no-cmake        (with --build-only) skip the standalone CMake build
# Without a GPU, a CUDA torch in its own venv works for --build-only (never in the project's CPU venv), e.g.
#   python3 -m venv /work/venv-cuda && /work/venv-cuda/bin/pip install torch==2.13.0 numpy ninja setuptools wheel
#   PYTHON=/work/venv-cuda/bin/python bash tools/cuda_build_check.sh --build-only
# Nothing here points the compiler at torch's CUDA wheels (CPATH etc.): setup.py adds their nvidia/*/include and
# lib itself (a bare nvcc install has no cusparse.h / cublas headers), and this check shows that it does.
# Env: CUDA_ARCH (default: the visible GPU's, e.g. 90), PYTHON (default: python), MAX_JOBS (default 4), CUDA_HOME
# (default /usr/local/cuda when it has nvcc, else nvcc's parent).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_ONLY=0
CMAKE=1
WHEEL_DIR=
while [ $# -gt 0 ]; do
    case "$1" in
        --build-only) BUILD_ONLY=1 ;;
        --no-cmake) CMAKE=0 ;;
        --wheel-dir) WHEEL_DIR=$(mkdir -p "$2" && cd "$2" && pwd); shift ;;
        *) echo "cuda_build_check.sh: unknown option $1 (--build-only, --wheel-dir DIR, --no-cmake)" >&2; exit 2 ;;
    esac
    shift
done
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
# CUDA_HOME: the toolkit root; a wrapper script on PATH (e.g. /usr/local/bin/nvcc) does not tell it, so prefer
# /usr/local/cuda when it has nvcc
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")"); fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
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
'import torch; print(torch.__version__)'), nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
if [ "$BUILD_ONLY" = 1 ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    mkdir "$scratch/src"
    cp -r setup.py README.md csrc mmm4rec_kernels "$scratch/src/"
    cd "$scratch/src"
    # the README's GPU line builds through pip: the same setup.py run, with its one-line build message
    start=$(date +%s)
    if ! "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps --disable-pip-version-check -w "$scratch/dist" . \
            > "$scratch/build.log" 2>&1; then
        grep -m1 "mmm4rec-kernels:" "$scratch/build.log" || true
        tail -n 60 "$scratch/build.log"
        echo "cuda_build_check: the extension build FAILED (pip wheel --no-build-isolation)" >&2
        exit 1
    fi
    grep -m1 -o "mmm4rec-kernels:.*" "$scratch/build.log"
    echo "wheel built in $(( $(date +%s) - start )) s: $(basename "$scratch"/dist/*.whl)"
    "$PYTHON" -m pip install -q --no-deps --disable-pip-version-check --target "$scratch/site" "$scratch"/dist/*.whl
    cd "$scratch"   # not the source tree: import what the wheel installed
    status=$(PYTHONPATH="$scratch/site" "$PYTHON" -m mmm4rec_kernels | grep "CUDA extension" || true)
    echo "python -m mmm4rec_kernels: $status"
    PYTHONPATH="$scratch/site" "$PYTHON" -c "from mmm4rec_kernels import _cuda, cuda
assert cuda.built(), 'extension does not import'
assert 'allow_tf32' in _cuda.tissd_quadratic_fwd.__doc__ and 'allow_tf32' in _cuda.tissd_quadratic_bwd.__doc__
print('mmm4rec_kernels._cuda builds and imports from the wheel; kernels not run (no GPU)')"
    case "$status" in *": built"*) ;; *) echo "cuda_build_check: the wheel has no usable extension" >&2; exit 1 ;; esac
    [ -n "$WHEEL_DIR" ] && cp "$scratch"/dist/*.whl "$scratch/build.log" "$WHEEL_DIR/"
    cd "$ROOT"
else
    time "$PYTHON" setup.py build_ext --inplace
    "$PYTHON" -c "import torch; from mmm4rec_kernels import cuda
assert cuda.available(), 'extension or GPU missing'
print('mmm4rec_kernels._cuda OK on', torch.cuda.get_device_name())"
fi

BUILD_DIR=build
[ "$BUILD_ONLY" = 1 ] && BUILD_DIR="$scratch/build-cmake"
if [ "$CMAKE" = 1 ]; then
    echo "== 2/3 standalone CMake build + ./build/tissd_cuda_check (arch $CUDA_ARCH)"
    time cmake -S . -B "$BUILD_DIR" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" > /dev/null
    time cmake --build "$BUILD_DIR" -j "$MAX_JOBS"
else
    echo "== 2/3 skipped (--no-cmake)"
fi
if [ "$BUILD_ONLY" = 1 ]; then
    echo "== 3/3 skipped (--build-only): $BUILD_DIR/tissd_cuda_check and pytest need a GPU"
    exit 0
fi
"./$BUILD_DIR/tissd_cuda_check"

echo "== 3/3 pytest tests/test_tissd_cuda.py"
"$PYTHON" -m pytest tests/test_tissd_cuda.py -q
