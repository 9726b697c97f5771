#!/usr/bin/env bash
# Moved to tools/run_gpu.sh (issue 24); kept because the device instructions name benchmarks/run_gpu.sh.
exec bash "$(dirname "$0")/../tools/run_gpu.sh" "$@"
