#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one script for a short lease on a GPU machine:
#
#   bash benchmarks/gpu_check.sh [--dry-run] quick
#   bash benchmarks/gpu_check.sh [--dry-run] [build] [tests] [kernels] [infonce] [train] ...
#
#   quick    everything below that fits one command of at most 9 minutes, at most 8 files in $OUT
#   build    fastxmc/_C.so with the CUDA kernels: the prebuilt library (.gpu-prebuilt/, made by
#            benchmarks/gpu_prebuild.sh on a CPU machine) when its record matches this machine's
#            torch, Python ABI, GPU arch and the tree's csrc/; otherwise compiled here (FASTXMC_CUDA=1)
#   tests    the GPU numerics (pytest -m gpu) with compiled Triton (TRITON_INTERPRET=0)
#   kernels  the kernel microbenchmarks on the GPU (InfoNCE, SupCon, region-word, modulation,
#            word attention), each against its peers in the same run
#   infonce  the InfoNCE Triton kernels alone: their GPU tests, then benchmarks/infonce_gpu_grid.py
#            (triton vs triton-atomic vs cuda at N = 4096-65536, the grid splits, the autotuned configs)
#   train    bench_train_step on the GPU (coco128 at width 96, and the shapes preset; fused,
#            reference, and fused in channels_last, which run.memory_format=auto leaves off on CUDA)
#
# quick, stage by stage. A stage is stopped at its timeout (SIGINT first, so pytest still writes
# its JUnit XML and the benchmarks keep the CSV rows they appended; SIGKILL 15 s later), and no
# stage's timeout reaches past the deadline (less that grace and the summary's 10 s): one stuck
# stage cannot eat the others' time, and the script ends by the deadline whatever happens.
#
#   stage    expected s  timeout s  what
#   setup        15         40      carried wheels (.whl/) into /tmp/site; the prebuilt library
#                                   when it matches (else the build below); its op-registration
#                                   check (every CUDA kernel of csrc/ registered, sm_XX code)
#   info          8         20      python -m fastxmc.info
#   tests       110        160      pytest -m gpu -n 8 -v, 90 s per test, JUnit XML
#   infonce      90        140      bench_infonce bf16, N = M = 16k, 32k, 64k, D = 768, full mode:
#                                   GEMM, materialized (where it fits), fastxmc-triton,
#                                   fastxmc-triton-atomic (the previous 1-D-grid kernels),
#                                   fastxmc-cuda, then the peers open_clip and Inf-CL (the
#                                   project's own rows first, should the stage be cut short)
#   train        60         90      bench_train_step coco128 (width 96, batch 8), fused vs
#                                   reference, 3 timed steps
#   summary       3         10      summary.txt
#   total       286        460      deadline 520 s (QUICK_DEADLINE_S): 9 minutes less 20 s for $OUT
#   build       210        300      only when the prebuilt library does not match: the stages
#                                   after it then get what is left before the deadline, in order
#
# Files in $OUT (quick, 8, the most a device call brings back): setup.log tests.log tests.xml
# infonce.log infonce.csv train_step.log train_step.csv summary.txt.
#
# No stage named: build and tests. Logs and CSVs go to $OUT (default /tmp/gpu_check); PYTHON picks
# the interpreter (default python3, the one that holds a CUDA build of torch); ARCH the compute
# capabilities to compile for (default: this GPU's only, which builds fastest). --dry-run prints
# the plan, the budget and the prebuilt library's match against $PYTHON, and runs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PYTHON=${PYTHON:-python3}
PREBUILT=.gpu-prebuilt
WHEELS=.whl
SITE=${SITE:-/tmp/site}
QUICK_DEADLINE_S=${QUICK_DEADLINE_S:-520}
QUICK_FILES_MAX=8
SUMMARY_RESERVE_S=10   # kept back from every stage's timeout for the summary
KILL_GRACE_S=15        # after its SIGINT a stage has this long to write its files, then SIGKILL
MIN_STAGE_S=20         # a stage left less than this is skipped rather than started
# Stage logs are written as they happen, also when a stage is stopped at its timeout.
export PYTHONUNBUFFERED=1

dry_run=0
stages=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    quick|build|tests|kernels|infonce|train) stages+=("$arg") ;;
    *) echo "gpu_check.sh: unknown stage $arg (quick, build, tests, kernels, infonce, train; --dry-run)" >&2
       exit 2 ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && stages=(build tests)
if [[ " ${stages[*]} " == *" quick "* ]] && [ ${#stages[@]} -gt 1 ]; then
  echo "gpu_check.sh: quick is a whole plan of its own; name it alone" >&2
  exit 2
fi
quick=0
[ "${stages[0]}" = quick ] && quick=1

start_s=$SECONDS
failed=()
stage_rows=()   # "name|expected|timeout|took|status" for the summary table
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$SUMMARY"; }

# run_stage NAME COMMAND...: output to $OUT/${STAGE_LOG:-NAME.log}; a failure is recorded, not
# fatal. STAGE_TIMEOUT (seconds, 0: none) and STAGE_EXPECTED, when set, bound and describe it;
# under quick the timeout is also cut to what is left before the deadline.
run_stage() {
  local name=$1; shift
  local logfile=$OUT/${STAGE_LOG:-$name.log} limit=${STAGE_TIMEOUT:-0} expected=${STAGE_EXPECTED:--}
  if [ "$quick" = 1 ]; then
    # So that even a stage that needs its SIGKILL ends before the deadline.
    local left=$((QUICK_DEADLINE_S - (SECONDS - start_s) - SUMMARY_RESERVE_S - KILL_GRACE_S))
    if [ "$left" -lt "$MIN_STAGE_S" ]; then
      log "$name SKIPPED: $left s left before the deadline"
      failed+=("$name"); stage_rows+=("$name|$expected|$limit|0|skipped (deadline)")
      return 0
    fi
    if [ "$limit" -eq 0 ] || [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  log "$name (timeout ${limit} s): $*"
  local t0=$SECONDS rc=0 status=ok
  set +e
  if [ "$limit" -gt 0 ]; then
    timeout -s INT -k "$KILL_GRACE_S" "$limit" "$@" 2>&1 | tee -a "$logfile"
  else
    "$@" 2>&1 | tee -a "$logfile"
  fi
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT"; elif [ "$rc" -ne 0 ]; then status="FAILED ($rc)"; fi
  [ "$status" = ok ] || { failed+=("$name"); log "$name $status"; }
  log "$name took $((SECONDS - t0)) s"
  stage_rows+=("$name|$expected|$limit|$((SECONDS - t0))|$status")
}

gpu_arch() {  # this GPU's compute capability, e.g. 9.0
  $PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())"
}

# Exit 0 when the prebuilt library's record matches this machine and tree (it says why not
# otherwise); its caller then copies the library into place.
prebuilt_matches() {
  [ -f "$PREBUILT/prebuilt.json" ] || { echo "no $PREBUILT/prebuilt.json: run benchmarks/gpu_prebuild.sh on a CPU machine and carry $PREBUILT"; return 1; }
  $PYTHON -m benchmarks.gpu_tools match "$PREBUILT/prebuilt.json" ${1:+--arch "$1"}
}

use_prebuilt() {
  cp "$PREBUILT/_C.so" fastxmc/_C.so.tmp
  mv fastxmc/_C.so.tmp fastxmc/_C.so   # never rewrite in place a library a process may have mapped
  echo "fastxmc/_C.so <- $PREBUILT/_C.so"
}


# Commands of the quick plan's stages (also printed by --dry-run).
QUICK_TESTS=(env TRITON_INTERPRET=0 $PYTHON -m pytest -m gpu -n 8 -v -rfE -p no:cacheprovider
             --timeout 90 --timeout-method thread --junit-xml "$OUT/tests.xml" tests)
QUICK_INFONCE=($PYTHON -m benchmarks.bench_infonce --device cuda --dtype bf16 --dim 768
               --sizes 16384,32768,65536 --modes full
               --providers materialized,fastxmc-triton,fastxmc-triton-atomic,fastxmc-cuda,open_clip,inf-cl
               --reps 5 --min-reps 2 --budget 2 --max-seconds 8 --out "$OUT/infonce.csv")
QUICK_TRAIN=($PYTHON -m benchmarks.bench_train_step --device cuda --configs coco128
             --providers fused,reference --coco-width 96 --coco-batch 8 --steps 3 --warmup 1
             --loader-batches 0 --out "$OUT/train_step.csv")
QUICK_PLAN="setup:15:40 info:8:20 tests:110:160 infonce:90:140 train:60:90 summary:3:10"
QUICK_OUTPUTS="setup.log tests.log tests.xml infonce.log infonce.csv train_step.log train_step.csv summary.txt"

dry_run_report() {
  echo "gpu_check.sh --dry-run: stages ${stages[*]}; OUT=$OUT; PYTHON=$PYTHON"
  if [ "$quick" = 1 ]; then
    local total_e=0 total_t=0 entry name e t
    printf '  %-9s %10s %10s\n' stage expected_s timeout_s
    for entry in $QUICK_PLAN; do
      IFS=: read -r name e t <<<"$entry"
      printf '  %-9s %10s %10s\n' "$name" "$e" "$t"
      total_e=$((total_e + e)); total_t=$((total_t + t))
    done
    printf '  %-9s %10s %10s   deadline %s s (9 min = 540 s)\n' total "$total_e" "$total_t" "$QUICK_DEADLINE_S"
    printf '  %-9s %10s %10s   only when the prebuilt library does not match\n' build 210 300
    [ "$total_t" -le "$QUICK_DEADLINE_S" ] || { echo "  the timeouts add up past the deadline" >&2; return 1; }
    local n
    n=$(wc -w <<<"$QUICK_OUTPUTS")
    echo "  files in \$OUT ($n of at most $QUICK_FILES_MAX): $QUICK_OUTPUTS"
    [ "$n" -le "$QUICK_FILES_MAX" ] || { echo "  more files than a device call brings back" >&2; return 1; }
    echo "  tests:   ${QUICK_TESTS[*]}"
    echo "  infonce: ${QUICK_INFONCE[*]}"
    echo "  train:   ${QUICK_TRAIN[*]}"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      echo "  wheels:  $(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
    else
      echo "  wheels:  none in $WHEELS (open_clip and Inf-CL rows would be skipped)"
    fi
  fi
  local arch=${ARCH:-9.0} how="assumed: no GPU is asked here; set ARCH"
  [ -z "${ARCH:-}" ] || how="from ARCH"
  echo "  prebuilt library against $PYTHON (arch $arch, $how):"
  local said rc=0
  said=$(prebuilt_matches "$arch" 2>&1) || rc=$?
  sed 's/^/    /' <<<"$said"
  case $rc in
    0) echo "    -> would use $PREBUILT/_C.so" ;;
    3) echo "    -> not decided here (no torch in $PYTHON)" ;;
    *) echo "    -> would compile fastxmc/_C.so here (build timeout 300 s)" ;;
  esac
}

if [ "$dry_run" = 1 ]; then
  rm -f "$SUMMARY"
  dry_run_report
  exit $?
fi

# ---------------------------------------------------------------- the run
: > "$SUMMARY"
log "GPU $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
log "$($PYTHON -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1)"
if [ -z "${ARCH:-}" ]; then
  ARCH=$(gpu_arch 2>/dev/null) || { log "no CUDA GPU visible to $PYTHON's torch"; ARCH=unknown; }
fi
log "arch $ARCH"

# The library: the prebuilt one when it matches, else a build. Shared by quick and build.
library_stage() {
  local setup_log=$1
  if prebuilt_matches "$ARCH" 2>&1 | tee -a "$OUT/$setup_log"; then
    use_prebuilt | tee -a "$OUT/$setup_log"
    LIBRARY="prebuilt ($PREBUILT/_C.so)"
  else
    log "the prebuilt library does not match (above): compiling fastxmc/_C.so for $ARCH here"
    STAGE_LOG=$setup_log STAGE_TIMEOUT=300 STAGE_EXPECTED=210 run_stage build \
      env FASTXMC_CUDA=1 FASTXMC_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
      $PYTHON setup.py build_ext --inplace
    LIBRARY="compiled here"
  fi
  STAGE_LOG=$setup_log STAGE_TIMEOUT=20 STAGE_EXPECTED=5 run_stage verify \
    $PYTHON -m benchmarks.gpu_tools verify fastxmc/_C.so --cuda --archs "$ARCH"
}

LIBRARY=unchanged
if [ "$quick" = 1 ]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # The packages the image lacks, carried as wheels (benchmarks/gpu_prebuild.sh).
    STAGE_LOG=setup.log STAGE_TIMEOUT=20 STAGE_EXPECTED=5 run_stage wheels \
      $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    log "no wheels in $WHEELS: open_clip and Inf-CL will be skipped"
  fi
  library_stage setup.log
  STAGE_LOG=setup.log STAGE_TIMEOUT=20 STAGE_EXPECTED=8 run_stage info $PYTHON -m fastxmc.info
  STAGE_LOG=tests.log STAGE_TIMEOUT=160 STAGE_EXPECTED=110 run_stage tests "${QUICK_TESTS[@]}"
  STAGE_LOG=infonce.log STAGE_TIMEOUT=140 STAGE_EXPECTED=90 run_stage infonce "${QUICK_INFONCE[@]}"
  STAGE_LOG=train_step.log STAGE_TIMEOUT=90 STAGE_EXPECTED=60 run_stage train "${QUICK_TRAIN[@]}"
else
  for stage in "${stages[@]}"; do
    case $stage in
      build)
        library_stage build.log
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
    esac
  done
fi

# ---------------------------------------------------------------- summary (printed last: a device
# call's reply carries the end of the output)
{
  echo
  echo "== summary ($((SECONDS - start_s)) s; library: $LIBRARY)"
  printf '  %-10s %10s %10s %7s  %s\n' stage expected_s timeout_s took_s status
  for row in "${stage_rows[@]}"; do
    IFS='|' read -r name e t took status <<<"$row"
    printf '  %-10s %10s %10s %7s  %s\n' "$name" "$e" "$t" "$took" "$status"
  done
  if [ "$quick" = 1 ]; then
    echo "-- tests"
    $PYTHON -m benchmarks.gpu_tools junit "$OUT/tests.xml" --log "$OUT/tests.log" || true
    echo "-- infonce (bf16, D = 768, full)"
    $PYTHON -m benchmarks.gpu_tools table "$OUT/infonce.csv" --bound infonce \
      --cols provider,n,mode,median_ms,ratio_to_4mm,speedup_vs_materialized,peak_extra_mb,status,note || true
    echo "-- train step (coco128, width 96, batch 8)"
    $PYTHON -m benchmarks.gpu_tools table "$OUT/train_step.csv" --where metric=step \
      --cols config,provider,median_ms,images_per_s,ratio_to_baseline,status,note || true
  fi
  files=$(find "$OUT" -type f | wc -l)
  echo "-- files in \$OUT: $files$([ "$quick" = 1 ] && echo " (a device call brings back $QUICK_FILES_MAX)")"
  if [ "$quick" = 1 ] && [ "$files" -gt "$QUICK_FILES_MAX" ]; then
    echo "   more than $QUICK_FILES_MAX: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
  fi
} 2>&1 | tee -a "$SUMMARY"

if [ ${#failed[@]} -gt 0 ]; then log "failed: ${failed[*]}"; exit 1; fi
log "all stages passed"
