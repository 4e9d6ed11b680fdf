#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one script for a short lease on a GPU machine:
#
#   bash benchmarks/gpu_check.sh [build] [tests] [kernels] [infonce] [train] ...
#
#   build    compile fastxmc/_C.so with the CUDA kernels (FASTXMC_CUDA=1) against this machine's torch
#   tests    the GPU numerics (pytest -m gpu) with compiled Triton (TRITON_INTERPRET=0)
#   kernels  the kernel microbenchmarks on the GPU (InfoNCE, SupCon, region-word, modulation,
#            word attention), each against its peers in the same run
#   infonce  the InfoNCE Triton kernels alone, a short run: their GPU tests (split grids against
#            the fp64 oracle, bit-equal reruns) and fastxmc-triton (2-D grids, deterministic) vs
#            fastxmc-triton-atomic (1-D grid, atomic grad_b) vs fastxmc-cuda, bf16 and fp32,
#            N = 1024..65536, D = 768; then the configs the autotuner chose
#   train    bench_train_step on the GPU (coco128 at width 96, and the shapes preset; fused,
#            reference, and fused in channels_last, which run.memory_format=auto leaves off on CUDA)
#
# No stage named: build and tests. Logs and CSVs go to $OUT (default /tmp/gpu_check); PYTHON picks
# the interpreter (default python3, the one that holds a CUDA build of torch); ARCH the compute
# capabilities to compile for (default: this GPU's only, which builds fastest).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests)
failed=()

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.log"; }

run_stage() {  # run_stage NAME COMMAND...: output to $OUT/NAME.log, a failure is recorded, not fatal
  local name=$1; shift
  log "$name: $*"
  local start=$SECONDS
  if ! "$@" > >(tee "$OUT/$name.log") 2>&1; then failed+=("$name"); log "$name FAILED"; fi
  log "$name took $((SECONDS - start)) s"
}

if [ -z "${ARCH:-}" ]; then
  ARCH=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
log "GPU $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
log "$($PYTHON -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)')"

for stage in "${stages[@]}"; do
  case $stage in
    build)
      run_stage build env FASTXMC_CUDA=1 FASTXMC_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
        $PYTHON setup.py build_ext --inplace
      run_stage info $PYTHON -m fastxmc.info ;;
    tests)
      run_stage tests env TRITON_INTERPRET=0 $PYTHON -m pytest -q -rs -m gpu tests ;;
    kernels)
      for dtype in bf16 fp32; do
        run_stage "infonce_$dtype" $PYTHON -m benchmarks.bench_infonce --device cuda --dtype $dtype \
          --dim 768 --sizes 4096,16384,65536 --out "$OUT/infonce.csv"
      done
      run_stage supcon $PYTHON -m benchmarks.bench_infonce --device cuda --dtype bf16 --labels \
        --dim 768 --sizes 4096,16384,65536 --out "$OUT/infonce.csv"
      run_stage region_word $PYTHON -m benchmarks.bench_region_word --device cuda \
        --out "$OUT/region_word.csv"
      run_stage modulation $PYTHON -m benchmarks.bench_modulation --device cuda \
        --out "$OUT/modulation.csv"
      run_stage word_attention $PYTHON -m benchmarks.bench_word_attention --device cuda \
        --out "$OUT/word_attention.csv" ;;
    infonce)
      run_stage infonce_tests env TRITON_INTERPRET=0 $PYTHON -m pytest -q -rs -m gpu \
        tests/test_similarity_lse_triton.py tests/test_extension.py
      run_stage infonce_grid env TRITON_INTERPRET=0 $PYTHON -m benchmarks.infonce_gpu_grid \
        --out "$OUT/infonce_grid.csv" ;;
    train)
      run_stage train_step $PYTHON -m benchmarks.bench_train_step --device cuda \
        --configs coco128,shapes --providers fused,reference,fused-channels-last \
        ${TRAIN_STEP_ARGS:-} --out "$OUT/train_step.csv" ;;
    *) echo "unknown stage $stage (build, tests, kernels, infonce, train)" >&2; exit 2 ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then log "failed: ${failed[*]}"; exit 1; fi
log "all stages passed"
