#!/usr/bin/env bash
# One command for a lent GPU (the device tool runs it in the repo root; files under $OUT come back):
#
#   bash tools/run_gpu.sh                           # build, gpu_check (check + kernels + sweep), table4, pytest
#   bash tools/run_gpu.sh build kernels             # any subset of: build kernels table4 pytest bench trainstep compile
#                                                   # csrc
#
# Device tool call (mamba_ssm is not in the GPU image and the machine has no internet: carry its wheel, see
# `--prepare` below):   run(command="bash tools/run_gpu.sh", carry=[".whl"], timeout_s=600)
# (benchmarks/run_gpu.sh, the name the device instructions use, execs this file)
# The whole default run is planned to end inside the tool's 10-minute limit (RUN_GPU_BUDGET_S, default 570 s);
# stages that would overrun are cut to the time left. For fuller numbers use two calls:
#   run(command="bash tools/run_gpu.sh build kernels", ...) then run(command="bash tools/run_gpu.sh
#   build table4 pytest bench", ...).
#
# Here, once, with internet (not on the GPU machine):
#   bash tools/run_gpu.sh --prepare                 # builds the mamba-ssm 2.3.2.post1 wheel (no CUDA ext) into .whl/
#
# Outputs ($OUT, else /tmp/mmm4rec_gpu_out): run.log, gpu_check.md, gpu_check.json, table4.json, bench_tissd.json,
# train_step.md (stage trainstep), train_step_compile.md (stage compile).
# The Triton kernels run pinned launch configs (mmm4rec_kernels/triton/configs.py, from the offline sm_90 table):
# one compile per kernel, no autotune sweep, so timing starts within seconds. MMM4REC_AUTOTUNE=1 turns autotuning on
# (slow first calls: 4-48 configs per kernel). gpu_check times fp32 both exact and with TF32 dots ("... tf32" rows).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    PYBIN=${PYBIN:-python3}
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$PYBIN" -m pip wheel --no-deps --no-build-isolation \
        --no-cache-dir -w .whl mamba-ssm==2.3.2.post1
    "$PYBIN" -m pip download --no-deps -d .whl einops   # mamba's ssd_combined imports einops
    ls -la .whl
    exit 0
fi

OUT=${OUT:-/tmp/mmm4rec_gpu_out}
mkdir -p "$OUT"
LOG=$OUT/run.log
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)
BUDGET=${RUN_GPU_BUDGET_S:-570}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build kernels table4 pytest)

log() { echo "[run_gpu $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# stage_time WANT: seconds for the next stage, at most WANT and at most what is left (minus a margin).
stage_time() { local l; l=$(($(left) - 15)); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
run() {  # run NAME SECONDS CMD...: time-limited, output to the log
    local name=$1 secs=$2; shift 2
    if [ "$secs" -lt 20 ]; then log "SKIP $name: only ${secs}s left of the ${BUDGET}s budget"; return 0; fi
    log "START $name (limit ${secs}s): $*"
    set -o pipefail
    timeout --signal=INT --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    set +o pipefail
    log "END $name rc=$rc"
    return 0
}

export MMM4REC_AUTOTUNE=${MMM4REC_AUTOTUNE:-0}
log "stages: ${STAGES[*]}; budget ${BUDGET}s; OUT=$OUT; MMM4REC_AUTOTUNE=$MMM4REC_AUTOTUNE"
nvidia-smi -L 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tee -a "$LOG"

# mamba_ssm rival: a carried wheel (no internet there)
if ls .whl/mamba_ssm-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
$PY -m benchmarks._rivals 2>&1 | tee -a "$LOG"

for stage in "${STAGES[@]}"; do
    case $stage in
    build)
        # Python packages + the CUDA extension (no build isolation: the build must see torch). Sm_90 only here.
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
        export MAX_JOBS=${MAX_JOBS:-16}
        run build-ext "$(stage_time 240)" $PY setup.py build_ext --inplace
        $PY -c "import mmm4rec_kernels.cuda as c; print('CUDA extension built:', c.built(), 'available:', c.available())" \
            2>&1 | tee -a "$LOG"
        # register the packages + the `mmm4rec` command without building the extension a second time
        run pip-install "$(stage_time 60)" env MMM4REC_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-index --no-deps \
            --no-build-isolation -e .
        ;;
    kernels)
        T=$(stage_time 360)
        run gpu_check "$T" $PY -m tools.gpu_check --budget-s $((T > 60 ? T - 45 : 15)) \
            --json "$OUT/gpu_check.json" --md "$OUT/gpu_check.md"
        ;;
    table4)
        run table4 "$(stage_time 150)" $PY -m benchmarks.table4 --epochs 3 --json "$OUT/table4.json"
        ;;
    pytest)
        run pytest-tests "$(stage_time 120)" $PY -m pytest tests -q --maxfail=10 -m "not slow" -p no:cacheprovider
        ;;
    bench)
        run pytest-bench "$(stage_time 240)" $PY -m pytest benchmarks/bench_tissd.py -k "paper" --benchmark-only \
            --benchmark-json "$OUT/bench_tissd.json" -p no:cacheprovider -q
        ;;
    trainstep)
        # model training step (fwd + bwd + optimizer) per variant in fresh processes: now vs the package before the
        # issue-12 throughput work (aadd586) vs RecBole SASRec when installed; wall ms per step on the GPU
        run trainstep "$(stage_time 240)" bash -c "$PY -m benchmarks.bench_train_step --device cuda \
            --cases h64-text paper-text paper-mm --rounds 3 --steps 20 --previous aadd586 | tee '$OUT/train_step.md'"
        ;;
    compile)
        # the paper-shape training step eager vs torch.compile(fullgraph=True) vs compiled + CUDA graphs
        # (mode="reduce-overhead"); wall ms per step, fresh process per variant (each compiles in its warm-up)
        run compile "$(stage_time 300)" bash -c "$PY -m benchmarks.bench_train_step --device cuda --compile \
            --cases paper-mm --rounds 2 --steps 20 --previous '' --no-sasrec | tee '$OUT/train_step_compile.md'; \
            $PY -m benchmarks.bench_compile --cases paper-mm --device cuda | tee -a '$OUT/train_step_compile.md'"
        ;;
    csrc)
        # the standalone CUDA checker on the GPU: every csrc path (exact fp32, TF32, bf16, fp16) vs a float64 loop
        run csrc-check "$(stage_time 180)" bash -c 'nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc csrc/tissd_quadratic.cu \
            csrc/standalone/check_tissd.cu -o /tmp/tissd_cuda_check && /tmp/tissd_cuda_check'
        ;;
    *)
        log "unknown stage $stage (build kernels csrc table4 pytest bench trainstep compile)"
        ;;
    esac
done
log "done in $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ -f "$OUT/gpu_check.md" ] && tail -n 60 "$OUT/gpu_check.md"
exit 0
