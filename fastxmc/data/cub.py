"""CUB-200-2011 birds with the Reed et al. captions, in the AttnGAN / DF-GAN ``data/birds`` layout.

Layout::

    ROOT/CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...
    ROOT/CUB_200_2011/images.txt            "<id> <class dir>/<file>.jpg" (needed for the bbox crop)
    ROOT/CUB_200_2011/bounding_boxes.txt    "<id> <x> <y> <width> <height>" (needed for the bbox crop)
    ROOT/CUB_200_2011/train_test_split.txt  "<id> <1 = train | 0 = test>" (fallback split, see below)
    ROOT/CUB_200_2011/classes.txt           "<id> <class dir>" (optional: species names)
    ROOT/text/<class dir>/<file>.txt        captions, one a line (``text_c10/`` is accepted too)
    ROOT/train/filenames.pickle             AttnGAN's split: a pickled list of "<class dir>/<file>" keys
    ROOT/test/filenames.pickle

Splits: "train" reads ``train/filenames.pickle`` and "val" reads ``test/filenames.pickle`` (AttnGAN's
150 / 50 species split, 8,855 / 2,933 images). Without those files, CUB's own
``train_test_split.txt`` is used (all 200 species in both splits); without either, the error names
both paths. The pickles are read with an unpickler that accepts plain lists of strings only.

Captions: the non-empty lines of the image's text file (Reed et al. give 10), with the mojibake pair
``"\\ufffd\\ufffd"`` replaced by a space as AttnGAN does. Labels: the species, ``int(class dir[:3]) - 1``
(0..199); ``label_names`` are the 200 species names.

Bounding-box crop (``bbox_crop``, AttnGAN's ``get_imgs``): a square of side ``2 r`` with
``r = int(0.75 * max(w, h))`` around the box centre, clipped to the image. It is stored per record
as ``extra["crop"] = [x1, y1, x2, y2]`` with ``x1, y1`` clipped at 0; the loaders clip ``x2, y2`` to
the image size when they decode it.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from fastxmc.data.folder import DatasetFormatError, Record

__all__ = ["read_cub", "crop_box", "NUM_SPECIES"]

NUM_SPECIES = 200
_PICKLE_SPLIT = {"train": "train", "val": "test"}


class _StringListUnpickler(pickle.Unpickler):
    """Unpickles lists of str/bytes only: no class or function can be named."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: expected a list of file names")


def _read_filenames_pickle(path: Path) -> list[str]:
    try:
        names = _StringListUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetFormatError(f"{path}: not a pickled list of file names ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise DatasetFormatError(f"{path}: expected a pickled list of strings")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _read_table(path: Path, ncols: int) -> dict[int, list[str]]:
    """``{id: [columns...]}`` of a whitespace-separated CUB metadata file."""
    if not path.is_file():
        raise FileNotFoundError(f"CUB metadata file {path} not found")
    rows = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != ncols:
            raise DatasetFormatError(f"{path}:{lineno}: expected {ncols} columns, got {len(parts)}")
        rows[int(parts[0])] = parts[1:]
    return rows


def _split_keys(root: Path, split: str) -> list[str]:
    pick = root / _PICKLE_SPLIT[split] / "filenames.pickle"
    if pick.is_file():
        return _read_filenames_pickle(pick)
    table = root / "CUB_200_2011" / "train_test_split.txt"
    if not table.is_file():
        raise FileNotFoundError(f"CUB split file not found: neither {pick} nor {table} exists")
    names = _read_table(root / "CUB_200_2011" / "images.txt", 2)
    want = "1" if split == "train" else "0"
    return [names[i][0].rsplit(".", 1)[0] for i, (flag,) in sorted(_read_table(table, 2).items())
            if flag == want]


def _text_dir(root: Path) -> Path:
    for name in ("text", "text_c10"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"CUB caption folder not found: neither {root / 'text'} nor "
                            f"{root / 'text_c10'} exists")


def _read_captions(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"CUB caption file {path} not found")
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\ufffd\ufffd", " ")
    caps = [line.strip() for line in text.splitlines()]
    caps = [c for c in caps if c]
    if not caps:
        raise DatasetFormatError(f"{path}: no captions")
    return caps


def crop_box(bbox) -> list[int]:
    """AttnGAN's square crop around an ``[x, y, w, h]`` box: ``[x1, y1, x2, y2]`` (x2, y2 unclipped)."""
    x, y, w, h = (int(float(v)) for v in bbox)
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    return [max(0, cx - r), max(0, cy - r), cx + r, cy + r]


def _bboxes(root: Path) -> dict[str, list[int]]:
    """``{key: crop box}`` from images.txt and bounding_boxes.txt."""
    names = _read_table(root / "CUB_200_2011" / "images.txt", 2)
    boxes = _read_table(root / "CUB_200_2011" / "bounding_boxes.txt", 5)
    return {names[i][0].rsplit(".", 1)[0]: crop_box(boxes[i]) for i in names if i in boxes}


def _species(key: str, where: Path) -> tuple[int, str]:
    cls = key.split("/", 1)[0]
    num, _, name = cls.partition(".")
    if not num.isdigit() or not 1 <= int(num) <= NUM_SPECIES or "/" not in key:
        raise DatasetFormatError(f"{where}: file key {key!r} is not '<NNN.Species_name>/<file>'")
    return int(num) - 1, name.replace("_", " ")


def read_cub(root, split: str, bbox_crop: bool = False) -> tuple[list[Record], list[str]]:
    """Records of one CUB split (see the module docstring) and the 200 species names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CUB dataset folder {root} does not exist")
    images = root / "CUB_200_2011" / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"CUB image folder {images} does not exist")
    keys = _split_keys(root, split)
    text = _text_dir(root)
    boxes = _bboxes(root) if bbox_crop else {}
    names = [""] * NUM_SPECIES
    records = []
    for key in keys:
        label, species = _species(key, root)
        names[label] = species
        extra = {}
        if bbox_crop:
            if key not in boxes:
                raise DatasetFormatError(f"{root / 'CUB_200_2011' / 'bounding_boxes.txt'}: no box for {key}")
            extra["crop"] = boxes[key]
        rel = f"CUB_200_2011/images/{key}.jpg"
        records.append(Record(rel, _read_captions(text / f"{key}.txt"), [label], root / rel, extra))
    if not records:
        raise DatasetFormatError(f"{root}: empty CUB split {split!r}")
    return records, _species_names(root, names)


def _species_names(root: Path, seen: list[str]) -> list[str]:
    """All 200 names from ``classes.txt`` when present, else those seen in the split's keys."""
    classes = root / "CUB_200_2011" / "classes.txt"
    if classes.is_file():
        for parts in _read_table(classes, 2).values():
            label, species = _species(parts[0] + "/x", classes)
            seen[label] = species
    return [n or f"species {i + 1:03d}" for i, n in enumerate(seen)]
