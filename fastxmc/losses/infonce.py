"""InfoNCE (CLIP-style, label-guided, distributed) and supervised contrastive losses.

The only O(N x M) work is the similarity log-sum-exp of :mod:`fastxmc.ops.infonce`, run by the
chosen backend; positives enter through per-target or per-class sums of embeddings
(``mean_p S_ip = a_i . sum_p b_p / (|P(i)| t)``), which cost O((N + M) D) and plain autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastxmc.losses import distributed as dist_ops
from fastxmc.losses import validation as check
from fastxmc.ops.infonce import registry, request_for, similarity_lse
from fastxmc.reference.infonce import info_nce_reference, supcon_reference


@torch._dynamo.assume_constant_result
def _choose_backend(device: torch.device, dtype: torch.dtype, impl, logits=None) -> str:
    # Evaluated eagerly while torch.compile traces (the choice reads files and the environment).
    return registry.select(request_for(device, dtype, logits), impl)


def _local_logits(logits):
    """The call's N x M for the size rule of :func:`request_for`, None in a compiled graph: its
    shapes may be symbolic there, and the size-independent choice (the kernels' custom ops) traces
    with fullgraph=True where the materialized reference's masked indexing does not."""
    return None if torch.compiler.is_compiling() else logits


# ---------------------------------------------------------------- positives without the N x M mask
def _class_ids(*label_sets: torch.Tensor) -> list:
    """Dense class ids shared by every label set (static shapes: safe under torch.compile)."""
    both = torch.cat([lab.reshape(-1) for lab in label_sets])
    values, order = torch.sort(both)
    starts = torch.ones_like(values, dtype=torch.long)
    starts[1:] = (values[1:] != values[:-1]).long()
    dense = torch.empty_like(starts).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    return list(torch.split(dense, [lab.numel() for lab in label_sets]))


def _bucket_sums(x: torch.Tensor, ids: torch.Tensor, buckets: int):
    """Per-bucket sums of the rows of ``x`` and per-bucket counts."""
    sums = x.new_zeros(buckets, x.shape[1]).index_add(0, ids, x)
    counts = x.new_zeros(buckets).index_add(0, ids, torch.ones_like(ids, dtype=x.dtype))
    return sums, counts


def _mean_positive(anchors, sums, counts, scale):
    """mean over an anchor's positives of S = scale * <anchor, positive>, and the positive count."""
    return scale * (anchors * sums).sum(1) / counts.clamp(min=1), counts


def _direction_terms(lse, pos_mean, counts):
    """Per-anchor loss (0 for anchors without positives) and the mask of anchors that count."""
    has_pos = counts > 0
    return torch.where(has_pos, lse - pos_mean, torch.zeros_like(lse)), has_pos


# ---------------------------------------------------------------- the global view of a batch
class _Batch:
    """Local rows and, under ``group=``, the global rows every rank contributes."""

    def __init__(self, group, device):
        self.group = group
        self.rank, self.world = dist_ops.world(group) if group is not None else (0, 1)
        self.device = device

    def layout(self, n: int):
        """Every rank's row count and this rank's offset in the concatenation."""
        sizes = [n] if self.group is None else dist_ops.gather_sizes(n, self.group, self.device)
        return sizes, sum(sizes[: self.rank])

    def gather(self, x, sizes):
        return x if self.group is None else dist_ops.gather_rows(x, sizes, self.group)

    def column_lse(self, partial):
        return partial if self.group is None else dist_ops.all_reduce_lse(partial, self.group)

    def total(self, x):
        return x if self.group is None else dist_ops.all_reduce_sum(x, self.group)

    def finish(self, local_share):
        """Global value on every rank; gradient ``world x`` the local share (DDP averages)."""
        if self.group is None:
            return local_share
        scaled = local_share * self.world
        return self.total(local_share) + scaled - scaled.detach()


def _reduce(terms, has_pos, reduction, batch: _Batch):
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    anchors = batch.total(has_pos.sum().to(terms.dtype))
    return total / anchors.clamp(min=1)


# ---------------------------------------------------------------- info_nce
def _check_info_nce(a, b, temperature, targets, labels, labels_b, reduction, symmetric, group):
    check.check_embeddings("a", a, allow_empty=group is not None)
    check.check_embeddings("b", b, dim=a.shape[1], allow_empty=group is not None)
    check.check_same("a", a, "b", b)
    check.check_temperature(temperature)
    check.check_reduction(reduction)
    n, m = a.shape[0], b.shape[0]
    if targets is not None and labels is not None:
        raise ValueError("pass either targets or labels, not both")
    if labels_b is not None and labels is None:
        raise ValueError("labels_b needs labels (the labels of a)")
    if targets is not None:
        check.check_index_vector("targets", targets, n, a.device, upper=m)
    elif labels is not None:
        check.check_index_vector("labels", labels, n, a.device)
        if labels_b is not None:
            check.check_index_vector("labels_b", labels_b, m, a.device)
        elif n != m:
            raise ValueError(f"labels alone pairs a and b row by row, so a and b need equal rows "
                             f"(got {n} and {m}); pass labels_b for b's labels")
    elif n != m:
        raise ValueError(f"a has {n} rows and b has {m}: without targets or labels row i pairs "
                         "with column i, which needs equal rows; pass targets= or labels=")
    if reduction == "none" and symmetric:
        raise ValueError("reduction='none' returns per-anchor losses of one direction; "
                         "pass symmetric=False")
    if group is not None and not torch.distributed.is_initialized():
        raise ValueError("group= needs an initialized torch.distributed process group")


def _scale_of(temperature, like: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        return temperature.to(device=like.device, dtype=acc).reshape(()).reciprocal()
    return torch.tensor(1.0 / temperature, dtype=acc, device=like.device)


def _info_nce_positives(a, b, a_all, b_all, targets, labels, labels_b, batch, off_a, off_b,
                        sizes_a, sizes_b, scale):
    """Row positives for the local rows of a and column positives for the local rows of b."""
    n, m = a.shape[0], b.shape[0]
    if labels is not None:
        labels_b = labels if labels_b is None else labels_b
        la_all = batch.gather(labels.reshape(-1), sizes_a)
        lb_all = batch.gather(labels_b.reshape(-1), sizes_b)
        ids_a, ids_b = _class_ids(la_all, lb_all)
        buckets = ids_a.numel() + ids_b.numel()
        sums_b, counts_b = _bucket_sums(b_all, ids_b, buckets)
        sums_a, counts_a = _bucket_sums(a_all, ids_a, buckets)
        own_a, own_b = ids_a[off_a:off_a + n], ids_b[off_b:off_b + m]
        return (_mean_positive(a, sums_b[own_a], counts_b[own_a], scale),
                _mean_positive(b, sums_a[own_b], counts_a[own_b], scale))
    if targets is None:
        targets = torch.arange(n, device=a.device)
    global_targets = batch.gather(targets.long() + off_b, sizes_a)  # rows -> global columns
    row_pos = scale * (a * b_all[global_targets[off_a:off_a + n]]).sum(1)
    sums_a, counts_a = _bucket_sums(a_all, global_targets, b_all.shape[0])
    col = _mean_positive(b, sums_a[off_b:off_b + m], counts_a[off_b:off_b + m], scale)
    return (row_pos, torch.ones_like(row_pos)), col


def info_nce(a, b, temperature=0.1, *, targets=None, labels=None, labels_b=None, symmetric=True,
             normalize=True, reduction="mean", group=None, impl=None):
    """Contrastive cross-entropy between two sets of embeddings (CLIP / XMC-GAN / label-guided).

    Args:
        a: (N, D) float32/float16/bfloat16/float64 embeddings (anchors of the a->b direction);
            any strides. Low precision inputs accumulate in fp32.
        b: (M, D) embeddings, same dtype and device.
        temperature: positive float, or a scalar tensor that receives a gradient (e.g.
            ``logit_scale.exp().reciprocal()``). Logits are ``S = a @ b.T / temperature``.
        targets: (N,) integer column index of row i's positive (default ``arange(N)``, N == M).
        labels: (N,) integer labels of a; every pair with equal labels is a positive.
        labels_b: (M,) labels of b (default: ``labels``).
        symmetric: mean of the a->b and b->a directions (the latter anchors on b's rows with the
            transposed positives); False gives a->b only.
        normalize: L2-normalize a and b first (plain autograd, outside the fused core).
        reduction: "mean" over anchors that have a positive, "sum", or "none" (per-anchor losses
            of a->b, 0 for anchors without a positive; needs symmetric=False).
        group: a torch.distributed process group: each rank passes its local rows, negatives
            come from every rank, labels travel with their rows, and targets index the local b.
            Returns the loss of the concatenated global batch on every rank; backward yields
            ``world_size x`` this rank's share so that DDP's gradient averaging gives exactly the
            single-process gradient of the global loss (temperature included).
        impl: force a backend ("reference", "torch", "cpu", "triton", "cuda", or
            "triton-atomic", whose grad_b is not deterministic); default: the
            ``FASTXMC_IMPL`` environment variable, else the fastest that fits.

    Per anchor: ``logsumexp_j S_ij - mean_{p in P(i)} S_ip``; anchors without a positive are left
    out of the mean. Note XMC-GAN sums the two directions: that is ``2 * info_nce(...)``.
    """
    _check_info_nce(a, b, temperature, targets, labels, labels_b, reduction, symmetric, group)
    local = None if group is not None else _local_logits(a.shape[0] * b.shape[0])
    backend = _choose_backend(a.device, a.dtype, impl, local)
    batch = _Batch(group, a.device)
    if backend == "reference":
        return _info_nce_reference_global(a, b, temperature, targets, labels, labels_b, symmetric,
                                          normalize, reduction, batch)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    scale = _scale_of(temperature, a)
    sizes_a, off_a = batch.layout(a.shape[0])
    sizes_b, off_b = batch.layout(b.shape[0])
    a_all, b_all = batch.gather(a, sizes_a), batch.gather(b, sizes_b)
    row_lse, col_partial = similarity_lse(a, b_all, scale, backend=backend, with_cols=symmetric)
    af, bf, af_all, bf_all = (x.to(row_lse.dtype) for x in (a, b, a_all, b_all))
    row_pos, col_pos = _info_nce_positives(af, bf, af_all, bf_all, targets, labels, labels_b,
                                           batch, off_a, off_b, sizes_a, sizes_b, scale)
    row_terms, row_has = _direction_terms(row_lse, *row_pos)
    loss = _reduce(row_terms, row_has, reduction, batch)
    if symmetric:
        col_lse = batch.column_lse(col_partial)[off_b:off_b + b.shape[0]]
        col_terms, col_has = _direction_terms(col_lse, *col_pos)
        loss = (loss + _reduce(col_terms, col_has, reduction, batch)) / 2
    return loss if reduction == "none" else batch.finish(loss)


def _info_nce_reference_global(a, b, temperature, targets, labels, labels_b, symmetric,
                               normalize, reduction, batch: _Batch):
    """The oracle; under ``group=`` it gathers everything (with gradients) and computes the global
    loss on every rank, which is what open_clip's ``gather_with_grad`` does."""
    sizes_a, off_a = batch.layout(a.shape[0])
    sizes_b, off_b = batch.layout(b.shape[0])
    if targets is None and labels is None and batch.group is not None:
        targets = torch.arange(a.shape[0], device=a.device)
    if targets is not None:
        targets = batch.gather(targets.long() + off_b, sizes_a)
    if labels is not None:
        labels_b = batch.gather((labels if labels_b is None else labels_b).reshape(-1), sizes_b)
        labels = batch.gather(labels.reshape(-1), sizes_a)
    loss = info_nce_reference(batch.gather(a, sizes_a), batch.gather(b, sizes_b), temperature,
                              targets=targets, labels=labels, labels_b=labels_b,
                              symmetric=symmetric, normalize=normalize, reduction=reduction)
    if reduction == "none" and batch.group is not None:
        return loss[off_a:off_a + a.shape[0]]
    return loss


# ---------------------------------------------------------------- supcon
def supcon(features, labels, temperature=0.07, *, normalize=True, reduction="mean", group=None,
           impl=None):
    """Supervised contrastive loss within one set of embeddings (Khosla et al. 2020, one view).

    Args:
        features: (N, D) float embeddings; labels: (N,) integer labels.
        temperature, normalize, group, impl: as in :func:`info_nce`.
        reduction: "mean" over anchors with at least one positive, "sum", or "none" (per anchor,
            0 where an anchor has no positive).

    Per anchor i: ``logsumexp_{j != i} S_ij - mean_{p != i, y_p = y_i} S_ip``, ``S = f f^T / t``.
    Equals pytorch-metric-learning's ``SupConLoss(temperature)`` (which also drops anchors without
    positives) and HobbitLong SupContrast's ``SupConLoss`` with one view and
    ``base_temperature == temperature``, except that SupContrast counts anchors without positives
    in the mean (as 0, or NaN in its older releases) where fastxmc leaves them out.
    """
    check.check_embeddings("features", features, allow_empty=group is not None)
    check.check_index_vector("labels", labels, features.shape[0], features.device)
    check.check_temperature(temperature)
    check.check_reduction(reduction)
    local = None if group is not None else _local_logits(features.shape[0] ** 2)
    backend = _choose_backend(features.device, features.dtype, impl, local)
    batch = _Batch(group, features.device)
    sizes, offset = batch.layout(features.shape[0])
    if backend == "reference":
        loss = supcon_reference(batch.gather(features, sizes), batch.gather(labels, sizes),
                                temperature, normalize=normalize, reduction=reduction)
        return loss[offset:offset + features.shape[0]] if reduction == "none" else loss
    f = F.normalize(features, dim=1) if normalize else features
    scale = _scale_of(temperature, f)
    f_all = batch.gather(f, sizes)
    lse, _ = similarity_lse(f, f_all, scale, backend=backend, diag_offset=offset,
                            exclude_diag=True, with_cols=False)
    ff, ff_all = f.to(lse.dtype), f_all.to(lse.dtype)
    (ids,) = _class_ids(batch.gather(labels.reshape(-1), sizes))
    sums, counts = _bucket_sums(ff_all, ids, ids.numel())
    own = ids[offset:offset + f.shape[0]]
    # Positives exclude the anchor itself: remove it from its class sum and count.
    pos_mean, pos_count = _mean_positive(ff, sums[own] - ff, counts[own] - 1, scale)
    terms, has_pos = _direction_terms(lse, pos_mean, pos_count)
    loss = _reduce(terms, has_pos, reduction, batch)
    return loss if reduction == "none" else batch.finish(loss)


# ---------------------------------------------------------------- module forms
class _ContrastiveModule(nn.Module):
    """Holds a fixed temperature or a learnable CLIP-style logit scale (``exp`` clamped)."""

    def __init__(self, temperature: float, learnable: bool, max_logit_scale: float):
        super().__init__()
        check.check_temperature(temperature)
        self.max_log_scale = math.log(max_logit_scale)
        if learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.register_parameter("logit_scale", None)
            self.fixed_temperature = float(temperature)

    def temperature(self):
        if self.logit_scale is None:
            return self.fixed_temperature
        # CLIP caps the logit scale at 100; clamping keeps the temperature >= 1/100.
        return torch.exp(-self.logit_scale.clamp(max=self.max_log_scale))


class InfoNCELoss(_ContrastiveModule):
    """Module form of :func:`info_nce`; ``learnable=True`` trains a logit scale like CLIP."""

    def __init__(self, temperature=0.07, *, learnable=False, max_logit_scale=100.0, symmetric=True,
                 normalize=True, reduction="mean", group=None, impl=None):
        super().__init__(temperature, learnable, max_logit_scale)
        self.options = dict(symmetric=symmetric, normalize=normalize, reduction=reduction,
                            group=group, impl=impl)

    def forward(self, a, b, targets=None, labels=None, labels_b=None):
        return info_nce(a, b, self.temperature(), targets=targets, labels=labels,
                        labels_b=labels_b, **self.options)


class SupConLoss(_ContrastiveModule):
    """Module form of :func:`supcon`."""

    def __init__(self, temperature=0.07, *, learnable=False, max_logit_scale=100.0, normalize=True,
                 reduction="mean", group=None, impl=None):
        super().__init__(temperature, learnable, max_logit_scale)
        self.options = dict(normalize=normalize, reduction=reduction, group=group, impl=impl)

    def forward(self, features, labels):
        return supcon(features, labels, self.temperature(), **self.options)
