"""Diversity of generated images: k-NN manifold metrics, and the spread of G's samples across z.

FID, KID, R-precision and attribute accuracy all reward one good image per caption, so a generator
whose samples barely change with the noise scores well on each of them. The instruments here
measure what they cannot see.

**Precision, recall, density and coverage** (:func:`prdc`) of a fake feature set Y (M rows)
against a real one X (N rows). Each sample gets the ball whose radius ``NND_k`` is the distance to
its k-th nearest neighbour among the other samples of its own set:

- precision = 1/M sum_j 1[y_j lies in some real ball]  (Kynkäänniemi et al. 2019, k = 3)
- recall    = 1/N sum_i 1[x_i lies in some fake ball]  (Kynkäänniemi et al. 2019, k = 3)
- density   = 1/(k M) sum_j (number of real balls holding y_j)  (Naeem et al. 2020, k = 5)
- coverage  = 1/N sum_i 1[the real ball of x_i holds some y_j]  (Naeem et al. 2020, k = 5)

Balls are closed (``distance <= radius``). Precision and density measure fidelity, recall and
coverage diversity: fakes that are all one image have recall ~0 (their balls have radius 0).

What two samples of one distribution score, at finite N and M:

- density: expectation exactly 1. A fresh sample is exchangeable with the other N - 1 points a
  real ball is measured against, so each of the N balls holds it with probability k / N.
- coverage: expectation 1 - prod_{i=1..k} (N - i) / (N + M - i) (Naeem et al.), about 1 - 2^-k
  (0.969 for k = 5) when M = N.
- precision and recall: below 1, by an amount that grows with the dimension. Measured for
  N = M = 1000 standard normals with k = 3: about 0.98 in 2-D, 0.89 in 8-D and 0.62 in 64-D.
  Read them against the same metrics of two halves of the real set (the evaluation reports both).

Distances are Euclidean, computed in float64 from features centred on the real mean, one block of
at most ``chunk_size`` rows against a whole set at a time, so memory stays at
``chunk_size * max(N, M)`` values whatever N and M are.

**Per-caption spread** (:func:`z_spread`, :class:`SpreadMeter`): the spread of a group of m >= 2
images is the per-element standard deviation across the group (Bessel-corrected, ddof = 1),
averaged over the elements (pixels and channels, or feature dimensions); a set of groups reports
the mean over its groups. ``z_spread`` takes one group per caption: G's samples of that caption
under ``n_z`` noise vectors. ``real_spread`` is the same statistic over groups of real images that
belong together (:func:`real_spread_groups` says which: one label, or one caption on data
without labels), so that ``z_spread / real_spread`` near 1 means the samples of one caption vary
as much as those real images do, and near 0 that G ignores z.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from fastxmc.eval.metrics import _as_float64, _check_rows

__all__ = [
    "K_PRECISION", "K_DENSITY", "pairwise_distances", "kth_neighbour_distances", "prdc",
    "precision_recall", "density_coverage", "expected_coverage", "element_spread", "SpreadMeter",
    "generate_across_z", "z_spread", "real_spread_groups",
]

K_PRECISION = 3   # Kynkäänniemi et al.'s k for precision and recall
K_DENSITY = 5     # Naeem et al.'s k for density and coverage
_BLOCK_ELEMENTS = 1 << 22   # float64 distances per block by default: 32 MiB


# ---------------------------------------------------------------------------- distances
def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) Euclidean distances between the rows of ``a`` (n, D) and ``b`` (m, D), float64.

    ``|a|^2 + |b|^2 - 2 <a, b>`` through one matrix product, clamped at 0 before the root; in
    float64 on features centred near their mean the cancellation error is far below any k-NN
    radius of distinct points.
    """
    a, b = a.double(), b.double()
    squared = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return squared.clamp_(min=0).sqrt_()


def _block_rows(chunk_size: int | None, columns: int) -> int:
    if chunk_size is None:
        return max(1, _BLOCK_ELEMENTS // max(1, columns))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _blocks(n: int, rows: int):
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def _check_k(k, name: str, rows: int, set_name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    if rows <= k:
        raise ValueError(f"{name}={k} needs more than {k} rows of {set_name}, got {rows}")


def _kth_neighbours(x: torch.Tensor, ks: Sequence[int], chunk_size: int | None) -> torch.Tensor:
    """(N, len(ks)) float64: each row's distance to its k-th nearest other row, for each k."""
    top = max(ks) + 1   # the row itself is among the smallest distances, at 0
    index = torch.tensor(list(ks))
    parts = []
    for rows in _blocks(x.shape[0], _block_rows(chunk_size, x.shape[0])):
        smallest = pairwise_distances(x[rows], x).topk(top, dim=1, largest=False).values
        parts.append(smallest[:, index])
    return torch.cat(parts)


def kth_neighbour_distances(features, k: int, *, chunk_size: int | None = None) -> torch.Tensor:
    """(N,) float64: the distance of each row of ``features`` (N, D) to its k-th nearest neighbour
    among the other rows (``NND_k``, the radius of its k-NN ball). Duplicated rows are distinct
    neighbours at distance 0."""
    x = _as_float64(features, "features")
    _check_rows(x, "features")
    _check_k(k, "k", x.shape[0], "features")
    return _kth_neighbours(x, [k], chunk_size)[:, 0]


# ---------------------------------------------------------------------------- manifold metrics
def _prepare(real, fake) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_float64(real, "real"), _as_float64(fake, "fake")
    _check_rows(x, "real")
    _check_rows(y, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake must have the same width, got {x.shape[1]} and {y.shape[1]}")
    if y.shape[0] == 0:
        raise ValueError("fake has no rows")
    offset = x.mean(0)
    return x - offset, y - offset


def _ball_pass(x: torch.Tensor, y: torch.Tensor, k_pr: int | None, k_dc: int | None,
               chunk_size: int | None) -> dict:
    """The metrics of centred real ``x`` (N, D) and fake ``y`` (M, D): precision and recall when
    ``k_pr`` is given, density and coverage when ``k_dc`` is, from one pass over blocks of fake rows
    against all real rows."""
    n, m = x.shape[0], y.shape[0]
    for k, name in ((k_pr, "k_pr"), (k_dc, "k_dc")):
        if k is not None:
            _check_k(k, name, n, "real")
    if k_pr is not None:
        _check_k(k_pr, "k_pr", m, "fake")
        fake_radii = _kth_neighbours(y, [k_pr], chunk_size)[:, 0]          # (M,)
    ks = [k for k in (k_pr, k_dc) if k is not None]
    real_radii = dict(zip(ks, _kth_neighbours(x, ks, chunk_size).T))       # k -> (N,)
    precise, recalled = torch.zeros(m, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    held, covered = torch.zeros(m, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
    for rows in _blocks(m, _block_rows(chunk_size, n)):
        d = pairwise_distances(y[rows], x)                                 # (rows, N)
        if k_pr is not None:
            precise[rows] = (d <= real_radii[k_pr]).any(1)
            recalled |= (d <= fake_radii[rows, None]).any(0)
        if k_dc is not None:
            inside = d <= real_radii[k_dc]
            held[rows] = inside.sum(1)
            covered |= inside.any(0)
    out = {}
    if k_pr is not None:
        out.update(precision=float(precise.double().mean()), recall=float(recalled.double().mean()))
    if k_dc is not None:
        out.update(density=float(held.double().sum()) / (k_dc * m),
                   coverage=float(covered.double().mean()))
    return out


def prdc(real, fake, *, k_pr: int = K_PRECISION, k_dc: int = K_DENSITY,
         chunk_size: int | None = None) -> dict:
    """Precision and recall (k = ``k_pr``), density and coverage (k = ``k_dc``) of ``fake`` (M, D)
    against ``real`` (N, D); tensors or numpy arrays (see the module docstring).

    Needs N > max(k_pr, k_dc) and M > k_pr. Distances are computed in blocks of ``chunk_size``
    rows (default: about 4M distances, 32 MiB, per block). Returns ``{"precision", "recall",
    "density", "coverage"}`` floats and ``{"k_pr", "k_dc", "n_real", "n_fake"}`` ints.
    """
    x, y = _prepare(real, fake)
    out = _ball_pass(x, y, k_pr, k_dc, chunk_size)
    return {**out, "k_pr": k_pr, "k_dc": k_dc, "n_real": x.shape[0], "n_fake": y.shape[0]}


def precision_recall(real, fake, *, k: int = K_PRECISION, chunk_size: int | None = None) -> dict:
    """``{"precision", "recall"}`` of Kynkäänniemi et al. (see :func:`prdc`); needs N, M > k."""
    return _ball_pass(*_prepare(real, fake), k, None, chunk_size)


def density_coverage(real, fake, *, k: int = K_DENSITY, chunk_size: int | None = None) -> dict:
    """``{"density", "coverage"}`` of Naeem et al. (see :func:`prdc`); needs N > k."""
    return _ball_pass(*_prepare(real, fake), None, k, chunk_size)


def expected_coverage(n_real: int, n_fake: int, k: int = K_DENSITY) -> float:
    """Expected coverage of ``n_fake`` fakes from the real distribution itself (Naeem et al.):
    ``1 - prod_{i=1..k} (N - i) / (N + M - i)``."""
    return 1.0 - math.prod((n_real - i) / (n_real + n_fake - i) for i in range(1, k + 1))


# ---------------------------------------------------------------------------- spread
def element_spread(group: torch.Tensor) -> torch.Tensor:
    """(G,) float64: for ``group`` (G, m, ...) of G groups of m >= 2 samples, the standard
    deviation across the m samples (ddof = 1) of every element, averaged over the elements."""
    if group.dim() < 3 or group.shape[1] < 2:
        raise ValueError(f"group must have shape (G, m >= 2, ...), got {tuple(group.shape)}")
    flat = group.detach().double().flatten(2)
    return flat.std(dim=1, unbiased=True).mean(1).cpu()


class SpreadMeter:
    """Running mean over groups of images of :func:`element_spread`, in pixels and in the space of
    each feature function.

    ``features``: ``{name: fn}``, where ``fn`` maps images (B, 3, H, W) in [0, 1] to (B, D)
    features. ``update(images)`` takes one group (m, 3, H, W) or G groups (G, m, 3, H, W) of the
    same size; ``compute()`` returns ``{"pixels": mean, name: mean, ...}`` (None before any group)
    and ``groups``.
    """

    def __init__(self, features: Mapping[str, Callable] | None = None):
        self.features = dict(features or {})
        if "pixels" in self.features:
            raise ValueError("features must not use the name 'pixels' (the pixel spread's key)")
        self.groups = 0
        self._sums = {name: 0.0 for name in ("pixels", *self.features)}

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        if images.dim() == 4:
            images = images[None]
        if images.dim() != 5 or images.shape[1] < 2:
            raise ValueError(f"images must have shape (m >= 2, 3, H, W) or (G, m >= 2, 3, H, W), got "
                             f"{tuple(images.shape)}")
        g, m = images.shape[:2]
        self._sums["pixels"] += float(element_spread(images).sum())
        flat = images.flatten(0, 1)
        for name, fn in self.features.items():
            self._sums[name] += float(element_spread(fn(flat).reshape(g, m, -1)).sum())
        self.groups += g

    def compute(self) -> dict:
        means = {name: (total / self.groups if self.groups else None)
                 for name, total in self._sums.items()}
        return {**means, "groups": self.groups}


@torch.no_grad()
def generate_across_z(generator: torch.nn.Module, sentence: torch.Tensor, words: torch.Tensor,
                      word_mask: torch.Tensor, n_z: int, *, seed: int = 0, batch_size: int = 64,
                      z_dim: int | None = None):
    """Yield (c, n_z, 3, H, W) float32 images in [0, 1] on the generator's device: G's samples of
    consecutive blocks of the C captions (rows of ``sentence`` / ``words`` / ``word_mask``), each
    under ``n_z`` noise vectors.

    The (C, n_z, z_dim) noise comes from a private generator seeded with ``seed`` (the global RNG
    is untouched), drawn before any batching, so the images do not depend on ``batch_size``;
    each G call takes at most ``max(batch_size, n_z)`` rows.
    """
    if isinstance(n_z, bool) or not isinstance(n_z, int) or n_z < 2:
        raise ValueError(f"n_z must be an int >= 2 (a spread needs two samples), got {n_z!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(generator.parameters()).device
    z_dim = getattr(generator, "z_dim", None) if z_dim is None else z_dim
    if not isinstance(z_dim, int):
        raise ValueError("z_dim must be given for a generator without a z_dim attribute")
    captions = sentence.shape[0]
    z = torch.randn(captions, n_z, z_dim, generator=torch.Generator().manual_seed(seed))
    per_call = max(1, batch_size // n_z)
    for rows in _blocks(captions, per_call):
        c = rows.stop - rows.start
        repeat = lambda t: t[rows].to(device).repeat_interleave(n_z, dim=0)  # noqa: E731
        out = generator(z[rows].flatten(0, 1).to(device), repeat(sentence), repeat(words),
                        repeat(word_mask))
        yield out.float().clamp(0, 1).reshape(c, n_z, *out.shape[1:])


@torch.no_grad()
def z_spread(generator: torch.nn.Module, sample_set, n_z: int = 16, *, seed: int = 0,
             batch_size: int = 64, features: Mapping[str, Callable] | None = None) -> dict:
    """G's mean per-caption spread across ``n_z`` noise vectors, e.g. for the training log.

    ``sample_set``: the captions, as anything with ``sentence`` (C, E), ``words`` (C, T, E) and
    ``word_mask`` (C, T) (a :class:`fastxmc.train.samples.SampleSet`; its ``z`` is not used: the
    noise is drawn from ``seed``, see :func:`generate_across_z`). ``generator`` should be in eval
    mode (G_ema). ``features``: optional ``{name: fn}`` feature spaces (see :class:`SpreadMeter`).

    Returns floats: ``{"pixels": ..., name: ...}``, each the mean over the C captions of
    :func:`element_spread` across their n_z samples (0 when G ignores z). Cost: C * n_z
    generator rows (plus their features).
    """
    meter = SpreadMeter(features)
    for images in generate_across_z(generator, sample_set.sentence, sample_set.words,
                                    sample_set.word_mask, n_z, seed=seed, batch_size=batch_size):
        meter.update(images)
    result = meter.compute()
    if not result["groups"]:
        raise ValueError("sample_set holds no captions")
    return {name: value for name, value in result.items() if name != "groups"}


def real_spread_groups(labels, captions: Sequence[Sequence[str]], picks, size: int, *,
                       seed: int = 0) -> tuple[str, list]:
    """Which real images the ``real_spread`` of each picked caption is measured over.

    ``labels`` (N,): every image's primary label (-1: none); ``captions[i]``: image i's captions;
    ``picks``: the images whose first caption ``captions[p][0]`` is sampled for ``z_spread``.

    - When any image has a label (``grouping = "label"``), the group of pick p is the images with
      p's primary label: real images of one class, as the dataset defines it (on shapes, one shape
      and colour of the primary object, whatever its size, position and background). That is a
      wider set than the images one caption describes, so ``real_spread`` is an upper reference.
    - Otherwise (``grouping = "caption"``) it is the images that have the exact string
      ``captions[p][0]`` among their captions.

    Groups of fewer than 2 images (a pick without a label, a caption no other image shares) are
    None. Larger groups are cut to ``size`` images drawn at random (seeded) so that they hold as
    many samples as a ``z_spread`` group (the ddof = 1 standard deviation of m samples still
    underestimates by a factor depending on m, e.g. 0.80 at m = 2, 0.98 at m = 16).
    Returns ``(grouping, [index array or None per pick])``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(captions),):
        raise ValueError(f"labels must have shape ({len(captions)},) like captions, got {labels.shape}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    grouping = "label" if (labels >= 0).any() else "caption"
    if grouping == "caption":
        holders: dict[str, list[int]] = {}
        for i, strings in enumerate(captions):
            for s in set(strings):
                holders.setdefault(s, []).append(i)
    rng = np.random.default_rng(seed)
    groups = []
    for p in np.asarray(picks, dtype=np.int64).tolist():
        if not 0 <= p < len(captions):
            raise ValueError(f"picks must be image indices in [0, {len(captions)}), got {p}")
        if grouping == "label":
            members = np.flatnonzero(labels == labels[p]) if labels[p] >= 0 else np.empty(0, np.int64)
        else:
            members = np.asarray(holders[captions[p][0]], dtype=np.int64)
        if members.size < 2:
            groups.append(None)
            continue
        if members.size > size:
            members = np.sort(rng.choice(members, size=size, replace=False))
        groups.append(members)
    return grouping, groups
