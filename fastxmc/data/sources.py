"""Dataset kind -> the usable records of a split, with unreadable images found and left out.

:func:`load_split` is what the loader calls: it reads the annotations of ``cfg.dataset``
(:func:`read_split`), checks that every image folder exists, then checks every image once
(:func:`find_unreadable`: a full decode with PIL, JPEGs at 1/8 scale; the result is cached per dataset
under ``<cache_dir>/imagecheck``, keyed by every image's path, size and mtime). An unreadable, corrupt
or missing image is left out with a :class:`DataWarning` naming the file and counted in
:attr:`SplitData.skipped`, or raises :class:`UnreadableImageError` with ``cfg.strict``. A missing
annotation file or image folder and an empty split raise errors that name the path. Nothing is dropped
silently.

Parsed COCO and Localized Narratives annotations (large JSON files) are cached under
``<cache_dir>/records``, keyed by the annotation files' paths, sizes and mtimes and the reader options.
Both caches are JSON files written atomically; one that no longer parses or lacks the expected
structure (truncated, garbled) is reported in one :class:`DataWarning` line and rebuilt.

Sample index ``i`` of a split is ``records[i]`` after unreadable images are left out.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastxmc.atomic import atomic_write_text
from fastxmc.data.config import SPLITS, DataConfig
from fastxmc.data.folder import (CAPTIONS_FILE, DamagedCacheError, DatasetFormatError, DataWarning, Record,
                                 read_records, warn_rebuilding)

__all__ = ["DataWarning", "UnreadableImageError", "SplitData", "read_split", "find_unreadable",
           "load_split", "image_problem"]

_RECORDS_VERSION = 1
_IMAGECHECK_VERSION = 1
_WARN_EACH = 20            # unreadable images warned about one by one; the rest in one summary
_PARALLEL_CHECK_MIN = 512  # below this many images the check runs in-process


class UnreadableImageError(DatasetFormatError):
    """An image could not be decoded and ``strict`` is set."""


@dataclass
class SplitData:
    """The records of one split of one dataset.

    ``records[i]`` is sample ``i``: ``path`` absolute, ``captions`` non-empty, ``labels`` a list whose
    first entry is the primary label (``None`` when the dataset has no labels; ``[]`` for an image
    without any). ``skipped`` lists ``(path, reason)`` of the unreadable images left out.
    """
    kind: str
    split: str
    root: Path
    records: list[Record]
    label_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def primary_labels(self) -> np.ndarray:
        """(N,) int64: ``labels[0]`` of each record, -1 without labels."""
        return np.array([r.labels[0] if r.labels else -1 for r in self.records], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when the dataset has no labels)."""
        if self.label_names is not None:
            return len(self.label_names)
        return int(max((max(r.labels) for r in self.records if r.labels), default=-1)) + 1


# ----------------------------------------------------------------------------------------------
# Readers


def _shapes_split(cfg: DataConfig, split: str):
    from fastxmc.data import shapes
    scfg = cfg.shapes_config()
    if cfg.path is not None:
        root = shapes.write_shapes_dataset(cfg.path, scfg)
    else:
        root = shapes.ensure_shapes_dataset(scfg, cfg.resolved_cache_dir())
    if scfg.split_sizes()[split] == 0:     # the generator writes no folder for an empty split
        raise FileNotFoundError(f"no {split!r} split in the shapes dataset {root} "
                                f"(DataConfig.shapes_{split} = 0)")
    return root, read_records(root / split, check_images=False), list(shapes.LABEL_NAMES)


def _folder_split(cfg: DataConfig, split: str):
    root = Path(cfg.path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist (or is not a directory)")
    if (root / split).is_dir():
        folder = root / split
    elif split == "train" and (root / CAPTIONS_FILE).is_file():
        folder = root
    else:
        raise FileNotFoundError(f"no {split!r} split in {root}: expected {root / split / CAPTIONS_FILE}"
                                + (f" or {root / CAPTIONS_FILE}" if split == "train" else ""))
    return folder, read_records(folder, check_images=False), None


def _coco_split(cfg: DataConfig, split: str):
    from fastxmc.data import coco
    paths = coco.coco_paths(cfg.path, split, cfg.coco_year)
    files = [paths["captions"], paths["instances"]]
    records, names = _cached_records(cfg, split, files, {"year": cfg.coco_year},
                                     lambda: coco.read_coco(cfg.path, split, cfg.coco_year))
    return Path(cfg.path), records, names


def _cub_split(cfg: DataConfig, split: str):
    from fastxmc.data.cub import read_cub
    records, names = read_cub(cfg.path, split, cfg.cub_bbox_crop)
    return Path(cfg.path), records, names


def _ln_split(cfg: DataConfig, split: str):
    from fastxmc.data import narratives
    root = Path(cfg.path)
    files = narratives.narrative_files(root, split, cfg.ln_source)
    files += sorted(root.glob("annotations/instances_*.json"))
    if cfg.ln_instances is not None:
        files.append(Path(cfg.ln_instances))
    options = {"source": cfg.ln_source, "images": cfg.ln_images, "instances": cfg.ln_instances}
    records, names = _cached_records(
        cfg, split, files, options,
        lambda: narratives.read_narratives(root, split, cfg.ln_source, cfg.ln_images, cfg.ln_instances))
    return root, records, names


_READERS = {"shapes": _shapes_split, "folder": _folder_split, "coco": _coco_split, "cub": _cub_split,
            "ln": _ln_split}


def read_split(cfg: DataConfig, split: str) -> SplitData:
    """The records of ``split`` as the annotations give them (images not yet checked)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    cfg.validate()
    root, records, names = _READERS[cfg.dataset](cfg, split)
    if not records:
        raise DatasetFormatError(f"{root}: empty dataset (split {split!r} has no images)")
    return SplitData(cfg.dataset, split, Path(root), records, names)


# ----------------------------------------------------------------------------------------------
# Parsed-annotation cache (COCO, Localized Narratives)


def _file_stamp(path: Path) -> list:
    try:
        st = path.stat()
        return [str(path.absolute()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path.absolute()), None, None]


def _write_json(path: Path, obj) -> None:
    """Atomically; ASCII JSON (``ensure_ascii``), so the text is the same in any locale."""
    atomic_write_text(json.dumps(obj, separators=(",", ":")), path)


def _read_json_cache(path: Path, parse):
    """``parse(json object)`` of the cache file ``path``, or None when there is none yet. A file
    that does not parse, or whose structure ``parse`` rejects (any KeyError, TypeError, ValueError
    or AttributeError), is reported with :func:`warn_rebuilding` and None is returned: the caller
    rebuilds and overwrites it.

    Parsing in full is the check: these files are read whole anyway, and a truncated or garbled
    JSON file fails to parse or lacks its keys, so no separate digest is kept."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:     # ValueError: bytes that are not UTF-8
        warn_rebuilding(DamagedCacheError(path, f"unreadable: {err}"), "it")
        return None
    try:
        return parse(json.loads(text))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        why = f"unreadable JSON: {err}" if isinstance(err, json.JSONDecodeError) else \
            f"unexpected content: {type(err).__name__}: {err}"
        warn_rebuilding(DamagedCacheError(path, why), "it")
        return None


def _parse_records(obj) -> tuple[list[Record], list | None, list[str]]:
    """(records, label names, warnings) of a parsed-annotation cache file."""
    records = [Record(img, caps, labels, Path(p), extra) for img, caps, labels, p, extra in obj["records"]]
    names, messages = obj["label_names"], obj["warnings"]
    if not (names is None or isinstance(names, list)) or not all(isinstance(m, str) for m in messages):
        raise TypeError("'label_names' or 'warnings' is not a list")
    return records, names, messages


def _cached_records(cfg: DataConfig, split: str, files, options: dict, build):
    """``build()`` -> (records, names), cached by the stamps of ``files`` (and re-emitting its warnings)."""
    payload = {"v": _RECORDS_VERSION, "kind": cfg.dataset, "split": split, "options": options,
               "files": [_file_stamp(Path(f)) for f in files]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
    path = cfg.resolved_cache_dir() / "records" / f"{cfg.dataset}-{split}-{key}.json"
    cached = _read_json_cache(path, _parse_records)
    if cached is not None:
        records, names, messages = cached
        for message in messages:
            warnings.warn(message, DataWarning, stacklevel=3)
        return records, names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        records, names = build()
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    rows = [[r.image, r.captions, r.labels, str(r.path), r.extra] for r in records]
    _write_json(path, {"label_names": names, "warnings": messages, "records": rows})
    return records, names


# ----------------------------------------------------------------------------------------------
# Image check


def image_problem(path) -> str | None:
    """Why the image at ``path`` cannot be used, or ``None`` when it decodes fully.

    A full PIL decode (JPEGs at 1/8 scale, which still reads every byte of the entropy-coded data),
    so a truncated or corrupt file is found, not only a bad header.
    """
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # any failure to decode makes the image unusable; the reason is reported
        return f"{type(e).__name__}: {e}"
    return None


def _check_paths(paths: list[str], workers: int, progress: bool) -> list[str | None]:
    from tqdm.auto import tqdm
    bar = dict(total=len(paths), desc="fastxmc.data: checking images", unit="img", disable=not progress,
               mininterval=2.0, file=sys.stderr)
    if workers <= 1 or len(paths) < _PARALLEL_CHECK_MIN:
        return [image_problem(p) for p in tqdm(paths, **bar)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return list(tqdm(pool.imap(image_problem, paths, chunksize=128), **bar))


def find_unreadable(paths, *, cache_dir, workers: int = 1, progress: bool = True) -> tuple[dict, Path]:
    """``({index: reason}, cache file)`` for the images of ``paths`` that cannot be decoded.

    The result is stored in ``cache_dir/imagecheck/<key>.json``, the key being a hash of every
    path with its size and mtime, so an unchanged dataset is checked once.
    """
    paths = [str(p) for p in paths]
    h = hashlib.sha256(f"v{_IMAGECHECK_VERSION}\n".encode())
    for p in paths:
        h.update(json.dumps(_file_stamp(Path(p))).encode())
    path = Path(cache_dir) / "imagecheck" / f"{h.hexdigest()[:32]}.json"
    bad = _read_json_cache(path, lambda obj: {int(i): str(reason) for i, reason in obj["bad"].items()})
    if bad is not None:
        return bad, path
    problems = _check_paths(paths, workers, progress)
    bad = {i: reason for i, reason in enumerate(problems) if reason is not None}
    _write_json(path, {"n": len(paths), "bad": {str(i): r for i, r in bad.items()},
                              "files": {str(i): paths[i] for i in bad}})
    return bad, path


def _check_folders(data: SplitData) -> None:
    """Every folder that holds images of the split must exist (an error naming the first that does not)."""
    for folder in sorted({r.path.parent for r in data.records}):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} of the {data.kind} {data.split!r} split "
                                    f"does not exist")


def _report_unreadable(data: SplitData, bad: dict, listing: Path, strict: bool) -> None:
    names = [f"{data.records[i].path} ({reason})" for i, reason in sorted(bad.items())]
    if strict:
        more = f" and {len(names) - 3} more (listed in {listing})" if len(names) > 3 else ""
        raise UnreadableImageError(f"{len(names)} unreadable image(s) in the {data.kind} {data.split!r} "
                                   f"split ({data.root}), strict data: {'; '.join(names[:3])}{more}")
    for name in names[:_WARN_EACH]:
        warnings.warn(f"fastxmc.data: skipping unreadable image {name}", DataWarning, stacklevel=3)
    if len(names) > _WARN_EACH:
        warnings.warn(f"fastxmc.data: skipping {len(names) - _WARN_EACH} more unreadable images of "
                      f"the {data.kind} {data.split!r} split (all listed in {listing})", DataWarning,
                      stacklevel=3)


def load_split(cfg: DataConfig, split: str, *, progress: bool = True) -> SplitData:
    """:func:`read_split`, then unreadable images left out (or an error with ``cfg.strict``)."""
    data = read_split(cfg, split)
    _check_folders(data)
    bad, listing = find_unreadable([r.path for r in data.records], cache_dir=cfg.resolved_cache_dir(),
                                   workers=cfg.resolved_workers(), progress=progress)
    if bad:
        _report_unreadable(data, bad, listing, cfg.strict)
        data.skipped = [(str(data.records[i].path), reason) for i, reason in sorted(bad.items())]
        data.records = [r for i, r in enumerate(data.records) if i not in bad]
    if not data.records:
        raise DatasetFormatError(f"{data.root}: empty dataset: all {len(bad)} images of the {data.kind} "
                                 f"{data.split!r} split are unreadable")
    return data
