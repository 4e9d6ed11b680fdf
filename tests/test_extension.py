"""The native build: what it reports, its kernels' registration, life without it, and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastxmc import _extension
from tests.conftest import requires_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_build_info_reports_cuda_consistently():
    info = _extension.build_info()
    assert set(info) >= {"cuda", "torch_version"}
    assert _extension.has_kernel("infonce_lse_forward", "CPU")
    # The CUDA kernels are registered exactly when the build says they were compiled.
    assert _extension.has_kernel("infonce_lse_forward", "CUDA") == bool(info["cuda"])
    assert _extension.has_kernel("infonce_lse_backward", "CUDA") == bool(info["cuda"])


def test_extension_compiled_against_this_torch():
    assert _extension.build_info()["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_cpp_op_rejects_bad_tensors_with_named_arguments():
    op = torch.ops.fastxmc.infonce_lse_forward
    with pytest.raises(RuntimeError, match="a"):
        op(torch.randn(3), torch.randn(3, 2), torch.tensor(1.0), 0, False, True)
    with pytest.raises(RuntimeError, match="b"):
        op(torch.randn(3, 2), torch.randn(3, 5), torch.tensor(1.0), 0, False, True)


def test_package_works_without_extension():
    code = ("import torch, fastxmc.losses as L, fastxmc.info as I; "
            "a = torch.randn(6, 4); print(L.info_nce(a, a.flip(0)).item()); I.main([])")
    out = _python(code, FASTXMC_DISABLE_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert "falling back to the 'torch' backend" in out.stderr  # one warning says why
    assert "extension: NOT available: disabled by FASTXMC_DISABLE_EXTENSION=1" in out.stdout


def test_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "fastxmc.info", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["extension"]["loaded"] is True
    cpu = info["ops"]["info_nce"]["cpu"]
    assert cpu["default"] == "cpu"
    assert cpu["backends"]["cpu"] == [] and cpu["backends"]["cuda"]  # cuda lists why not
    cuda = info["backends"]["info_nce"]["cuda"]
    assert "FP32 FMA" in cuda and "no tensor cores" in cuda and "GPUs without Triton" in cuda


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    from fastxmc.losses import info_nce, supcon
    from fastxmc.reference.infonce import info_nce_reference, supcon_reference

    for n, m in [(1, 1), (129, 129), (300, 77)]:
        a = torch.randn(n, 96, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(m, 96, device="cuda", dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 5, (n,), device="cuda")
        labels_b = torch.randint(0, 5, (m,), device="cuda")
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        for fn, ref in [(lambda impl: info_nce(a, b, 0.1, labels=labels, labels_b=labels_b, impl=impl),
                         lambda: info_nce_reference(a, b, 0.1, labels=labels, labels_b=labels_b)),
                        (lambda impl: supcon(a, labels, 0.1, impl=impl),
                         lambda: supcon_reference(a, labels, 0.1))]:
            got, want = fn(backend), ref()
            g = torch.autograd.grad(got, (a, b), allow_unused=True, materialize_grads=True)
            w = torch.autograd.grad(want, (a, b), allow_unused=True, materialize_grads=True)
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
            for x, y in zip(g, w):
                torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)
