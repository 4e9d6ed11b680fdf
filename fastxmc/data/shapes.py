"""The embedded synthetic dataset: captioned coloured shapes on textured backgrounds.

Every image (``resolution`` x ``resolution`` RGB, 64 by default) holds one or two objects on a
background. Each object has a **shape** (:data:`SHAPES`), a **color** (:data:`COLORS`, a palette of
saturated, well separated colours), a **size** (:data:`SIZES`) and a **position**, one cell of a
3x3 grid (:data:`POSITIONS`: ``"top left"``, ``"top"``, ... ``"center"``, ... ``"bottom right"``).
The background is a gradient, stripes, a checkerboard or speckle (:data:`BACKGROUND_KINDS`) in a
muted colour (:data:`BACKGROUND_COLORS`, none of them an object colour word).

Captions: ``n_captions`` (5 by default) distinct captions per image from varied templates, e.g.
``"a small red circle at the top left"``, ``"in the middle there is a blue star"``,
``"a green square above a large pink cross"``, ``"a triangle colored yellow on the right"``. Every
caption names the shape and the color of the *primary* object (object 0) with their canonical words;
sizes, positions and the background are mentioned by some captions only, with synonyms. Captions are
lower case, without a final period, and at most 15 words long.

Class label (for the label-guided losses): the primary object's shape and colour,
``label = SHAPES.index(shape) * len(COLORS) + COLORS.index(color)``; :data:`LABEL_NAMES` gives
``"red circle"``-style names, :data:`NUM_CLASSES` = 6 x 8 = 48. In ``captions.jsonl`` the entry is
``"labels": [label]``.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, SPLIT_IDS[s],
i])``, so the same config gives byte-identical PNGs and identical captions, a different seed
gives different data, train and val come from disjoint streams, and the first ``k`` images of a
split do not depend on the split's size.

On disk (see :func:`write_shapes_dataset`)::

    ROOT/meta.json                       config, vocabularies, label names, hashes
    ROOT/manifest.json                   size and sha256 of every file below
    ROOT/<split>/captions.jsonl          the ``folder`` format (fastxmc.data.folder)
    ROOT/<split>/images/000000.png ...
    ROOT/<split>/attributes.jsonl        per-image attribute records, same order as captions.jsonl

``ensure_shapes_dataset(cfg)`` writes it once under :func:`default_cache_dir` (keyed by the config
hash) and returns the root. ``python -m fastxmc.data.shapes --out DIR`` writes one by hand.

Every use of an existing dataset checks its files against the manifest (:func:`verify_dataset`). A
damaged dataset (a truncated, garbled or missing image, label or index file) is reported in one
:class:`~fastxmc.data.folder.DataWarning` line naming the file and why, then generated again:
the run goes on with the bytes a fresh dataset holds. A failed write (a full disk) raises
:class:`~fastxmc.atomic.FileWriteError` and leaves any previous dataset as it was.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from fastxmc.atomic import (FileWriteError, atomic_target, file_sha256, move_aside,
                            remove_abandoned_temporaries)
from fastxmc.data.folder import (CAPTIONS_FILE, DamagedCacheError, DatasetFormatError, Record,
                                 read_records, warn_rebuilding, write_records)

__all__ = [
    "SHAPES", "COLORS", "COLOR_RGB", "SIZES", "POSITIONS", "BACKGROUND_KINDS", "BACKGROUND_COLORS",
    "LABEL_NAMES", "NUM_CLASSES", "SPLIT_IDS", "GENERATOR_VERSION", "ShapesConfig", "Sample",
    "label_of", "label_attribute", "generate_sample", "sample_rng", "config_hash", "write_shapes_dataset",
    "ensure_shapes_dataset", "default_cache_dir", "read_attributes", "is_complete", "verify_dataset",
    "named_attributes",
    "named_positions",
    "primary_objects", "primary_object_keys", "ATTRIBUTE_VALUES",
    "describe_object",
]

# Bump when the images or captions a given config produces change: it is part of the cache key.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOR_RGB = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 30),
    "green": (40, 180, 60),
    "cyan": (30, 205, 225),
    "blue": (40, 70, 235),
    "purple": (150, 50, 205),
    "pink": (255, 115, 195),
}
COLORS = tuple(COLOR_RGB)
SIZES = ("small", "large")
# Row-major 3x3 grid: POSITIONS[row * 3 + col].
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
BACKGROUND_KINDS = ("gradient", "stripes", "checkered", "speckled")
BACKGROUND_RGB = {
    "black": (38, 38, 42),
    "gray": (125, 125, 128),
    "white": (222, 222, 218),
    "brown": (112, 82, 58),
}
BACKGROUND_COLORS = tuple(BACKGROUND_RGB)

NUM_CLASSES = len(SHAPES) * len(COLORS)
LABEL_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
SPLIT_IDS = {"train": 0, "val": 1}

# Geometry, as fractions of the resolution.
_HALF_SIZE = {"small": 0.08, "large": 0.14}
_JITTER = 0.02


def label_of(shape: str, color: str) -> int:
    """Class id of a (shape, color) pair: ``SHAPES.index(shape) * len(COLORS) + COLORS.index(color)``."""
    return SHAPES.index(shape) * len(COLORS) + COLORS.index(color)


def label_attribute(labels, attribute: str) -> np.ndarray:
    """The index of the primary object's ``attribute`` ("shape" into :data:`SHAPES`, "color" into
    :data:`COLORS`) encoded in each class label (:func:`label_of`); -1 where a label is -1."""
    labels = np.asarray(labels, dtype=np.int64)
    if attribute not in ("shape", "color"):
        raise ValueError(f"attribute must be 'shape' or 'color', got {attribute!r}")
    if ((labels < -1) | (labels >= NUM_CLASSES)).any():
        raise ValueError(f"labels must be shapes class ids in [0, {NUM_CLASSES}) or -1")
    index = labels // len(COLORS) if attribute == "shape" else labels % len(COLORS)
    return np.where(labels < 0, -1, index)


# The vocabulary of each attribute a batch can be grouped by (DataConfig.group_by).
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}


def primary_objects(folder, images) -> list:
    """The primary object's record (the first object, which the label describes) of each image
    (``images``: paths relative to the split ``folder``, as in its ``captions.jsonl``)."""
    by_image = {r["image"]: r["objects"][0] for r in read_attributes(folder)}
    missing = [im for im in images if im not in by_image]
    if missing:
        raise ValueError(f"{Path(folder) / 'attributes.jsonl'} has no record of {len(missing)} image(s), "
                         f"e.g. {missing[0]!r}: regenerate the dataset")
    return [by_image[im] for im in images]


def primary_object_keys(objects: list, attributes) -> np.ndarray:
    """(N,) int64: one key per object record (:func:`primary_objects`), equal for two objects
    exactly when they agree in every one of ``attributes``. The key of one attribute is its index in
    :data:`ATTRIBUTE_VALUES` (so ``("color",)`` gives :func:`label_attribute`'s colours)."""
    unknown = [a for a in attributes if a not in ATTRIBUTE_VALUES]
    if unknown or not attributes:
        raise ValueError(f"attributes must be a non-empty set of {list(ATTRIBUTE_VALUES)}, got {attributes!r}")
    keys = np.zeros(len(objects), np.int64)
    for name in attributes:               # mixed radix over the attributes' vocabularies
        values = ATTRIBUTE_VALUES[name]
        keys = keys * len(values) + np.array([values.index(o[name]) for o in objects], np.int64)
    return keys


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. Every field is part of the cache key (:func:`config_hash`)."""
    resolution: int = 64
    n_train: int = 20000
    n_val: int = 1000
    seed: int = 0
    max_objects: int = 2            # 1 or 2 objects per image
    two_object_prob: float = 0.5    # probability of a second object when max_objects == 2
    n_captions: int = 5             # distinct captions per image
    supersample: int = 4            # antialiasing factor for the shapes
    backgrounds: tuple = BACKGROUND_KINDS  # the background kinds drawn from (uniformly)
    object_scale: float = 1.0       # multiplies the object sizes (_HALF_SIZE); > 1 for small images

    def __post_init__(self):
        if not (16 <= self.resolution <= 1024):
            raise ValueError(f"resolution must be in [16, 1024], got {self.resolution}")
        if self.n_train < 0 or self.n_val < 0:
            raise ValueError(f"split sizes must be >= 0, got n_train={self.n_train} n_val={self.n_val}")
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        if not (0.0 <= self.two_object_prob <= 1.0):
            raise ValueError(f"two_object_prob must be in [0, 1], got {self.two_object_prob}")
        if not (1 <= self.n_captions <= 10):
            raise ValueError(f"n_captions must be in [1, 10], got {self.n_captions}")
        if not (1 <= self.supersample <= 8):
            raise ValueError(f"supersample must be in [1, 8], got {self.supersample}")
        if not (0.5 <= self.object_scale <= 1.6):
            raise ValueError(f"object_scale must be in [0.5, 1.6] (larger objects would cover their "
                             f"neighbours' grid cells), got {self.object_scale}")
        unknown = [k for k in self.backgrounds if k not in BACKGROUND_KINDS]
        if not self.backgrounds or unknown or len(set(self.backgrounds)) != len(self.backgrounds):
            raise ValueError(f"backgrounds must be distinct kinds out of {BACKGROUND_KINDS}, "
                             f"got {self.backgrounds!r}")

    def split_sizes(self) -> dict:
        return {"train": self.n_train, "val": self.n_val}


class Sample(NamedTuple):
    image: np.ndarray      # (resolution, resolution, 3) uint8
    captions: list
    label: int
    attributes: dict


def sample_rng(cfg: ShapesConfig, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split``."""
    return np.random.default_rng([cfg.seed, SPLIT_IDS[split], index])


# ----------------------------------------------------------------------------------------------
# Drawing


@lru_cache(maxsize=8)
def _grid(res: int):
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    return (x + 0.5) / res, (y + 0.5) / res     # in (0, 1)


def _background(rng: np.random.Generator, res: int, kind: str, color: str) -> np.ndarray:
    base = np.array(BACKGROUND_RGB[color], np.float32)
    x, y = _grid(res)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)   # about [-0.7, 0.7]
        amp = rng.uniform(55, 85)
        img = base + (t * amp)[..., None]
    elif kind == "stripes":
        orient = rng.integers(4)
        u = (x, y, (x + y) * 0.7071, (x - y) * 0.7071)[orient]
        period = rng.uniform(0.09, 0.16)
        phase = rng.uniform(0, 2 * math.pi)
        img = base + (np.sin(2 * math.pi * u / period + phase) * 22.0)[..., None]
    elif kind == "checkered":
        cell = rng.uniform(0.09, 0.16)
        ox, oy = rng.uniform(0, cell, 2)
        c = (np.floor((x + ox) / cell) + np.floor((y + oy) / cell)) % 2
        img = base + ((c * 2 - 1) * 18.0)[..., None]
    elif kind == "speckled":
        lum = rng.normal(0, 14, (res, res, 1)).astype(np.float32)
        chroma = rng.normal(0, 6, (res, res, 3)).astype(np.float32)
        img = base + lum + chroma
    else:  # pragma: no cover - guarded by BACKGROUND_KINDS
        raise ValueError(kind)
    return np.broadcast_to(img, (res, res, 3)).astype(np.float32)


def _unit_polygon(shape: str):
    if shape == "square":
        s = 0.84
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.1))
        return pts
    if shape == "cross":
        w = 0.34
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                (-w, w), (-1, w), (-1, -w), (-w, -w)]
    raise ValueError(shape)


def _alpha(shape: str, cx: float, cy: float, half: float, x0: int, y0: int, w: int, h: int,
           ss: int) -> np.ndarray:
    """Coverage in [0, 1] of the shape over the pixel box [x0, x0+w) x [y0, y0+h)."""
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    px, py, r = (cx - x0) * ss, (cy - y0) * ss, half * ss
    if shape == "circle":
        draw.ellipse([px - r, py - r, px + r, py + r], fill=255)
    else:
        draw.polygon([(px + u * r, py + v * r) for u, v in _unit_polygon(shape)], fill=255)
    if ss > 1:
        canvas = canvas.resize((w, h), Image.BOX)
    return np.asarray(canvas, np.float32)[..., None] * (1.0 / 255.0)


# ----------------------------------------------------------------------------------------------
# Captions

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POS_WORDS = {
    "top left": ("at the top left", "in the upper left", "in the top left corner"),
    "top": ("at the top", "near the top", "at the top center"),
    "top right": ("at the top right", "in the upper right", "in the top right corner"),
    "left": ("on the left", "at the left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the lower left", "in the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom center"),
    "bottom right": ("at the bottom right", "in the lower right", "in the bottom right corner"),
}
_REL_WORDS = {"above": ("above", "over"), "below": ("below", "under", "beneath"),
              "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of")}
_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_BG_ADJ = {"gradient": ("gradient",), "stripes": ("striped",), "checkered": ("checkered",),
           "speckled": ("speckled", "noisy")}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(o0: dict, o1: dict) -> str:
    """Where object 0 is relative to object 1."""
    dr, dc = o1["row"] - o0["row"], o1["col"] - o0["col"]
    if dr != 0 and abs(dr) >= abs(dc):
        return "above" if dr > 0 else "below"
    return "left of" if dc > 0 else "right of"


class _Words:
    """Random wordings of one image's parts (each call may pick a different synonym)."""

    def __init__(self, rng, objects, background, relation):
        self.rng, self.o, self.bg, self.rel = rng, objects, background, relation

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def np(self, k, size=None):                      # noun phrase with article
        o = self.o[k]
        if size is None:
            size = bool(self.rng.integers(2))
        words = f"{self.pick(_SIZE_WORDS[o['size']])} " if size else ""
        return _a(f"{words}{o['color']} {o['shape']}")

    def pos(self, k, short=False):
        opts = _POS_WORDS[self.o[k]["position"]]
        return self.pick(opts[:2] if short else opts)

    def bgp(self):
        kind, color = self.bg["kind"], self.bg["color"]
        adj = self.pick(_BG_ADJ[kind])
        if kind == "gradient":
            return self.pick((f"on a {color} gradient", f"on a {color} gradient background",
                              f"against a {color} gradient"))
        return self.pick((f"on {_a(adj)} {color} background", f"against {_a(adj)} {color} background"))

    def rel01(self):
        return self.pick(_REL_WORDS[self.rel])

    def rel10(self):
        return self.pick(_REL_WORDS[_INVERSE[self.rel]])


_ONE = (
    lambda w: f"{w.np(0)} {w.pos(0)}",
    lambda w: f"{w.np(0, False)} {w.pos(0)} {w.bgp()}",
    lambda w: f"{w.np(0, True)} {w.bgp()}",
    lambda w: f"there is {w.np(0)} {w.pos(0)}",
    lambda w: f"{w.pos(0)} there is {w.np(0)}",
    lambda w: f"{w.pos(0)}, {w.np(0, True)}",
    lambda w: f"{w.pick(('a picture of', 'an image of', 'a drawing of'))} {w.np(0, True)}",
    lambda w: f"{_a(w.o[0]['shape'])} colored {w.o[0]['color']} {w.pos(0)}",
    lambda w: (f"{w.pick(_SIZE_WORDS[w.o[0]['size']])} {w.o[0]['color']} {w.o[0]['shape']} "
               f"{w.pos(0)}"),
    lambda w: f"{w.np(0)}, {w.pick(('alone', 'by itself', 'on its own'))}, {w.pos(0, True)}",
)
_TWO = (
    lambda w: f"{w.np(0)} {w.rel01()} {w.np(1)}",
    lambda w: f"{w.np(0, False)} {w.rel01()} {w.np(1, False)} {w.bgp()}",
    lambda w: f"{w.np(0, True)} and {w.np(1, True)}",
    lambda w: f"{w.np(0, False)} {w.pos(0, True)} and {w.np(1, False)} {w.pos(1, True)}",
    lambda w: f"there is {w.np(0)} {w.rel01()} {w.np(1)}",
    lambda w: f"{w.np(1)} {w.rel10()} {w.np(0)}",
    lambda w: f"two shapes: {w.np(0)} and {w.np(1)}",
    lambda w: f"{w.np(0, False)} and {w.np(1, False)} {w.bgp()}",
    lambda w: f"{w.np(0, False)} {w.pos(0, True)}, {w.np(1, False)} {w.rel10()} it",
)


def named_attributes(caption: str) -> frozenset:
    """Which attributes of a single-object image ``caption`` names: ``"shape"`` and ``"color"``
    always (every template names them), ``"size"`` and ``"position"`` when one of their words or
    phrases appears (as whole words)."""
    padded = f" {' '.join(caption.replace(',', ' ').split())} "
    named = {"shape", "color"}
    if any(f" {w} " in padded for words in _SIZE_WORDS.values() for w in words):
        named.add("size")
    if named_positions(caption):
        named.add("position")
    return frozenset(named)


# Every position phrase with its position, longest first: "at the top left" must be read before
# "at the top", which it contains.
_POS_PHRASES = sorted(((phrase, position) for position, phrases in _POS_WORDS.items() for phrase in phrases),
                      key=lambda item: -len(item[0]))


def named_positions(caption: str) -> frozenset:
    """The :data:`POSITIONS` a ``caption``'s position phrases name (as whole words; a phrase inside a
    longer one, such as "at the top" in "at the top left", counts as the longer one only)."""
    padded = f" {' '.join(caption.replace(',', ' ').split())} "
    named = set()
    for phrase, position in _POS_PHRASES:
        if f" {phrase} " in padded:
            named.add(position)
            padded = padded.replace(f" {phrase} ", " | ")
    return frozenset(named)


def describe_object(obj: dict) -> str:
    """One fixed wording of an object record's four attributes, e.g. ``"a small red circle at the
    top"`` (size, colour, shape, then the first phrase of the position): for probes that change one
    attribute and compare."""
    return f"{_a(obj['size'])} {obj['color']} {obj['shape']} {_POS_WORDS[obj['position']][0]}"


def _captions(rng, objects, background, relation, n: int) -> list[str]:
    words = _Words(rng, objects, background, relation)
    templates = _TWO if len(objects) == 2 else _ONE
    out: list[str] = []
    for _ in range(20):
        for t in rng.permutation(len(templates)):
            c = templates[int(t)](words)
            if c not in out:
                out.append(c)
                if len(out) == n:
                    return out
    raise RuntimeError(f"could not draw {n} distinct captions")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# One sample


def generate_sample(rng: np.random.Generator, cfg: ShapesConfig) -> Sample:
    """Draw one image with its captions, class label and attribute record.

    ``attributes``: ``{"objects": [{"shape", "color", "size", "position", "row", "col",
    "center": [x, y] (fractions of the width/height), "half_size" (fraction)}, ...],
    "background": {"kind", "color"}, "relation": "above"|"below"|"left of"|"right of"|None
    (object 0 relative to object 1), "label": int}``. Object 0 is the primary object.
    """
    res, ss = cfg.resolution, cfg.supersample
    n_obj = 2 if cfg.max_objects == 2 and rng.random() < cfg.two_object_prob else 1
    cells = rng.choice(9, size=n_obj, replace=False)
    objects, used = [], set()
    for cell in cells:
        while True:
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
            if (shape, color) not in used:
                break
        used.add((shape, color))
        size = SIZES[int(rng.integers(len(SIZES)))]
        row, col = divmod(int(cell), 3)
        jx, jy = rng.uniform(-_JITTER, _JITTER, 2)
        objects.append({"shape": shape, "color": color, "size": size, "position": POSITIONS[int(cell)],
                        "row": row, "col": col,
                        "center": [round((col + 0.5) / 3 + jx, 4), round((row + 0.5) / 3 + jy, 4)],
                        "half_size": round(_HALF_SIZE[size] * cfg.object_scale, 4)})
    background = {"kind": cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))],
                  "color": BACKGROUND_COLORS[int(rng.integers(len(BACKGROUND_COLORS)))]}

    img = _background(rng, res, background["kind"], background["color"]).copy()
    for o in objects:
        rgb = np.array(COLOR_RGB[o["color"]], np.float32) + rng.integers(-10, 11, 3).astype(np.float32)
        cx, cy, half = o["center"][0] * res, o["center"][1] * res, o["half_size"] * res
        x0, y0 = max(int(math.floor(cx - half)) - 1, 0), max(int(math.floor(cy - half)) - 1, 0)
        x1, y1 = min(int(math.ceil(cx + half)) + 1, res), min(int(math.ceil(cy + half)) + 1, res)
        a = _alpha(o["shape"], cx, cy, half, x0, y0, x1 - x0, y1 - y0, ss)
        region = img[y0:y1, x0:x1]
        region += (rgb - region) * a
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    relation = _relation(objects[0], objects[1]) if n_obj == 2 else None
    label = label_of(objects[0]["shape"], objects[0]["color"])
    captions = _captions(rng, objects, background, relation, cfg.n_captions)
    attributes = {"objects": objects, "background": background, "relation": relation, "label": label}
    return Sample(image, captions, label, attributes)


# ----------------------------------------------------------------------------------------------
# On disk


def config_hash(cfg: ShapesConfig) -> str:
    """sha256 of the config and :data:`GENERATOR_VERSION` (the cache key)."""
    fields = dataclasses.asdict(cfg)
    if cfg.backgrounds == BACKGROUND_KINDS:  # every kind: the key datasets had before the option
        del fields["backgrounds"]
    if cfg.object_scale == 1.0:              # likewise
        del fields["object_scale"]
    payload = json.dumps({"generator_version": GENERATOR_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$FASTXMC_CACHE``, else ``$XDG_CACHE_HOME/fastxmc``, else ``~/.cache/fastxmc``."""
    if os.environ.get("FASTXMC_CACHE"):
        return Path(os.environ["FASTXMC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastxmc"


META, MANIFEST = "meta.json", "manifest.json"
_DIGEST_DIFFERS = "its content differs from the sha256 recorded in manifest.json"


def _load_meta(root: Path) -> dict | None:
    """``root/meta.json``; None when there is none, :class:`DamagedCacheError` when it does not parse."""
    path = root / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:      # ValueError: not UTF-8, or not JSON (truncated)
        raise DamagedCacheError(path, f"unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise DamagedCacheError(path, "not a JSON object")
    return meta


def _is_dataset_of(meta: dict | None, cfg: ShapesConfig) -> bool:
    return bool(meta) and bool(meta.get("complete")) and meta.get("config_hash") == config_hash(cfg)


def is_complete(root, cfg: ShapesConfig) -> bool:
    """Whether ``root``'s meta.json marks a complete shapes dataset generated from ``cfg`` (its files
    are not read: :func:`verify_dataset` checks them)."""
    try:
        meta = _load_meta(Path(root))
    except DamagedCacheError:
        return False
    return _is_dataset_of(meta, cfg)


# ----------------------------------------------------------------------------------------------
# Checking a dataset on disk

# (root, manifest digest, stat signature) of the datasets whose files matched their sha256 in this
# process; (root, content digest, meta.json mtime) for datasets written without a manifest.
_VERIFIED: set = set()


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except FileNotFoundError:
        raise DamagedCacheError(path, "missing") from None


def _load_manifest(root: Path, meta: dict) -> dict:
    """{relative path: [bytes, sha256]} of manifest.json, itself checked against meta.json."""
    path = root / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DamagedCacheError(path, "missing") from None
    if hashlib.sha256(data).hexdigest() != meta["manifest_sha256"]:
        raise DamagedCacheError(path, "its content differs from the sha256 recorded in meta.json")
    return json.loads(data)["files"]


def _check_sizes(root: Path, files: dict) -> int:
    """Raise for the first file whose size is not the recorded one; returns a hash of every file's
    (inode, size, mtime), which changes whenever a file is rewritten."""
    stats = []
    for rel, (size, _) in files.items():
        path = root / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DamagedCacheError(path, "missing") from None
        if st.st_size != size:
            raise DamagedCacheError(path, f"{st.st_size} bytes, {size} expected")
        stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return hash(tuple(stats))


def verify_dataset(root, meta: dict | None = None) -> None:
    """Check the files of the complete dataset at ``root`` against what was recorded when they were
    written; raise :class:`~fastxmc.data.folder.DamagedCacheError` naming the first bad file.

    Every call: manifest.json must match its sha256 in meta.json, and every file it lists must
    exist with its recorded size (one ``stat`` per file): that finds truncated and missing files.
    The first call per process, and again whenever a file's inode, size or mtime changed: every
    file's sha256 too, which finds garbage of the right size. Measured on 5250 images at 64 px
    (35 MB): 0.08 s per call, 0.3 s for the first, so about 0.3 s and 1.2 s for the default 21000;
    hashing at every call would add the second figure to every loader and evaluation for what a
    stat mostly finds already. A dataset written before the manifest existed is checked against
    its content digest (every image and caption), once per process.
    """
    root = Path(root)
    meta = meta if meta is not None else _load_meta(root)
    if meta is None:
        raise DamagedCacheError(root / META, "missing")
    if "manifest_sha256" not in meta:
        _verify_content_digest(root, meta)
        return
    files = _load_manifest(root, meta)
    signature = (str(root.absolute()), meta["manifest_sha256"], _check_sizes(root, files))
    if signature in _VERIFIED:
        return
    for rel, (_, digest) in files.items():
        if _sha256(root / rel) != digest:
            raise DamagedCacheError(root / rel, _DIGEST_DIFFERS)
    _VERIFIED.add(signature)


def _hash_sample(h, data: bytes, rec: Record) -> None:
    """Feed one image's PNG bytes and its record into the content digest (meta's content_sha256)."""
    h.update(data)
    h.update(json.dumps(rec.to_json(), sort_keys=True).encode())


def _verify_content_digest(root: Path, meta: dict) -> None:
    key = (str(root.absolute()), meta.get("content_sha256"), (root / META).stat().st_mtime_ns)
    if key in _VERIFIED:
        return
    h = hashlib.sha256()
    for split, info in meta["splits"].items():
        folder = root / info["folder"]
        try:
            records = read_records(folder, check_images=False)
        except (DatasetFormatError, FileNotFoundError, ValueError) as err:
            raise DamagedCacheError(folder / CAPTIONS_FILE, str(err)) from None
        h.update(f"split {split} {info['n']}\n".encode())
        for rec in records:
            try:
                _hash_sample(h, rec.path.read_bytes(), rec)
            except FileNotFoundError:
                raise DamagedCacheError(rec.path, "missing") from None
    if h.hexdigest() != meta.get("content_sha256"):
        raise DamagedCacheError(root, "its images or captions differ from the content_sha256 in meta.json")
    _VERIFIED.add(key)


def read_attributes(folder) -> list[dict]:
    """The attribute records of one split folder, in the order of its ``captions.jsonl``."""
    path = Path(folder) / "attributes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"attribute file {path} not found")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _Progress:
    def __init__(self, enabled: bool, total: int, every: float = 2.0):
        self.enabled, self.total, self.every = enabled, total, every
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int, split: str, force: bool = False):
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            print(f"fastxmc.data.shapes: {done}/{self.total} images ({split}), {rate:.0f} img/s, "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)


def _write_split(out: Path, split: str, cfg: ShapesConfig, h, progress: _Progress, done: int) -> int:
    n = cfg.split_sizes()[split]
    (out / "images").mkdir(parents=True)
    records, attrs = [], []
    h.update(f"split {split} {n}\n".encode())
    for i in range(n):
        s = generate_sample(sample_rng(cfg, split, i), cfg)
        name = f"images/{i:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
        with open(out / name, "wb") as f:
            f.write(data)
        rec = Record(name, s.captions, [s.label])
        _hash_sample(h, data, rec)
        records.append(rec)
        attrs.append(json.dumps({"image": name, **s.attributes}, separators=(",", ":")))
        done += 1
        progress(done, split)
    write_records(out, records)
    (out / "attributes.jsonl").write_text("\n".join(attrs) + "\n", encoding="utf-8")
    return done


def _manifest(folder: Path) -> dict:
    """{relative path: [bytes, sha256]} of every file under ``folder`` (but meta and manifest), sorted."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (META, MANIFEST))
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, _sha256(p)] for p in paths}


def _write_dataset(out: Path, cfg: ShapesConfig, sizes: dict, prog: _Progress) -> None:
    """Every file of the dataset of ``cfg`` into the new directory ``out``, meta.json last."""
    out.mkdir()
    h = hashlib.sha256()
    done = 0
    for split in sizes:
        done = _write_split(out / split, split, cfg, h, prog, done)
    manifest = json.dumps({"format": "fastxmc-shapes-manifest", "files": _manifest(out)},
                          separators=(",", ":")).encode()
    (out / MANIFEST).write_bytes(manifest)
    meta = {
        "format": "fastxmc-shapes",
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "content_sha256": h.hexdigest(),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "splits": {s: {"folder": s, "n": n} for s, n in sizes.items()},
        "num_classes": NUM_CLASSES,
        "label_names": list(LABEL_NAMES),
        "label_definition": "SHAPES.index(shape) * len(COLORS) + COLORS.index(color) "
                            "of the primary object (objects[0])",
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                  "positions": list(POSITIONS), "background_kinds": list(BACKGROUND_KINDS),
                  "background_colors": list(BACKGROUND_COLORS)},
        "complete": True,
    }
    (out / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def _make_way(root: Path, replace: bool) -> None:
    """Just before the new dataset is renamed to ``root``: remove what is there when ``replace``,
    or an empty directory. Anything else is another process's finished dataset: the rename then
    fails and that one is used."""
    if not root.exists():
        return
    if replace:
        move_aside(root)
    elif root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _generate(root: Path, cfg: ShapesConfig, progress: bool, replace: bool) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(root.parent, root.name)
    sizes = {s: n for s, n in cfg.split_sizes().items() if n > 0}
    prog = _Progress(progress, sum(sizes.values()))
    t0 = time.monotonic()
    if progress:
        print(f"fastxmc.data.shapes: generating {sizes} images at {cfg.resolution}px into {root}",
              file=sys.stderr, flush=True)
    try:
        with atomic_target(root) as tmp:
            _write_dataset(tmp, cfg, sizes, prog)
            _make_way(root, replace)
    except FileWriteError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and is_complete(root, cfg):
            return root                 # another process finished first
        if err.path != root:            # a file inside the temporary directory: name the dataset
            raise FileWriteError(root, err) from err
        raise
    prog(sum(sizes.values()), "done", force=True)
    if progress:
        print(f"fastxmc.data.shapes: wrote {root} in {time.monotonic() - t0:.1f}s",
              file=sys.stderr, flush=True)
    return root


def write_shapes_dataset(root, cfg: ShapesConfig | None = None, progress: bool = True,
                         overwrite: bool = False) -> Path:
    """Generate the dataset of ``cfg`` into ``root`` (see the module docstring for the layout).

    Idempotent: if ``root`` already holds a complete dataset of the same config (and generator
    version) whose files pass :func:`verify_dataset`, it returns at once. One whose files do not
    (its meta.json names this config, so every file is derived data) is reported in one warning
    line and generated again. Atomic: everything is written into a sibling temp directory that
    replaces ``root`` at the end, so an interrupted or failed run (a full disk:
    :class:`~fastxmc.atomic.FileWriteError`) never leaves something that looks complete and leaves
    a previous dataset as it was; temp dirs left by dead processes are removed. A ``root`` that
    holds anything else (an unreadable meta.json included) is an error unless ``overwrite``.
    Concurrent calls (e.g. one per rank) are safe.
    """
    cfg = cfg or ShapesConfig()
    root = Path(root)
    meta = None
    try:
        meta = _load_meta(root)
        if _is_dataset_of(meta, cfg):
            verify_dataset(root, meta)
            return root
    except DamagedCacheError as err:
        if meta is None and not overwrite:   # meta.json unreadable: maybe not a dataset fastxmc wrote
            raise FileExistsError(f"{root} exists but its {err.path.name} is unreadable ({err.why}); "
                                  f"pass overwrite=True or use another path") from None
        warn_rebuilding(err, f"the shapes dataset {root}")
        overwrite = True
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and does not hold a shapes dataset with this config "
                              f"(hash {config_hash(cfg)[:16]}); pass overwrite=True or use another path")
    return _generate(root, cfg, progress, replace=overwrite)


def ensure_shapes_dataset(cfg: ShapesConfig | None = None, cache_dir=None,
                          progress: bool = True) -> Path:
    """The root of the dataset of ``cfg`` under ``cache_dir/shapes/<hash16>``, generated if missing,
    generated again if damaged. Whatever is at that path is fastxmc's cache of ``cfg``, so it is
    replaced when it is not that dataset, intact."""
    cfg = cfg or ShapesConfig()
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return write_shapes_dataset(base / "shapes" / config_hash(cfg)[:16], cfg, progress=progress,
                                overwrite=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastxmc.data.shapes",
                                description="Write the embedded shapes dataset in the folder format.")
    p.add_argument("--out", help="dataset root (default: the cache, see default_cache_dir())")
    d = ShapesConfig()
    for f in dataclasses.fields(ShapesConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)),
                       default=getattr(d, f.name))
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    cfg = ShapesConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ShapesConfig)})
    try:
        if args.out:
            root = write_shapes_dataset(args.out, cfg, overwrite=args.overwrite)
        else:
            root = ensure_shapes_dataset(cfg)
    except (FileWriteError, FileExistsError) as err:    # one line: the path and what to do
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
