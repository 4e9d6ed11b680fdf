"""Loads the compiled extension ``fastxmc/_C.so`` (C++ CPU kernels, CUDA kernels when built).

The package works without it (reference / torch / triton backends); :func:`extension_error`
then says why it is missing so ``python -m fastxmc.info`` and backend errors can tell the user.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

_LIB_PATH = Path(__file__).with_name("_C.so")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str | None]:
    if os.environ.get("FASTXMC_DISABLE_EXTENSION") == "1":
        return False, "disabled by FASTXMC_DISABLE_EXTENSION=1"
    if not _LIB_PATH.exists():
        return False, (f"{_LIB_PATH} was not built; run `make build` (or "
                       "`python setup.py build_ext --inplace`) to compile the C++/CUDA kernels")
    try:
        torch.ops.load_library(str(_LIB_PATH))
    except OSError as err:  # wrong torch ABI, missing CUDA runtime library, ...
        return False, f"{_LIB_PATH} failed to load: {err}"
    return True, None


def extension_loaded() -> bool:
    return _load()[0]


def extension_error() -> str | None:
    """Why the extension is unavailable, or None when it is loaded."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the extension was compiled with (``{}`` when it is not loaded)."""
    if not extension_loaded():
        return {}
    return json.loads(torch.ops.fastxmc.build_info())


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastxmc::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU" / "CUDA")."""
    if not extension_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastxmc::{op}", dispatch_key)
    except RuntimeError:  # the op is not registered at all: a build older than this source tree
        return False
