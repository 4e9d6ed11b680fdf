"""Datasets and the data loader of the training engine.

Entry points (imported lazily, so ``import fastxmc.data`` stays cheap)::

    from fastxmc.data import DataConfig, build_loader
    loader = build_loader(DataConfig(), split="train", batch_size=32, seed=0)
    for batch in loader:            # one epoch: dict of tensors, see fastxmc.data.loader
        ...

Modules:

- :mod:`fastxmc.data.config`: :class:`DataConfig`, the ``data`` section of the train config.
- :mod:`fastxmc.data.loader`: :class:`Loader` / :func:`build_loader`: sampling, sharding under
  torchrun, deterministic captions and flips, resume, the torch (DataLoader + PIL) image path.
- :mod:`fastxmc.data.dali`: the NVIDIA DALI image path (GPU when there is one, else CPU).
- :mod:`fastxmc.data.text`: frozen text encoders (MiniLM by default, any local transformers model)
  and the memory-mapped caption embedding cache.
- :mod:`fastxmc.data.sources`: dataset kind -> records of a split; unreadable images found (once,
  cached), warned about and left out, or an error with ``strict``.
- Readers: :mod:`fastxmc.data.folder` (images + ``captions.jsonl``), :mod:`fastxmc.data.shapes` (the
  embedded, seeded synthetic captioned dataset, written once to the cache in the folder format),
  :mod:`fastxmc.data.coco` (MS-COCO 2014 + instance labels), :mod:`fastxmc.data.cub` (CUB-200-2011,
  AttnGAN/DF-GAN layout), :mod:`fastxmc.data.narratives` (Localized Narratives over COCO or Open Images).
"""
from __future__ import annotations

import importlib

__all__ = ["DataConfig", "Loader", "build_loader", "DatasetFormatError", "UnreadableImageError",
           "DataWarning"]

_LAZY = {
    "DataConfig": "fastxmc.data.config",
    "Loader": "fastxmc.data.loader",
    "build_loader": "fastxmc.data.loader",
    "DatasetFormatError": "fastxmc.data.folder",
    "UnreadableImageError": "fastxmc.data.sources",
    "DataWarning": "fastxmc.data.sources",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastxmc.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
