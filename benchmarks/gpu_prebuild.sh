#!/usr/bin/env bash
# Builds, on a machine without a GPU, what benchmarks/gpu_check.sh needs on the lent GPU machine,
# so that its one short command spends no minutes compiling:
#
#   bash benchmarks/gpu_prebuild.sh [--no-wheels] [--wheels-only]
#
#   .gpu-prebuilt/_C.so            fastxmc/_C.so with the CUDA kernels, for that machine's torch
#   .gpu-prebuilt/prebuilt.json    what it was built against (torch, CUDA, Python ABI, archs, the
#                                  digest of csrc/ + CMakeLists.txt); gpu_check.sh uses the library
#                                  only when these match the machine and the tree it runs on
#   .whl/*.whl                     the Python packages the GPU machine lacks (it has no network)
#
# Both folders are ignored by git; a device call names them in `carry`. The library is built in a
# throwaway virtual environment ($WORK/venv-cp<ver>) that holds the GPU machine's torch, so that
# it compiles against the same headers and links the same libtorch; the CMake build directory is
# its own, so the tree's usual build (fastxmc/_C.so, build/cmake-cuda) is left alone. After the
# build the library is loaded into that torch and every op of csrc/ must show its CPU and CUDA
# kernels and sm_XX machine code, or the script fails: no GPU is needed for that check.
#
# Environment (defaults are the GPU machine's, as its image reports them):
#   TORCH_VERSION  2.11.0      torch release of the GPU machine (the PyPI wheel is its CUDA 13.0 build)
#   TORCHVISION_VERSION 0.26.0 its torchvision (only for rehearsing gpu_check.sh here: test modules
#                              import it)
#   PY_VERSION     3.12        its Python (the record carries the ABI; gpu_check.sh compares it)
#   ARCH           9.0         compute capabilities to compile (H100 / H200: 9.0)
#   CUDA_HOME      /usr/local/cuda-13.0, else /usr/local/cuda: an nvcc of torch's CUDA major
#   MAX_JOBS       2           parallel compile jobs
#   NICE           15          niceness of the install and build (the machine is shared)
#   WORK           build/gpu-prebuild   the virtual environment, downloads and CMake build
#   PY             a Python $PY_VERSION interpreter to use (default: searched, see find_python)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.11.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.26.0}
PY_VERSION=${PY_VERSION:-3.12}
ARCH=${ARCH:-9.0}
MAX_JOBS=${MAX_JOBS:-2}
NICE=${NICE:-15}
WORK=${WORK:-build/gpu-prebuild}
PREBUILT=.gpu-prebuilt
WHEELS=.whl
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda-13.0
  [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=/usr/local/cuda
fi
# Packages that benchmarks need and the GPU machine's image lacks, pinned (one version each: two
# versions of one package stop the whole --no-deps install there). The image has their other
# requirements (torch, torchvision, timm, huggingface-hub, safetensors, regex, tqdm, numpy,
# triton): the Requires-Dist lines printed below say what each asks for.
WHEEL_SPECS=(open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 inf-cl==1.2.1)

do_build=1 do_wheels=1
for arg in "$@"; do
  case $arg in
    --no-wheels) do_wheels=0 ;;
    --wheels-only) do_build=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_prebuild.sh: unknown argument $arg (--no-wheels, --wheels-only)" >&2; exit 2 ;;
  esac
done

log() { echo "== gpu_prebuild $(date -u +%H:%M:%S) $*"; }
die() { echo "gpu_prebuild: ERROR: $*" >&2; exit 1; }

# A CPython $PY_VERSION: the library itself links no libpython, but the record must name the ABI
# the GPU machine runs, and the install step there (pip --python-version) is keyed on it.
find_python() {
  local c candidates=()
  [ -n "${PY:-}" ] && candidates+=("$PY")
  candidates+=("python$PY_VERSION")
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$PY_VERSION".*/bin/python"$PY_VERSION"; do
    candidates+=("$c")
  done
  command -v uv >/dev/null 2>&1 && candidates+=("$(uv python find "$PY_VERSION" 2>/dev/null || true)")
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    # A pyenv shim exists on PATH even when no selected version provides it: run it to be sure.
    if "$c" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PY_VERSION'.split('.'))))" \
        >/dev/null 2>&1; then
      command -v "$c" 2>/dev/null || echo "$c"
      return 0
    fi
  done
  die "no Python $PY_VERSION found (tried: ${candidates[*]}); install one (pyenv install $PY_VERSION, uv python install $PY_VERSION) or set PY"
}

build_library() {
  local python venv vpy tag
  python=$(find_python)
  tag=cp${PY_VERSION/./}
  venv=$WORK/venv-$tag
  log "Python $("$python" -c 'import sys; print(sys.version.split()[0])') at $python; venv $venv"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  vpy=$venv/bin/python
  # torch with its CUDA wheels (the cuBLAS & co. headers that ATen's CUDA headers include come
  # from them, see setup.py); the build tools; and what the GPU machine's image has for the tests
  # (pytest with its plugins, torchvision, tqdm), so that gpu_check.sh can be rehearsed here with
  # PYTHON=$vpy (its GPU stages then skip or fail fast).
  log "installing torch==$TORCH_VERSION and the build tools into $venv (first time: a few GB)"
  nice -n "$NICE" "$vpy" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" \
    "torchvision==$TORCHVISION_VERSION" numpy pillow tqdm cmake ninja setuptools wheel \
    pytest pytest-xdist pytest-timeout
  local torch_version torch_cuda nvcc_release
  torch_version=$("$vpy" -c "import torch; print(torch.__version__)" 2>/dev/null)
  torch_cuda=$("$vpy" -c "import torch; print(torch.version.cuda)" 2>/dev/null)
  [ "${torch_version%%+*}" = "$TORCH_VERSION" ] || die "venv holds torch $torch_version, not $TORCH_VERSION"
  [ "$torch_cuda" != None ] || die "torch $torch_version is a CPU-only build; the GPU machine's is a CUDA build"
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
  nvcc_release=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  [ "${nvcc_release%%.*}" = "${torch_cuda%%.*}" ] \
    || die "nvcc $nvcc_release at $CUDA_HOME does not match torch's CUDA $torch_cuda"
  log "torch $torch_version (CUDA $torch_cuda), nvcc $nvcc_release, archs $ARCH, $MAX_JOBS jobs"

  # Not --inplace: the library goes to $WORK/lib, never over the tree's fastxmc/_C.so.
  local start=$SECONDS
  env FASTXMC_CUDA=1 FASTXMC_CUDA_ARCH_LIST="$ARCH" TORCH_CUDA_ARCH_LIST="$ARCH" \
      CUDA_HOME="$CUDA_HOME" MAX_JOBS="$MAX_JOBS" \
      FASTXMC_BUILD_DIR="$WORK/cmake-cuda-torch$TORCH_VERSION-$tag" \
      nice -n "$NICE" "$vpy" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/temp"
  log "build took $((SECONDS - start)) s"
  local built=$WORK/lib/fastxmc/_C.so
  [ -f "$built" ] || die "the build finished without $built"

  mkdir -p "$PREBUILT"
  cp "$built" "$PREBUILT/_C.so.tmp" && mv "$PREBUILT/_C.so.tmp" "$PREBUILT/_C.so"
  "$vpy" -m benchmarks.gpu_tools record "$PREBUILT/_C.so" --archs "$ARCH" --nvcc "$nvcc_release" \
    --out "$PREBUILT/prebuilt.json" >/dev/null
  log "recorded $PREBUILT/prebuilt.json:"
  cat "$PREBUILT/prebuilt.json"

  log "verifying: load into torch $torch_version and check every op's kernels"
  if ! CUDA_HOME="$CUDA_HOME" "$vpy" -m benchmarks.gpu_tools verify "$PREBUILT/_C.so" --cuda \
      --archs "$ARCH"; then
    rm -f "$PREBUILT/prebuilt.json"  # never leave a record that gpu_check.sh would trust
    die "the prebuilt library failed verification (above); $PREBUILT/prebuilt.json removed"
  fi
  "$vpy" -m benchmarks.gpu_tools match "$PREBUILT/prebuilt.json" --arch "${ARCH%%;*}" \
    || die "the fresh record does not match the environment it was built in"
}

download_wheels() {
  mkdir -p "$WHEELS"
  log "downloading ${WHEEL_SPECS[*]} for CPython $PY_VERSION into $WHEELS"
  nice -n "$NICE" python3 -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${WHEEL_SPECS[@]}"
  # Keep exactly the pinned versions: a wheel of another version left by an earlier pin would be
  # installed beside it there and fail the install.
  local whl name keep spec
  for whl in "$WHEELS"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1-2)   # distribution_version
    keep=0
    for spec in "${WHEEL_SPECS[@]}"; do
      [ "$name" = "$(echo "${spec%%==*}" | tr - _)-${spec##*==}" ] && keep=1
    done
    [ $keep = 1 ] || { log "removing $whl (not pinned)"; rm -f "$whl"; }
  done
  for whl in "$WHEELS"/*.whl; do
    printf '  %-48s %7s KiB  needs: %s\n' "$(basename "$whl")" "$(( $(stat -c %s "$whl") / 1024 ))" \
      "$(unzip -p "$whl" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
         | grep -v 'extra ==' | tr '\n' ' ')"
  done
  [ "$(ls "$WHEELS"/*.whl | wc -l)" -eq ${#WHEEL_SPECS[@]} ] \
    || die "expected ${#WHEEL_SPECS[@]} wheels in $WHEELS, found $(ls "$WHEELS"/*.whl | wc -l)"
}

[ $do_build = 1 ] && build_library
[ $do_wheels = 1 ] && download_wheels
# What a device call carries beside the tree: it must stay well under the 64 MiB of a call.
log "to carry: $(du -sh "$PREBUILT" 2>/dev/null | cut -f1) in $PREBUILT, $(du -sh "$WHEELS" 2>/dev/null | cut -f1) in $WHEELS"
