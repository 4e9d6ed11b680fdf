"""The fused core of every backend against the materialized oracle (values and all gradients)."""
import pytest
import torch

from fastxmc.ops.infonce import similarity_lse
from fastxmc.reference.similarity_lse import similarity_lse_reference
from tests.conftest import FUSED_CPU_BACKENDS

# (N, M, D): N = 1, M = 1, N != M, sizes off every tile multiple, D odd.
SHAPES = [(1, 1, 3), (1, 7, 5), (9, 1, 4), (5, 13, 3), (33, 70, 16), (70, 33, 40)]
# (exclude_diag, diag_offset): none, the diagonal, shifted diagonals (as under group=).
EXCLUSIONS = [(False, 0), (True, 0), (True, 2), (True, -3)]


def _inputs(n, m, d, dtype=torch.float32):
    a = torch.randn(n, d, dtype=dtype, requires_grad=True)
    b = torch.randn(m, d, dtype=dtype, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         requires_grad=True)
    return a, b, scale


def _run(fn, a, b, scale, grad_row, grad_col, **kw):
    row, col = fn(a, b, scale, **kw)
    loss = (row * grad_row).sum()
    if kw.get("with_cols", True):
        loss = loss + (col * grad_col).sum()
    grads = torch.autograd.grad(loss, (a, b, scale))
    return (row, col) + tuple(grads)


def _finite_weights(lse):
    # Weights 0 where the lse is -inf (an empty set), as the losses do.
    return torch.where(torch.isfinite(lse), torch.rand_like(lse), torch.zeros_like(lse))


def _compare(backend, n, m, d, exclude, offset, with_cols, dtype=torch.float32, tol=2e-5):
    a, b, scale = _inputs(n, m, d, dtype)
    ref_row, ref_col = similarity_lse_reference(a.double(), b.double(), scale.double(), offset,
                                                exclude, with_cols=True)
    g_row, g_col = _finite_weights(ref_row), _finite_weights(ref_col)
    kw = dict(diag_offset=offset, exclude_diag=exclude, with_cols=with_cols)
    ref = _run(lambda *x, **k: similarity_lse_reference(*x, **k),
               a.double().detach().requires_grad_(), b.double().detach().requires_grad_(),
               scale.double().detach().requires_grad_(), g_row.double(), g_col.double(), **kw)
    out = _run(lambda *x, **k: similarity_lse(*x, backend=backend, **k), a, b, scale,
               g_row, g_col, **kw)
    names = ["row_lse", "col_lse", "grad_a", "grad_b", "grad_scale"]
    for name, got, want in zip(names, out, ref):
        if name == "col_lse" and not with_cols:
            assert got.numel() == 0
            continue
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("exclude,offset", EXCLUSIONS)
def test_matches_oracle(backend, n, m, d, exclude, offset):
    _compare(backend, n, m, d, exclude, offset, with_cols=True)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_rows_only(backend):
    _compare(backend, 21, 34, 8, True, 1, with_cols=False)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fp64_gradcheck(backend):
    a, b, scale = _inputs(6, 9, 4, torch.float64)
    for exclude in (False, True):
        def fn(a, b, scale):
            return similarity_lse(a, b, scale, backend=backend, exclude_diag=exclude, diag_offset=1)
        assert torch.autograd.gradcheck(fn, (a, b, scale))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_many_row_blocks(backend, monkeypatch):
    # More rows than one work block (the CPU kernel's buffer is <= 64 MB; the streaming chunk is
    # shrunk here) so the online column merges across blocks are exercised.
    import fastxmc.ops.streaming.infonce as streaming

    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 1000)
    a, b, scale = _inputs(4500, 4000, 8) if backend == "cpu" else _inputs(300, 250, 8)
    with torch.no_grad():
        row, col = similarity_lse(a, b, scale, backend=backend)
        ref_row, ref_col = similarity_lse_reference(a.double(), b.double(), scale.double())
    torch.testing.assert_close(row.double(), ref_row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col.double(), ref_col, rtol=1e-5, atol=1e-5)


def test_cpu_portable_epilogue_matches_oracle():
    # CPUs without AVX-512 run the scalar epilogue; FASTXMC_CPU_NO_AVX512=1 forces it here.
    import os
    import subprocess
    import sys

    code = ("import torch, tests.test_similarity_lse as t\n"
            "for n, m, d in t.SHAPES:\n"
            "    for ex, off in t.EXCLUSIONS:\n"
            "        t._compare('cpu', n, m, d, ex, off, with_cols=True)\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, FASTXMC_CPU_NO_AVX512="1"), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
