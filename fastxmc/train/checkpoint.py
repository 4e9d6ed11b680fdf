"""Checkpoints of a training run: everything needed to continue it exactly.

A checkpoint (``DIR/checkpoints/ckpt-<step>.pt``) is a dict of tensors and plain containers so
that it loads with ``torch.load(..., weights_only=True)``:

    format    FORMAT_VERSION
    step      completed G steps
    G, D, G_ema           state_dicts (unwrapped from DDP)
    opt_G, opt_D          optimizer state_dicts
    data      the loader's state_dict (the next batch)
    rng       {"torch", "numpy", "python", "cuda", "z"}: RNG states as tensors / lists
              ("z": one state per rank of the generator that draws the noise)
    config    the resolved train config (dict)
    text_dim  width of the text embeddings the networks were built for

It is written to a temporary file in the same directory and renamed over the final name
(``os.replace`` is atomic), so a crash never leaves a half-written checkpoint; the newest
``keep`` are kept.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir) -> list:
    """The run's checkpoint files, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict, run_dir, keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<state['step']>.pt`` and keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"run.keep_checkpoints must be >= 1, got {keep}")
    path = checkpoint_path(run_dir, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` and check its format version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a fastxmc checkpoint of format {FORMAT_VERSION} (found {found})")
    return state


# ---------------------------------------------------------------- RNG states as plain data
def capture_rng() -> dict:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- a trained run, for sampling
class LoadedRun(NamedTuple):
    config: object        # fastxmc.train.config.TrainConfig
    G_ema: torch.nn.Module  # in eval mode, on the requested device
    step: int
    text_dim: int
    path: Path
    D: torch.nn.Module | None = None  # with load_run(..., discriminator=True): in eval mode


def load_run(run_dir, *, device="cpu", checkpoint=None, discriminator: bool = False) -> LoadedRun:
    """Config and G_ema of a run (its latest checkpoint, or ``checkpoint``), and D when asked for:
    used by ``python -m fastxmc.sample`` and the evaluation."""
    from fastxmc.models import Discriminator, Generator
    from fastxmc.train.config import config_from_dict, discriminator_kwargs, generator_kwargs

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints (looked in "
                                f"{run_dir / CHECKPOINT_DIR}); train it first with "
                                f"python -m fastxmc.train --out {run_dir}")
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    generator = Generator(text_dim=state["text_dim"], **generator_kwargs(config))
    generator.load_state_dict(state["G_ema"])
    frozen = lambda net: net.to(device).eval().requires_grad_(False)  # noqa: E731
    disc = None
    if discriminator:
        disc = Discriminator(text_dim=state["text_dim"], num_classes=state.get("d_classes", 0),
                             **discriminator_kwargs(config))
        disc.load_state_dict(state["D"])
        disc = frozen(disc)
    return LoadedRun(config, frozen(generator), state["step"], state["text_dim"], path, disc)
