"""Triton kernels of the fused similarity log-sum-exp (the core of InfoNCE / SupCon).

Math contract: ``csrc/infonce/infonce.h``; oracle: :mod:`fastxmc.reference.similarity_lse`.
With ``S = scale * a @ b.T`` (a: N x D, b: M x D) and, when ``exclude_diag``, the self pairs
``j == i + diag_offset`` left out:

* forward: ``row_lse[i] = lse_j S[i, j]`` (N,) and ``col_lse[j] = lse_i S[i, j]`` (M,), fp32,
  ``-inf`` for an empty set. ONE launch on a 2-D grid: program (p, s) owns row block p
  (``BLOCK_M`` rows) and column split s (``cols_per_split`` columns, a multiple of every BLOCK_N).
  Its row LSE over the split is an online (running max, running sum) pair in registers, stored to
  a ``(n_splits, N)`` fp32 buffer; its column LSE over its rows goes to a
  ``(cdiv(N, PART_BLOCK_M), M)`` buffer (PART_BLOCK_M = the smallest BLOCK_M that autotuning may
  pick). Each entry of both buffers has exactly one writer, and ``torch.logsumexp(dim=0)`` merges
  them in a fixed order: no atomics, deterministic.
* backward: ``dS = g_i exp(S - row_lse_i) + h_j exp(S - col_lse_j)``, ``grad_a = scale dS b``,
  ``grad_b = scale dS^T a``, ``grad_scale = sum dS * (a_i . b_j)``. TWO launches of one kernel,
  each computing the gradient of the rows it walks: on (x, y) = (a, b) it gives grad_a and
  grad_scale; on (b, a), i.e. on S^T with the roles of (g, row_lse) and (h, col_lse) swapped and
  the diagonal at ``-diag_offset``, it gives grad_b. Program (p, s) of a launch owns row block p
  and column split s and recomputes its S tiles; ``grad_x[p's rows] += scale dS @ y_tile`` is a
  plain read-modify-write into a ``(n_splits, rows, D)`` fp32 buffer that no other program
  touches, and torch sums the splits (``sum(dim=0)``, fixed order; no buffer and no sum when there
  is one split). No atomics anywhere: the gradients are bit-equal run to run, as
  ``torch.use_deterministic_algorithms`` users expect.
* grid size: the host chooses the splits (:func:`split_extent`) so that a launch has about
  ``PROGRAMS_PER_SM`` x the SM count programs at the largest BLOCK_M (cdiv(N, 128) row blocks
  alone are 32 programs at N = 4096, a quarter of an H100's 132 SMs; with 8 column splits,
  256), never more splits than column granules, and for the backward at most
  ``PARTIAL_BUDGET_BYTES`` of partials. A large N needs no split: the grid is then the 1-D one.
* autotuning: keyed on D, the dtypes and a size bucket of each extent (next power of two, clamped
  to [``BUCKET_MIN``, ``BUCKET_MAX``]), so a config tuned at N = 512 is not reused at N = 65536.

FLOPs and bytes, against the single-launch atomic backward of
:mod:`fastxmc.ops.triton.infonce_atomic` (backend ``triton-atomic``, kept for comparison):

* forward: 2 N M D FLOPs. The column split adds the ``(n_splits, N)`` row partials and their
  logsumexp; since splits appear only when row blocks are few, ``n_splits * N`` stays near
  ``PROGRAMS_PER_SM * SMs * 128`` values (about 135 KB on an H100), nothing next to the GEMM.
* backward: each launch recomputes S (2 N M D) and does one gradient GEMM (2 N M D): 8 N M D
  FLOPs, where the atomic kernel recomputes S once and does both GEMMs from it (6 N M D). That is
  1.33x the backward's FLOPs, 1.25x forward + backward (10 vs 8 N M D), the price of
  determinism without an (N / BLOCK_M, M, D) buffer of grad_b partials. Memory traffic: a launch
  read-modify-writes its programs' fp32 output rows once per column tile, rows * D * 8 B *
  cols_per_split / BLOCK_N, mostly in L2 (the atomic kernel does the same for grad_a and
  M * D * 4 B * N / BLOCK_M of atomic adds for grad_b). The split partials are
  ``n_splits * rows * D`` fp32 (at most ``PARTIAL_BUDGET_BYTES``), written once and read once by
  the sum: at N = M = 4096, D = 768 on an H100, 8 splits and 96 MiB a launch, about 30 us of HBM
  traffic each way; from N = 33792 (264 row blocks of 128) there is one split and no partial.

Inputs may be float32, float16 or bfloat16; every accumulation is fp32. fp16/bf16 tiles go to
``tl.dot`` as they are (tensor cores; the backward rounds dS to the input dtype for its gradient
GEMM, fp16 with a per-row power-of-two rescaling, see the kernel); fp32 tiles use
``input_precision="ieee"`` so the results match the fp32 oracle (no TF32). Triton lowers an
"ieee" fp32 dot to CUDA-core FMAs, not tensor cores: the fp32 path is the accurate one, bf16/fp16
the fast one. The ``cuda`` backend (``csrc/infonce/infonce_cuda.cu``) runs FP32 FMA tiles on CUDA
cores for every dtype (no tensor cores) and sums its gradients with atomics: it is the fallback
for GPUs without Triton.

CPU testing: with ``TRITON_INTERPRET=1`` in the environment before fastxmc is imported (see
``fastxmc.ops.triton.runtime``), the same kernels run on CPU tensors through Triton's numpy
interpreter, with one small fixed tile config and a small program target
(``INTERPRETER_TARGET_PROGRAMS``), so that the tests' shapes of tens of rows are split.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastxmc.ops.triton.runtime import INTERPRET as _INTERPRET
from fastxmc.ops.triton.runtime import tl, triton, triton_unavailable_reason  # noqa: F401

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The one config used under the interpreter (autotuning there would run every config through numpy).
# BLOCK_N != BLOCK_M on purpose, so a transposed index shows up in the tests. PART_BLOCK_M is the
# row granularity of the partial buffers (column-LSE and grad_scale partials); it must divide
# BLOCK_M.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "PART_BLOCK_M": 16}
# Programs a launch aims at under the interpreter (the GPU's is PROGRAMS_PER_SM x its SMs).
INTERPRETER_TARGET_PROGRAMS = 8

# GPU autotuning space. The partial buffers are sized for the smallest BLOCK_M of this space; the
# column splits are multiples of the largest BLOCK_N (every BLOCK_N divides it).
_TUNE_BLOCK_M = (64, 128)
_TUNE_BLOCK_N = (64, 128)
_TUNE_BLOCK_K = (32, 64)
_TUNE_WARPS = (4, 8)
_GPU_PART_BLOCK_M = min(_TUNE_BLOCK_M)

# Programs per SM a launch aims at: the configs fit one to three programs per SM (89-255
# registers a thread; the 8-warp backward ones fit one, see benchmarks/triton_compile_report.py),
# so 2 gives an SM a second program to switch to, or a second wave.
PROGRAMS_PER_SM = 2
# Cap on a backward launch's (n_splits, rows, D) fp32 gradient partials.
PARTIAL_BUDGET_BYTES = 128 << 20
# Size buckets of the autotune key: powers of two in [BUCKET_MIN, BUCKET_MAX].
BUCKET_MIN = 128
BUCKET_MAX = 1 << 16


# Which (BLOCK_M, BLOCK_N, BLOCK_K, warps) of the space each kernel may run, per input dtype: the
# configs that ptxas (sm_90, Triton 3.8) compiles without spilling, as
# benchmarks/triton_compile_report.py measures offline. bf16 / fp16 tiles feed tensor cores and
# spill only in the 128 x 128 backward; the "ieee" fp32 dot is a CUDA-core FMA loop whose operand
# tiles live in registers, so fp32 keeps 8 warps (64 x 64 x 32 also fits in 4) and, in the
# backward, BLOCK_M = 64 with BLOCK_K = 32. Fewer configs also means fewer compiles on first use.
def config_allowed_any_dtype(block_m: int, block_n: int, warps: int) -> bool:
    """The space of every dtype and kernel: no 4-warp 128 x 128 tile, whose fp32 scores alone
    would take 128 registers a thread."""
    return not (warps == 4 and block_m * block_n > 64 * 128)


def config_allowed(kernel: str, dtype: torch.dtype, d: Optional[int], tile: dict,
                   warps: int) -> bool:
    """Whether ``kernel`` ("fwd" or "bwd") may run the config ``tile`` (BLOCK_M / BLOCK_N /
    BLOCK_K) with ``warps`` on ``dtype`` inputs of feature size ``d`` (None: any)."""
    bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
    if not config_allowed_any_dtype(bm, bn, warps):
        return False
    # A BLOCK_K wider than D only loads padding: keep the narrowest BLOCK_K when D is small.
    if d is not None and bk > max(d, min(_TUNE_BLOCK_K)):
        return False
    small_4_warps = (bm, bn, bk) == (64, 64, 32)
    if kernel == "fwd":
        if dtype == torch.float32:
            return small_4_warps or (warps == 8 and bm * bn < 128 * 128)
        return True
    if bm * bn >= 128 * 128:
        return False
    if dtype == torch.float32:
        return warps == 8 and bm == 64 and bk == 32
    return warps == 8 or small_4_warps


if triton is not None:

    # ------------------------------------------------------------------ shared tile helpers
    # Indexing: row / column indices and in-tile offsets are int32 (N, M < 2^31 and
    # BLOCK * D < 2^31); the large part of an address (block start * D) goes into a scalar 64-bit
    # base pointer. int64 offset tensors would double the registers held by every pointer tile.
    # a and b are contiguous, so D is their row stride.
    @triton.jit
    def _raw_scores(a_blk_ptr, b_tile_ptr, r_loc, c_loc, row_ok, col_ok, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """(BLOCK_M, BLOCK_N) fp32 tile of a_blk @ b_tile^T, 0 in the padded rows / columns.

        a_blk_ptr / b_tile_ptr point at the first row of the block / tile; r_loc (BLOCK_M,) and
        c_loc (BLOCK_N,) are the in-block row indices. The K-loop walks D in BLOCK_K chunks; masked
        loads zero the tail of D so it adds nothing to the dot products.
        """
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            # a_blk: (BLOCK_M, BLOCK_K); the b tile is loaded already transposed: (BLOCK_K, BLOCK_N)
            a_blk = tl.load(a_blk_ptr + r_loc[:, None] * D + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_t = tl.load(b_tile_ptr + c_loc[None, :] * D + ks[:, None],
                          mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:
                # Interpreter only: its tl.dot multiplies the raw uint16 storage of bf16. A bf16
                # product is exact in fp32, so upcasting first gives the same tile values.
                a_blk = a_blk.to(tl.float32)
                b_t = b_t.to(tl.float32)
            acc = tl.dot(a_blk, b_t, acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _round_to_bf16_rtne(x):
        """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32 (interpreter only)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _allowed(rows, cols, row_ok, col_ok, diag_offset, EXCLUDE_DIAG: tl.constexpr):
        """(BLOCK_M, BLOCK_N) bool: in range, and not an excluded self pair j == i + diag_offset."""
        ok = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAG:
            ok = ok & (cols[None, :] != rows[:, None] + diag_offset)
        return ok

    # ------------------------------------------------------------------ forward
    @triton.jit
    def _similarity_lse_fwd_kernel(
            a_ptr, b_ptr, scale_ptr,   # a (N, D), b (M, D) contiguous; scale 0-dim fp32
            row_part_ptr,              # out (n_splits, N) fp32: row LSE over each column split
            col_part_ptr,              # out (cdiv(N, PART_BLOCK_M), M) fp32 partial column LSE
            N, M, D, diag_offset,
            cols_per_split,            # columns of a split, a multiple of BLOCK_N
            N_BUCKET, M_BUCKET,        # size buckets of N and M: read by the autotune key only
            EXCLUDE_DIAG: tl.constexpr, WITH_COLS: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PART_BLOCK_M: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)                                         # row block
        pid_s = tl.program_id(1)                                         # column split
        r_loc = tl.arange(0, BLOCK_M)
        c_loc = tl.arange(0, BLOCK_N)
        rows = pid_m * BLOCK_M + r_loc                                   # (BLOCK_M,) int32
        row_ok = rows < N
        a_blk_ptr = a_ptr + pid_m.to(tl.int64) * BLOCK_M * D
        # This split's columns [col_start, col_end); the split count is cdiv(M, cols_per_split),
        # so col_start < M, and col_end is written so that it can not overflow int32.
        col_start = pid_s * cols_per_split
        col_end = col_start + tl.minimum(cols_per_split, M - col_start)
        b_tile_ptr = b_ptr + col_start.to(tl.int64) * D
        scale = tl.load(scale_ptr)   # read on the device: no host sync for a learnable scale

        # Online row LSE: running max m_i and running sum l_i = sum_j exp(S_ij - m_i).
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # Column partials: the buffer has one row per PART_BLOCK_M input rows (sized for the
        # smallest BLOCK_M the autotuner may pick, since the host allocates it before the config
        # is known). This program covers R = BLOCK_M / PART_BLOCK_M of those rows, for its
        # split's columns: it writes its value into the first and -inf (neutral for logsumexp)
        # into the others, so every run overwrites the whole buffer and nothing from autotuning's
        # trial runs is left over.
        R: tl.constexpr = BLOCK_M // PART_BLOCK_M
        part_ptr = col_part_ptr + pid_m.to(tl.int64) * R * M
        n_filler = tl.minimum(tl.cdiv(N, PART_BLOCK_M) - pid_m * R, R)   # rows of ours that exist

        for n0 in range(col_start, col_end, BLOCK_N):
            cols = n0 + c_loc                                            # (BLOCK_N,) int32
            col_ok = cols < col_end
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
        tl.store(row_part_ptr + pid_s.to(tl.int64) * N + rows, row_lse, mask=row_ok)

    # ------------------------------------------------------------------ backward
    @triton.jit
    def _similarity_lse_bwd_kernel(
            x_ptr, y_ptr, scale_ptr,     # x (N, D): the rows whose gradient this launch computes;
                                         # y (M, D): the other side; scale 0-dim fp32
            own_g_ptr, own_lse_ptr,      # (N,) fp32 upstream gradient and LSE of x's rows' sets
                                         # (read iff OWN_TERM)
            other_g_ptr, other_lse_ptr,  # (M,) fp32 the same for y's rows (read iff OTHER_TERM)
            grad_part_ptr,               # out (n_splits, N, D) fp32 gradient of x per column
                                         # split; fully written, no zero-fill needed
            gs_part_ptr,                 # out (n_splits, cdiv(N, PART_BLOCK_M)) fp32 grad_scale
                                         # parts (written iff SCALE_GRAD)
            N, M, D, diag_offset,        # pairs (i, i + diag_offset) of x . y^T are excluded
            cols_per_split,              # columns (rows of y) of a split, a multiple of BLOCK_N
            N_BUCKET, M_BUCKET,          # size buckets of N and M: read by the autotune key only
            EXCLUDE_DIAG: tl.constexpr, OWN_TERM: tl.constexpr, OTHER_TERM: tl.constexpr,
            SCALE_GRAD: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, RESCALE_DS: tl.constexpr,
            PART_BLOCK_M: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)                                         # row block of x
        pid_s = tl.program_id(1)                                         # column split
        r_loc = tl.arange(0, BLOCK_M)
        c_loc = tl.arange(0, BLOCK_N)
        rows = pid_m * BLOCK_M + r_loc                                   # (BLOCK_M,) int32
        row_ok = rows < N
        x_blk_ptr = x_ptr + pid_m.to(tl.int64) * BLOCK_M * D
        g_blk_ptr = grad_part_ptr + (pid_s.to(tl.int64) * N + pid_m * BLOCK_M) * D
        col_start = pid_s * cols_per_split                               # as in the forward
        col_end = col_start + tl.minimum(cols_per_split, M - col_start)
        y_tile_ptr = y_ptr + col_start.to(tl.int64) * D
        scale = tl.load(scale_ptr)
        in_dtype = x_ptr.dtype.element_ty

        if OWN_TERM:
            g = tl.load(own_g_ptr + rows, mask=row_ok, other=0.0)                     # (BLOCK_M,)
            # A -inf LSE (empty set) must give a 0 term: shift by +inf so exp(S - shift) = 0.
            r_lse = tl.load(own_lse_ptr + rows, mask=row_ok, other=float("inf"))
            r_lse = tl.where(r_lse == float("-inf"), float("inf"), r_lse)
        gs_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        x_mask_rows = row_ok[:, None]

        for n0 in range(col_start, col_end, BLOCK_N):
            cols = n0 + c_loc                                                         # (BLOCK_N,)
            col_ok = cols < col_end
            # Recompute the tile (each of the two launches does: 8 N M D backward FLOPs in all).
            dot = _raw_scores(x_blk_ptr, y_tile_ptr, r_loc, c_loc, row_ok, col_ok, D,
                              BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST)   # x_i . y_j
            s = tl.where(_allowed(rows, cols, row_ok, col_ok, diag_offset, EXCLUDE_DIAG),
                         dot * scale, float("-inf"))                   # excluded -> exp() = 0

            ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if OWN_TERM:
                ds += g[:, None] * tl.exp(s - r_lse[:, None])
            if OTHER_TERM:
                h = tl.load(other_g_ptr + cols, mask=col_ok, other=0.0)
                c_lse = tl.load(other_lse_ptr + cols, mask=col_ok, other=float("inf"))
                c_lse = tl.where(c_lse == float("-inf"), float("inf"), c_lse)
                ds += h[None, :] * tl.exp(s - c_lse[None, :])

            if SCALE_GRAD:
                # dL/dscale = sum_ij dS_ij * (x_i . y_j): the raw dot is already in registers.
                gs_acc += tl.sum(ds * dot, axis=1)

            # Operand of the gradient GEMM. Low-precision inputs: round dS to their dtype so the
            # GEMM runs on tensor cores (as flash-attention does with P and dS); bf16 keeps fp32's
            # exponent range. fp16 does not: dS ~ g p ~ 1 / (N M) underflows at large batches (and
            # a large dS could overflow), so each row of dS is scaled by the power of two (exact)
            # that brings its max |dS| into [1, 2), and the factor is undone in fp32 on the GEMM
            # output, whose rows it indexes. Per row (not per tile) so a row whose every dS is
            # small keeps its precision: an output row only loses terms below 2^-24 of its own
            # largest term.
            if RESCALE_DS:
                e_row = tl.floor(tl.log2(tl.maximum(tl.max(tl.abs(ds), axis=1), 1e-38)))  # (BM,)
                ds_op = (ds * tl.exp2(-e_row)[:, None]).to(in_dtype)
                out_scale = scale * tl.exp2(e_row)[:, None]                            # (BM, 1)
            elif UPCAST:
                # Interpreter, bf16: its tl.dot can not take bf16 (see _raw_scores) and its
                # fp32 -> bf16 cast truncates where the GPU rounds to nearest even. Emulate the
                # GPU: round dS to bf16 precision (RNE) but keep it in fp32.
                ds_op = _round_to_bf16_rtne(ds)
                out_scale = scale
            else:
                ds_op = ds.to(in_dtype)
                out_scale = scale

            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                y_blk = tl.load(y_tile_ptr + c_loc[:, None] * D + ks[None, :],
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0)        # (BN, BK)
                if UPCAST:
                    y_blk = y_blk.to(tl.float32)
                # These gradient rows belong to this program alone: plain read-modify-write. The
                # split's first column tile stores instead of adding (load masked off), so the
                # buffer needs no zero-fill and autotuning's trial runs leave nothing behind. The
                # load and the store use the same pointer tensor, hence the same layout and the
                # same thread per element, so program order alone orders them.
                x_mask = x_mask_rows & k_ok[None, :]
                g_ptrs = g_blk_ptr + r_loc[:, None] * D + ks[None, :]
                acc = tl.load(g_ptrs, mask=x_mask & (n0 > col_start), other=0.0)
                acc += tl.dot(ds_op, y_blk, input_precision=INPUT_PRECISION) * out_scale
                tl.store(g_ptrs, acc, mask=x_mask)
            y_tile_ptr += BLOCK_N * D

        if SCALE_GRAD:
            # grad_scale partial of this program, and 0 into the other PART_BLOCK_M slots it
            # covers (the forward's whole-buffer overwrite scheme), in its split's row.
            R: tl.constexpr = BLOCK_M // PART_BLOCK_M
            n_parts = tl.cdiv(N, PART_BLOCK_M)
            part_ptr = gs_part_ptr + pid_s.to(tl.int64) * n_parts + pid_m * R
            tl.store(part_ptr, tl.sum(gs_acc, axis=0))
            n_filler = tl.minimum(n_parts - pid_m * R, R)
            for r in tl.static_range(1, R):
                if r < n_filler:
                    tl.store(part_ptr + r, 0.0)

    # ------------------------------------------------------------------ autotuned wrappers (GPU)
    def _tune_space():
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                              num_stages=3)
                for bm in _TUNE_BLOCK_M for bn in _TUNE_BLOCK_N for bk in _TUNE_BLOCK_K
                for w in _TUNE_WARPS if config_allowed_any_dtype(bm, bn, w)]

    def _pruner(kernel: str):
        def prune(configs, named_args, **kwargs):
            x = named_args["a_ptr"] if "a_ptr" in named_args else named_args["x_ptr"]
            kept = [c for c in configs if config_allowed(kernel, x.dtype, named_args["D"],
                                                         c.kwargs, c.num_warps)]
            return kept or configs
        return prune

    # The autotuner appends every tensor argument's dtype to the key. Every output is fully
    # overwritten by every run, so trial runs need no reset. The two backward launches (grad_a
    # with grad_scale, grad_b) are tuned apart: their flags differ and the key does not see them.
    _TUNE_KEY = ["D", "N_BUCKET", "M_BUCKET"]

    def _tuned(kernel, name):
        return triton.autotune(configs=_tune_space(), key=_TUNE_KEY,
                               prune_configs_by={"early_config_prune": _pruner(name)})(kernel)

    _fwd_tuned = _tuned(_similarity_lse_fwd_kernel, "fwd")
    _bwd_rows_tuned = _tuned(_similarity_lse_bwd_kernel, "bwd")   # x = a: grad_a, grad_scale
    _bwd_cols_tuned = _tuned(_similarity_lse_bwd_kernel, "bwd")   # x = b: grad_b


# ---------------------------------------------------------------------- host side
def _require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"fastxmc Triton similarity_lse kernels cannot run: {reason}")


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x D), got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_common(a, b, scale, diag_offset, exclude_diag, with_cols) -> None:
    _check_matrix("a", a)
    _check_matrix("b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature size D, got a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    if not isinstance(scale, Tensor):
        raise TypeError(f"scale must be a 0-dim torch.Tensor, got {type(scale).__name__}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one value (0-dim), got shape {tuple(scale.shape)}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
    if scale.device != a.device:
        raise ValueError(f"scale must be on the device of a ({a.device}), got {scale.device}")
    # Kernel indexing is int32 within a block (see the kernels): rows / columns < 2^31, and
    # BLOCK * D < 2^31 for the largest BLOCK (128).
    if max(a.shape[0], b.shape[0]) >= 2 ** 31 or a.shape[1] >= 2 ** 24:
        raise ValueError(f"a {tuple(a.shape)} / b {tuple(b.shape)} too large: rows must be < 2^31 "
                         "and D < 2^24")
    if isinstance(diag_offset, bool) or not isinstance(diag_offset, int):
        raise TypeError(f"diag_offset must be an int, got {type(diag_offset).__name__}")
    for name, flag in (("exclude_diag", exclude_diag), ("with_cols", with_cols)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def _check_vector(name: str, t, length: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of a ({device}), got {t.device}")
    return t.to(torch.float32).contiguous()


def _effective_exclusion(n: int, m: int, diag_offset: int, exclude_diag: bool) -> Tuple[int, bool]:
    """Drop an exclusion that hits no pair; this also keeps diag_offset within int32."""
    if exclude_diag and -n < diag_offset < m:
        return diag_offset, True
    return 0, False


# tl.dot precision for fp32 inputs. "ieee": exact fp32 products, results match the fp32 oracle, but
# Triton runs it on CUDA cores. "tf32x3" (3 TF32 passes, near-fp32 accuracy on tensor cores) is the
# fast alternative; its numerics can not be checked under the interpreter (which ignores it).
FP32_INPUT_PRECISION = "ieee"


def _precision_flags(dtype: torch.dtype) -> dict:
    return {
        # For fp16/bf16 the setting is irrelevant ("tf32" is Triton's default).
        "INPUT_PRECISION": FP32_INPUT_PRECISION if dtype == torch.float32 else "tf32",
        # The interpreter's tl.dot mishandles bf16 (it multiplies the raw uint16 storage).
        "UPCAST": _INTERPRET and dtype == torch.bfloat16,
    }



# ---------------------------------------------------------------------- grid
def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _geometry() -> Tuple[int, int, int]:
    """(largest BLOCK_M, largest BLOCK_N, PART_BLOCK_M) of the configs that may run: the host sizes
    splits and buffers before the autotuner picks a config."""
    if _INTERPRET:
        cfg = _INTERPRETER_CONFIG
        return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["PART_BLOCK_M"]
    return max(_TUNE_BLOCK_M), max(_TUNE_BLOCK_N), _GPU_PART_BLOCK_M


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a launch on ``device`` should have to keep every SM busy."""
    if _INTERPRET:
        return INTERPRETER_TARGET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * _sm_count(index)


def split_extent(rows: int, cols: int, target: int, row_block: int, col_granule: int,
                 max_splits: Optional[int] = None) -> Tuple[int, int]:
    """(cols_per_split, n_splits) for a grid of cdiv(rows, row_block) row blocks x n_splits column
    splits: the fewest splits that reach ``target`` programs, at most one per ``col_granule``
    columns (every BLOCK_N divides the granule, so it tiles a split) and at most ``max_splits``.
    Splits are whole granules, equal but for the last, which may be shorter; rounding to granules
    can leave fewer splits than asked for, never fewer than half. Every split holds a column."""
    row_blocks = _cdiv(rows, row_block)
    granules = _cdiv(cols, col_granule)
    splits = min(_cdiv(target, row_blocks), granules)
    if max_splits is not None:
        splits = min(splits, max_splits)
    splits = max(splits, 1)
    per_split = _cdiv(granules, splits) * col_granule
    return per_split, _cdiv(cols, per_split)


def size_bucket(n: int) -> int:
    """The autotune key's bucket of an extent: its next power of two, clamped to
    [BUCKET_MIN, BUCKET_MAX]."""
    return min(max(1 << max(n - 1, 0).bit_length(), BUCKET_MIN), BUCKET_MAX)


def _launch(kernel_raw, kernel_tuned, grid, args: tuple, meta: dict) -> None:
    """``grid(config) -> (row blocks, splits)``; the interpreter runs its one config untuned."""
    if _INTERPRET:
        cfg = dict(_INTERPRETER_CONFIG)
        cfg.pop("PART_BLOCK_M")
        kernel_raw[grid(cfg)](*args, **meta, **cfg)
    else:
        kernel_tuned[grid](*args, **meta)


def _sum_splits(part: Tensor) -> Tensor:
    """(n_splits, rows, D) -> (rows, D): torch's reduction over a fixed shape, deterministic."""
    return part[0] if part.shape[0] == 1 else part.sum(dim=0)


# ---------------------------------------------------------------------- forward / backward
def similarity_lse_forward_triton(a: Tensor, b: Tensor, scale: Tensor, diag_offset: int,
                                  exclude_diag: bool, with_cols: bool) -> Tuple[Tensor, Tensor]:
    """Row / column LSE of ``scale * a @ b.T`` (see module doc). Returns fp32 (N,), (M,) or (0,)."""
    _check_common(a, b, scale, diag_offset, exclude_diag, with_cols)
    _require_triton(a.device)
    n, d = a.shape
    m = b.shape[0]
    if n == 0 or m == 0:   # every set is empty (or there are no rows): no launch
        row_lse = torch.full((n,), float("-inf"), device=a.device, dtype=torch.float32)
        col_lse = torch.full((m if with_cols else 0,), float("-inf"), device=a.device,
                             dtype=torch.float32)
        return row_lse, col_lse

    a = a.contiguous()
    b = b.contiguous()
    scale = scale.detach().reshape(()).to(torch.float32).contiguous()
    diag_offset, exclude_diag = _effective_exclusion(n, m, diag_offset, exclude_diag)
    block_m, block_n, part = _geometry()
    per_split, n_splits = split_extent(n, m, target_programs(a.device), block_m, block_n)
    # Both buffers are fully overwritten by every launch: no fill.
    row_part = torch.empty((n_splits, n), device=a.device, dtype=torch.float32)
    col_part = torch.empty((_cdiv(n, part), m) if with_cols else (1,), device=a.device,
                           dtype=torch.float32)
    _launch(_similarity_lse_fwd_kernel, _fwd_tuned,
            lambda cfg: (_cdiv(n, cfg["BLOCK_M"]), n_splits),
            (a, b, scale, row_part, col_part, n, m, d, diag_offset, per_split,
             size_bucket(n), size_bucket(m)),
            dict(EXCLUDE_DIAG=exclude_diag, WITH_COLS=with_cols, PART_BLOCK_M=part,
                 **_precision_flags(a.dtype)))
    # Merge the partial LSEs (all -inf stays -inf): O(n_splits N) and O(M N / PART_BLOCK_M).
    row_lse = row_part[0] if n_splits == 1 else torch.logsumexp(row_part, dim=0)
    if with_cols:
        col_lse = torch.logsumexp(col_part, dim=0)
    else:
        col_lse = torch.empty(0, device=a.device, dtype=torch.float32)
    return row_lse, col_lse


def _backward_rows(x: Tensor, y: Tensor, scale: Tensor, own: Optional[Tuple[Tensor, Tensor]],
                   other: Optional[Tuple[Tensor, Tensor]], diag_offset: int, exclude_diag: bool,
                   scale_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """One backward launch: the fp32 gradient (rows, D) of x, where S = scale x y^T and ``own`` /
    ``other`` are the (upstream gradient, LSE) of x's / y's rows (None: that term is absent);
    with ``scale_grad`` also grad_scale (0-dim), else None."""
    n, d = x.shape
    m = y.shape[0]
    block_m, block_n, part = _geometry()
    max_splits = max(1, PARTIAL_BUDGET_BYTES // (4 * n * d))
    per_split, n_splits = split_extent(n, m, target_programs(x.device), block_m, block_n,
                                       max_splits)
    grad_part = torch.empty((n_splits, n, d), device=x.device, dtype=torch.float32)
    gs_part = torch.empty((n_splits, _cdiv(n, part)) if scale_grad else (1,), device=x.device,
                          dtype=torch.float32)
    unused = scale   # any valid pointer for an argument the flags say is never read
    own_g, own_lse = own if own is not None else (unused, unused)
    other_g, other_lse = other if other is not None else (unused, unused)
    _launch(_similarity_lse_bwd_kernel,
            _bwd_rows_tuned if scale_grad else _bwd_cols_tuned,
            lambda cfg: (_cdiv(n, cfg["BLOCK_M"]), n_splits),
            (x, y, scale, own_g, own_lse, other_g, other_lse, grad_part, gs_part,
             n, m, d, diag_offset, per_split, size_bucket(n), size_bucket(m)),
            dict(EXCLUDE_DIAG=exclude_diag, OWN_TERM=own is not None,
                 OTHER_TERM=other is not None, SCALE_GRAD=scale_grad, PART_BLOCK_M=part,
                 RESCALE_DS=x.dtype == torch.float16, **_precision_flags(x.dtype)))
    return _sum_splits(grad_part), (gs_part.sum() if scale_grad else None)


def similarity_lse_backward_triton(grad_row: Tensor, grad_col: Tensor, a: Tensor, b: Tensor,
                                   scale: Tensor, row_lse: Tensor, col_lse: Tensor,
                                   diag_offset: int, exclude_diag: bool, with_cols: bool
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of the row / column LSE: (grad_a (N, D), grad_b (M, D), grad_scale ()), fp32.
    Deterministic: bit-equal results for equal inputs (no atomics, fixed-order reductions)."""
    _check_common(a, b, scale, diag_offset, exclude_diag, with_cols)
    _require_triton(a.device)
    n, d = a.shape
    m = b.shape[0]
    grad_row = _check_vector("grad_row", grad_row, n, a.device)
    row_lse = _check_vector("row_lse", row_lse, n, a.device)
    if with_cols:
        grad_col = _check_vector("grad_col", grad_col, m, a.device)
        col_lse = _check_vector("col_lse", col_lse, m, a.device)
    if n == 0 or m == 0 or d == 0:   # no pairs (or no features): no gradient
        return (torch.zeros((n, d), device=a.device, dtype=torch.float32),
                torch.zeros((m, d), device=a.device, dtype=torch.float32),
                torch.zeros((), device=a.device, dtype=torch.float32))

    a = a.contiguous()
    b = b.contiguous()
    scale = scale.detach().reshape(()).to(torch.float32).contiguous()
    diag_offset, exclude_diag = _effective_exclusion(n, m, diag_offset, exclude_diag)
    rows_term = (grad_row, row_lse)
    cols_term = (grad_col, col_lse) if with_cols else None
    grad_a, grad_scale = _backward_rows(a, b, scale, rows_term, cols_term, diag_offset,
                                        exclude_diag, scale_grad=True)
    # grad_b: the same kernel on S^T = scale b a^T, whose pair (j, i) is excluded where
    # i == j - diag_offset; b's own sets are the columns of S.
    grad_b, _ = _backward_rows(b, a, scale, cols_term, rows_term, -diag_offset, exclude_diag,
                               scale_grad=False)
    return grad_a, grad_b, grad_scale
