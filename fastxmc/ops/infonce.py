"""The fused similarity log-sum-exp op behind ``info_nce`` and ``supcon``.

``similarity_lse(a, b, scale, ...) -> (row_lse, col_lse)`` computes the row and column
log-sum-exp of ``S = scale * a @ b.T`` without materializing S (contract: csrc/infonce/infonce.h).
Every loss term beyond these two vectors is O((N + M) D) and lives in :mod:`fastxmc.losses`.

Layers (Liger/flash-attn style): per-backend ``*_forward`` / ``*_backward`` free functions, one
``torch.library`` custom op pair (with fake implementations, so ``torch.compile(fullgraph=True)``
traces through it), autograd wiring, and the backend registry used by the public losses.

GPU backends: ``triton`` (:mod:`fastxmc.ops.triton.infonce`) is the default on CUDA: fp16/bf16
tiles on tensor cores, 2-D grids that keep every SM busy, a deterministic backward. ``cuda``
(``csrc/infonce/infonce_cuda.cu``) runs FP32 FMA tiles on CUDA cores whatever the input dtype
(no tensor cores) and sums its gradients with atomics: it is the fallback for GPUs without Triton.
``triton-atomic`` (:mod:`fastxmc.ops.triton.infonce_atomic`: 1-D grid, atomic grad_b, not
deterministic) runs only when forced, as the benchmarks' baseline.
"""
from __future__ import annotations


import torch

from fastxmc import _extension
from fastxmc.ops import backends
from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.ops.streaming.infonce import (similarity_lse_backward_torch,
                                           similarity_lse_forward_torch)
from fastxmc.ops.triton import infonce as triton_infonce
from fastxmc.ops.triton import infonce_atomic as triton_infonce_atomic


# Register the compiled ops (torch.ops.fastxmc.*) now; a missing build is reported, not raised.
_extension.extension_loaded()


# ---------------------------------------------------------------- backends' kernels
def _native_forward(a, b, scale, diag_offset, exclude_diag, with_cols):
    return torch.ops.fastxmc.infonce_lse_forward(a, b, scale, diag_offset, exclude_diag, with_cols)


def _native_backward(grad_row, grad_col, a, b, scale, row_lse, col_lse, diag_offset, exclude_diag,
                  with_cols):
    return torch.ops.fastxmc.infonce_lse_backward(grad_row, grad_col, a, b, scale, row_lse, col_lse,
                                                  diag_offset, exclude_diag, with_cols)


# The C++ op dispatches on the tensors' device, so "cpu" and "cuda" share the entry points.
_KERNELS = {
    "torch": (similarity_lse_forward_torch, similarity_lse_backward_torch),
    "cpu": (_native_forward, _native_backward),
    "cuda": (_native_forward, _native_backward),
    "triton": (triton_infonce.similarity_lse_forward_triton,
               triton_infonce.similarity_lse_backward_triton),
    "triton-atomic": (triton_infonce_atomic.similarity_lse_forward_triton_atomic,
                      triton_infonce_atomic.similarity_lse_backward_triton_atomic),
}


# ---------------------------------------------------------------- what each backend supports
_cpu_unsupported = backends.native_cpu("infonce_lse_forward")
_cuda_unsupported = backends.native_cuda("infonce_lse_forward")
_triton_unsupported = backends.triton(triton_infonce.triton_unavailable_reason)


# Request feature: a CPU call with at most SMALL_CPU_LOGITS logits. The C++ kernels recompute the
# similarity GEMM in the backward to keep memory bounded; below this size storing the logits is
# cheaper, so the materialized reference goes first. Measured on 2 AVX-512 cores, forward +
# backward: the kernels take 1.2-1.4x the reference's time at N = M <= 256, are level near
# 362^2 and take 0.92x at 512^2, 0.54x at 1024^2 (D = 512).
SMALL = "small"
SMALL_CPU_LOGITS = 1 << 17

registry = OpRegistry(
    op="info_nce/supcon",
    # Above SMALL_CPU_LOGITS the reference is never chosen automatically while a bounded-memory
    # backend fits: it materializes the N x M logits. Triton on CPU (the interpreter) only runs
    # when forced; "triton-atomic" (nondeterministic grad_b) only runs when forced.
    priority={"cuda": ["triton", "cuda", "torch", "reference"],
              "cpu": ["cpu", "torch", "reference"],
              "cpu+small": ["reference", "cpu", "torch"],
              "default": ["torch", "reference"]},
)

registry.register(Backend("reference", backends.floating_unsupported, "materialized plain PyTorch (oracle)"))
registry.register(Backend("torch", backends.floating_unsupported, "streaming PyTorch, bounded memory"))
registry.register(Backend("cpu", _cpu_unsupported, "C++ kernels (csrc/), ATen GEMM + fused epilogues"))
registry.register(Backend("triton", _triton_unsupported,
                          "Triton GPU kernels: tensor cores for fp16/bf16, 2-D grids sized to the "
                          "SM count, deterministic backward"))
registry.register(Backend("triton-atomic", _triton_unsupported,
                          "Triton, 1-D grid, grad_b by fp32 atomics (not deterministic); "
                          "opt-in only, the benchmark baseline"))
registry.register(Backend("cuda", _cuda_unsupported,
                          "C++/CUDA kernels (csrc/): FP32 FMA tiles on CUDA cores for every dtype, "
                          "no tensor cores, gradients by atomics; the fallback for GPUs without "
                          "Triton"))


def request_for(device: torch.device, dtype: torch.dtype, logits: int | None = None) -> Request:
    """The registry request of a call with ``logits`` = N x M similarities (None: not known or
    not local, e.g. global negatives gathered from other ranks)."""
    device = torch.device(device)
    small = device.type == "cpu" and logits is not None and logits <= SMALL_CPU_LOGITS
    return Request(device, dtype, frozenset({SMALL}) if small else frozenset())


# ---------------------------------------------------------------- the custom op pair
def _acc_dtype(a: torch.Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastxmc::similarity_lse", mutates_args=())
def similarity_lse_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, diag_offset: int,
                      exclude_diag: bool, with_cols: bool, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    forward, _ = _KERNELS[backend]
    row, col = forward(a.contiguous(), b.contiguous(), scale, diag_offset, exclude_diag, with_cols)
    return row, col


@similarity_lse_op.register_fake
def _(a, b, scale, diag_offset, exclude_diag, with_cols, backend):
    acc = _acc_dtype(a)
    return a.new_empty(a.shape[0], dtype=acc), a.new_empty(b.shape[0] if with_cols else 0, dtype=acc)


@torch.library.custom_op("fastxmc::similarity_lse_backward", mutates_args=())
def similarity_lse_backward_op(grad_row: torch.Tensor, grad_col: torch.Tensor, a: torch.Tensor,
                               b: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
                               col_lse: torch.Tensor, diag_offset: int, exclude_diag: bool,
                               with_cols: bool, backend: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = _KERNELS[backend]
    ga, gb, gs = backward(grad_row.contiguous(), grad_col.contiguous(), a.contiguous(),
                          b.contiguous(), scale, row_lse, col_lse, diag_offset, exclude_diag,
                          with_cols)
    return ga, gb, gs.reshape(())


@similarity_lse_backward_op.register_fake
def _(grad_row, grad_col, a, b, scale, row_lse, col_lse, diag_offset, exclude_diag, with_cols,
      backend):
    acc = _acc_dtype(a)
    return (a.new_empty(a.shape, dtype=acc), b.new_empty(b.shape, dtype=acc),
            a.new_empty((), dtype=acc))


def _setup_context(ctx, inputs, output):
    a, b, scale, diag_offset, exclude_diag, with_cols, backend = inputs
    ctx.save_for_backward(a, b, scale, *output)
    ctx.params = (diag_offset, exclude_diag, with_cols, backend)


def _backward(ctx, grad_row, grad_col):
    a, b, scale, row_lse, col_lse = ctx.saved_tensors
    diag_offset, exclude_diag, with_cols, backend = ctx.params
    if grad_row is None:
        grad_row = torch.zeros_like(row_lse)
    if grad_col is None or not with_cols:
        grad_col = torch.zeros_like(col_lse)
    ga, gb, gs = similarity_lse_backward_op(grad_row, grad_col, a, b, scale, row_lse, col_lse,
                                            diag_offset, exclude_diag, with_cols, backend)
    return (ga.to(a.dtype), gb.to(b.dtype), gs.to(scale.dtype).reshape(scale.shape),
            None, None, None, None)


similarity_lse_op.register_autograd(_backward, setup_context=_setup_context)


def similarity_lse(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, backend: str,
                   diag_offset: int = 0, exclude_diag: bool = False, with_cols: bool = True):
    """Row and column log-sum-exp of ``scale * a @ b.T`` through the chosen fused backend.

    a: (N, D), b: (M, D) float tensors; scale: 0-dim float tensor (may require grad).
    Pairs ``(i, i + diag_offset)`` are left out when ``exclude_diag``. Returns fp32 (fp64 for fp64
    inputs) ``row_lse`` (N,) and ``col_lse`` (M,), or an empty ``col_lse`` when ``with_cols=False``.
    """
    scale = scale.to(device=a.device, dtype=_acc_dtype(a)).reshape(())
    return similarity_lse_op(a, b, scale, int(diag_offset), bool(exclude_diag), bool(with_cols),
                             backend)
