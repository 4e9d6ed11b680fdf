"""MS-COCO (2014 by default) captions, with category labels from the instances annotations.

Layout (the official downloads, unpacked into one root)::

    ROOT/annotations/captions_train2014.json     required for split "train"
    ROOT/annotations/captions_val2014.json       required for split "val"
    ROOT/annotations/instances_train2014.json    optional: category labels
    ROOT/train2014/COCO_train2014_000000000009.jpg ...
    ROOT/val2014/...

Every image of the captions file that has at least one caption becomes one record, in increasing
image id order; its captions (stripped of surrounding whitespace) in increasing annotation id order.
Images without any caption are left out with a :class:`~fastxmc.data.sources.DataWarning` that counts
them. The files are read with ``pycocotools``.

Labels (when the instances file exists): categories are numbered 0..C-1 in increasing COCO category
id order (``label_names`` gives their names). An image's ``labels`` are the categories present in it,
sorted by the total area of their instances in the image, largest first (ties: lower id first), so
``labels[0]``, the **primary label**, is the category covering the most area. Images without
instances get ``labels == []`` (primary label -1).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections import defaultdict
from pathlib import Path

from fastxmc.data.folder import DatasetFormatError, Record
from fastxmc.data.sources import DataWarning

__all__ = ["coco_paths", "read_coco", "read_instance_labels", "primary_first_labels"]


def coco_paths(root, split: str, year: str = "2014") -> dict:
    """``{"captions", "instances", "images"}`` paths for a split (whether or not they exist)."""
    root = Path(root)
    tag = f"{split}{year}"
    return {"captions": root / "annotations" / f"captions_{tag}.json",
            "instances": root / "annotations" / f"instances_{tag}.json",
            "images": root / tag}


def _load_coco(path: Path):
    """A ``pycocotools.coco.COCO`` index of ``path`` (its progress prints are silenced)."""
    from pycocotools.coco import COCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise DatasetFormatError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


def primary_first_labels(annotations, cat_index: dict) -> list[int]:
    """Contiguous category ids of one image's instances, largest total area first (ties: lower id)."""
    area: dict[int, float] = defaultdict(float)
    for ann in annotations:
        area[ann["category_id"]] += float(ann.get("area", 0.0))
    order = sorted(area, key=lambda cat: (-area[cat], cat))
    return [cat_index[cat] for cat in order]


def read_instance_labels(path: Path):
    """(image id -> labels, label names) from an instances file."""
    coco = _load_coco(path)
    cat_ids = sorted(coco.cats)
    if not cat_ids:
        raise DatasetFormatError(f"{path}: instances file has no categories")
    cat_index = {cat: i for i, cat in enumerate(cat_ids)}
    try:
        labels = {img: primary_first_labels(anns, cat_index) for img, anns in coco.imgToAnns.items()}
    except KeyError as e:
        raise DatasetFormatError(f"{path}: annotation without {e} (or of an unknown category)") from None
    return labels, [coco.cats[c]["name"] for c in cat_ids]


def _captions_by_image(coco, path: Path) -> dict:
    out = {}
    for img_id, anns in coco.imgToAnns.items():
        try:
            caps = [a["caption"].strip() for a in sorted(anns, key=lambda a: a["id"])]
        except (KeyError, AttributeError):
            raise DatasetFormatError(f"{path}: a caption annotation of image {img_id} has no "
                                     f"'caption' string or 'id'") from None
        out[img_id] = [c for c in caps if c]
    return out


def read_coco(root, split: str, year: str = "2014") -> tuple[list[Record], list[str] | None]:
    """Records of one COCO split and the category names (``None`` without an instances file).

    Raises ``FileNotFoundError`` naming the path for a missing captions file or image folder, and
    :class:`DatasetFormatError` for a malformed file or a split without captioned images.
    """
    paths = coco_paths(root, split, year)
    if not paths["captions"].is_file():
        raise FileNotFoundError(f"COCO captions file {paths['captions']} not found")
    if not paths["images"].is_dir():
        raise FileNotFoundError(f"COCO image folder {paths['images']} does not exist")
    coco = _load_coco(paths["captions"])
    captions = _captions_by_image(coco, paths["captions"])
    labels, names = (None, None)
    if paths["instances"].is_file():
        labels, names = read_instance_labels(paths["instances"])
    records, uncaptioned = [], 0
    for img_id in sorted(coco.imgs):
        caps = captions.get(img_id)
        if not caps:
            uncaptioned += 1
            continue
        name = coco.imgs[img_id].get("file_name")
        if not isinstance(name, str) or not name:
            raise DatasetFormatError(f"{paths['captions']}: image {img_id} has no 'file_name'")
        rel = f"{paths['images'].name}/{name}"
        img_labels = None if labels is None else labels.get(img_id, [])
        records.append(Record(rel, caps, img_labels, paths["images"] / name, {"coco_id": img_id}))
    if uncaptioned:
        warnings.warn(f"{paths['captions']}: {uncaptioned} images without captions left out", DataWarning,
                      stacklevel=2)
    if not records:
        raise DatasetFormatError(f"{paths['captions']}: empty dataset (no captioned images)")
    return records, names
