"""The Triton similarity-LSE kernels beyond the oracle sweep of test_similarity_lse.py: the 2-D
grid's splits, every kernel flag at odd shapes, fp16 / bf16 (the fp16 dS rescaling), bit-equal
gradients run to run, the autotune key, and the opt-in atomic variant's contract.

Tolerances: fp32 against the fp64 oracle at 2e-5 (as test_similarity_lse.py); fp16 / bf16 by the
project's rule |out - ref64| <= 2 |ref_lowprec - ref64| + floor, where ref_lowprec is the oracle
run on the low-precision inputs and ref64 the fp64 oracle on the same (rounded) inputs.
"""
import inspect
import warnings

import pytest
import torch

from fastxmc.ops.infonce import registry, request_for, similarity_lse
from fastxmc.ops.triton import infonce as tri
from fastxmc.reference.similarity_lse import similarity_lse_reference
from tests.conftest import requires_gpu

NAMES = ["row_lse", "col_lse", "grad_a", "grad_b", "grad_scale"]
# (N, M, D): N = 1, M = 1, N != M both ways, N and M off every tile (16 x 32 here) and split
# multiple, D odd and below / above BLOCK_K.
SHAPES = [(1, 1, 3), (1, 100, 7), (100, 1, 5), (17, 33, 16), (47, 95, 33), (95, 47, 20)]
# (exclude_diag, diag_offset): none, the diagonal, shifted either way (as under group=), one pair
# at a corner, and an offset that hits no pair.
EXCLUSIONS = [(False, 0), (True, 0), (True, 5), (True, -7), (True, 94), (True, 500)]
# Program targets: 1 (one split: the 1-D grid), the interpreter's default, and more than any
# shape has column granules (a split per 32 columns).
TARGETS = [1, tri.INTERPRETER_TARGET_PROGRAMS, 10_000]


def _leaves(n, m, d, dtype=torch.float32, device="cpu"):
    a = torch.randn(n, d).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(m, d).to(device=device, dtype=dtype).requires_grad_()
    return a, b, torch.tensor(1.7, device=device, requires_grad=True)


def _upstream(n, m, weight=1.0, device="cpu"):
    """Upstream gradients for a fixed loss; 0 where the oracle's LSE is -inf (as the losses do)."""
    return weight * torch.rand(n).to(device), weight * torch.rand(m).to(device)


def _outputs(fn, a, b, scale, g_row, g_col, **kw):
    """(row_lse, col_lse, grad_a, grad_b, grad_scale) of sum(g_row row) + sum(g_col col)."""
    row, col = fn(a, b, scale, **kw)
    loss = (torch.where(torch.isfinite(row), row, 0) * g_row.to(row.dtype)).sum()
    if kw.get("with_cols", True):
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col.to(col.dtype)).sum()
    return (row.detach(), col.detach()) + torch.autograd.grad(loss, (a, b, scale))


def _oracle(a, b, scale, g_row, g_col, dtype=torch.float64, **kw):
    leaves = [t.detach().to(dtype if t.dim() else torch.float64).requires_grad_()
              for t in (a, b, scale)]
    if dtype != torch.float64:
        leaves[2] = scale.detach().clone().requires_grad_()
    return _outputs(similarity_lse_reference, *leaves, g_row, g_col, **kw)


def _triton(a, b, scale, g_row, g_col, **kw):
    return _outputs(lambda *x, **k: similarity_lse(*x, backend="triton", **k), a, b, scale,
                    g_row, g_col, **kw)


def _assert_fp32_close(got, want, with_cols=True, tol=2e-5):
    for name, g, w in zip(NAMES, got, want):
        if name == "col_lse" and not with_cols:
            assert g.numel() == 0
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol,
                                   msg=lambda msg: f"{name}: {msg}")


def _assert_within_low_precision_rule(got, low_ref, exact, with_cols=True, floor=1e-2):
    for name, f, r, e in zip(NAMES, got, low_ref, exact):
        if name == "col_lse" and not with_cols:
            continue
        assert f.dtype == r.dtype, name
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(f), finite), name   # -inf exactly where the oracle's
        f, r, e = f.double()[finite], r.double()[finite], e[finite]
        if e.numel() == 0:
            continue
        bound = 2 * (r - e).abs() + floor * e.abs().max() + 1e-6
        err = (f - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"


# ---------------------------------------------------------------- values and gradients, fp32
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_every_exclusion_matches_fp64_oracle(target, n, m, d, monkeypatch):
    monkeypatch.setattr(tri, "INTERPRETER_TARGET_PROGRAMS", target)
    a, b, scale = _leaves(n, m, d)
    g_row, g_col = _upstream(n, m)
    for exclude, offset in EXCLUSIONS:
        kw = dict(diag_offset=offset, exclude_diag=exclude)
        _assert_fp32_close(_triton(a, b, scale, g_row, g_col, **kw),
                           _oracle(a, b, scale, g_row, g_col, **kw))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("exclude,offset", [(False, 0), (True, 3)])
def test_rows_only_matches_fp64_oracle(target, exclude, offset, monkeypatch):
    # with_cols=False: the forward skips the column partials, the grad_a launch has no column
    # term and the grad_b launch no term of its own rows.
    monkeypatch.setattr(tri, "INTERPRETER_TARGET_PROGRAMS", target)
    a, b, scale = _leaves(47, 95, 9)
    g_row, g_col = _upstream(47, 95)
    kw = dict(diag_offset=offset, exclude_diag=exclude, with_cols=False)
    _assert_fp32_close(_triton(a, b, scale, g_row, g_col, **kw),
                       _oracle(a, b, scale, g_row, g_col, **kw), with_cols=False)


def test_empty_rows_and_columns_give_minus_inf_and_no_gradient():
    # N = M = 1 with its only pair excluded: both sets empty.
    a, b, scale = _leaves(1, 1, 4)
    row, col, ga, gb, gs = _triton(a, b, scale, *_upstream(1, 1), exclude_diag=True)
    assert row.item() == float("-inf") and col.item() == float("-inf")
    assert not ga.any() and not gb.any() and gs.item() == 0.0


def test_splits_are_exercised_by_these_shapes():
    """The shapes above run with several column splits in both backward launches."""
    bm, bn, _ = tri._geometry()
    target = tri.INTERPRETER_TARGET_PROGRAMS
    assert tri.split_extent(47, 95, target, bm, bn)[1] == 3
    assert tri.split_extent(95, 47, target, bm, bn)[1] == 2
    assert tri.split_extent(1, 100, 10_000, bm, bn) == (32, 4)


# ---------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(1, 100, 7), (47, 95, 33), (95, 47, 20)])
@pytest.mark.parametrize("exclude,offset,with_cols", [(False, 0, True), (True, -7, True),
                                                      (True, 5, False)])
def test_low_precision_within_rule(dtype, n, m, d, exclude, offset, with_cols):
    a, b, scale = _leaves(n, m, d, dtype)
    g_row, g_col = _upstream(n, m)
    kw = dict(diag_offset=offset, exclude_diag=exclude, with_cols=with_cols)
    got = _triton(a, b, scale, g_row, g_col, **kw)
    low_ref = _oracle(a, b, scale, g_row, g_col, dtype=dtype, **kw)
    exact = _oracle(a, b, scale, g_row, g_col, **kw)
    _assert_within_low_precision_rule(got, low_ref, exact, with_cols)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight", [1e-7, 1e7])
def test_low_precision_gradients_at_extreme_upstream_scales(dtype, weight):
    """dS = g p reaches fp16's limits: with upstream weights of 1e-7 it is below fp16's smallest
    subnormal (6e-8), with 1e7 above its largest value (65504). The kernel's per-row power-of-two
    rescaling keeps the fp16 gradient GEMM in range. The free backward returns fp32 gradients, so
    they are compared with the oracle's fp32 gradients on the same inputs (ref_lowprec: the oracle
    in fp32 arithmetic; its gradients would underflow or overflow if cast to fp16) and a floor
    relative to the gradient's own size."""
    n, m, d = 47, 95, 24
    a, b, scale = _leaves(n, m, d, dtype)
    g_row, g_col = _upstream(n, m, weight)
    with torch.no_grad():
        row, col = similarity_lse(a, b, scale, backend="triton")
    got = tri.similarity_lse_backward_triton(g_row, g_col, a.detach(), b.detach(), scale.detach(),
                                             row, col, 0, False, True)

    def oracle_grads(acc):
        leaves = [t.detach().to(acc).requires_grad_() for t in (a, b, scale)]
        r, c = similarity_lse_reference(*leaves)
        loss = (r * g_row.to(acc)).sum() + (c * g_col.to(acc)).sum()
        return torch.autograd.grad(loss, leaves)
    exact, low_ref = oracle_grads(torch.float64), oracle_grads(torch.float32)
    for name, f, r, e in zip(NAMES[2:], got, low_ref, exact):
        assert f.dtype == torch.float32 and bool(torch.isfinite(f).all()), name
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max()
        err = (f.double() - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"


# ---------------------------------------------------------------- split grids, any device
def _check_split_grids(device, cases, dtype):
    """Every case (N, M, D, exclude_diag, diag_offset) within the low-precision rule (fp32: a floor
    of 1e-5 of the largest value, bf16 / fp16: 1e-2), and bit-equal on a second run."""
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    for n, m, d, exclude, offset in cases:
        a, b, scale = _leaves(n, m, d, dtype, device)
        g_row, g_col = _upstream(n, m, device=device)
        kw = dict(diag_offset=offset, exclude_diag=exclude)
        got = _triton(a, b, scale, g_row, g_col, **kw)
        low_ref = _oracle(a, b, scale, g_row, g_col, dtype=dtype, **kw)
        exact = _oracle(a, b, scale, g_row, g_col, **kw)
        _assert_within_low_precision_rule(got, low_ref, exact, floor=floor)
        again = _triton(a, b, scale, g_row, g_col, **kw)
        for name, x, y in zip(NAMES, got, again):
            assert torch.equal(x, y), f"{name} differs between two runs at {(n, m, d)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_grids_in_the_interpreter(dtype):
    _check_split_grids("cpu", [(40, 130, 24, True, 3), (130, 40, 24, True, -5)], dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_split_grids_match_oracle_and_repeat_bit_equal(dtype):
    # Compiled and autotuned. Splits on an H100 (264 target programs), forward and grad_a launch
    # / grad_b launch: 700 x 3000 24 / 6; a single row 40 (one per 128 columns) / 1; 4097 x 4095
    # 8 / 9; 40000 x 300 1 (the 1-D grid) / 79.
    cases = [(700, 3000, 256, True, 5), (3000, 700, 96, True, -11), (1, 5000, 768, False, 0),
             (4097, 4095, 256, False, 0), (40000, 300, 64, True, 0)]
    _check_split_grids("cuda", cases, dtype)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_two_runs_are_bit_equal(dtype):
    a, b, scale = _leaves(95, 47, 20, dtype)
    g_row, g_col = _upstream(95, 47)
    kw = dict(diag_offset=-3, exclude_diag=True)
    first = _triton(a, b, scale, g_row, g_col, **kw)
    second = _triton(a, b, scale, g_row, g_col, **kw)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), name


def test_default_kernels_use_no_atomics():
    """Bit-equal gradients on a GPU follow from every output element having one writer and
    every reduction a fixed order: the default kernels issue no atomic operation."""
    for kernel in (tri._similarity_lse_fwd_kernel, tri._similarity_lse_bwd_kernel):
        source = inspect.getsource(kernel.fn)
        assert "atomic" not in source, kernel.fn.__name__


def test_default_backward_runs_under_deterministic_algorithms():
    a, b, scale = _leaves(33, 70, 16)
    g_row, g_col = _upstream(33, 70)
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        _assert_fp32_close(_triton(a, b, scale, g_row, g_col), _oracle(a, b, scale, g_row, g_col))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# ---------------------------------------------------------------- grid and autotune key
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 65536), (4096, 4096), (4097, 300),
                                       (65536, 65536), (300, 1)])
def test_split_extent_covers_every_column_and_fills_the_target(rows, cols):
    target, row_block, granule = 264, 128, 128   # an H100 (132 SMs) at 2 programs per SM
    per_split, n_splits = tri.split_extent(rows, cols, target, row_block, granule)
    assert per_split % granule == 0
    assert (n_splits - 1) * per_split < cols <= n_splits * per_split   # no split is empty
    row_blocks = -(-rows // row_block)
    granules = -(-cols // granule)
    # At least half the target (whole granules per split), unless the granules run out first;
    # never a split more than the target needs.
    assert 2 * row_blocks * n_splits >= min(target, row_blocks * granules)
    assert n_splits == 1 or row_blocks * (n_splits - 1) < target
    capped = tri.split_extent(rows, cols, target, row_block, granule, max_splits=2)[1]
    assert capped <= 2


def test_grid_fills_an_h100_at_n_4096():
    per_split, n_splits = tri.split_extent(4096, 4096, 2 * 132, 128, 128)
    assert (per_split, n_splits) == (512, 8)   # 32 row blocks x 8 splits = 256 programs


def test_backward_partials_respect_the_budget(monkeypatch):
    # A budget of one (rows x D) fp32 buffer allows one split: the plain 1-D grid.
    seen = []
    real = tri.split_extent
    monkeypatch.setattr(tri, "PARTIAL_BUDGET_BYTES", 4 * 47 * 33)
    monkeypatch.setattr(tri, "split_extent", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    a, b, scale = _leaves(47, 95, 33)
    g_row, g_col = _upstream(47, 95)
    _assert_fp32_close(_triton(a, b, scale, g_row, g_col), _oracle(a, b, scale, g_row, g_col))
    forward, grad_a, grad_b = seen
    assert forward[1] == 3 and grad_a[1] == 1 and grad_b[1] == 1


def test_autotune_key_has_size_buckets():
    for tuned in (tri._fwd_tuned, tri._bwd_rows_tuned, tri._bwd_cols_tuned):
        assert tuned.keys == ["D", "N_BUCKET", "M_BUCKET"]
    assert [tri.size_bucket(n) for n in (1, 128, 129, 4096, 5000, 65536, 10 ** 6)] == \
        [128, 128, 256, 4096, 8192, 65536, 65536]


# ---------------------------------------------------------------- the opt-in atomic variant
def _loss_and_grads(backend, a, b, scale):
    row, col = similarity_lse(a, b, scale, backend=backend)
    return torch.autograd.grad(row.sum() + col.sum(), (a, b, scale))


def test_atomic_variant_is_never_chosen_automatically():
    for order in registry.priority.values():
        assert "triton-atomic" not in order
    assert registry.select(request_for(torch.device("cpu"), torch.float32),
                           impl="triton-atomic") == "triton-atomic"


def test_atomic_backward_alerts_under_deterministic_algorithms():
    a, b, scale = _leaves(9, 7, 4)
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="triton-atomic.*not deterministic"):
            _loss_and_grads("triton-atomic", a, b, scale)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            _loss_and_grads("triton-atomic", a, b, scale)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss_and_grads("triton-atomic", a, b, scale)


# ---------------------------------------------------------------- tuning space and compile report
def test_tuning_space_per_dtype():
    """What each kernel may run (the spill-free configs of benchmarks/triton_compile_report.py)."""
    space = [({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w)
             for bm in tri._TUNE_BLOCK_M for bn in tri._TUNE_BLOCK_N for bk in tri._TUNE_BLOCK_K
             for w in tri._TUNE_WARPS]

    def count(kernel, dtype, d=None):
        return sum(tri.config_allowed(kernel, dtype, d, tile, w) for tile, w in space)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    assert [count("fwd", dt) for dt in dtypes] == [14, 14, 7]
    assert [count("bwd", dt) for dt in dtypes] == [7, 7, 2]
    assert count("bwd", torch.float32, d=16) == 2 and count("fwd", torch.bfloat16, d=16) == 7
    assert not any(tri.config_allowed("bwd", torch.bfloat16, None,
                                      {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": bk}, 8)
                   for bk in tri._TUNE_BLOCK_K)


def test_compile_report_compiles_for_sm90_offline():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.triton_compile_report", "--kernels",
                          "bwd-rows", "--dtypes", "fp32"], cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("bwd-rows")]
    assert len(rows) == 2 and all(line.endswith("ok") for line in rows), out.stdout
