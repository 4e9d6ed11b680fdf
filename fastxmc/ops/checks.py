"""Argument checks shared by the attention and modulation ops: each error names the argument and
what was expected. Value checks (which read tensors on the host) are skipped while torch.compile
traces; shape, dtype and device checks always run."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def eager() -> bool:
    return not torch.compiler.is_compiling()


def check_float_tensor(name: str, x, ndim: int, layout: str) -> None:
    """``x`` is a float tensor with ``ndim`` dimensions (``layout`` names them, e.g. "(B, R, d)")."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same device and dtype as ``ref``."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} is {x.dtype} but {ref_name} is {ref.dtype}; pass one dtype")


def check_word_mask(word_mask, words: torch.Tensor) -> None:
    """(B, T) bool on the words' device; every caption keeps at least one real token."""
    if not isinstance(word_mask, torch.Tensor):
        raise TypeError(f"word_mask must be a bool torch.Tensor (B, T), got {type(word_mask).__name__}")
    if word_mask.dtype != torch.bool:
        raise TypeError(f"word_mask must be a bool tensor (True = real token), got {word_mask.dtype}")
    if tuple(word_mask.shape) != tuple(words.shape[:2]):
        raise ValueError(f"word_mask must have shape (B, T) = {tuple(words.shape[:2])} to match words, "
                         f"got {tuple(word_mask.shape)}")
    if word_mask.device != words.device:
        raise ValueError(f"word_mask is on {word_mask.device} but words are on {words.device}")
    # Reading a CUDA mask would synchronize every call (G runs this each step); CPU masks are checked.
    if word_mask.device.type != "cpu" or not eager():
        return
    if word_mask.numel() and not bool(word_mask.any(dim=1).all()):
        empty = (~word_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"word_mask: captions {empty[:8]} have no real token (all padding); every "
                         "caption needs at least one True entry")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
