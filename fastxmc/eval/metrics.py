"""Image-generation metrics computed from features, probabilities or similarity scores.

Every function here is independent of the feature extractor, so the same code scores InceptionV3
features (``fid_inception``) and dual-encoder features (``fid_dual``):

- :class:`FeatureStats`: streaming mean and covariance (float64, Chan's pairwise update), so 30k
  samples never need all their features in memory; optionally keeps the first rows for KID.
- :func:`frechet_distance`: ``|m1 - m2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (FID), with the matrix
  square root taken through symmetric eigen-decompositions in float64.
- :func:`kernel_inception_distance`: the unbiased MMD^2 estimator with the polynomial kernel
  ``(gamma <x, y> + coef0)^degree`` averaged over random subsets (Binkowski et al. 2018, the
  defaults of torch-fidelity: 100 subsets of 1000, degree 3, gamma = 1 / dim, coef0 = 1).
- :func:`inception_score`: ``exp(E_x KL(p(y|x) || p(y)))`` over contiguous splits.
- :func:`r_precision`: the AttnGAN / DM-GAN protocol: every image is ranked against its own
  caption and ``num_mismatched`` (99) captions of other images; the hit rate is reported as the
  mean and standard deviation over folds.

Means and standard deviations over splits, subsets and folds use the population std (``ddof=0``),
as the reference implementations do (``numpy.std``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FeatureStats", "frechet_distance", "fid_from_stats", "polynomial_kernel", "mmd2_unbiased",
    "kernel_inception_distance", "inception_score", "sample_mismatched", "r_precision_hits",
    "fold_mean_std", "r_precision_from_scores", "r_precision",
]


def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x.detach().to("cpu", torch.float64)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


# ---------------------------------------------------------------------------- feature statistics
class FeatureStats:
    """Running mean and covariance of feature rows, merged batch by batch.

    ``update(features)`` takes (B, D) rows of any float dtype on any device; the statistics are
    kept in float64 on the CPU and merged with Chan et al.'s pairwise formula (batch mean and
    centred scatter), which stays accurate when the features have a large common offset.
    ``keep`` > 0 also stores the first ``keep`` rows (float32), e.g. for KID.
    """

    def __init__(self, keep: int = 0):
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be an integer >= 0, got {keep!r}")
        self.keep = keep
        self.num = 0
        self._mean: torch.Tensor | None = None      # (D,) float64
        self._scatter: torch.Tensor | None = None   # (D, D) float64: sum of centred outer products
        self._kept: list[torch.Tensor] = []
        self._num_kept = 0

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else self._mean.numel()

    def update(self, features: torch.Tensor) -> None:
        x = _as_float64(features, "features")
        _check_rows(x, "features")
        if self._mean is not None and x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} columns, earlier batches had {self.dim}")
        if x.shape[0] == 0:
            return
        self._keep_rows(x)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None:
            self._mean, self._scatter, self.num = mean_b, scatter_b, n_b
            return
        total = self.num + n_b
        delta = mean_b - self._mean
        self._scatter = self._scatter + scatter_b + torch.outer(delta, delta) * (self.num * n_b / total)
        self._mean = self._mean + delta * (n_b / total)
        self.num = total

    def _keep_rows(self, x: torch.Tensor) -> None:
        room = self.keep - self._num_kept
        if room > 0:
            rows = x[:room].float()
            self._kept.append(rows)
            self._num_kept += rows.shape[0]

    def _require(self, minimum: int) -> None:
        if self.num < minimum:
            raise ValueError(f"FeatureStats holds {self.num} rows; at least {minimum} are needed")

    def mean(self) -> torch.Tensor:
        """(D,) float64 mean of every row seen."""
        self._require(1)
        return self._mean.clone()

    def covariance(self) -> torch.Tensor:
        """(D, D) float64 unbiased covariance (divides by N - 1, like ``numpy.cov``)."""
        self._require(2)
        return self._scatter / (self.num - 1)

    def kept(self) -> torch.Tensor:
        """(min(N, keep), D) float32: the first rows seen, in order."""
        if not self._kept:
            raise ValueError("FeatureStats kept no rows (construct it with keep > 0 and update it)")
        return torch.cat(self._kept)

    def state_dict(self) -> dict:
        """Plain tensors and ints (safe for ``torch.load(weights_only=True)``): for caching the
        statistics of a reference set."""
        self._require(1)
        state = {"num": self.num, "keep": self.keep, "mean": self._mean, "scatter": self._scatter}
        if self._kept:
            state["kept"] = self.kept()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStats":
        stats = cls(keep=int(state["keep"]))
        stats.num = int(state["num"])
        stats._mean = state["mean"].to(torch.float64)
        stats._scatter = state["scatter"].to(torch.float64)
        if "kept" in state:
            stats._kept = [state["kept"].float()]
            stats._num_kept = state["kept"].shape[0]
        return stats


# ---------------------------------------------------------------------------- Frechet distance
def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2.

    S1 S2 is not symmetric, but it is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD:
    both have the same (non-negative) eigenvalues, so the trace of the square root is the sum of
    their square roots. This avoids the complex intermediate values of a general ``sqrtm``.
    """
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    values = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return values.clamp(min=0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

    mu: (D,), sigma: (D, D) symmetric PSD; tensors or numpy arrays, computed in float64.
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same size, got {tuple(mu1.shape)} "
                         f"and {tuple(mu2.shape)}")
    d = mu1.numel()
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    diff = mu1 - mu2
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * _trace_sqrt_product(sigma1, sigma2)
    return float(value)


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """:func:`frechet_distance` between the Gaussians fitted by two :class:`FeatureStats`."""
    return frechet_distance(stats1.mean(), stats1.covariance(), stats2.mean(), stats2.covariance())


# ---------------------------------------------------------------------------- KID
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """(N, M) kernel matrix ``(gamma <x_i, y_j> + coef0) ** degree``; gamma defaults to 1 / D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 from the three (m, m) kernel matrices of two equally sized samples.

    ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
    - 2 sum_{i, j} k(x_i, y_j) / m^2`` (the estimator of Binkowski et al. and torch-fidelity).
    """
    m = k_xx.shape[0]
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(features1, features2, *, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of :func:`mmd2_unbiased`.

    features1 (N1, D), features2 (N2, D). Each subset draws ``subset_size`` rows of each set
    without replacement (a ``torch.Generator`` seeded with ``seed``: deterministic).
    Returns ``(mean, std)`` as floats.
    """
    x, y = _as_float64(features1, "features1"), _as_float64(features2, "features2")
    _check_rows(x, "features1")
    _check_rows(y, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features1 and features2 must have the same width, got {x.shape[1]} "
                         f"and {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(x.shape[0], y.shape[0]):
        raise ValueError(f"subset_size must be in [2, min(N1, N2) = {min(x.shape[0], y.shape[0])}], "
                         f"got {subset_size}: pass a smaller subset_size or more samples")
    def kernel(a, b):
        return polynomial_kernel(a, b, degree, gamma, coef0)

    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:subset_size]]
        ys = y[torch.randperm(y.shape[0], generator=generator)[:subset_size]]
        values[s] = mmd2_unbiased(kernel(xs, xs), kernel(xs, ys), kernel(ys, ys))
    return float(values.mean()), float(values.std(unbiased=False))


# ---------------------------------------------------------------------------- Inception Score
def inception_score(probabilities, *, splits: int = 10) -> tuple[float, float]:
    """IS = exp(mean_x KL(p(y|x) || p(y))) per split; returns (mean, std) over the splits.

    probabilities: (N, C), rows are class distributions (softmax outputs). The rows are split
    into ``splits`` contiguous parts (as in the original Inception Score code; shuffle first if
    the order of the samples follows their content); p(y) is each part's mean row.
    """
    p = _as_float64(probabilities, "probabilities")
    _check_rows(p, "probabilities")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-3):
        raise ValueError("probabilities must be non-negative rows that sum to 1 (apply softmax to logits)")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N = {p.shape[0]}], got {splits}")
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal)).sum(1)
        scores.append(math.exp(float(kl.mean())))
    scores = torch.tensor(scores, dtype=torch.float64)
    return float(scores.mean()), float(scores.std(unbiased=False))


# ---------------------------------------------------------------------------- R-precision
def _as_groups(groups, n: int) -> torch.Tensor:
    if groups is None:
        return torch.arange(n)
    groups = torch.as_tensor(groups)
    if groups.shape != (n,) or groups.is_floating_point():
        raise ValueError(f"groups must be an integer tensor of shape ({n},), got "
                         f"{tuple(groups.shape)} {groups.dtype}")
    return groups.cpu().long()


def sample_mismatched(groups: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """(N, num) row indices: for row i, ``num`` draws (with replacement, uniform) among the rows
    j whose group differs from row i's group.

    Exact and vectorised: rows are sorted by group, so a row's eligible set is everything outside
    its group's contiguous range [start, end) of the sorted order; a uniform draw r over the
    ``N - (end - start)`` eligible positions maps to ``r`` if ``r < start`` else ``r + end - start``.
    """
    n = groups.numel()
    sorted_groups, order = torch.sort(groups, stable=True)
    start = torch.searchsorted(sorted_groups, groups, right=False)
    end = torch.searchsorted(sorted_groups, groups, right=True)
    eligible = n - (end - start)
    if (eligible == 0).any():
        raise ValueError("every row shares its group: there are no mismatched captions to draw")
    u = torch.rand(n, num, generator=generator, dtype=torch.float64)
    r = (u * eligible[:, None]).long().clamp(max=(eligible - 1)[:, None])
    position = torch.where(r < start[:, None], r, r + (end - start)[:, None])
    return order[position]


def r_precision_hits(true_scores: torch.Tensor, mismatched_scores: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the true caption scores strictly above every mismatched one (R = 1).

    true_scores (N,), mismatched_scores (N, M). Ties count as misses, so a constant encoder
    scores 0 (AttnGAN's ``argmax == 0`` would count them as hits).
    """
    if true_scores.dim() != 1 or mismatched_scores.dim() != 2 or \
            mismatched_scores.shape[0] != true_scores.shape[0]:
        raise ValueError(f"expected true_scores (N,) and mismatched_scores (N, M), got "
                         f"{tuple(true_scores.shape)} and {tuple(mismatched_scores.shape)}")
    return true_scores > mismatched_scores.max(1).values


def fold_mean_std(values: torch.Tensor, folds: int, generator: torch.Generator) -> tuple[float, float]:
    """Shuffle ``values`` (N,), split into ``folds`` near-equal parts; mean and std of the part means."""
    if not 1 <= folds <= values.numel():
        raise ValueError(f"folds must be in [1, N = {values.numel()}], got {folds}")
    shuffled = values.double()[torch.randperm(values.numel(), generator=generator)]
    means = torch.stack([part.mean() for part in torch.tensor_split(shuffled, folds)])
    return float(means.mean()), float(means.std(unbiased=False))


def r_precision_from_scores(true_scores: torch.Tensor, mismatched_scores: torch.Tensor, *,
                            folds: int = 10, seed: int = 0) -> dict:
    """R-precision from precomputed scores: ``{"mean", "std", "n", "folds"}`` (see
    :func:`r_precision_hits` and :func:`fold_mean_std`)."""
    hits = r_precision_hits(true_scores, mismatched_scores)
    mean, std = fold_mean_std(hits, folds, torch.Generator().manual_seed(seed))
    return {"mean": mean, "std": std, "n": int(hits.numel()), "folds": folds}


def _gathered_scores(img: torch.Tensor, txt: torch.Tensor, others: torch.Tensor,
                     chunk: int = 256) -> torch.Tensor:
    """(N, M) scores ``<img_i, txt_others[i, m]>``, in row chunks so that the gathered
    (chunk, M, E) caption block stays small (30k x 99 x E at once would take gigabytes)."""
    parts = [torch.einsum("ne,nme->nm", img[i:i + chunk], txt[others[i:i + chunk]])
             for i in range(0, img.shape[0], chunk)]
    return torch.cat(parts)


def r_precision(image_features, text_features, *, groups=None, num_mismatched: int = 99,
                folds: int = 10, seed: int = 0) -> dict:
    """R-precision (R = 1) with the AttnGAN / DM-GAN protocol, from embeddings.

    image_features (N, E): the encoded generated images; text_features (N, E): the encoded
    caption each image was generated from (row i of both belong together). Scores are cosine
    similarities. Every image is ranked against its caption and ``num_mismatched`` captions drawn
    from the other rows; rows in the same ``groups`` entry (N,) ints are never drawn as each
    other's mismatches (pass the source image index when several captions of one image are
    evaluated, or the class label as AttnGAN does on CUB); by default only the row itself is
    excluded. Deterministic for a given ``seed``.

    Returns ``{"mean", "std", "n", "folds"}``: the hit rate averaged over ``folds`` random folds.
    """
    img, txt = _as_float64(image_features, "image_features"), _as_float64(text_features, "text_features")
    _check_rows(img, "image_features")
    _check_rows(txt, "text_features")
    if img.shape != txt.shape:
        raise ValueError(f"image_features and text_features must have the same shape, got "
                         f"{tuple(img.shape)} and {tuple(txt.shape)}")
    if num_mismatched < 1:
        raise ValueError(f"num_mismatched must be >= 1, got {num_mismatched}")
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    generator = torch.Generator().manual_seed(seed)
    others = sample_mismatched(_as_groups(groups, img.shape[0]), num_mismatched, generator)
    true_scores = (img * txt).sum(1)
    mismatched_scores = _gathered_scores(img, txt, others)
    hits = r_precision_hits(true_scores, mismatched_scores)
    mean, std = fold_mean_std(hits, folds, generator)
    return {"mean": mean, "std": std, "n": int(hits.numel()), "folds": folds}
