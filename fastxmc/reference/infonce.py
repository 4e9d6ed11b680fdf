"""Materialized plain-PyTorch InfoNCE and SupCon: the oracle every fused backend is tested against.

These build the full N x M logits and positive mask and apply the definitions literally, sharing
no code with the fused path (:mod:`fastxmc.losses.infonce`), so the two check each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(n: int, m: int, targets=None, labels=None, labels_b=None, device=None):
    """(n, m) bool: which pairs are positives (targets, equal labels, or the diagonal)."""
    if labels is not None:
        labels_b = labels if labels_b is None else labels_b
        return labels.reshape(-1, 1) == labels_b.reshape(1, -1)
    if targets is None:
        targets = torch.arange(n, device=device)
    return F.one_hot(targets.long(), m).bool()


def _anchor_losses(logits: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor | None = None):
    """Per-row ``lse(allowed logits) - mean(positive logits)`` and whether the row has positives."""
    if allowed is not None:
        logits_lse = logits.masked_fill(~allowed, float("-inf"))
    else:
        logits_lse = logits
    count = pos.sum(dim=1)
    has_pos = count > 0
    pos_mean = (logits * pos).sum(dim=1) / count.clamp(min=1)
    lse = torch.logsumexp(logits_lse[has_pos], dim=1)
    losses = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    losses = losses.index_put((has_pos.nonzero().squeeze(1),), lse - pos_mean[has_pos])
    return losses, has_pos


def _reduce(losses, has_pos, reduction: str):
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / has_pos.sum().clamp(min=1)


def info_nce_reference(a, b, temperature=0.1, *, targets=None, labels=None, labels_b=None,
                       symmetric=True, normalize=True, reduction="mean"):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(acc), b.to(acc)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = (a @ b.T) / temperature
    pos = positive_mask(a.shape[0], b.shape[0], targets, labels, labels_b, a.device)
    row = _reduce(*_anchor_losses(logits, pos), reduction)
    if not symmetric:
        return row
    col = _reduce(*_anchor_losses(logits.T, pos.T), reduction)
    return (row + col) / 2


def supcon_reference(features, labels, temperature=0.07, *, normalize=True, reduction="mean"):
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(acc)
    if normalize:
        f = F.normalize(f, dim=1)
    logits = (f @ f.T) / temperature
    not_self = ~torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    pos = (labels.reshape(-1, 1) == labels.reshape(1, -1)) & not_self
    return _reduce(*_anchor_losses(logits, pos, allowed=not_self), reduction)
