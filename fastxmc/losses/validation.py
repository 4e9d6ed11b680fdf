"""Argument checks shared by the public losses: every error names the argument and what was expected."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _eager() -> bool:
    # Value checks need host reads; skip them while torch.compile traces (shapes are still checked).
    return not torch.compiler.is_compiling()


def check_embeddings(name: str, x, dim: int | None = None, *, allow_empty: bool = False) -> None:
    """A 2-D float tensor of rows; ``allow_empty``: zero rows are fine (a rank's empty shard when
    the loss gathers rows from a process group, whose other ranks hold the rows)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} has no rows (shape {tuple(x.shape)}): a contrastive loss needs at "
                         "least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features but the other input has {dim}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; pass one dtype")


def check_index_vector(name: str, x, length: int, device, upper: int | None = None) -> None:
    """Integer 1-D tensor of ``length`` entries (``upper``: values must lie in [0, upper))."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the embeddings are on {device}")
    if upper is not None and length and _eager():
        low, high = int(x.min()), int(x.max())
        if low < 0 or high >= upper:
            raise ValueError(f"{name} values must lie in [0, {upper}), got range [{low}, {high}]")


def check_temperature(temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
        # Reading a CUDA value would synchronize every call; CPU values are checked.
        if temperature.device.type == "cpu" and _eager() and not float(temperature.detach()) > 0:
            raise ValueError(f"temperature must be positive, got {float(temperature.detach())}")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive float or a tensor, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
