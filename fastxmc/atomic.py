"""Atomic file writes: a temporary file beside the target, then ``os.replace`` (readers never see a
partial file, and a crash leaves the previous version in place)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_torch_save(payload, path) -> None:
    """``torch.save(payload, path)``, atomically."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path) -> None:
    """``path.write_text(text)``, atomically."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
