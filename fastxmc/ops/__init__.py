"""Fused ops: one file per op family, each with a backend registry (see :mod:`fastxmc.ops.registry`).

Public entry points: :func:`word_attention` and :func:`modulated_batch_norm` (the generator's
attention and modulation); the contrastive losses live in :mod:`fastxmc.losses`.
"""
from fastxmc.ops.modulated_bn import modulated_batch_norm
from fastxmc.ops.word_attention import word_attention

__all__ = ["word_attention", "modulated_batch_norm"]
