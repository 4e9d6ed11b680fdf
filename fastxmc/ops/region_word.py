"""The region-word similarity matrix behind ``region_word_loss`` (XMC-GAN's word loss).

``region_word_similarity(regions, words, word_mask, gamma1, gamma2, backend=...)`` -> S (B_img, B_cap):
for image i and caption j, attention of every word over image i's regions
(``softmax over regions(gamma1 * cos(w_t, r_k))``), per-word context from the normalised regions,
``S[i, j] = logsumexp over valid words(gamma2 * cos(w_t, c_t)) / gamma2``. The loss on top of S is
O(B^2) and lives in :mod:`fastxmc.losses.region_word`. The fused backends never materialize the
(B, B, T, R) attention or the (B, B, T, d) contexts, forward or backward (contract and identities:
csrc/region_word/region_word.h).

Layers as in :mod:`fastxmc.ops.infonce`: per-backend forward / backward free functions, one
``torch.library`` custom op pair with fake implementations (``torch.compile(fullgraph=True)``
traces through it), autograd wiring, and the backend registry used by the public loss. The
``reference`` backend is the oracle itself, differentiated by autograd.
"""
from __future__ import annotations

import torch

from fastxmc import _extension
from fastxmc.ops import backends
from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.ops.streaming.region_word import (region_word_backward_torch,
                                               region_word_forward_torch)
from fastxmc.ops.triton import region_word as triton_region_word
from fastxmc.reference.region_word import region_word_similarity_reference

# Request feature: more regions than the Triton kernels hold in one tile (see that module).
MANY_REGIONS = "many_regions"

# Register the compiled ops (torch.ops.fastxmc.*) now; a missing build is reported, not raised.
_extension.extension_loaded()


# ---------------------------------------------------------------- backends' kernels
def _native_forward(regions, words, word_mask, gamma1, gamma2):
    return torch.ops.fastxmc.region_word_forward(regions, words, word_mask, gamma1, gamma2)


def _native_backward(grad_s, regions, words, word_mask, s, gram, gamma1, gamma2):
    return torch.ops.fastxmc.region_word_backward(grad_s, regions, words, word_mask, s, gram,
                                                  gamma1, gamma2)


# The C++ op dispatches on the tensors' device, so "cpu" and "cuda" share the entry points.
_KERNELS = {
    "torch": (region_word_forward_torch, region_word_backward_torch),
    "cpu": (_native_forward, _native_backward),
    "cuda": (_native_forward, _native_backward),
    "triton": (triton_region_word.region_word_forward_triton,
               triton_region_word.region_word_backward_triton),
}


# ---------------------------------------------------------------- what each backend supports
_cpu_unsupported = backends.native_cpu("region_word_forward")
_cuda_unsupported = backends.native_cuda("region_word_forward")
_triton_available = backends.triton(triton_region_word.triton_unavailable_reason)


def _triton_unsupported(req: Request) -> list:
    why = _triton_available(req)
    if MANY_REGIONS in req.features:
        why.append(f"more than {triton_region_word.MAX_REGIONS} regions per image")
    return why


registry = OpRegistry(
    op="region_word_loss",
    # The reference is never chosen automatically while a bounded-memory backend fits: it
    # materializes B x B x T x R. Triton on CPU (the interpreter) only runs when forced.
    priority={"cuda": ["triton", "cuda", "torch", "reference"],
              "cpu": ["cpu", "torch", "reference"],
              "default": ["torch", "reference"]},
)
registry.register(Backend("reference", backends.floating_unsupported,
                          "materialized plain PyTorch (oracle): O(B^2 T (R + d)) memory"))
registry.register(Backend("torch", backends.floating_unsupported, "streaming PyTorch, image blocks, bounded memory"))
registry.register(Backend("cpu", _cpu_unsupported,
                          "C++ kernels (csrc/), ATen GEMMs + fused epilogues, padding skipped"))
registry.register(Backend("triton", _triton_unsupported, "Triton GPU kernels"))
registry.register(Backend("cuda", _cuda_unsupported, "C++/CUDA kernels (csrc/), cuBLAS + fused epilogues"))


def request_for(device: torch.device, dtype: torch.dtype, n_regions: int) -> Request:
    """The registry request of a call: device, dtype and whether R fits the Triton tiles."""
    many = n_regions > triton_region_word.MAX_REGIONS
    return Request(torch.device(device), dtype, frozenset({MANY_REGIONS}) if many else frozenset())


# ---------------------------------------------------------------- the custom op pair
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Backends whose forward saves the (B_img, R, R) Gram matrices for the backward (the others
# return an empty gram).
_SAVES_GRAM = ("torch", "cpu", "cuda")


@torch.library.custom_op("fastxmc::region_word_similarity", mutates_args=())
def region_word_similarity_op(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                              gamma1: float, gamma2: float, backend: str
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    forward, _ = _KERNELS[backend]
    s, gram = forward(regions.contiguous(), words.contiguous(), word_mask.contiguous(), gamma1,
                      gamma2)
    return s, gram


@region_word_similarity_op.register_fake
def _(regions, words, word_mask, gamma1, gamma2, backend):
    acc = _acc_dtype(regions)
    b, r = regions.shape[0], regions.shape[1]
    gram_shape = (b, r, r) if backend in _SAVES_GRAM else (0,)
    return (regions.new_empty(b, words.shape[0], dtype=acc),
            regions.new_empty(gram_shape, dtype=acc))


@torch.library.custom_op("fastxmc::region_word_similarity_backward", mutates_args=())
def region_word_similarity_backward_op(grad_s: torch.Tensor, regions: torch.Tensor,
                                       words: torch.Tensor, word_mask: torch.Tensor,
                                       s: torch.Tensor, gram: torch.Tensor, gamma1: float,
                                       gamma2: float, backend: str
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
    _, backward = _KERNELS[backend]
    return backward(grad_s.contiguous(), regions.contiguous(), words.contiguous(),
                    word_mask.contiguous(), s.contiguous(), gram.contiguous(), gamma1, gamma2)


@region_word_similarity_backward_op.register_fake
def _(grad_s, regions, words, word_mask, s, gram, gamma1, gamma2, backend):
    acc = _acc_dtype(regions)
    return regions.new_empty(regions.shape, dtype=acc), words.new_empty(words.shape, dtype=acc)


def _setup_context(ctx, inputs, output):
    regions, words, word_mask, gamma1, gamma2, backend = inputs
    s, gram = output
    ctx.mark_non_differentiable(gram)
    ctx.save_for_backward(regions, words, word_mask, s, gram)
    ctx.params = (gamma1, gamma2, backend)


def _backward(ctx, grad_s, _grad_gram):
    regions, words, word_mask, s, gram = ctx.saved_tensors
    gamma1, gamma2, backend = ctx.params
    if grad_s is None:
        grad_s = torch.zeros_like(s)
    grad_regions, grad_words = region_word_similarity_backward_op(
        grad_s, regions, words, word_mask, s, gram, gamma1, gamma2, backend)
    return grad_regions.to(regions.dtype), grad_words.to(words.dtype), None, None, None, None


region_word_similarity_op.register_autograd(_backward, setup_context=_setup_context)


def region_word_similarity(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                           gamma1: float, gamma2: float, *, backend: str) -> torch.Tensor:
    """S (B_img, B_cap) in fp32 (fp64 for fp64 inputs) through ``backend`` (already selected);
    differentiable in regions and words. Inputs are validated by the public loss."""
    if backend == "reference":
        return region_word_similarity_reference(regions, words, word_mask, float(gamma1),
                                                float(gamma2))
    s, _ = region_word_similarity_op(regions, words, word_mask, float(gamma1), float(gamma2),
                                     backend)
    return s
