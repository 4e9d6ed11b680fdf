"""The install paths of docs/install.md, each into a fresh virtual environment, then used from outside
the source tree (so nothing is imported from the checkout by accident).

The new environments see this environment's packages (torch, DALI, ...) through a ``.pth`` file,
as an existing environment of a user's would hold them; fastxmc itself is installed into each.
"""
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900


def fresh_venv(where: Path) -> Path:
    """A new virtual environment whose interpreter also sees this one's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=TIMEOUT)
    python = where / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    (Path(own) / "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --no-build-isolation builds with the environment's own setuptools: the README asks for >= 77
    # (PEP 639 license metadata); Python 3.11's venv comes with 65
    pip_install(python, "setuptools>=77", "wheel")
    return python


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTXMC_IMPL")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def pip_install(python: Path, *args, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-v", *args], cwd=ROOT,
                          env=env or clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def run_outside(python: Path, tmp_path: Path, *command, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *command], cwd=tmp_path, env=env or clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def script(python: Path, name: str) -> str:
    return str(python.parent / name)


IMPORT_CHECK = """
import fastxmc, fastxmc._extension as ext, torch
from fastxmc.losses import info_nce
assert '{root}' not in fastxmc.__file__, fastxmc.__file__
a, b = torch.randn(6, 4), torch.randn(6, 4)
ref = info_nce(a, b, 0.1, impl='reference')
assert torch.allclose(info_nce(a, b, 0.1, impl='torch'), ref, atol=1e-6)
print('loaded', ext.extension_loaded(), fastxmc.__version__)
"""


def test_install_into_an_environment_with_torch_builds_the_extension(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    # CPU kernels only: its own CMake build folder, compiled once per clone (the CUDA kernels'
    # nvcc build takes minutes and has its own checks)
    pip_install(python, "--no-build-isolation", ".", env=clean_env(FASTXMC_CUDA="0"))
    check = run_outside(python, tmp_path, "-c", IMPORT_CHECK.format(root=ROOT))
    assert check.returncode == 0 and "loaded True 0.1.0" in check.stdout, check.stderr[-3000:]
    info = subprocess.run([script(python, "fastxmc-info")], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "extension: built" in info.stdout, info.stdout
    assert re.search(r"^info_nce on cpu: default backend cpu$", info.stdout, re.M), info.stdout
    assert re.search(r"^\s+cpu\s+available$", info.stdout, re.M), info.stdout


@pytest.mark.parametrize("how", ["FASTXMC_BUILD_EXT=0", "no compiler"])
def test_install_without_the_extension_warns_once_and_the_python_backends_work(tmp_path, how):
    python = fresh_venv(tmp_path / "venv")
    extra = {"FASTXMC_BUILD_EXT": "0"} if how == "FASTXMC_BUILD_EXT=0" else {"CXX": "/nonexistent/c++"}
    proc = pip_install(python, "--no-build-isolation", ".", env=clean_env(**extra))
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "installing without the native extension" in line]
    assert len(warnings) == 1, (proc.stdout + proc.stderr)[-4000:]
    assert ("FASTXMC_BUILD_EXT=0" if how == "FASTXMC_BUILD_EXT=0" else "no C++ compiler") in warnings[0]
    check = run_outside(python, tmp_path, "-c", IMPORT_CHECK.format(root=ROOT))
    assert check.returncode == 0 and "loaded False 0.1.0" in check.stdout, check.stderr[-3000:]
    info = subprocess.run([script(python, "fastxmc-info")], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "extension: built" not in info.stdout, info.stdout
    assert re.search(r"^\s+cpu\s+unavailable", info.stdout, re.M), info.stdout
    assert re.search(r"^\s+torch\s+available$", info.stdout, re.M), info.stdout


def test_install_with_the_train_extra_then_the_console_script_trains(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, ".[train]")  # pip's isolated build: no torch there, so no _C.so
    out = tmp_path / "run"
    env = clean_env(FASTXMC_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([script(python, "fastxmc-train"), "--preset", "tiny", "--steps", "2",
                           "--out", str(out), "--quiet", "--run.tensorboard=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "checkpoints" / "ckpt-00000002.pt").is_file()
    for name in ("fastxmc-pretrain", "fastxmc-sample", "fastxmc-eval", "fastxmc-bench"):
        helped = subprocess.run([script(python, name), "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert helped.returncode == 0 and "usage" in helped.stdout.lower(), (name, helped.stderr[-2000:])
