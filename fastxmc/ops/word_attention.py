"""Word attention for the generator (XMC-GAN's attentional self-modulation at 16x16).

``word_attention(queries, words, word_mask, rho)`` -> (B, R, d): for every region query q_r,
``alpha_r = softmax over words(rho * cos(q_r, w_t))`` with padding words masked, and the context
``sum_t alpha_rt * normalize(w_t)``. The oracle is
:func:`fastxmc.reference.region_word.word_attention_reference`.

The fused backends (contract: csrc/word_attention/word_attention.h) compute the normalisation, the
(R x T) similarity, the masked softmax and the context product in one pass over the queries, and
keep only the softmax's log-sum-exp per (b, r) for the backward, which recomputes the rest.
Layers as in :mod:`fastxmc.ops.infonce`: per-backend forward / backward free functions, one
``torch.library`` custom op pair (with fake implementations, so ``torch.compile(fullgraph=True)``
traces through it), autograd wiring, and the backend registry.
"""
from __future__ import annotations

import torch

from fastxmc import _extension
from fastxmc.ops.checks import check_float_tensor, check_like, check_positive, check_word_mask
from fastxmc.ops import backends
from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.ops.triton import word_attention as triton_word_attention
from fastxmc.reference.region_word import word_attention_reference


# Register the compiled ops (torch.ops.fastxmc.*) now; a missing build is reported, not raised.
_extension.extension_loaded()


# ---------------------------------------------------------------- backends' kernels
def _native_forward(queries, words, word_mask, rho):
    return torch.ops.fastxmc.word_attention_forward(queries, words, word_mask, rho)


def _native_backward(grad_context, queries, words, word_mask, lse, rho):
    return torch.ops.fastxmc.word_attention_backward(grad_context, queries, words, word_mask, lse,
                                                     rho)


def _cpu_backward_queries(grad_context, queries, words, word_mask, lse, rho):
    return torch.ops.fastxmc.word_attention_backward_queries(grad_context, queries, words,
                                                             word_mask, lse, rho)


# The C++ op dispatches on the tensors' device, so "cpu" and "cuda" share the entry points.
_KERNELS = {
    "cpu": (_native_forward, _native_backward),
    "cuda": (_native_forward, _native_backward),
    "triton": (triton_word_attention.word_attention_forward_triton,
               triton_word_attention.word_attention_backward_triton),
}


# Backends that read (B, R, d) queries and grad_context in place when they are channel-major (the
# transpose of G's flattened (B, d, H, W) conv output, :func:`_channel_major`) and then return
# context and grad_queries in that layout, so G's reshape back to (B, d, H, W) is a view; the other
# backends take contiguous rows.
_CHANNEL_MAJOR = {"cpu"}

# Backward kernels that skip the words' gradient (G's words are frozen embeddings, so the
# reference's autograd never computes it); the other backends compute it and drop it.
_QUERIES_ONLY_BACKWARD = {"cpu": _cpu_backward_queries}

# ---------------------------------------------------------------- what each backend supports
_cpu_unsupported = backends.native_cpu("word_attention_forward")
_cuda_unsupported = backends.native_cuda("word_attention_forward")
_triton_unsupported = backends.triton(triton_word_attention.triton_unavailable_reason)


registry = OpRegistry(
    op="word_attention",
    # Triton on CPU (the interpreter) only runs when forced: it is not in the cpu list.
    priority={"cuda": ["triton", "cuda", "reference"],
              "cpu": ["cpu", "reference"],
              "default": ["reference"]},
)
registry.register(Backend("reference", backends.floating_unsupported,
                          "materialized plain PyTorch (oracle)"))
registry.register(Backend("cpu", _cpu_unsupported,
                          "C++ kernels (csrc/), ATen GEMMs + fused softmax"))
registry.register(Backend("triton", _triton_unsupported, "Triton GPU kernels"))
registry.register(Backend("cuda", _cuda_unsupported, "C++/CUDA kernels (csrc/)"))


# ---------------------------------------------------------------- the custom op pair
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastxmc::word_attention_fused", mutates_args=())
def word_attention_op(queries: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                      rho: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    forward, _ = _KERNELS[backend]
    context, lse = forward(_rows(queries, backend), words.contiguous(), word_mask.contiguous(), rho)
    return context, lse


def _channel_major(x: torch.Tensor) -> bool:
    """Whether (B, R, d) ``x`` is the transpose of a (B, d, R) tensor with contiguous (d, R) blocks
    (the C++ kernels' ``channel_major``, which this must match: the fake outputs follow it)."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1 and x.stride(2) == x.shape[1]


def _rows(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Queries or grad_context as ``backend`` reads them: as they are, or contiguous."""
    return x if backend in _CHANNEL_MAJOR and _channel_major(x) else x.contiguous()


def _empty_rows_like(queries: torch.Tensor, backend: str) -> torch.Tensor:
    """A fake (B, R, d) output in the layout ``backend`` gives it for these queries."""
    b, r, d = queries.shape
    acc = _acc_dtype(queries)
    if backend in _CHANNEL_MAJOR and _channel_major(queries):
        return queries.new_empty((b, d, r), dtype=acc).transpose(1, 2)
    return queries.new_empty((b, r, d), dtype=acc)


@word_attention_op.register_fake
def _(queries, words, word_mask, rho, backend):
    return (_empty_rows_like(queries, backend),
            queries.new_empty(queries.shape[:2], dtype=_acc_dtype(queries)))


def _backward_args(grad_context, queries, words, word_mask, lse, rho, backend) -> tuple:
    """The backward kernels' arguments, tensors made contiguous (or left channel-major)."""
    return (_rows(grad_context, backend), _rows(queries, backend), words.contiguous(),
            word_mask.contiguous(), lse.contiguous(), rho)


@torch.library.custom_op("fastxmc::word_attention_fused_backward", mutates_args=())
def word_attention_backward_op(grad_context: torch.Tensor, queries: torch.Tensor,
                               words: torch.Tensor, word_mask: torch.Tensor, lse: torch.Tensor,
                               rho: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, backward = _KERNELS[backend]
    return backward(*_backward_args(grad_context, queries, words, word_mask, lse, rho, backend))


@word_attention_backward_op.register_fake
def _(grad_context, queries, words, word_mask, lse, rho, backend):
    return (_empty_rows_like(queries, backend),
            words.new_empty(words.shape, dtype=_acc_dtype(queries)))


# A separate op, not a flag on the one above: graphs that torch.compile cached with the full
# backward keep calling an op of the same schema.
@torch.library.custom_op("fastxmc::word_attention_fused_backward_queries", mutates_args=())
def word_attention_backward_queries_op(grad_context: torch.Tensor, queries: torch.Tensor,
                                       words: torch.Tensor, word_mask: torch.Tensor,
                                       lse: torch.Tensor, rho: float, backend: str) -> torch.Tensor:
    """grad_queries alone, for words that need no gradient."""
    args = _backward_args(grad_context, queries, words, word_mask, lse, rho, backend)
    if backend in _QUERIES_ONLY_BACKWARD:
        return _QUERIES_ONLY_BACKWARD[backend](*args)
    return _KERNELS[backend][1](*args)[0]


@word_attention_backward_queries_op.register_fake
def _(grad_context, queries, words, word_mask, lse, rho, backend):
    return _empty_rows_like(queries, backend)


def _setup_context(ctx, inputs, output):
    queries, words, word_mask, rho, backend = inputs
    ctx.save_for_backward(queries, words, word_mask, output[1])
    ctx.params = (rho, backend)


def _backward(ctx, grad_context, grad_lse):
    # lse is an internal output (the public function drops it): it never receives a gradient.
    queries, words, word_mask, lse = ctx.saved_tensors
    rho, backend = ctx.params
    if not ctx.needs_input_grad[1]:
        grad_q = word_attention_backward_queries_op(grad_context, queries, words, word_mask, lse,
                                                    rho, backend)
        return grad_q.to(queries.dtype), None, None, None, None
    grad_q, grad_w = word_attention_backward_op(grad_context, queries, words, word_mask, lse, rho,
                                                backend)
    return (grad_q.to(queries.dtype) if ctx.needs_input_grad[0] else None,
            grad_w.to(words.dtype), None, None, None)


word_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API
@torch._dynamo.assume_constant_result
def _choose_backend(device: torch.device, dtype: torch.dtype, impl) -> str:
    # Evaluated eagerly while torch.compile traces (the choice reads files and the environment).
    return registry.select(Request(device, dtype), impl)


def _check(queries, words, word_mask, rho) -> None:
    check_float_tensor("queries", queries, 3, "(B, R, d)")
    check_float_tensor("words", words, 3, "(B, T, d)")
    check_like("words", words, "queries", queries)
    if words.shape[0] != queries.shape[0] or words.shape[2] != queries.shape[2]:
        raise ValueError(f"queries (B, R, d) = {tuple(queries.shape)} and words (B, T, d) = "
                         f"{tuple(words.shape)} must agree on B and d")
    check_word_mask(word_mask, words)
    check_positive("rho", rho)


def word_attention(queries: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                   rho: float = 15.0, *, impl: str | None = None) -> torch.Tensor:
    """Attention of every region query over the words of its own caption.

    Args:
        queries: (B, R, d) region queries (e.g. a conv1x1 of G's 16x16 features, flattened).
        words: (B, T, d) word embeddings, same dtype/device.
        word_mask: (B, T) bool, True for real tokens (CLS/SEP included); every caption needs one.
        rho: softmax sharpness (XMC-GAN: 15).
        impl: force a backend; default: ``FASTXMC_IMPL``, else the fastest that fits.
    Returns:
        (B, R, d) contexts made of the L2-normalised words, in the queries' dtype (computed in
        fp32, fp64 for fp64 inputs); gradients for queries and words. Padding words never
        influence the result and get a zero gradient (the fused backends ignore whatever they
        hold; the reference needs them finite).
    """
    _check(queries, words, word_mask, rho)
    backend = _choose_backend(queries.device, queries.dtype, impl)
    if backend == "reference":
        return word_attention_reference(queries, words, word_mask, float(rho))
    context, _ = word_attention_op(queries, words, word_mask, float(rho), backend)
    return context.to(queries.dtype)
