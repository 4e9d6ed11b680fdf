"""Materialized oracle of the fused core shared by every InfoNCE/SupCon backend.

``S = scale * a @ b.T``; pairs ``(i, i + diag_offset)`` are dropped when ``exclude_diag``.
Returns the row and column log-sum-exp (fp32, ``-inf`` for an empty set). Autograd through this
function gives the gradients the fused backwards must reproduce (see ``csrc/infonce/infonce.h``).
"""
from __future__ import annotations

import torch


def self_pair_mask(n: int, m: int, diag_offset: int, device) -> torch.Tensor:
    """(n, m) bool, True on the excluded self pairs ``j == i + diag_offset``."""
    rows = torch.arange(n, device=device).unsqueeze(1)
    cols = torch.arange(m, device=device).unsqueeze(0)
    return cols == rows + diag_offset


def similarity_lse_reference(a, b, scale, diag_offset: int = 0, exclude_diag: bool = False,
                             with_cols: bool = True):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = (a.to(acc) @ b.to(acc).T) * scale.to(acc)
    if exclude_diag:
        s = s.masked_fill(self_pair_mask(a.shape[0], b.shape[0], diag_offset, a.device), float("-inf"))
    row = torch.logsumexp(s, dim=1)
    col = torch.logsumexp(s, dim=0) if with_cols else s.new_empty(0)
    return row, col
