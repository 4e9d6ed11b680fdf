"""XMC-GAN's region-word matching loss (the AttnGAN/DAMSM word loss), as a drop-in function."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastxmc.ops.checks import check_float_tensor, check_like, check_positive, check_word_mask
from fastxmc.ops.region_word import region_word_similarity, registry, request_for


@torch._dynamo.assume_constant_result
def _choose_backend(device: torch.device, dtype: torch.dtype, n_regions: int, impl) -> str:
    # Evaluated eagerly while torch.compile traces (the choice reads files and the environment).
    return registry.select(request_for(device, dtype, n_regions), impl)


def _check(regions, words, word_mask, gammas: dict) -> None:
    check_float_tensor("regions", regions, 3, "(B, R, d)")
    check_float_tensor("words", words, 3, "(B, T, d)")
    check_like("words", words, "regions", regions)
    if words.shape[0] != regions.shape[0]:
        raise ValueError(f"regions has {regions.shape[0]} images but words has {words.shape[0]} "
                         "captions; pair image i with caption i")
    if words.shape[2] != regions.shape[2]:
        raise ValueError(f"regions have d = {regions.shape[2]} features but words have "
                         f"{words.shape[2]}; project one side first")
    if regions.shape[0] == 0:
        raise ValueError(f"regions has no images (shape {tuple(regions.shape)}): the matching loss "
                         "needs at least one image-caption pair")
    if regions.shape[1] == 0 or words.shape[1] == 0:
        raise ValueError(f"regions {tuple(regions.shape)} and words {tuple(words.shape)} must not be empty")
    check_word_mask(word_mask, words)
    for name, value in gammas.items():
        check_positive(name, value)


def region_word_loss(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, *,
                     gamma1: float = 5.0, gamma2: float = 5.0, gamma3: float = 50.0,
                     impl: str | None = None) -> torch.Tensor:
    """XMC-GAN's word loss over every (image i, caption j) pair of the batch.

    Args:
        regions: (B, R, d) image region features (XMC-GAN: D's 16x16 map through a conv1x1).
        words: (B, T, d) word features of the B captions (caption i describes image i).
        word_mask: (B, T) bool, True for real tokens (CLS/SEP count as words; only padding is
            False); every caption needs at least one real token.
        gamma1: sharpness of each word's attention over the regions.
        gamma2: sharpness of the log-sum-exp over words.
        gamma3: scale of the matching logits.
        impl: force a backend ("reference", ...); default: ``FASTXMC_IMPL``, else the fastest that fits.
    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs): cross-entropy over the rows of
        ``gamma3 * S`` plus over its columns, each averaged over the batch (the reference code
        sums the two directions). Gradients flow to regions and words.
    """
    _check(regions, words, word_mask, {"gamma1": gamma1, "gamma2": gamma2, "gamma3": gamma3})
    backend = _choose_backend(regions.device, regions.dtype, regions.shape[1], impl)
    logits = gamma3 * region_word_similarity(regions, words, word_mask, gamma1, gamma2,
                                             backend=backend)
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
