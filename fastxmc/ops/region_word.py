"""The region-word similarity matrix behind ``region_word_loss`` (XMC-GAN's word loss).

``region_word_similarity(regions, words, word_mask, gamma1, gamma2, backend=...)`` -> S (B_img, B_cap):
for image i and caption j, attention of every word over image i's regions
(``softmax over regions(gamma1 * cos(w_t, r_k))``), per-word context from the normalised regions,
``S[i, j] = logsumexp over valid words(gamma2 * cos(w_t, c_t)) / gamma2``. The loss on top of S is
O(B^2) and lives in :mod:`fastxmc.losses.region_word`. The fused backends must never materialize
the (B, B, T, R) attention or the (B, B, T, d) contexts (identities in ../shared/design/kernels.md).
"""
from __future__ import annotations

import torch

from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.reference.region_word import region_word_similarity_reference


def _reference_unsupported(req: Request) -> list:
    return [] if req.dtype.is_floating_point else [f"dtype {req.dtype} is not floating point"]


_KERNELS = {"reference": region_word_similarity_reference}

registry = OpRegistry(op="region_word_loss", priority={"default": ["reference"]})
registry.register(Backend("reference", _reference_unsupported,
                          "materialized plain PyTorch (oracle): O(B^2 T R) memory"))


def region_word_similarity(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                           gamma1: float, gamma2: float, *, backend: str) -> torch.Tensor:
    """S (B_img, B_cap) in fp32 (fp64 for fp64 inputs) through ``backend`` (already selected);
    differentiable in regions and words. Inputs are validated by the public loss."""
    return _KERNELS[backend](regions, words, word_mask, float(gamma1), float(gamma2))
