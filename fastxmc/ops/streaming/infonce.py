"""Streaming PyTorch implementation of the similarity-LSE core (the ``torch`` backend).

Rows are processed in chunks so that at most ``chunk x M`` similarities exist at once; the column
log-sum-exp is merged online across chunks (running max and rescaled sum). Works on any device.
The contract is the one of ``csrc/infonce/infonce.h``.
"""
from __future__ import annotations

import torch

# Elements of one similarity chunk (16M fp32 = 64 MB): bounded memory whatever N and M are.
CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_chunks(n: int, m: int):
    rows = max(1, min(n, CHUNK_ELEMENTS // max(m, 1)))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _excluded(start: int, stop: int, m: int, diag_offset: int, device) -> torch.Tensor:
    rows = torch.arange(start, stop, device=device).unsqueeze(1)
    return torch.arange(m, device=device).unsqueeze(0) == rows + diag_offset


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    # An empty set has lse = -inf; using 0 there keeps exp(-inf - 0) = 0 instead of NaN.
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def similarity_lse_forward_torch(a, b, scale, diag_offset: int, exclude_diag: bool, with_cols: bool):
    acc = _acc_dtype(a)
    a, b, s = a.to(acc), b.to(acc), scale.to(acc)
    n, m = a.shape[0], b.shape[0]
    row_lse = torch.empty(n, dtype=acc, device=a.device)
    col_max = torch.full((m,), float("-inf"), dtype=acc, device=a.device)
    col_sum = torch.zeros(m, dtype=acc, device=a.device)
    for start, stop in _row_chunks(n, m):
        sim = torch.mm(a[start:stop], b.T) * s
        if exclude_diag:
            sim = sim.masked_fill(_excluded(start, stop, m, diag_offset, a.device), float("-inf"))
        row_lse[start:stop] = torch.logsumexp(sim, dim=1)
        if with_cols:
            new_max = torch.maximum(col_max, sim.amax(dim=0)) if stop > start else col_max
            ref = _finite_or_zero(new_max)
            col_sum = col_sum * torch.exp(col_max - ref) + torch.exp(sim - ref).sum(dim=0)
            col_max = new_max
    if not with_cols:
        return row_lse, row_lse.new_empty(0)
    return row_lse, torch.log(col_sum) + _finite_or_zero(col_max)


def similarity_lse_backward_torch(grad_row, grad_col, a, b, scale, row_lse, col_lse,
                                  diag_offset: int, exclude_diag: bool, with_cols: bool):
    acc = _acc_dtype(a)
    a, b, s = a.to(acc), b.to(acc), scale.to(acc)
    n, m = a.shape[0], b.shape[0]
    grad_a = torch.empty_like(a)
    grad_b = torch.zeros_like(b)
    grad_scale = torch.zeros((), dtype=acc, device=a.device)
    row_ref = _finite_or_zero(row_lse.to(acc))
    col_ref = _finite_or_zero(col_lse.to(acc)) if with_cols else None
    for start, stop in _row_chunks(n, m):
        dots = torch.mm(a[start:stop], b.T)  # (rows, M) raw a_i . b_j
        sim = dots * s
        if exclude_diag:
            sim = sim.masked_fill(_excluded(start, stop, m, diag_offset, a.device), float("-inf"))
        dsim = torch.exp(sim - row_ref[start:stop, None]) * grad_row[start:stop, None].to(acc)
        if with_cols:
            dsim += torch.exp(sim - col_ref[None, :]) * grad_col[None, :].to(acc)
        grad_scale += (dsim * dots).sum()
        torch.mm(dsim, b, out=grad_a[start:stop])
        grad_b.addmm_(dsim.T, a[start:stop])
    # dS carries no scale factor yet: da = s dS b, db = s dS^T a.
    return grad_a.mul_(s), grad_b.mul_(s), grad_scale
