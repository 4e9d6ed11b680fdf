"""Differentiable collectives for the ``group=`` losses (local rows against global columns).

Gradient convention: DDP averages parameter gradients over ranks, so the losses return, on every
rank, the global loss value while back-propagating ``world_size x`` this rank's share of it. The
gathers below therefore *sum* the gradients that every rank computes for a gathered slice back onto
the rank that owns it; after DDP's averaging each parameter gradient equals the single-process
gradient on the concatenated batch (the temperature's included, not scaled by world size).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world(group) -> tuple[int, int]:
    """(rank, world size) within ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(n: int, group, device) -> list:
    """Every rank's local row count (ranks may hold different numbers of rows)."""
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(x: torch.Tensor, sizes: list, group) -> torch.Tensor:
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # Sum every rank's gradient for the global tensor, then keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start:start + ctx.sizes[rank]], None, None


def gather_rows(x: torch.Tensor, sizes: list, group) -> torch.Tensor:
    """Concatenate every rank's rows; differentiable when ``x`` requires grad."""
    if x.requires_grad:
        return _GatherRows.apply(x, sizes, group)
    return _all_gather_padded(x, sizes, group)


class _AllReduceLSE(torch.autograd.Function):
    """logsumexp over ranks of per-rank partial log-sum-exps (the column statistics)."""

    @staticmethod
    def forward(ctx, partial, group):
        peak = partial.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        ref = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = torch.exp(partial - ref)
        dist.all_reduce(total, group=group)
        out = torch.log(total) + ref
        ctx.save_for_backward(partial, out)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad):
        partial, out = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        weight = torch.exp(partial - torch.where(torch.isfinite(out), out, torch.zeros_like(out)))
        return grad * weight, None


def all_reduce_lse(partial: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceLSE.apply(partial, group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of a tensor that needs no gradient (counts, loss values)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x
