"""What every Triton module of fastxmc shares: the optional import, the interpreter flag, and why
the kernels cannot run on a device.

``INTERPRET`` is read once, when this module is imported: ``triton.jit`` decides at decoration time
whether a kernel is compiled or run by Triton's numpy interpreter, so ``TRITON_INTERPRET=1`` must be
in the environment before fastxmc is imported (tests/conftest.py sets it).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # The package must import (and report why) without Triton.
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken install failing at import time
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

__all__ = ["triton", "tl", "TRITON_IMPORT_ERROR", "INTERPRET", "interpret_env",
           "triton_unavailable_reason"]


def interpret_env() -> bool:
    """Whether the environment asks for Triton's interpreter (as Triton itself reads it)."""
    if triton is not None:
        try:
            return bool(triton.knobs.runtime.interpret)
        except AttributeError:  # older Triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Fixed at import: kernels decorated after this are interpreted iff this is True.
INTERPRET = triton is not None and interpret_env()


def triton_unavailable_reason(device) -> Optional[str]:
    """None when fastxmc's Triton kernels can run on ``device``, else a human-readable reason."""
    if triton is None:
        return TRITON_IMPORT_ERROR
    device = torch.device(device)
    if INTERPRET:
        # The interpreter copies any tensor to the host and back, so it runs everywhere torch does.
        return None
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda is not available"
    if interpret_env():
        return "TRITON_INTERPRET=1 was set after fastxmc was imported; set it before importing fastxmc"
    return (f"Triton kernels need a CUDA device, got {device.type!r} "
            "(set TRITON_INTERPRET=1 before importing fastxmc to run them on CPU)")
