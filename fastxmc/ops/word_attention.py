"""Word attention for the generator (XMC-GAN's attentional self-modulation at 16x16).

``word_attention(queries, words, word_mask, rho)`` -> (B, R, d): for every region query q_r,
``alpha_r = softmax over words(rho * cos(q_r, w_t))`` with padding words masked, and the context
``sum_t alpha_rt * normalize(w_t)``. Backends live in ``registry``; the oracle is
:func:`fastxmc.reference.region_word.word_attention_reference`.
"""
from __future__ import annotations

import torch

from fastxmc.ops.checks import check_float_tensor, check_like, check_positive, check_word_mask
from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.reference.region_word import word_attention_reference


def _reference_unsupported(req: Request) -> list:
    return [] if req.dtype.is_floating_point else [f"dtype {req.dtype} is not floating point"]


_KERNELS = {"reference": word_attention_reference}

registry = OpRegistry(op="word_attention", priority={"default": ["reference"]})
registry.register(Backend("reference", _reference_unsupported, "materialized plain PyTorch (oracle)"))


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
        (B, R, d) contexts made of the L2-normalised words; gradients for queries and words.
    """
    _check(queries, words, word_mask, rho)
    backend = registry.select(Request(queries.device, queries.dtype), impl)
    return _KERNELS[backend](queries, words, word_mask, float(rho))
