"""Materialized oracles of XMC-GAN's attention ops (the reference code's ``attention_lib``).

Everything is computed the way the authors' JAX code does it (google-research/xmcgan_image_generation,
``xmcgan/libml/attention_lib.py``): L2 normalisation as ``x * rsqrt(max(|x|^2, 1e-12))``, padding
handled by the mask, softmax axes as documented per function. The fused backends must reproduce
these values and their autograd gradients.

Shapes: regions / queries (B, R, d), words (B, T, d), word_mask (B, T) bool (True = real token).
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # on the squared norm, as the reference code's l2_normalize


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` over the last axis, with the reference code's guard ``|x|^2 >= 1e-12``."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp_min(NORM_EPS))


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def word_attention_reference(queries, words, word_mask, rho: float = 15.0) -> torch.Tensor:
    """The generator's word attention (``attention_for_g``): (B, R, d).

    ``alpha = softmax over words(rho * cos(q_r, w_t))`` with padding words excluded, context
    ``c_r = sum_t alpha_rt * normalize(w_t)``. Computed in fp32 (fp64 for fp64 inputs), returned
    in the input dtype.
    """
    q, w = l2_normalize(_acc(queries)), l2_normalize(_acc(words))
    logits = rho * q @ w.transpose(1, 2)                         # (B, R, T)
    logits = logits.masked_fill(~word_mask[:, None, :], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ w).to(queries.dtype)


def region_word_similarity_reference(regions, words, word_mask, gamma1: float = 5.0,
                                     gamma2: float = 5.0) -> torch.Tensor:
    """``S[i, j]`` for image i and caption j (the inner function of ``word_loss``): (B_img, B_cap).

    1. ``a_tk = softmax over regions k(gamma1 * cos(w_t, r_k))`` (padding words get a uniform
       attention in the reference code; they are masked out in step 3 either way);
    2. ``c_t = sum_k a_tk * normalize(r_k)``;
    3. ``S = logsumexp over valid t(gamma2 * cos(w_t, c_t)) / gamma2``.
    Materializes the (B_img, B_cap, T, R) attention and (B_img, B_cap, T, d) contexts.
    """
    r, w = l2_normalize(_acc(regions)), _acc(words)
    wn = l2_normalize(w)
    attn = torch.softmax(gamma1 * torch.einsum("ikd,jtd->ijtk", r, wn), dim=-1)
    context = torch.einsum("ijtk,ikd->ijtd", attn, r)
    # cos(w_t, c_t); the guarded normalisation keeps all-zero padding vectors finite (0, not NaN).
    cos = (wn[None] * l2_normalize(context)).sum(-1)             # (B_img, B_cap, T)
    cos = cos.masked_fill(~word_mask[None], float("-inf"))
    return torch.logsumexp(gamma2 * cos, dim=-1) / gamma2


def region_word_loss_reference(regions, words, word_mask, gamma1: float = 5.0, gamma2: float = 5.0,
                               gamma3: float = 50.0) -> torch.Tensor:
    """XMC-GAN's word loss: cross-entropy of ``gamma3 * S`` over rows + over columns (summed, each
    averaged over the batch); the diagonal pairs (image i, caption i) are the positives."""
    logits = gamma3 * region_word_similarity_reference(regions, words, word_mask, gamma1, gamma2)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target))
