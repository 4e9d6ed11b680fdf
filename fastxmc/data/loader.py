"""The training/eval data loader: sampling, sharding, determinism, captions, and the torch image path.

``build_loader(cfg, split=..., batch_size=..., rank=..., world_size=..., seed=...)`` returns a
:class:`Loader`. ``iter(loader)`` yields the rest of the current epoch as batches (dicts of tensors on
``device``)::

    image       (B, 3, H, W) float32 in [0, 1]   resized (bilinear, no crop) to cfg.resolution
    sentence    (B, E) float32                   frozen encoder: mean of the caption's token outputs
    words       (B, T, E) float32                token outputs incl. [CLS]/[SEP], zero past the mask
    word_mask   (B, T) bool                      True for real tokens
    label       (B,) int64                       primary label, -1 when the dataset has none
    index       (B,) int64                       sample index in the split
    caption     (B,) int64                       index of the drawn caption within the image's captions
    with cfg.two_captions also sentence_b, words_b, word_mask_b, caption_b: another caption of the
    same image (a different one whenever the image has more than one).

Determinism: the epoch's order is a permutation drawn from ``(seed, epoch)``; the caption(s) and the
flip of sample ``i`` are drawn from ``(seed, epoch)`` and looked up at ``i``, so they depend on
``(seed, epoch, i)`` only, not on the backend, the rank or the batch. Flips (probability 1/2) happen
on the train split when ``cfg.flip``. Under torchrun each rank takes every ``world_size``-th sample of
the permutation (``rank::world_size``; with ``drop_last`` the permutation is cut to a multiple of
``world_size``, otherwise padded with its own first samples), then cuts its share into batches.
With ``cfg.label_groups = K`` the permutation is made of runs of K samples sharing their primary
label (:func:`grouped_order`), laid out so that every rank's share keeps the runs whole: each batch
(a multiple of K) then holds B/K labels, K samples each, which gives the contrastive terms hard
negatives (same class, other attributes) and SupCon guaranteed positives, as metric learning's
"m per class" samplers do. ``cfg.group_by`` (shapes dataset) makes the runs share a set of the
primary object's attributes instead of the label: ``"color+size+position"`` gives runs whose samples
differ only in shape (and in what else is in the image). Several comma-separated alternatives
(``"label,color+size+position"``) give each sample to one of them at random every epoch
(:func:`mixed_group_keys`), so a batch mixes the kinds of runs. ``state_dict()`` is ``(epoch, position)`` plus what must match on
resume; ``load_state_dict`` makes the next batch exactly the one that would have come next.

Backends (``cfg.backend``; ``loader.backend`` and ``loader.backend_reason`` say which and why): both
decode to uint8 (B, H, W, 3) with the same order, flips and crops, then share the conversion to
float, so they give identical batches when the images are already at the target size, and batches
within a few intensity levels (antialiased bilinear, two implementations) when resizing.

- ``"torch"``: a ``torch.utils.data.DataLoader`` whose items are whole batches decoded with PIL in
  ``cfg.workers`` persistent worker processes (``cfg.prefetch`` batches ahead each).
- ``"dali"``: :mod:`fastxmc.data.dali`.
- ``"auto"``: DALI whenever it is installed, else torch. With a CUDA device DALI decodes (nvJPEG) and
  resizes on the GPU; on CPU its pipeline measured about 15-20% less CPU time per image than the
  torch workers on the shapes dataset (about 0.26 vs 0.31 CPU-ms per 64x64 PNG, batch 32) with the
  same cost in the training thread (about 3-4 ms per batch, mostly the text lookup and conversion).

Captions are encoded once per dataset (:mod:`fastxmc.data.text`) and looked up by sample index in the
training process. With ``torch.distributed`` initialized, local rank 0 generates the shapes dataset,
checks the images and builds the caches first while the other ranks wait at a barrier.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fastxmc.data.config import DataConfig, group_alternatives
from fastxmc.data.sources import SplitData, UnreadableImageError, load_split
from fastxmc.data.text import CaptionCache, FrozenTextEncoder, open_caption_cache

__all__ = ["Loader", "build_loader", "choose_backend", "epoch_plan", "EpochPlan", "grouped_order",
           "mixed_group_keys", "load_image"]

STATE_VERSION = 1
# Identity fields added after version 1, with the value states saved before them imply.
_IDENTITY_DEFAULTS = {"label_groups": 0, "group_by": "label"}


def choose_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """``(backend, reason)`` for ``cfg.backend`` = ``requested`` on ``device``."""
    from fastxmc.data.dali import dali_available
    if requested == "torch":
        return "torch", "requested (data.backend=torch)"
    if requested == "dali":
        if not dali_available():
            raise ImportError("data.backend='dali' but NVIDIA DALI is not installed (pip install "
                              "nvidia-dali-cuda120 or nvidia-dali-cuda130), or use backend=torch/auto")
        return "dali", "requested (data.backend=dali)"
    if requested != "auto":
        raise ValueError(f"data.backend must be one of ['auto', 'dali', 'torch'], got {requested!r}")
    if not dali_available():
        return "torch", "auto: NVIDIA DALI is not installed"
    if device.type == "cuda":
        return "dali", "auto: DALI is installed; it decodes and resizes on the GPU"
    return "dali", "auto: DALI is installed; its CPU pipeline measured faster than the torch workers"


# ----------------------------------------------------------------------------------------------
# Sampling plan


@dataclass
class EpochPlan:
    """What one rank reads in one epoch: the batches' sample indices and every sample's draws."""
    batches: list[np.ndarray]       # int64 sample indices, one array per batch
    caption: np.ndarray             # (N,) int64 caption index of every sample of the split
    caption_b: np.ndarray           # (N,) int64 second caption (differs from caption when possible)
    flip: np.ndarray                # (N,) bool


def _rank_share(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    n = len(order)
    if world_size == 1:
        return order
    if drop_last:
        order = order[: n // world_size * world_size]
    else:
        total = math.ceil(n / world_size) * world_size
        order = np.concatenate([order, np.resize(order, total - n)]) if total > n else order
    return order[rank::world_size]


def grouped_order(labels: np.ndarray, group_size: int, rng: np.random.Generator,
                  world_size: int = 1) -> np.ndarray:
    """A permutation of ``range(len(labels))`` made of runs of ``group_size`` samples that share a
    label, in random order, arranged so that ``order[rank::world_size]`` keeps the runs whole.

    Each label's samples are shuffled and cut into runs; what is left over (fewer than
    ``group_size`` of a label, and unlabelled samples, label < 0) is shuffled and cut into mixed runs,
    so every sample is used once per epoch. The runs are shuffled; every ``world_size`` consecutive
    runs are interleaved element by element (rank r takes the r-th of them); a last incomplete set
    of runs and the final partial run follow as they are.
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = group_size
    by_label = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[by_label])) + 1
    runs, rest = [], []
    for members in np.split(by_label, bounds):
        if len(members) == 0:
            continue
        members = rng.permutation(members)
        full = 0 if labels[members[0]] < 0 else len(members) // k * k
        runs.append(members[:full].reshape(-1, k))
        rest.append(members[full:])
    rest = rng.permutation(np.concatenate(rest)) if rest else np.zeros(0, np.int64)
    full = len(rest) // k * k
    runs.append(rest[:full].reshape(-1, k))          # mixed-label runs of the leftovers
    runs = np.concatenate(runs)
    runs = runs[rng.permutation(len(runs))]
    whole = len(runs) // world_size * world_size
    body = runs[:whole].reshape(-1, world_size, k).transpose(0, 2, 1).ravel()
    return np.concatenate([body, runs[whole:].ravel(), rest[full:]]).astype(np.int64)


def mixed_group_keys(keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) group keys from (A, N) ``keys`` of A alternatives: each sample is given to one alternative
    at random and keyed by it, with keys made distinct across alternatives, so that
    :func:`grouped_order` only groups samples given to the same alternative. -1 (no key) stays -1."""
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim == 1:
        return keys
    n_alt, n = keys.shape
    if n_alt == 1:
        return keys[0]
    choice = rng.integers(n_alt, size=n)
    chosen = keys[choice, np.arange(n)]
    return np.where(chosen < 0, -1, chosen * n_alt + choice)


def epoch_plan(n_captions: np.ndarray, *, seed: int, epoch: int, batch_size: int, rank: int = 0,
               world_size: int = 1, shuffle: bool = True, drop_last: bool = True,
               flip: bool = False, labels: np.ndarray | None = None,
               label_groups: int = 0) -> EpochPlan:
    """The plan of ``epoch`` for ``rank``. ``n_captions`` (N,): captions per sample; with
    ``label_groups`` > 0 (and ``shuffle``), ``labels`` (N,) group the order (:func:`grouped_order`);
    (A, N) ``labels`` are A alternative keys, mixed anew each epoch (:func:`mixed_group_keys`).

    Every draw depends on ``(seed, epoch)`` and the sample index only (see the module docstring).
    """
    n_captions = np.asarray(n_captions, dtype=np.int64)
    n = len(n_captions)
    if not shuffle:
        order = np.arange(n)
    elif label_groups:
        keys = mixed_group_keys(labels, np.random.default_rng([seed, epoch, 2]))
        order = grouped_order(keys, label_groups, np.random.default_rng([seed, epoch, 0]), world_size)
    else:
        order = np.random.default_rng([seed, epoch, 0]).permutation(n)
    u = np.random.default_rng([seed, epoch, 1]).random((3, n))
    caption = np.minimum((u[0] * n_captions).astype(np.int64), n_captions - 1)
    others = np.maximum(n_captions - 1, 1)
    shift = 1 + np.minimum((u[1] * others).astype(np.int64), others - 1)
    caption_b = np.where(n_captions > 1, (caption + shift) % n_captions, caption)
    flips = (u[2] < 0.5) if flip else np.zeros(n, bool)
    share = _rank_share(order, rank, world_size, drop_last).astype(np.int64)
    stop = len(share) // batch_size * batch_size if drop_last else len(share)
    batches = [share[s:s + batch_size] for s in range(0, stop, batch_size)]
    return EpochPlan(batches, caption, caption_b, flips)


def batches_per_epoch(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


# ----------------------------------------------------------------------------------------------
# torch image path


def load_image(path: str, crop, resolution: int, flip: bool) -> np.ndarray:
    """(resolution, resolution, 3) uint8: decode (RGB), crop ``[x1, y1, x2, y2]`` (clipped), resize, flip."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:  # any decode failure; the image check should have caught it before
        raise UnreadableImageError(f"cannot decode image {path} ({type(e).__name__}: {e}); it passed "
                                   f"the image check, so it changed since: delete its imagecheck cache "
                                   f"entry") from e
    if crop is not None:
        x1, y1, x2, y2 = crop
        im = im.crop((x1, y1, min(x2, im.width), min(y2, im.height)))
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.BILINEAR)
    a = np.asarray(im)
    return a[:, ::-1] if flip else a


class _BatchImages(torch.utils.data.Dataset):
    """Items are whole batches: ``dataset[(indices, flips)]`` -> uint8 (B, res, res, 3)."""

    def __init__(self, paths, crops, resolution: int):
        self.paths, self.crops, self.resolution = [str(p) for p in paths], crops, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, plan):
        indices, flips = plan
        out = np.empty((len(indices), self.resolution, self.resolution, 3), np.uint8)
        for j, (i, f) in enumerate(zip(indices, flips)):
            crop = self.crops[i] if self.crops is not None else None
            out[j] = load_image(self.paths[i], crop, self.resolution, bool(f))
        return torch.from_numpy(out)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the plans set just before each ``iter(DataLoader)``."""

    def __init__(self):
        self.plans: list = []

    def __iter__(self):
        return iter(self.plans)

    def __len__(self):
        return len(self.plans)


class TorchImages:
    """uint8 (B, res, res, 3) image batches from a DataLoader with persistent workers."""

    def __init__(self, paths, crops, resolution: int, workers: int, prefetch: int, pin_memory: bool):
        self._sampler = _PlanSampler()
        # forkserver, not fork: a worker forked from a process that holds a DALI pipeline (e.g. a
        # benchmark comparing both paths) inherits its locks and deadlocks when it frees the copy.
        extra = dict(persistent_workers=True, prefetch_factor=prefetch,
                     multiprocessing_context="forkserver") if workers > 0 else {}
        self._loader = torch.utils.data.DataLoader(
            _BatchImages(paths, crops, resolution), batch_size=None, sampler=self._sampler,
            num_workers=workers, pin_memory=pin_memory, **extra)

    def batches(self, plans) -> Iterator[torch.Tensor]:
        self._sampler.plans = list(plans)
        return iter(self._loader)


# ----------------------------------------------------------------------------------------------
# Loader


def _rank0_first(build, progress: bool):
    """Run ``build(progress)`` on local rank 0 first when a process group is up (others wait)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return build(progress)
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if local == 0:
        try:
            return build(progress)
        finally:
            dist.barrier()
    dist.barrier()
    return build(False)


class Loader:
    """Batches of one split (see the module docstring). Build it with :func:`build_loader`."""

    def __init__(self, cfg: DataConfig, *, split: str = "train", batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 device="cpu", progress: bool = True):
        _check_loader_args(batch_size, rank, world_size, seed)
        self.cfg, self.split, self.batch_size = cfg.validate(), split, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last, self.device = shuffle, drop_last, torch.device(device)
        self.max_tokens = cfg.resolved_max_tokens()
        self.data, self._cache = _rank0_first(self._prepare, progress)
        self.num_samples = len(self.data.records)
        if len(self) == 0:
            raise ValueError(f"the {cfg.dataset} {split!r} split has {self.num_samples} samples: not one "
                             f"batch of {batch_size} per rank for world_size={world_size} with "
                             f"drop_last={drop_last}")
        self._n_captions = np.array([len(r.captions) for r in self.data.records], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._n_captions)])
        self._rows = self._cache.rows(c for r in self.data.records for c in r.captions)
        self._labels = self.data.primary_labels()
        self._group_keys = _group_keys(self.data, self._labels, cfg.group_by)
        if shuffle:  # an unshuffled loader (evaluation) reads in index order, without groups
            _check_label_groups(cfg.label_groups, batch_size, self._labels, f"{cfg.dataset} {split!r} split")
        self.text_dim = self._cache.dim
        self.num_classes, self.label_names = self.data.num_classes, self.data.label_names
        self.stats = {"skipped_images": len(self.data.skipped), "truncated_captions": self._cache.truncated,
                      "num_samples": self.num_samples, "distinct_captions": len(self._cache.strings)}
        self.backend, self.backend_reason = choose_backend(cfg.backend, self.device)
        self._images = self._make_images()
        self.epoch, self.position, self._generation = 0, 0, 0
        self._encoder = None

    def _prepare(self, progress: bool) -> tuple[SplitData, CaptionCache]:
        data = load_split(self.cfg, self.split, progress=progress)
        strings = (c for r in data.records for c in r.captions)
        cache = open_caption_cache(strings, self.cfg.text_encoder, self.max_tokens,
                                   self.cfg.resolved_cache_dir(), progress=progress)
        return data, cache

    def _make_images(self):
        paths = [r.path for r in self.data.records]
        crops = [r.extra.get("crop") for r in self.data.records]
        crops = crops if any(c is not None for c in crops) else None
        workers = self.cfg.resolved_workers()
        if self.backend == "dali":
            from fastxmc.data.dali import DaliImages
            device_id = None
            if self.device.type == "cuda":
                index = self.device.index
                device_id = index if index is not None else torch.cuda.current_device()
            return DaliImages(paths, crops, self.cfg.resolution, self.batch_size, threads=workers,
                              prefetch=self.cfg.prefetch, device_id=device_id)
        return TorchImages(paths, crops, self.cfg.resolution, workers, self.cfg.prefetch,
                           pin_memory=self.device.type == "cuda")

    # -- iteration ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.drop_last)

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's :class:`EpochPlan` for ``epoch``."""
        return epoch_plan(self._n_captions, seed=self.seed, epoch=epoch, batch_size=self.batch_size,
                          rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                          drop_last=self.drop_last, flip=self.cfg.flip and self.split == "train",
                          labels=self._group_keys, label_groups=self.cfg.label_groups if self.shuffle else 0)

    def __iter__(self) -> Iterator[dict]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        self._generation += 1
        return self._epoch(self._generation)

    def _epoch(self, generation: int) -> Iterator[dict]:
        plan, start = self.plan(self.epoch), self.position
        todo = plan.batches[start:]
        images = iter(self._images.batches((idx, plan.flip[idx]) for idx in todo))
        for k, idx in enumerate(todo):
            # checked before touching the backend, whose iterator a newer epoch may have taken over
            if generation != self._generation:
                raise RuntimeError("this iterator was superseded by a newer iter(loader) (or a "
                                   "load_state_dict); iterate one at a time")
            batch = self._assemble(idx, next(images), plan)
            self.position = start + k + 1
            yield batch
        if generation == self._generation:
            self.epoch, self.position = self.epoch + 1, 0

    def _text(self, idx: np.ndarray, caption: np.ndarray) -> tuple[torch.Tensor, ...]:
        return self._text_tensors(*self._cache.gather(self._rows[self._offsets[idx] + caption[idx]]))

    def _text_tensors(self, sentence, words, mask) -> tuple[torch.Tensor, ...]:
        """numpy (n, E) f32, (n, T, E) f16, (n, T) bool -> tensors on the device, words as float32
        (converted with numpy on CPU, on the device otherwise)."""
        if self.device.type == "cpu":
            words = words.astype(np.float32)
            return torch.from_numpy(sentence), torch.from_numpy(words), torch.from_numpy(mask)
        dev = self.device
        return (torch.from_numpy(sentence).to(dev), torch.from_numpy(words).to(dev).float(),
                torch.from_numpy(mask).to(dev))

    def _image_tensor(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) / 255, the same for both backends.

        On CPU with numpy (single-threaded: torch's threaded elementwise ops cost tens of ms per
        batch on a busy 2-core machine), on the device otherwise.
        """
        if self.device.type == "cpu":
            out = np.ascontiguousarray(img.numpy().transpose(0, 3, 1, 2), dtype=np.float32)
            out /= np.float32(255)
            return torch.from_numpy(out)
        image = img.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return image.to(torch.float32, memory_format=torch.contiguous_format).div_(255)

    def _assemble(self, idx: np.ndarray, img: torch.Tensor, plan: EpochPlan) -> dict:
        batch = {"image": self._image_tensor(img)}
        batch["sentence"], batch["words"], batch["word_mask"] = self._text(idx, plan.caption)
        batch["label"] = torch.from_numpy(self._labels[idx]).to(self.device)
        batch["index"] = torch.from_numpy(idx).to(self.device)
        batch["caption"] = torch.from_numpy(plan.caption[idx]).to(self.device)
        if self.cfg.two_captions:
            batch["sentence_b"], batch["words_b"], batch["word_mask_b"] = self._text(idx, plan.caption_b)
            batch["caption_b"] = torch.from_numpy(plan.caption_b[idx]).to(self.device)
        return batch

    # -- state -------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "label_groups": self.cfg.label_groups, "group_by": self.cfg.group_by}

    def state_dict(self) -> dict:
        """Plain ints/bools: where the next batch comes from, and what must match to resume."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume so that the next batch is exactly the one after the saved state's last batch."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a fastxmc loader state (version {STATE_VERSION}): {state!r}")
        for key, mine in self._identity().items():
            saved = state.get(key, _IDENTITY_DEFAULTS.get(key))
            if saved != mine:
                raise ValueError(f"loader state mismatch: {key} was {saved!r} when saved, "
                                 f"is {mine!r} now (the data or the loader settings changed)")
        epoch, position = state["epoch"], state["position"]
        valid = isinstance(epoch, int) and isinstance(position, int) and epoch >= 0
        if not (valid and 0 <= position <= len(self)):
            raise ValueError(f"loader state has a bad epoch/position: {epoch!r}/{position!r}")
        self.epoch, self.position = epoch, position
        self._generation += 1

    # -- captions ----------------------------------------------------------------------------

    def captions(self, index, caption) -> list[str]:
        """The caption strings of a batch's ``index`` and ``caption`` (B,) tensors."""
        idx = torch.as_tensor(index).reshape(-1).tolist()
        cap = torch.as_tensor(caption).reshape(-1).tolist()
        if len(idx) != len(cap):
            raise ValueError(f"index and caption must have the same length, got {len(idx)} and {len(cap)}")
        return [self.data.records[i].captions[c] for i, c in zip(idx, cap)]

    def sentence_embeddings(self) -> torch.Tensor:
        """(n, E) float32 CPU: the sentence embeddings of this split's distinct captions."""
        return torch.from_numpy(np.ascontiguousarray(self._cache.sentence[np.unique(self._rows)],
                                                     dtype=np.float32))

    def primary_labels(self) -> np.ndarray:
        """(num_samples,) int64: every sample's primary label (-1 where it has none)."""
        return self._labels.copy()

    def caption_owners(self) -> np.ndarray:
        """(n_captions,) int64: the sample each of the split's captions belongs to, in flat caption
        order (sample 0's captions first): caption ``c`` of sample ``i`` is flat number
        ``caption_offsets()[i] + c``."""
        return np.repeat(np.arange(self.num_samples, dtype=np.int64), self._n_captions)

    def caption_offsets(self) -> np.ndarray:
        """(num_samples + 1,) int64: the flat number of each sample's first caption, and the total."""
        return self._offsets.astype(np.int64, copy=True)

    def caption_sentences(self, flat) -> torch.Tensor:
        """(K, E) float32 sentence embeddings of captions by flat number, on the loader's device."""
        rows = self._rows[np.asarray(flat, dtype=np.int64)]
        sentence = np.ascontiguousarray(self._cache.sentence[rows], dtype=np.float32)
        return torch.from_numpy(sentence).to(self.device)

    def label_sets(self, index) -> list[list[int]]:
        """The full label lists (primary first) of samples ``index``; ``[]`` without labels."""
        return [list(self.data.records[i].labels or []) for i in torch.as_tensor(index).reshape(-1).tolist()]

    def encode_captions(self, strings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sentence (N, E) f32, words (N, T, E) f32, word_mask (N, T) bool) on ``device``.

        Captions of the dataset come from the cache; others are encoded with the same frozen encoder,
        tokenization, truncation and float16 rounding of the token outputs that the cache uses.
        """
        if isinstance(strings, str) or not all(isinstance(s, str) for s in strings):
            raise TypeError("encode_captions expects a list of caption strings")
        strings = list(strings)
        n, T, E = len(strings), self.max_tokens, self.text_dim
        sentence, words = np.zeros((n, E), np.float32), np.zeros((n, T, E), np.float16)
        mask = np.zeros((n, T), bool)
        known = [i for i, s in enumerate(strings) if s in self._cache.row_of]
        new = [i for i, s in enumerate(strings) if s not in self._cache.row_of]
        if known:
            rows = self._cache.rows(strings[i] for i in known)
            sentence[known], words[known], mask[known] = self._cache.gather(rows)
        if new:
            if self._encoder is None:
                self._encoder = FrozenTextEncoder(self.cfg.text_encoder)
            enc = self._encoder.encode([strings[i] for i in new], T)
            sentence[new], words[new], mask[new] = enc.sentence, enc.words, enc.mask
        return self._text_tensors(sentence, words, mask)


def _check_loader_args(batch_size, rank, world_size, seed) -> None:
    for name, value, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0),
                            ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size, got rank={rank} world_size={world_size}")


def _group_keys(data: SplitData, labels: np.ndarray, group_by: str) -> np.ndarray:
    """What the samples of a label_groups run share (DataConfig.group_by): (N,) labels, or for
    several alternatives (A, N) keys, one row per alternative (:func:`mixed_group_keys`)."""
    alternatives = group_alternatives(group_by)
    if alternatives == [("label",)]:
        return labels
    from fastxmc.data.shapes import primary_object_keys, primary_objects
    objects = primary_objects(data.root / data.split, [r.image for r in data.records])
    rows = [labels if alt == ("label",) else primary_object_keys(objects, alt) for alt in alternatives]
    return np.stack(rows) if len(rows) > 1 else rows[0]


def _check_label_groups(group_size: int, batch_size: int, labels: np.ndarray, what: str) -> None:
    if not group_size:
        return
    if batch_size % group_size:
        raise ValueError(f"data.label_groups ({group_size}) must divide the batch size ({batch_size}), "
                         "so that no run of same-label samples is split between batches")
    if not (labels >= 0).any():
        raise ValueError(f"data.label_groups={group_size} needs class labels, and the {what} has none")


def build_loader(cfg: DataConfig, *, split: str = "train", batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 device="cpu", progress: bool = True) -> Loader:
    """A :class:`Loader` over ``split`` of ``cfg``'s dataset (see the module docstring)."""
    return Loader(cfg, split=split, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                  shuffle=shuffle, drop_last=drop_last, device=device, progress=progress)
