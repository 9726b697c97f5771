#!/usr/bin/env bash
# Runs the CUDA kernels of csrc/tissd_quadratic.cu on the CPU (no GPU, no nvcc): g++ compiles them against the
# shim headers in emu/ (one block at a time, blockDim std::threads, __syncthreads = std::barrier, __shared__ =
# static locals), then check_tissd.cu compares them with the float64 CPU loop. A logic check for GPU-less CI;
# it says nothing about speed, warp-level behaviour or memory-model details of real hardware.
#   bash csrc/standalone/emulate_check.sh            quick cases (~1 min)
#   bash csrc/standalone/emulate_check.sh --full     every case (several minutes)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/csrc/standalone"
cp "$here/../tissd_quadratic.cuh" "$work/csrc/"
cp "$here/tissd_cpu_ref.h" "$work/csrc/standalone/"
cp "$here/check_tissd.cu" "$work/csrc/standalone/check_tissd.cpp"
# kernel<<<grid, block, smem, stream>>>(p);  ->  emu_launch(kernel, grid, block, smem, stream, p);
python3 - "$here/../tissd_quadratic.cu" "$work/csrc/tissd_quadratic.cpp" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
out, count = re.subn(r'(\w+<[^;<>]*>)<<<(.*?)>>>\((\w+)\);', r'emu_launch(\1, \2, \3);', src)
assert count > 0, "no kernel launches found"
open(sys.argv[2], "w").write(out)
PY
g++ -std=c++20 -O2 -fno-strict-aliasing -pthread -I"$here/emu" -I"$work/csrc" "$work/csrc/tissd_quadratic.cpp" \
    "$work/csrc/standalone/check_tissd.cpp" -o "$work/check_emu"
if [ "${1:-}" = "--full" ]; then "$work/check_emu" --no-timing; else "$work/check_emu" --no-timing --quick; fi
