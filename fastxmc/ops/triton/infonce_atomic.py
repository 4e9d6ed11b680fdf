"""Triton similarity log-sum-exp with a 1-D grid and an atomic backward: backend ``triton-atomic``.

Opt-in only (``impl="triton-atomic"`` or ``FASTXMC_IMPL=triton-atomic``; never chosen
automatically): the baseline that ``benchmarks/bench_infonce.py`` compares the default ``triton``
kernels (:mod:`fastxmc.ops.triton.infonce`) with, and the single-pass backward for users who trade
bit-reproducible gradients for its 6 N M D backward FLOPs (the default backward does 8 N M D).
Same math contract (``csrc/infonce/infonce.h``), inputs, outputs and tile helpers as the default
kernels; what differs is the grid and how grad_b is summed:

* forward: ONE launch, a program per block of ``BLOCK_M`` rows walking every column tile:
  ``cdiv(N, BLOCK_M)`` programs, fewer than an H100's 132 SMs below N = 8448 at BLOCK_M = 64. The
  row LSE is an online (running max, running sum) pair held in registers; the column LSE of the
  program's rows goes into a ``[cdiv(N, PART_BLOCK_M), M]`` fp32 buffer merged with
  ``torch.logsumexp(dim=0)`` (deterministic).
* backward: ONE launch (same grid) that recomputes each S tile once (fwd + bwd = 8 N M D FLOPs):
  ``grad_a += scale * dS @ b_tile`` (the program owns its rows: plain read-modify-write),
  ``grad_b += scale * dS^T @ a_blk`` with fp32 ``atomic_add`` (every row program adds into every
  grad_b row, in an order that varies run to run: the last bits of grad_b are NOT reproducible),
  ``grad_scale`` from per-program partials summed by torch. Under
  ``torch.use_deterministic_algorithms(True)`` the backward raises (or warns, with
  ``warn_only=True``), as torch's own nondeterministic kernels do.
* autotuning: keyed on D (and the dtypes) only, so the config chosen at the first call's N is
  reused at every other N.

CPU testing: as the default kernels, under ``TRITON_INTERPRET=1`` with one small fixed config.
"""
import warnings
from typing import Tuple

import torch
from torch import Tensor

from fastxmc.ops.triton.infonce import (_INTERPRET, _check_common, _check_vector,
                                        _effective_exclusion, _precision_flags, _require_triton,
                                        tl, triton)

if triton is not None:
    from fastxmc.ops.triton.infonce import _allowed, _raw_scores, _round_to_bf16_rtne

# The one config used under the interpreter; PART_BLOCK_M must divide BLOCK_M.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "PART_BLOCK_M": 16}

# GPU autotuning space. The partial buffers are sized for the smallest BLOCK_M of this space.
_TUNE_BLOCK_M = (64, 128)
_TUNE_BLOCK_N = (64, 128)
_TUNE_BLOCK_K = (32, 64)
_TUNE_WARPS = (4, 8)
_GPU_PART_BLOCK_M = min(_TUNE_BLOCK_M)


if triton is not None:

    # ------------------------------------------------------------------ forward
    @triton.jit
    def _similarity_lse_fwd_rowblock_kernel(
            a_ptr, b_ptr, scale_ptr,   # a (N, D), b (M, D) contiguous; scale 0-dim fp32
            row_lse_ptr,               # out (N,) fp32
            col_part_ptr,              # out (cdiv(N, PART_BLOCK_M), M) fp32 partial column LSE
            N, M, D, diag_offset,
            EXCLUDE_DIAG: tl.constexpr, WITH_COLS: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PART_BLOCK_M: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        r_loc = tl.arange(0, BLOCK_M)
        c_loc = tl.arange(0, BLOCK_N)
        rows = pid * BLOCK_M + r_loc                                     # (BLOCK_M,) int32
        row_ok = rows < N
        a_blk_ptr = a_ptr + pid.to(tl.int64) * BLOCK_M * D
        b_tile_ptr = b_ptr
        scale = tl.load(scale_ptr)   # read on the device: no host sync for a learnable scale

        # Online row LSE: running max m_i and running sum l_i = sum_j exp(S_ij - m_i).
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # Column partials: the buffer has one row per PART_BLOCK_M input rows (sized for the
        # smallest BLOCK_M the autotuner may pick, since the host allocates it before the config
        # is known). This program covers R = BLOCK_M / PART_BLOCK_M of those rows: it writes its
        # value into the first and -inf (neutral for logsumexp) into the others, so every run
        # overwrites the whole buffer and nothing from autotuning's trial runs is left over.
        R: tl.constexpr = BLOCK_M // PART_BLOCK_M
        part_ptr = col_part_ptr + pid.to(tl.int64) * R * M
        n_filler = tl.minimum(tl.cdiv(N, PART_BLOCK_M) - pid * R, R)     # rows of ours that exist

        for n0 in range(0, M, BLOCK_N):
            cols = n0 + c_loc                                            # (BLOCK_N,) int32
            col_ok = cols < M
            s = _raw_scores(a_blk_ptr, b_tile_ptr, r_loc, c_loc, row_ok, col_ok, D,
                            BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST) * scale
            s = tl.where(_allowed(rows, cols, row_ok, col_ok, diag_offset, EXCLUDE_DIAG),
                         s, float("-inf"))                              # (BLOCK_M, BLOCK_N)

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with nothing allowed yet has m_new = -inf: shift by 0 instead, so that
            # exp(-inf - shift) = 0 and no (-inf) - (-inf) = NaN appears.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
            m_i = m_new

            if WITH_COLS:
                # This program's column LSE over its BLOCK_M rows, same -inf guard.
                c_max = tl.max(s, axis=0)                                # (BLOCK_N,)
                c_shift = tl.where(c_max == float("-inf"), 0.0, c_max)
                c_sum = tl.sum(tl.exp(s - c_shift[None, :]), axis=0)
                c_lse = tl.where(c_sum > 0, c_shift + tl.log(tl.where(c_sum > 0, c_sum, 1.0)),
                                 float("-inf"))
                tl.store(part_ptr + cols, c_lse, mask=col_ok)
                for r in tl.static_range(1, R):
                    tl.store(part_ptr + r * M + cols,
                             tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32),
                             mask=col_ok & (r < n_filler))
            b_tile_ptr += BLOCK_N * D

        shift = tl.where(m_i == float("-inf"), 0.0, m_i)
        row_lse = tl.where(l_i > 0, shift + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(row_lse_ptr + rows, row_lse, mask=row_ok)

    # ------------------------------------------------------------------ backward
    @triton.jit
    def _similarity_lse_bwd_atomic_kernel(
            a_ptr, b_ptr, scale_ptr,          # a (N, D), b (M, D) contiguous; scale 0-dim fp32
            grad_row_ptr, row_lse_ptr,        # (N,) fp32
            grad_col_ptr, col_lse_ptr,        # (M,) fp32 (not read unless WITH_COLS)
            grad_a_ptr,                       # out (N, D) fp32; fully written, no zero-fill needed
            grad_b_ptr,                       # out (M, D) fp32, contiguous; MUST be zero on entry
            gs_part_ptr,                      # out (cdiv(N, PART_BLOCK_M),) fp32 grad_scale parts
            N, M, D, diag_offset,
            EXCLUDE_DIAG: tl.constexpr, WITH_COLS: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, RESCALE_DS: tl.constexpr,
            PART_BLOCK_M: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        r_loc = tl.arange(0, BLOCK_M)
        c_loc = tl.arange(0, BLOCK_N)
        rows = pid * BLOCK_M + r_loc                                     # (BLOCK_M,) int32
        row_ok = rows < N
        a_blk_ptr = a_ptr + pid.to(tl.int64) * BLOCK_M * D
        ga_blk_ptr = grad_a_ptr + pid.to(tl.int64) * BLOCK_M * D
        b_tile_ptr = b_ptr
        gb_tile_ptr = grad_b_ptr
        scale = tl.load(scale_ptr)
        in_dtype = a_ptr.dtype.element_ty

        g = tl.load(grad_row_ptr + rows, mask=row_ok, other=0.0)                     # (BLOCK_M,)
        # A -inf LSE (empty row) must give a 0 term: shift by +inf so exp(S - shift) = 0.
        r_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=float("inf"))
        r_lse = tl.where(r_lse == float("-inf"), float("inf"), r_lse)
        gs_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

        for n0 in range(0, M, BLOCK_N):
            cols = n0 + c_loc                                                         # (BLOCK_N,)
            col_ok = cols < M
            # Recompute the tile (the only recompute: fwd + bwd = 8 N M D FLOPs in all).
            dot = _raw_scores(a_blk_ptr, b_tile_ptr, r_loc, c_loc, row_ok, col_ok, D,
                              BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST)   # a_i . b_j
            s = tl.where(_allowed(rows, cols, row_ok, col_ok, diag_offset, EXCLUDE_DIAG),
                         dot * scale, float("-inf"))                   # excluded -> exp() = 0

            ds = g[:, None] * tl.exp(s - r_lse[:, None])                             # (BM, BN)
            if WITH_COLS:
                h = tl.load(grad_col_ptr + cols, mask=col_ok, other=0.0)
                c_lse = tl.load(col_lse_ptr + cols, mask=col_ok, other=float("inf"))
                c_lse = tl.where(c_lse == float("-inf"), float("inf"), c_lse)
                ds += h[None, :] * tl.exp(s - c_lse[None, :])

            # dL/dscale = sum_ij dS_ij * (a_i . b_j): the raw dot is already in registers.
            gs_acc += tl.sum(ds * dot, axis=1)

            # Operands of the two gradient GEMMs. Low-precision inputs: round dS to their dtype so
            # the GEMMs run on tensor cores (as flash-attention does with P and dS); bf16 keeps
            # fp32's exponent range. fp16 does not: dS ~ g p ~ 1 / (N M) underflows at large batches
            # (and a large dS could overflow), so dS is scaled by powers of two (exact) that bring
            # each row's max |dS| into [1, 2) for grad_a = dS b, and each column's for
            # grad_b = dS^T a; the factors are undone in fp32 on the GEMM outputs, whose rows they
            # index. Per row / column (not per tile) so a row whose every dS is small keeps its
            # precision: an output row only loses terms below 2^-24 of its own largest term.
            if RESCALE_DS:
                abs_ds = tl.abs(ds)
                e_row = tl.floor(tl.log2(tl.maximum(tl.max(abs_ds, axis=1), 1e-38)))    # (BM,)
                e_col = tl.floor(tl.log2(tl.maximum(tl.max(abs_ds, axis=0), 1e-38)))    # (BN,)
                ds_for_a = (ds * tl.exp2(-e_row)[:, None]).to(in_dtype)
                ds_for_b = (ds * tl.exp2(-e_col)[None, :]).to(in_dtype)
                out_a = scale * tl.exp2(e_row)[:, None]                                 # (BM, 1)
                out_b = scale * tl.exp2(e_col)[:, None]                                 # (BN, 1)
            elif UPCAST:
                # Interpreter, bf16: its tl.dot can not take bf16 (see _raw_scores) and its
                # fp32 -> bf16 cast truncates where the GPU rounds to nearest even. Emulate the
                # GPU: round dS to bf16 precision (RNE) but keep it in fp32.
                ds_for_a = _round_to_bf16_rtne(ds)
                ds_for_b = ds_for_a
                out_a = scale
                out_b = scale
            else:
                ds_for_a = ds.to(in_dtype)
                ds_for_b = ds_for_a
                out_a = scale
                out_b = scale
            ds_for_b = tl.trans(ds_for_b)                                               # (BN, BM)

            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                a_mask = row_ok[:, None] & k_ok[None, :]
                b_mask = col_ok[:, None] & k_ok[None, :]
                a_blk = tl.load(a_blk_ptr + r_loc[:, None] * D + ks[None, :],
                                mask=a_mask, other=0.0)                                 # (BM, BK)
                b_blk = tl.load(b_tile_ptr + c_loc[:, None] * D + ks[None, :],
                                mask=b_mask, other=0.0)                                 # (BN, BK)
                if UPCAST:
                    a_blk = a_blk.to(tl.float32)
                    b_blk = b_blk.to(tl.float32)

                # grad_a rows belong to this program alone: plain read-modify-write, no atomics.
                # The first column tile stores instead of adding (load masked off), so grad_a
                # needs no zero-fill and autotuning's trial runs leave nothing behind. The load
                # and the store use the same pointer tensor, hence the same layout and the same
                # thread per element, so program order alone orders them.
                ga_ptrs = ga_blk_ptr + r_loc[:, None] * D + ks[None, :]
                ga = tl.load(ga_ptrs, mask=a_mask & (n0 > 0), other=0.0)
                ga += tl.dot(ds_for_a, b_blk, input_precision=INPUT_PRECISION) * out_a
                tl.store(ga_ptrs, ga, mask=a_mask)

                # grad_b rows are shared by all cdiv(N, BLOCK_M) row programs: fp32 atomic adds.
                # That is N M D / BLOCK_M atomics in all (the backward does 6 N M D FLOPs), and
                # the summation order, hence the last bits of grad_b, varies run to run.
                # "relaxed" suffices: nothing reads grad_b before the kernel ends.
                gb = tl.dot(ds_for_b, a_blk, input_precision=INPUT_PRECISION) * out_b
                tl.atomic_add(gb_tile_ptr + c_loc[:, None] * D + ks[None, :], gb,
                              mask=b_mask, sem="relaxed")
            b_tile_ptr += BLOCK_N * D
            gb_tile_ptr += BLOCK_N * D

        # grad_scale partial of this program, and 0 into the other PART_BLOCK_M slots it covers
        # (same whole-buffer overwrite scheme as the forward's column partials).
        R: tl.constexpr = BLOCK_M // PART_BLOCK_M
        part_ptr = gs_part_ptr + pid * R
        tl.store(part_ptr, tl.sum(gs_acc, axis=0))
        n_filler = tl.minimum(tl.cdiv(N, PART_BLOCK_M) - pid * R, R)
        for r in tl.static_range(1, R):
            if r < n_filler:
                tl.store(part_ptr + r, 0.0)

    # ------------------------------------------------------------------ autotuned wrappers (GPU)
    def _tune_configs(kernel: str):
        """The tile space, less the 4-warp configs that ptxas (sm_90, Triton 3.8, D % 16 == 0)
        showed spilling: 4 warps hold each (BLOCK_M x BLOCK_N) fp32 tile on half the threads of 8,
        and the backward keeps dS, its low-precision copies and the grad_a / grad_b chunks live.
        Fewer configs also means fewer compiles on first use.
        """
        configs = []
        for bm in _TUNE_BLOCK_M:
            for bn in _TUNE_BLOCK_N:
                for bk in _TUNE_BLOCK_K:
                    for w in _TUNE_WARPS:
                        if w == 4 and kernel == "fwd" and bm * bn > 64 * 128:
                            continue
                        if w == 4 and kernel == "bwd" and (bm, bn, bk) != (64, 64, 32):
                            continue
                        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                                     num_warps=w, num_stages=3))
        return configs

    def _prune_configs(configs, named_args, **kwargs):
        # A BLOCK_K wider than D only loads padding: keep the narrowest BLOCK_K when D is small.
        d = named_args["D"]
        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(d, min(_TUNE_BLOCK_K))]
        return kept or configs

    # The autotuner appends every tensor argument's dtype to the key: key=["D"] means (D, dtypes).
    _fwd_tuned = triton.autotune(configs=_tune_configs("fwd"), key=["D"],
                                 prune_configs_by={"early_config_prune": _prune_configs},
                                 )(_similarity_lse_fwd_rowblock_kernel)
    # grad_b is accumulated with atomics: zero it before every trial run (and after tuning).
    # grad_a and the partial buffers are fully overwritten by every run.
    _bwd_tuned = triton.autotune(configs=_tune_configs("bwd"), key=["D"],
                                 prune_configs_by={"early_config_prune": _prune_configs},
                                 reset_to_zero=["grad_b_ptr"])(_similarity_lse_bwd_atomic_kernel)


# ---------------------------------------------------------------------- host side
def _alert_nondeterministic() -> None:
    """torch's contract for nondeterministic kernels under ``use_deterministic_algorithms``."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = ("fastxmc similarity_lse backward of the 'triton-atomic' backend sums grad_b with "
               "fp32 atomics and is not deterministic; use the default 'triton' backend")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _part_block_m() -> int:
    return _INTERPRETER_CONFIG["PART_BLOCK_M"] if _INTERPRET else _GPU_PART_BLOCK_M


def _launch(kernel_raw, kernel_tuned, n: int, args: tuple, meta: dict) -> None:
    if _INTERPRET:
        cfg = dict(_INTERPRETER_CONFIG)
        cfg.pop("PART_BLOCK_M")
        kernel_raw[(triton.cdiv(n, cfg["BLOCK_M"]),)](*args, **meta, **cfg)
    else:
        kernel_tuned[lambda meta_: (triton.cdiv(n, meta_["BLOCK_M"]),)](*args, **meta)


def similarity_lse_forward_triton_atomic(a: Tensor, b: Tensor, scale: Tensor, diag_offset: int,
                                  exclude_diag: bool, with_cols: bool) -> Tuple[Tensor, Tensor]:
    """Row / column LSE of ``scale * a @ b.T`` (see module doc). Returns fp32 (N,), (M,) or (0,)."""
    _check_common(a, b, scale, diag_offset, exclude_diag, with_cols)
    _require_triton(a.device)
    n, d = a.shape
    m = b.shape[0]
    row_lse = torch.empty(n, device=a.device, dtype=torch.float32)
    if n == 0 or m == 0:   # every set is empty (or there are no rows): no launch
        row_lse.fill_(float("-inf"))
        col_lse = torch.full((m if with_cols else 0,), float("-inf"), device=a.device,
                             dtype=torch.float32)
        return row_lse, col_lse

    a = a.contiguous()
    b = b.contiguous()
    scale = scale.detach().reshape(()).to(torch.float32).contiguous()
    diag_offset, exclude_diag = _effective_exclusion(n, m, diag_offset, exclude_diag)
    part = _part_block_m()
    n_parts = triton.cdiv(n, part)
    # (n_parts, M) column partials; every launch overwrites all of it, so no fill is needed.
    col_part = torch.empty((n_parts, m) if with_cols else (1,), device=a.device,
                           dtype=torch.float32)
    _launch(_similarity_lse_fwd_rowblock_kernel, _fwd_tuned, n,
            (a, b, scale, row_lse, col_part, n, m, d, diag_offset),
            dict(EXCLUDE_DIAG=exclude_diag, WITH_COLS=with_cols, PART_BLOCK_M=part,
                 **_precision_flags(a.dtype)))
    if with_cols:
        # Merge the per-row-block partial LSEs: O(M N / PART_BLOCK_M), all -inf stays -inf.
        col_lse = torch.logsumexp(col_part, dim=0)
    else:
        col_lse = torch.empty(0, device=a.device, dtype=torch.float32)
    return row_lse, col_lse


def similarity_lse_backward_triton_atomic(grad_row: Tensor, grad_col: Tensor, a: Tensor, b: Tensor,
                                   scale: Tensor, row_lse: Tensor, col_lse: Tensor,
                                   diag_offset: int, exclude_diag: bool, with_cols: bool
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of the row / column LSE: (grad_a (N, D), grad_b (M, D), grad_scale ()), fp32."""
    _check_common(a, b, scale, diag_offset, exclude_diag, with_cols)
    _require_triton(a.device)
    _alert_nondeterministic()
    n, d = a.shape
    m = b.shape[0]
    grad_row = _check_vector("grad_row", grad_row, n, a.device)
    row_lse = _check_vector("row_lse", row_lse, n, a.device)
    if with_cols:
        grad_col = _check_vector("grad_col", grad_col, m, a.device)
        col_lse = _check_vector("col_lse", col_lse, m, a.device)
    else:
        grad_col = col_lse = row_lse   # never read (WITH_COLS=False); any valid pointer
    if n == 0 or m == 0:   # no pairs: no gradient
        return (torch.zeros((n, d), device=a.device, dtype=torch.float32),
                torch.zeros((m, d), device=a.device, dtype=torch.float32),
                torch.zeros((), device=a.device, dtype=torch.float32))

    a = a.contiguous()
    b = b.contiguous()
    scale = scale.detach().reshape(()).to(torch.float32).contiguous()
    diag_offset, exclude_diag = _effective_exclusion(n, m, diag_offset, exclude_diag)
    part = _part_block_m()
    grad_a = torch.empty((n, d), device=a.device, dtype=torch.float32)   # fully written
    grad_b = torch.zeros((m, d), device=a.device, dtype=torch.float32)   # atomic accumulation
    gs_part = torch.empty(triton.cdiv(n, part), device=a.device, dtype=torch.float32)
    _launch(_similarity_lse_bwd_atomic_kernel, _bwd_tuned, n,
            (a, b, scale, grad_row, row_lse, grad_col, col_lse, grad_a, grad_b, gs_part,
             n, m, d, diag_offset),
            dict(EXCLUDE_DIAG=exclude_diag, WITH_COLS=with_cols, PART_BLOCK_M=part,
                 RESCALE_DS=a.dtype == torch.float16, **_precision_flags(a.dtype)))
    return grad_a, grad_b, gs_part.sum()
