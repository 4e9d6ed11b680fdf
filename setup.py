"""Build fastxmc's native extension ``fastxmc/_C.so`` with CMake (CMakeLists.txt); the package
metadata lives in pyproject.toml.

    python setup.py build_ext --inplace          # writes fastxmc/_C.so next to the sources
    pip install --no-build-isolation .           # installs the package with the extension
    pip install -e . --no-build-isolation        # the same, editable

``_C.so`` is a plain shared library of TORCH_LIBRARY ops (loaded with ``torch.ops.load_library``), so
the build needs the installed torch: use ``--no-build-isolation`` with pip. The package works
without it (reference, torch and Triton backends): when torch, CMake or a C++ compiler is missing
at build time, the install goes on without ``_C.so`` after one warning (FASTXMC_BUILD_EXT=1 makes
that an error instead).

Environment variables:
    FASTXMC_BUILD_EXT=auto|0|1  auto (default): build the extension, or skip it with a warning when
                              torch, CMake or a compiler is missing; 0: never build it; 1: required.
    FASTXMC_CUDA=auto|0|1     auto (default): compile the CUDA kernels when nvcc is found and torch is a
                              CUDA build; 1: required (fail when impossible); 0: CPU kernels only.
    FASTXMC_CUDA_ARCH_LIST    compute capabilities, default "8.0;9.0+PTX" (TORCH_CUDA_ARCH_LIST syntax;
                              +PTX lets newer GPUs JIT the kernels).
    CUDA_HOME / CUDA_PATH     the CUDA toolkit; else /usr/local/cuda; else the nvcc on PATH.
    MAX_JOBS                  parallel compile jobs (default 2).
    FASTXMC_BUILD_DIR         CMake's build directory (default build/cmake-cuda or build/cmake-cpu):
                              a build against another torch keeps its own, so that neither
                              invalidates the other's incremental build.
    FASTXMC_CMAKE             the cmake executable (default: pip's cmake, then cmake on PATH; >= 3.25).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
EXT_NAME = "fastxmc._C"
MIN_CMAKE = (3, 25)
DEFAULT_ARCHS = "8.0;9.0+PTX"


def log(msg: str) -> None:
    print(f"[fastxmc] {msg}", flush=True)


# ---- tools -------------------------------------------------------------------------------------

def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else ()


def _python_tool(module: str, attr: str, exe: str) -> str | None:
    """The executable a pip package (cmake, ninja) installed in this environment, if any."""
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr)) / exe
        if candidate.is_file():
            return str(candidate)
    except Exception:  # noqa: BLE001 - the package is optional
        pass
    candidate = Path(sysconfig.get_path("scripts")) / exe
    return str(candidate) if candidate.is_file() else None


def find_cmake() -> str:
    candidates = [os.environ.get("FASTXMC_CMAKE"), _python_tool("cmake", "CMAKE_BIN_DIR", "cmake"),
                  shutil.which("cmake")]
    for cmake in filter(None, candidates):
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True)
        version = _version_tuple(out.stdout)
        if out.returncode == 0 and version >= MIN_CMAKE:
            return cmake
        log(f"ignoring {cmake}: version {out.stdout.strip().splitlines()[:1]} < {MIN_CMAKE}")
    raise CompileError("fastxmc: CMake >= 3.25 not found: `pip install cmake` or set FASTXMC_CMAKE")


def find_ninja() -> str | None:
    return _python_tool("ninja", "BIN_DIR", "ninja") or shutil.which("ninja")


# ---- CUDA --------------------------------------------------------------------------------------

def _toolkit_root_of(nvcc: str) -> Path:
    """The toolkit root of an nvcc that may be a wrapper script: nvcc -v reports its real bin dir."""
    out = subprocess.run([nvcc, "-v", "--version"], capture_output=True, text=True)
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    bindir = Path(match.group(1).strip()) if match else Path(nvcc).resolve().parent
    return bindir.resolve().parent


def find_nvcc() -> tuple[Path | None, str]:
    """(toolkit root, how it was found) or (None, why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:  # an explicit choice is never silently replaced by another toolkit
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return Path(home).resolve(), f"{var}={home}"
            return None, f"{var}={home} has no bin/nvcc"
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda").resolve(), "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_root_of(nvcc), f"nvcc on PATH ({nvcc})"
    return None, "no nvcc found (set CUDA_HOME, or install a CUDA toolkit at /usr/local/cuda)"


def nvcc_version(root: Path) -> str:
    out = subprocess.run([str(root / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    if out.returncode != 0 or not match:
        raise CompileError(f"fastxmc: `{root}/bin/nvcc --version` failed:\n{out.stdout}{out.stderr}")
    return match.group(1)


def wheel_cuda_dirs(major: str) -> tuple[list[Path], list[Path]]:
    """Include and library dirs of the nvidia CUDA pip wheels torch pulled (cuBLAS headers etc.).

    CUDA 13 wheels share one tree, ``nvidia/cu13/{include,lib}``; CUDA 12 wheels have one tree per
    component (``nvidia/cublas/include``, ...).
    """
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return [], []
    includes, libs = [], []
    for base in map(Path, nvidia.__path__):
        trees = [base / f"cu{major}"] if (base / f"cu{major}").is_dir() else sorted(base.iterdir())
        for tree in trees:
            if (tree / "include").is_dir():
                includes.append(tree / "include")
            if (tree / "lib").is_dir():
                libs.append(tree / "lib")
    return includes, libs


def overlay_missing_headers(toolkit_include: Path, wheel_includes: list[Path], dest: Path) -> Path:
    """A directory of links to the wheel headers the toolkit lacks (cublas_v2.h, cusparse.h, ...).

    Adding the wheel include dirs themselves would shadow the toolkit's own headers (cuda_runtime.h
    of a different patch release); linking only the missing entries cannot.
    """
    wanted = {}
    for include in wheel_includes:
        for entry in sorted(include.iterdir()):
            if not (toolkit_include / entry.name).exists():
                wanted.setdefault(entry.name, entry)
    current = {p.name: Path(os.readlink(p)) for p in dest.iterdir() if p.is_symlink()} if dest.is_dir() else {}
    if current != wanted:  # rebuilt only when it changes, so incremental builds stay incremental
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for name, target in wanted.items():
            (dest / name).symlink_to(target)
    return dest


def find_nvrtc(root: Path, wheel_libs: list[Path]) -> Path | None:
    for libdir in [root / "lib64", root / "lib", *wheel_libs]:
        found = sorted(libdir.glob("libnvrtc.so*")) if libdir.is_dir() else []
        found = [f for f in found if "builtins" not in f.name and ".alt." not in f.name]
        if found:
            return found[0]
    return None


def import_torch():
    try:
        import torch
    except ImportError:
        raise CompileError("fastxmc: building the extension needs torch installed in this Python; "
                           "with pip, pass --no-build-isolation") from None
    return torch


def cuda_decision() -> tuple[bool, str, Path | None]:
    """(build CUDA?, reason, toolkit root), following FASTXMC_CUDA."""
    mode = os.environ.get("FASTXMC_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise CompileError(f"fastxmc: FASTXMC_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False, "FASTXMC_CUDA=0", None
    torch = import_torch()

    def unavailable(why: str) -> tuple[bool, str, None]:
        if mode == "1":
            raise CompileError(f"fastxmc: FASTXMC_CUDA=1 but the CUDA kernels cannot be built: {why}")
        return False, why, None

    if not torch.version.cuda:
        return unavailable(f"torch {torch.__version__} is a CPU-only build")
    root, how = find_nvcc()
    if root is None:
        return unavailable(how)
    version = nvcc_version(root)
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return unavailable(f"nvcc {version} ({how}) does not match torch's CUDA {torch.version.cuda}")
    return True, f"nvcc {version} from {how}", root


# ---- the CMake-driven build_ext ----------------------------------------------------------------

class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def build_mode() -> str:
    mode = os.environ.get("FASTXMC_BUILD_EXT", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise CompileError(f"fastxmc: FASTXMC_BUILD_EXT must be auto, 0 or 1, not {mode!r}")
    return mode


def missing_build_tool() -> str | None:
    """Why the extension cannot be built here (None when torch, CMake and a compiler are found)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not importable at build time (with pip, pass --no-build-isolation)"
    compiler = os.environ.get("CXX") or "c++"
    if not shutil.which(compiler):
        return f"no C++ compiler ({compiler}) on PATH"
    try:
        find_cmake()
    except CompileError as err:
        return str(err).removeprefix("fastxmc: ")
    return None


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt; the library lands where setuptools expects ``_C.so``."""

    def run(self) -> None:
        mode = build_mode()
        why_not = "FASTXMC_BUILD_EXT=0" if mode == "0" else missing_build_tool()
        if why_not is None:
            return super().run()
        if mode == "1":
            raise CompileError(f"fastxmc: FASTXMC_BUILD_EXT=1 but the extension cannot be built: {why_not}")
        # a library an earlier build left in build/lib would otherwise be packaged as if built now
        (Path(self.build_lib) / "fastxmc" / "_C.so").unlink(missing_ok=True)
        log(f"WARNING: installing without the native extension _C.so ({why_not}); the reference, "
            "torch and Triton backends work, `python -m fastxmc.info` says what is missing")

    def get_ext_filename(self, fullname: str) -> str:
        if fullname == EXT_NAME:  # a plain shared library, not a CPython module: no ABI suffix
            return os.path.join(*fullname.split(".")[:-1], "_C.so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        torch = import_torch()

        start = time.monotonic()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        with_cuda, reason, cuda_root = cuda_decision()
        log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"CUDA kernels: {'yes' if with_cuda else 'no'} ({reason})")
        # A fixed place in the source tree (not setuptools' build_temp, a fresh temporary directory
        # under `pip install -e`), so that pip and build_ext --inplace share one incremental build.
        build_dir = (Path(os.environ["FASTXMC_BUILD_DIR"]).resolve() if os.environ.get("FASTXMC_BUILD_DIR")
                     else ROOT / "build" / ("cmake-cuda" if with_cuda else "cmake-cpu"))
        cmake = find_cmake()
        args = self._cmake_args(torch, build_dir, with_cuda, cuda_root)
        self._reset_cache_if_changed(build_dir, [cmake, *args])

        log(f"configuring with {cmake} in {build_dir}")
        self._run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], "configure", build_dir)
        jobs = os.environ.get("MAX_JOBS") or (str(self.parallel) if self.parallel else "2")
        log(f"compiling with {jobs} jobs (MAX_JOBS){'; nvcc takes a few minutes' if with_cuda else ''}")
        self._run([cmake, "--build", str(build_dir), "--parallel", jobs], "build", build_dir)
        # CMake writes into its own build dir (one per mode), so that switching FASTXMC_CUDA never
        # leaves the other mode's library looking up to date; then it goes where setuptools wants it.
        built = build_dir / "out" / "_C.so"
        if not built.is_file():
            raise CompileError(f"fastxmc: CMake finished but {built} is missing")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "_C.so.tmp"
        shutil.copy2(built, tmp)
        os.replace(tmp, out_dir / "_C.so")  # never rewrite in place a library a process has mapped
        log(f"built {out_dir / '_C.so'} in {time.monotonic() - start:.0f} s")

    def _cmake_args(self, torch, build_dir: Path, with_cuda: bool, cuda_root: Path | None) -> list[str]:
        torch_root = Path(torch.__file__).resolve().parent
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DFASTXMC_TORCH_ROOT={torch_root}",
            f"-DFASTXMC_OUTPUT_DIR={build_dir / 'out'}",
            f"-DFASTXMC_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        ninja = find_ninja()
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if with_cuda:
            args += self._cuda_args(torch, build_dir, cuda_root)
        return args

    @staticmethod
    def _cuda_args(torch, build_dir: Path, root: Path) -> list[str]:
        archs = os.environ.get("FASTXMC_CUDA_ARCH_LIST", DEFAULT_ARCHS).replace(",", ";").replace(" ", ";")
        archs = ";".join(a for a in archs.split(";") if a)
        major = torch.version.cuda.split(".")[0]
        wheel_includes, wheel_libs = wheel_cuda_dirs(major)
        overlay = overlay_missing_headers(root / "include", wheel_includes, build_dir / "cuda-overlay-include")
        args = [
            f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
            f"-DCUDA_TOOLKIT_ROOT_DIR={root}",
            f"-DCUDAToolkit_ROOT={root}",
            f"-DFASTXMC_CUDA_ARCH_LIST={archs}",
            f"-DTORCH_CUDA_ARCH_LIST={archs}",
            f"-DFASTXMC_CUDA_EXTRA_INCLUDE_DIRS={overlay}",
        ]
        nvrtc = find_nvrtc(root, wheel_libs)
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
        log(f"CUDA toolkit {root}; archs {archs}; wheel headers from "
            f"{', '.join(map(str, wheel_includes)) or 'none'}")
        return args

    @staticmethod
    def _reset_cache_if_changed(build_dir: Path, command: list[str]) -> None:
        """A CMake cache keeps the first compiler, generator and toolkit it saw: start over when they change."""
        stamp = build_dir / "fastxmc-configure.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == command:
            return
        for stale in (build_dir / "CMakeCache.txt", build_dir / "CMakeFiles"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(command))

    @staticmethod
    def _run(command: list[str], step: str, build_dir: Path) -> None:
        try:
            subprocess.run(command, cwd=ROOT, check=True)
        except FileNotFoundError as err:
            raise CompileError(f"fastxmc: cannot run {command[0]}: {err}") from None
        except subprocess.CalledProcessError as err:
            if step == "configure":  # force a fresh configure next time
                (build_dir / "fastxmc-configure.json").unlink(missing_ok=True)
            raise CompileError(
                f"fastxmc: CMake {step} failed (exit {err.returncode}); the error is in the output above.\n"
                f"  build dir: {build_dir}\n"
                "  to build without the CUDA kernels: FASTXMC_CUDA=0; to see the toolkit and torch that "
                "were picked: the [fastxmc] lines above") from None


# Name, version, dependencies, extras and console scripts: pyproject.toml.
setup(ext_modules=[CMakeExtension(EXT_NAME)], cmdclass={"build_ext": CMakeBuild}, zip_safe=False)
