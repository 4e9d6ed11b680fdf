"""The shapes attribute classifier: does a generated image show what its caption asked for?

A small CNN with one head per attribute of the object (:data:`ATTRIBUTE_VALUES`: shape, color,
size, position; the vocabularies of :mod:`fastxmc.data.shapes`), trained on the real train split
of a shapes dataset, evaluated on its real val split, and cached under
``<cache>/attributes/<dataset config hash>-<classifier config hash>.pt``.

Only **single-object** images are used, for training and for scoring: in a two-object image the
primary object (object 0, the one every caption names first) is not visually distinguishable from
the other one, so its attributes are not a function of the pixels. Filter evaluation targets with
:func:`is_single_object`; :func:`attribute_accuracy` rejects two-object records.

Scores (:func:`attribute_accuracy`) are reported per attribute beside the classifier's accuracy on
real val images (its ceiling) and chance, the frequency of the most common target value (what a
constant guess scores); ``"all"`` counts images with every attribute right.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from fastxmc.atomic import atomic_torch_save, state_digest
from fastxmc.data.folder import DamagedCacheError, warn_rebuilding
from fastxmc.data.shapes import (COLORS, POSITIONS, SHAPES, SIZES, ShapesConfig, config_hash,
                                 default_cache_dir, ensure_shapes_dataset, read_attributes)

__all__ = ["ATTRIBUTE_VALUES", "AttributeClassifierConfig", "AttributeClassifier", "is_single_object",
           "encode_targets", "load_split", "train_attribute_classifier", "evaluate_classifier",
           "ensure_attribute_classifier", "AttributeAccuracy", "attribute_accuracy"]

ATTRIBUTE_VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
# Part of every cached file: bump when the network or its training changes.
CACHE_FORMAT = "fastxmc-attribute-classifier-v2"
# Smaller datasets are upsampled to this size: at 32px a small shape is ~5 pixels wide, and the
# first stride-2 stage left too little of it (measured: shape accuracy 0.23 on real 32px images).
MIN_RESOLUTION = 64


@dataclass(frozen=True)
class AttributeClassifierConfig:
    """How the classifier is built and trained. Every field is part of the cache key."""
    width: int = 32               # channels of the first stage (x1, x2, x4 over three stages)
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2            # random translation augmentation, in pixels
    noise_std: float = 0.02       # Gaussian pixel noise augmentation
    max_train: int = 0            # cap on single-object training images (0: all)
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_shift < 0 or self.noise_std < 0 \
                or self.max_train < 0:
            raise ValueError(f"lr must be > 0 and weight_decay, max_shift, noise_std, max_train >= 0: {self}")

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- targets
def is_single_object(record: dict) -> bool:
    """Whether an attribute record describes one object (flat records always do)."""
    return "objects" not in record or len(record["objects"]) == 1


def _object_of(record: dict, index: int) -> dict:
    if not isinstance(record, dict):
        raise TypeError(f"target_attributes[{index}] must be a dict, got {type(record).__name__}")
    if "objects" not in record:
        return record
    if len(record["objects"]) != 1:
        raise ValueError(f"target_attributes[{index}] describes {len(record['objects'])} objects: only "
                         f"single-object images can be scored (filter with is_single_object)")
    return record["objects"][0]


def encode_targets(records) -> dict:
    """{attribute: (N,) int64 class index} from attribute records.

    A record is a flat ``{"shape", "color", "size", "position"}`` dict (strings of the shapes
    vocabularies) or an ``attributes.jsonl`` record with exactly one entry in ``"objects"``.
    """
    records = list(records)
    columns = {name: [] for name in ATTRIBUTE_VALUES}
    for i, record in enumerate(records):
        obj = _object_of(record, i)
        for name, values in ATTRIBUTE_VALUES.items():
            if obj.get(name) not in values:
                raise ValueError(f"target_attributes[{i}][{name!r}] must be one of {values}, "
                                 f"got {obj.get(name)!r}")
            columns[name].append(values.index(obj[name]))
    return {name: torch.tensor(col, dtype=torch.long) for name, col in columns.items()}


def load_split(root, split: str, max_images: int = 0) -> tuple:
    """The single-object images of a shapes split: ``(images (N, 3, H, W) uint8, targets)``."""
    folder = Path(root) / split
    records = [r for r in read_attributes(folder) if is_single_object(r)]
    if max_images:
        records = records[:max_images]
    if not records:
        raise ValueError(f"{folder} holds no single-object images: the attribute classifier needs them "
                         f"(generate the dataset with max_objects=1 or two_object_prob < 1)")
    images = np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in records])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), encode_targets(records)


# ---------------------------------------------------------------------------- the network
def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """CNN over images in [0, 1] -> logits per attribute.

    The input is RGB plus its saturation, ``max - min`` over the channels: objects are drawn in
    saturated palette colours and backgrounds in muted ones, so that channel is a clean silhouette
    and the shape becomes learnable in a few hundred steps (measured without it: shape still at
    chance after 150 steps of 64 images, when colour, size and position were near 100%).
    Three stages (stride-2 conv, stride-1 conv; width x1, x2, x4) give a map at 1/8 resolution.
    A 1x1 conv scores every location of the map ("where is the object"): averaged over the 3x3
    grid cells these scores are the position logits, and their softmax over the map is the
    attention that pools the object's features for the shape, color and size heads (so background
    textures do not dilute them, and these heads do not depend on where the object is).
    Inputs of another size are resized to ``resolution`` (bilinear, antialiased).
    """

    def __init__(self, resolution: int, width: int = 32):
        super().__init__()
        if resolution < 24:
            raise ValueError(f"resolution must be >= 24, got {resolution}")
        self.resolution = resolution
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(4, w, 2), _conv_bn_relu(w, w, 1), _conv_bn_relu(w, 2 * w, 2),
            _conv_bn_relu(2 * w, 2 * w, 1), _conv_bn_relu(2 * w, 4 * w, 2), _conv_bn_relu(4 * w, 4 * w, 1))
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True),
                                                        nn.Linear(4 * w, len(values)))
                                    for name, values in ATTRIBUTE_VALUES.items() if name != "position"})
        self.position_scores = nn.Conv2d(4 * w, 1, 1)

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) float in [0, 1] -> {attribute: (B, num_values) logits}."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, H, W) in [0, 1], got "
                             f"{tuple(images.shape)} {images.dtype}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False, antialias=True)
        saturation = images.amax(1, keepdim=True) - images.amin(1, keepdim=True)
        fmap = self.features(torch.cat([images, saturation], 1) * 2 - 1)       # (B, C, h, w)
        scores = self.position_scores(fmap)                                    # (B, 1, h, w)
        attention = scores.flatten(2).softmax(-1)                              # (B, 1, h * w)
        pooled = (fmap.flatten(2) * attention).sum(-1)                         # (B, C)
        logits = {name: head(pooled) for name, head in self.heads.items()}
        # Row-major 3x3 cells, the order of POSITIONS.
        logits["position"] = F.adaptive_avg_pool2d(scores, 3).flatten(1)
        return {name: logits[name] for name in ATTRIBUTE_VALUES}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict:
        """{attribute: (B,) int64 predicted index}, in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        chunks = [self(_to_float(images[i:i + batch_size]).to(device))
                  for i in range(0, images.shape[0], batch_size)]
        self.train(was_training)
        return {name: torch.cat([c[name].argmax(1).cpu() for c in chunks]) for name in ATTRIBUTE_VALUES}


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


# ---------------------------------------------------------------------------- training
def _augment(x: torch.Tensor, cfg: AttributeClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (edge-replicated) and pixel noise."""
    if cfg.max_shift:
        s = cfg.max_shift
        dx, dy = (torch.randint(-s, s + 1, (2,), generator=generator) + s).tolist()
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        x = padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    if cfg.noise_std:
        x = x + torch.randn(x.shape, generator=generator) * cfg.noise_std
    return x.clamp(0, 1)


def _loss(logits: dict, targets: dict, rows: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits[name], targets[name][rows]) for name in ATTRIBUTE_VALUES)


def _fit(model: AttributeClassifier, images: torch.Tensor, targets: dict,
         cfg: AttributeClassifierConfig, progress: bool) -> None:
    """AdamW with a one-cycle schedule over ``cfg.epochs`` shuffled epochs."""
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(images.shape[0] // cfg.batch_size, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="attribute classifier", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = _augment(_to_float(images[rows]), cfg, generator)
            loss = _loss(model(batch), targets, rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def _chance(targets: dict) -> dict:
    """Frequency of the most common value per attribute, and of the most common combination."""
    n = next(iter(targets.values())).numel()
    chance = {name: float(torch.bincount(t).max()) / n for name, t in targets.items()}
    combos = Counter(zip(*(t.tolist() for t in targets.values())))
    chance["all"] = combos.most_common(1)[0][1] / n
    return chance


def _accuracies(predicted: dict, targets: dict) -> dict:
    correct = {name: predicted[name] == targets[name] for name in ATTRIBUTE_VALUES}
    acc = {name: float(c.double().mean()) for name, c in correct.items()}
    acc["all"] = float(torch.stack(list(correct.values())).all(0).double().mean())
    return acc


def evaluate_classifier(model: AttributeClassifier, images: torch.Tensor, targets: dict) -> dict:
    """{attribute or "all": {"accuracy", "chance"}} of ``model`` on labelled images, plus "n"."""
    acc, chance = _accuracies(model.predict(images), targets), _chance(targets)
    report = {name: {"accuracy": acc[name], "chance": chance[name]} for name in acc}
    report["n"] = int(images.shape[0])
    return report


def train_attribute_classifier(root, cfg: AttributeClassifierConfig | None = None, *,
                               progress: bool = True) -> tuple:
    """Train on the single-object images of ``root``/train, score on ``root``/val.

    Returns ``(model, report)``: the classifier in eval mode (CPU) and
    :func:`evaluate_classifier`'s report on the real val images. Deterministic for ``cfg.seed``.
    """
    cfg = cfg or AttributeClassifierConfig()
    images, targets = load_split(root, "train", cfg.max_train)
    with torch.random.fork_rng():          # seeded initialisation without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = AttributeClassifier(resolution=max(images.shape[-1], MIN_RESOLUTION), width=cfg.width)
    _fit(model, images, targets, cfg, progress)
    val_images, val_targets = load_split(root, "val")
    return model, evaluate_classifier(model, val_images, val_targets)


# ---------------------------------------------------------------------------- cache
def _dataset_root_and_hash(dataset, cache_dir) -> tuple:
    if isinstance(dataset, ShapesConfig):
        return ensure_shapes_dataset(dataset, cache_dir, progress=False), config_hash(dataset)
    root = Path(dataset)
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FileNotFoundError(f"{root} is not a shapes dataset root (no readable meta.json)") from None
    if meta.get("format") != "fastxmc-shapes" or not meta.get("complete"):
        raise ValueError(f"{root} is not a complete shapes dataset (meta.json format/complete)")
    return root, meta["config_hash"]


def _load_cached(path: Path, cfg: AttributeClassifierConfig):
    """The cached model, or None when the file is from another format / config, or damaged: it does
    not load, or its content differs from the digest stored with it (reported in one warning
    line). The classifier is then retrained and the file overwritten."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CACHE_FORMAT or \
                payload.get("classifier_config") != dataclasses.asdict(cfg):
            return None
        if "digest" in payload and state_digest(payload) != payload["digest"]:
            why = "its content differs from the digest stored with it"
            warn_rebuilding(DamagedCacheError(path, why), "it")
            return None
        model = AttributeClassifier(payload["resolution"], cfg.width)
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # noqa: BLE001 - a truncated file raises anything from the unpickler
        why = "does not load: " + (str(err).strip().splitlines() or [type(err).__name__])[0]
        warn_rebuilding(DamagedCacheError(path, why), "it")
        return None
    model.eval()
    model.report = payload["report"]
    return model


def ensure_attribute_classifier(dataset, cfg: AttributeClassifierConfig | None = None, *,
                                cache_dir=None, progress: bool = True) -> AttributeClassifier:
    """The classifier of a shapes dataset, trained once and cached.

    dataset: a :class:`~fastxmc.data.shapes.ShapesConfig` (generated if missing) or the root of a
    shapes dataset. Cached at ``<cache_dir>/attributes/<dataset hash16>-<config hash12>.pt``
    (``cache_dir`` defaults to :func:`~fastxmc.data.shapes.default_cache_dir`). The returned
    model (eval mode, CPU) carries ``model.report``: its accuracy and chance on real val images.
    """
    cfg = cfg or AttributeClassifierConfig()
    root, data_hash = _dataset_root_and_hash(dataset, cache_dir)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = base / "attributes" / f"{data_hash[:16]}-{cfg.hash()[:12]}.pt"
    if path.is_file():
        model = _load_cached(path, cfg)
        if model is not None:
            return model
    model, report = train_attribute_classifier(root, cfg, progress=progress)
    payload = {"format": CACHE_FORMAT, "dataset_config_hash": data_hash,
               "classifier_config": dataclasses.asdict(cfg), "resolution": model.resolution,
               "vocab": {k: list(v) for k, v in ATTRIBUTE_VALUES.items()},
               "state_dict": model.state_dict(), "report": report}
    payload["digest"] = state_digest(payload)
    atomic_torch_save(payload, path)
    model.report = report
    return model


# ---------------------------------------------------------------------------- scoring generated images
class AttributeAccuracy:
    """Streaming attribute accuracy of generated images: ``update(images, target_attributes)``
    batch by batch, then ``compute()`` (see :func:`attribute_accuracy`)."""

    def __init__(self, classifier: AttributeClassifier):
        self.classifier = classifier
        self._predicted: list = []
        self._targets: list = []
        self._named: list = []

    def update(self, images: torch.Tensor, target_attributes, named=None) -> None:
        """``named``: optional, one set per row of the attributes its caption names (see
        :func:`fastxmc.data.shapes.named_attributes`); compute() then also scores each attribute
        on the rows whose caption names it."""
        targets = encode_targets(target_attributes)
        n = targets["shape"].numel()
        if images.dim() != 4 or images.shape[0] != n:
            raise ValueError(f"images must be (N, 3, H, W) with one row per target, got "
                             f"{tuple(images.shape)} for {n} targets")
        if named is not None and len(named) != n:
            raise ValueError(f"named must hold one set of attribute names per row ({n}), got {len(named)}")
        if self._targets and (named is None) != (not self._named):
            raise ValueError("pass named with every update() or with none")
        self._predicted.append(self.classifier.predict(images))
        self._targets.append(targets)
        if named is not None:
            self._named.append({k: torch.tensor([k in row for row in named]) for k in ATTRIBUTE_VALUES})

    def compute(self) -> dict:
        if not self._targets:
            raise ValueError("AttributeAccuracy.compute() before any update()")
        predicted = {k: torch.cat([p[k] for p in self._predicted]) for k in ATTRIBUTE_VALUES}
        targets = {k: torch.cat([t[k] for t in self._targets]) for k in ATTRIBUTE_VALUES}
        acc, chance = _accuracies(predicted, targets), _chance(targets)
        real = getattr(self.classifier, "report", {})
        result = {name: {"accuracy": acc[name], "real_val_accuracy": real.get(name, {}).get("accuracy"),
                         "chance": chance[name]} for name in acc}
        if self._named:
            for name in ATTRIBUTE_VALUES:
                rows = torch.cat([m[name] for m in self._named])
                hits = predicted[name][rows] == targets[name][rows]
                result[name]["named_n"] = int(rows.sum())
                result[name]["named_accuracy"] = float(hits.double().mean()) if hits.numel() else None
        result["n"] = int(targets["shape"].numel())
        return result


def attribute_accuracy(images: torch.Tensor, target_attributes, classifier: AttributeClassifier) -> dict:
    """Score images against the attributes their captions asked for.

    images: (N, 3, H, W) float in [0, 1] (or uint8); target_attributes: N single-object records
    (see :func:`encode_targets`). Returns ``{"shape" | "color" | "size" | "position" | "all":
    {"accuracy", "real_val_accuracy", "chance"}, "n": N}``.
    """
    meter = AttributeAccuracy(classifier)
    meter.update(images, target_attributes)
    return meter.compute()
