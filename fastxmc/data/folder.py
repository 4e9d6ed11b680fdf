"""The ``folder`` dataset format: an images directory plus ``captions.jsonl``.

Layout (the embedded shapes dataset is written in exactly this format)::

    FOLDER/
      captions.jsonl      one JSON object per image, one per line
      images/...          image files (any layout; paths are relative to FOLDER)

Each line of ``captions.jsonl``::

    {"image": "images/000000.png", "captions": ["a red circle", ...], "labels": [3]}

``image`` is a path relative to FOLDER (it may not escape it), ``captions`` a non-empty list of
non-empty strings, ``labels`` an optional list of integers (class ids for the label-guided losses).
Other keys are kept in :attr:`Record.extra`. Blank lines are ignored.

:func:`read_records` raises an error that names the path (and the line) for a folder that does not
exist, a missing ``captions.jsonl``, a malformed line, an entry without captions, an image path that
escapes the folder or does not exist, and an empty dataset. Nothing is dropped silently.

The data package's caches (the shapes dataset, caption embeddings, parsed annotations) share the
helpers at the end of this module: :class:`DamagedCacheError` for a cache file that fails its check
when opened, :func:`warn_rebuilding` for the one line that reports it, and the cleanup of what a
killed writer left behind.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fastxmc.atomic import atomic_write_bytes

CAPTIONS_FILE = "captions.jsonl"

__all__ = ["CAPTIONS_FILE", "DatasetFormatError", "Record", "read_records", "write_records", "DataWarning",
           "DamagedCacheError", "warn_rebuilding"]


class DatasetFormatError(ValueError):
    """A dataset's annotations are malformed, empty or point outside the dataset."""


class DataWarning(UserWarning):
    """Something in a dataset was left out or changed (named in the message)."""


@dataclass
class Record:
    """One image of a ``folder`` dataset.

    ``image`` is the path as written in ``captions.jsonl`` (relative to the folder, POSIX
    separators); ``path`` is the absolute path (filled in by :func:`read_records`).
    """
    image: str
    captions: list[str]
    labels: list[int] | None = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        obj = {"image": self.image, "captions": list(self.captions)}
        if self.labels is not None:
            obj["labels"] = [int(x) for x in self.labels]
        for k, v in self.extra.items():
            obj.setdefault(k, v)
        return obj


def _check_image_path(folder: Path, image, where: str, check_exists: bool) -> Path:
    if not isinstance(image, str) or not image:
        raise DatasetFormatError(f"{where}: 'image' must be a non-empty string, got {image!r}")
    if Path(image).is_absolute():
        raise DatasetFormatError(f"{where}: image path {image!r} must be relative to {folder}")
    # Lexical check, so that images symlinked into the folder from elsewhere stay allowed.
    norm = os.path.normpath(image)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise DatasetFormatError(f"{where}: image path {image!r} escapes the dataset folder {folder}")
    full = folder.absolute() / norm
    if check_exists and not full.is_file():
        raise FileNotFoundError(f"{where}: image {image!r} not found (looked for {full})")
    return full


def _check_captions(captions, where: str) -> list[str]:
    if captions is None:
        raise DatasetFormatError(f"{where}: entry has no 'captions'")
    if isinstance(captions, str):
        raise DatasetFormatError(f"{where}: 'captions' must be a list of strings, got one string")
    if not isinstance(captions, list) or not captions:
        raise DatasetFormatError(f"{where}: 'captions' must be a non-empty list of strings, got {captions!r}")
    for c in captions:
        if not isinstance(c, str) or not c.strip():
            raise DatasetFormatError(f"{where}: every caption must be a non-empty string, got {c!r}")
    return list(captions)


def _check_labels(labels, where: str) -> list[int] | None:
    if labels is None:
        return None
    if not isinstance(labels, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in labels):
        raise DatasetFormatError(f"{where}: 'labels' must be a list of integers, got {labels!r}")
    return list(labels)


def read_records(folder, *, check_images: bool = True) -> list[Record]:
    """Read ``FOLDER/captions.jsonl`` and return its records, validated.

    With ``check_images`` (default) every image file must exist. Raises ``FileNotFoundError``
    for a missing folder, annotation file or image, and :class:`DatasetFormatError` otherwise.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist (or is not a directory)")
    ann = folder / CAPTIONS_FILE
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file {ann} not found: a folder dataset needs {CAPTIONS_FILE}")
    records: list[Record] = []
    with open(ann, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{ann}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "image" not in obj:
                raise DatasetFormatError(f"{where}: entry has no 'image'")
            full = _check_image_path(folder, obj["image"], where, check_images)
            captions = _check_captions(obj.get("captions"), where)
            labels = _check_labels(obj.get("labels"), where)
            extra = {k: v for k, v in obj.items() if k not in ("image", "captions", "labels")}
            records.append(Record(obj["image"], captions, labels, full, extra))
    if not records:
        raise DatasetFormatError(f"{ann}: empty dataset (no entries)")
    return records


def write_records(folder, records: Iterable[Record | dict], *, check_images: bool = True) -> Path:
    """Write ``FOLDER/captions.jsonl`` atomically (:func:`fastxmc.atomic.atomic_write_bytes`).

    ``records`` are :class:`Record` objects or dicts with the JSON keys. The image files must
    already be in place when ``check_images`` is true. Every record is checked before anything is
    written, so a bad record leaves an existing ``captions.jsonl`` as it was. Returns its path.
    """
    folder = Path(folder)
    ann = folder / CAPTIONS_FILE
    lines = []
    for i, rec in enumerate(records):
        obj = rec.to_json() if isinstance(rec, Record) else dict(rec)
        where = f"record {i} for {ann}"
        _check_image_path(folder, obj.get("image"), where, check_images)
        _check_captions(obj.get("captions"), where)
        _check_labels(obj.get("labels"), where)
        lines.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    if not lines:
        raise DatasetFormatError(f"{ann}: refusing to write an empty dataset")
    return atomic_write_bytes("".join(lines).encode("utf-8"), ann)


# ----------------------------------------------------------------------------------------------
# Caches: files fastxmc derived from a dataset and can derive again


class DamagedCacheError(ValueError):
    """A cache file failed its check when opened (truncated, garbled, missing, or its content
    differs from the digest recorded when it was written). ``path`` names the file, ``why`` says
    what is wrong; the cache is rebuilt by whoever opened it."""

    def __init__(self, path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"cache {self.path} is damaged ({why})")


def warn_rebuilding(err: DamagedCacheError, what: str) -> None:
    """Report ``err`` in one warning line that also says what is rebuilt (``what``, e.g. "the
    caption cache DIR"): a damaged cache costs a rebuild, never the run."""
    warnings.warn(f"fastxmc.data: {err}; rebuilding {what}", DataWarning, stacklevel=3)
