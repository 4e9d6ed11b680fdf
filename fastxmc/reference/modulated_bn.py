"""Materialized oracle of the modulated batch norm: the plain PyTorch composition.

``y = BN_noaffine(x) * (1 + gamma) + beta`` (then ReLU when ``relu``), x (B, C, H, W), gamma/beta
(B, C) per channel or (B, C, H, W) per pixel. ``F.batch_norm`` owns the statistics and the running
buffer update (PyTorch's momentum convention, unbiased running variance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modulated_batch_norm_reference(x, gamma, beta, running_mean=None, running_var=None, *,
                                   training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                                   relu: bool = False) -> torch.Tensor:
    if gamma.dim() == 2:
        gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
    normalized = F.batch_norm(x, running_mean, running_var, None, None, training, momentum, eps)
    y = normalized * (1 + gamma) + beta
    return torch.relu(y) if relu else y
