"""Localized Narratives (Pont-Tuset et al. 2020) over COCO or Open Images images.

Layout (the official jsonl files next to the images)::

    ROOT/coco_train_localized_narratives-00000-of-00004.jsonl ...   (or coco_train_captions.jsonl)
    ROOT/coco_val_localized_narratives.jsonl
    ROOT/train2017/000000137576.jpg ...   ROOT/val2017/...          COCO 2017 images
    ROOT/annotations/instances_train2017.json                       optional: COCO labels
    ROOT/open_images_train_v6_localized_narratives-00000-of-00010.jsonl ...
    ROOT/open_images_validation_localized_narratives.jsonl
    ROOT/train/0000aa810854ddb4.jpg ...   ROOT/validation/...       Open Images images

Files: the ``*.jsonl`` files of ``ROOT`` whose name starts with the source (``coco_`` or
``open_images_``), names the split (``train``; ``val`` or ``validation``) as a ``_``-separated word,
and contains ``localized_narratives`` or ``captions``; read in sorted name order. Each line is one
narrative ``{"dataset_id", "image_id", "caption", ...}`` (other keys ignored). Narratives of the same
image are gathered into one record (its captions, in file order); records are in order of first
appearance.

Images: COCO ``<dir>/<image_id as 12 digits>.jpg`` with ``<dir>`` from the ``dataset_id``
(``mscoco_val2017`` -> ``val2017``; ``<split>2017`` if it has no such prefix); Open Images
``<dir>/<image_id>.jpg`` with ``<dir>`` = ``train`` or ``validation``. ``images`` replaces
``ROOT/<dir>`` by one folder.

Labels (COCO only): when ``instances`` is given, or ``ROOT/annotations/instances_<dir>.json`` exists,
the image's COCO categories as in :mod:`fastxmc.data.coco` (primary = largest total area); otherwise
none (label -1).
"""
from __future__ import annotations

import json
from pathlib import Path

from fastxmc.data.folder import DatasetFormatError, Record

__all__ = ["narrative_files", "read_narratives", "SOURCES"]

SOURCES = ("coco", "open_images")
_SPLIT_WORDS = {"train": ("train",), "val": ("val", "validation")}


def narrative_files(root, split: str, source: str = "coco") -> list[Path]:
    """The jsonl files of ``source`` and ``split`` in ``root`` (sorted); an error naming root if none."""
    root = Path(root)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"Localized Narratives folder {root} does not exist")
    found = []
    for p in sorted(root.glob(f"{source}_*.jsonl")):
        words = p.name[len(source) + 1:].replace("-", "_").split("_")
        if any(w in words for w in _SPLIT_WORDS[split]) and (
                "localized" in words or "captions.jsonl" in words):
            found.append(p)
    if not found:
        example = f"{source}_{_SPLIT_WORDS[split][0]}_localized_narratives.jsonl"
        raise FileNotFoundError(f"no Localized Narratives files for source {source!r} and split {split!r} "
                                f"in {root} (expected e.g. {example})")
    return found


def _image_location(source: str, split: str, dataset_id, image_id: str) -> tuple[str, str]:
    """(folder name, file name) of one narrated image."""
    if source == "coco":
        if not image_id.isdigit():
            raise ValueError(f"COCO image_id must be a number, got {image_id!r}")
        named = isinstance(dataset_id, str) and dataset_id.startswith("mscoco_")
        folder = dataset_id[len("mscoco_"):] if named else f"{split}2017"
        return folder, f"{int(image_id):012d}.jpg"
    return ("train" if split == "train" else "validation"), f"{image_id}.jpg"


def _read_lines(path: Path, source: str, split: str, out: dict) -> None:
    """Add the narratives of one file to ``out`` {(folder, file): [captions], ...}."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                image_id, caption = str(obj["image_id"]), obj["caption"]
                key = _image_location(source, split, obj.get("dataset_id"), image_id)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            except (KeyError, TypeError) as e:
                raise DatasetFormatError(f"{where}: a narrative needs 'image_id' and 'caption' "
                                         f"({e})") from None
            except ValueError as e:
                raise DatasetFormatError(f"{where}: {e}") from None
            if not isinstance(caption, str):
                raise DatasetFormatError(f"{where}: 'caption' must be a string, got {caption!r}")
            if caption.strip():
                out.setdefault(key, []).append(caption.strip())


def _coco_labels(root: Path, folders: set, instances) -> tuple[dict | None, list[str] | None]:
    """(COCO image id -> labels, names) from the instances file(s), or (None, None) without one."""
    from fastxmc.data.coco import read_instance_labels
    if instances is not None:
        paths = [Path(instances)]
        if not paths[0].is_file():
            raise FileNotFoundError(f"COCO instances file {paths[0]} not found")
    else:
        paths = [root / "annotations" / f"instances_{d}.json" for d in sorted(folders)]
        paths = [p for p in paths if p.is_file()]
    if not paths:
        return None, None
    labels, names = {}, None
    for p in paths:
        part, part_names = read_instance_labels(p)
        if names is not None and part_names != names:
            raise DatasetFormatError(f"{p}: categories differ from those of {paths[0]}")
        labels.update(part)
        names = part_names
    return labels, names


def read_narratives(root, split: str, source: str = "coco", images=None,
                    instances=None) -> tuple[list[Record], list[str] | None]:
    """Records of one Localized Narratives split (see the module docstring) and the label names."""
    root = Path(root)
    by_image: dict = {}
    for path in narrative_files(root, split, source):
        _read_lines(path, source, split, by_image)
    if not by_image:
        raise DatasetFormatError(f"{root}: empty dataset (no narratives for split {split!r})")
    folders = {folder for folder, _ in by_image}
    image_dirs = {d: (Path(images) if images is not None else root / d) for d in folders}
    for d in image_dirs.values():
        if not d.is_dir():
            raise FileNotFoundError(f"Localized Narratives image folder {d} does not exist")
    labels, names = (_coco_labels(root, folders, instances) if source == "coco" else (None, None))
    records = []
    for (folder, name), caps in by_image.items():
        image_id = name.rsplit(".", 1)[0]
        img_labels = None
        if labels is not None:
            img_labels = labels.get(int(image_id), [])
        records.append(Record(f"{folder}/{name}", caps, img_labels, image_dirs[folder] / name,
                              {"image_id": image_id}))
    return records, names
