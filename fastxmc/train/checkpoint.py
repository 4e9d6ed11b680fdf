"""Checkpoints of a training run: everything needed to continue it exactly.

A checkpoint (``DIR/checkpoints/ckpt-<step>.pt``) is a dict of tensors and plain containers so
that it loads with ``torch.load(..., weights_only=True)``:

    format    FORMAT_VERSION
    digest    BLAKE2b of every other entry (:func:`state_digest`): a flipped bit anywhere in the
              stored values or a file cut short is found at load time
    step      completed G steps
    G, D, G_ema           state_dicts (unwrapped from DDP)
    opt_G, opt_D          optimizer state_dicts
    data      the loader's state_dict (the next batch)
    rng       {"torch", "numpy", "python", "cuda", "z"}: RNG states as tensors / lists
              ("z": one state per rank of the generator that draws the noise)
    config    the resolved train config (dict)
    text_dim  width of the text embeddings the networks were built for

(``fastxmc.pretrain`` writes ``model`` and ``opt`` instead of the networks.) A checkpoint is
written through :func:`fastxmc.atomic.atomic_torch_save` and read back and verified before it
takes its final name; only then are older ones beyond the newest ``keep`` removed. Every loader
verifies what it reads (:func:`load_checkpoint`); ``--resume`` takes the newest checkpoint that
passes, setting each one that fails aside as ``<name>.bad`` (:func:`newest_valid_checkpoint`).
"""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

from fastxmc.atomic import atomic_torch_save, remove_abandoned_temporaries, state_digest

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 has no digest: it loads, its contents unverified
CHECKPOINT_DIR = "checkpoints"
BAD_SUFFIX = ".bad"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
TRAIN_KEYS = ("step", "G", "D", "G_ema", "opt_G", "opt_D", "data", "rng", "config", "text_dim")
PRETRAIN_KEYS = ("step", "model", "opt", "data", "rng", "config", "text_dim")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or inconsistent with its name.
    ``str()`` names the file and the reason; ``reason`` is the reason alone."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {self.path} is unusable: {reason}")


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir) -> list:
    """The run's checkpoint files, oldest first (files set aside as ``.bad`` are not listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint file by name, unverified (see :func:`newest_valid_checkpoint`)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def last_good_checkpoint(run_dir) -> str:
    """"the last good checkpoint is PATH" (or that none was written yet), for failure messages:
    a checkpoint takes its name only once written and verified, so the newest name is good."""
    try:
        kept = latest_checkpoint(run_dir)
    except OSError:
        kept = None
    return f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"


# ---------------------------------------------------------------- integrity
def _short_reason(err: BaseException) -> str:
    """One short clause for a failed torch.load (its zip reader's messages run to three lines)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "not a complete zip archive (cut short or overwritten)"
    sentence = text.split(". ")[0]
    return f"{type(err).__name__}: {sentence[:120]}"


def _read(path: Path, map_location) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch reports a damaged zip archive or pickle in many ways
        raise CheckpointError(path, f"unreadable, {_short_reason(err)}") from err


def verify_state(path: Path, state, required: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` unless ``state`` is a readable-format checkpoint whose digest
    matches, that holds ``required`` and whose step agrees with its file name."""
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(path, f"not a fastxmc checkpoint of format {FORMAT_VERSION} "
                                    f"(found {found})")
    if state["format"] >= 2 and state.get("digest") != state_digest(state):
        raise CheckpointError(path, "its contents do not match its digest (the file is corrupt)")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(path, f"it lacks {missing} (written by another program?)")
    named = _NAME.match(path.name)
    if named and "step" in state and int(named.group(1)) != int(state["step"]):
        raise CheckpointError(path, f"it holds step {state['step']}, its name says "
                                    f"{int(named.group(1))}")


def load_checkpoint(path, map_location="cpu", required: Iterable[str] = ()) -> dict:
    """Load a checkpoint with ``weights_only=True`` and verify it (:func:`verify_state`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = _read(path, map_location)
    verify_state(path, state, required)
    return state


def save_checkpoint(state: dict, run_dir, keep: int) -> Path:
    """Write ``state`` as ``ckpt-<state['step']>.pt``: atomically, read back and verified before
    it replaces anything; then remove the checkpoints older than the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"run.keep_checkpoints must be >= 1, got {keep}")
    path = checkpoint_path(run_dir, state["step"])
    payload = {"format": FORMAT_VERSION, **state}
    payload["digest"] = state_digest(payload)
    required = [k for k in payload if k not in ("format", "digest")]
    atomic_torch_save(payload, path,
                      verify=lambda tmp: verify_state(path, _read(tmp, "cpu"), required))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def set_aside(path: Path) -> Path:
    """Rename a bad checkpoint to ``<name>.bad`` (``.bad-2``, ... if taken); never delete it."""
    target, n = path.with_name(path.name + BAD_SUFFIX), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{BAD_SUFFIX}-{n}")
    path.rename(target)
    return target


def newest_valid_checkpoint(run_dir, *, required: Iterable[str] = (), rename_bad: bool = False,
                            warn: Callable[[str], None] = lambda message: None) -> tuple:
    """``(path, state)`` of the newest checkpoint of ``run_dir`` that loads and verifies.

    Each newer one that fails is reported through ``warn`` (one line: file and reason) and, with
    ``rename_bad``, set aside (:func:`set_aside`). With none valid, raises
    :class:`FileNotFoundError` listing every file tried and why it failed.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if rename_bad:
        remove_abandoned_temporaries(folder)  # the partial file of a write that was killed
    tried = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, required=required)
        except (CheckpointError, FileNotFoundError) as err:
            reason = err.reason if isinstance(err, CheckpointError) else "it vanished while read"
            tried.append(f"{path.name} ({reason})")
            kept = ""
            if rename_bad and path.exists():
                kept = f"; kept as {set_aside(path).name}"
            warn(f"checkpoint {path} is unusable: {reason}{kept}; trying the one before it")
    if not tried:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    raise FileNotFoundError(f"no valid checkpoint in {folder}; tried {', '.join(tried)}")


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


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_run(run_dir, *, device="cpu", checkpoint=None, discriminator: bool = False) -> LoadedRun:
    """Config and G_ema of a run, and D when asked for: used by ``python -m fastxmc.sample`` and the
    evaluation. ``checkpoint``: that file (verified); else the newest valid checkpoint of
    ``run_dir``, with a warning naming each newer one that failed verification (left in place:
    reading a run never changes it)."""
    from fastxmc.models import Discriminator, Generator
    from fastxmc.train.config import config_from_dict, discriminator_kwargs, generator_kwargs

    run_dir = Path(run_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        state = load_checkpoint(path, required=TRAIN_KEYS)
    elif not list_checkpoints(run_dir):
        raise FileNotFoundError(f"{run_dir} has no checkpoints (looked in "
                                f"{run_dir / CHECKPOINT_DIR}); train it first with "
                                f"python -m fastxmc.train --out {run_dir}")
    else:
        path, state = newest_valid_checkpoint(run_dir, required=TRAIN_KEYS, warn=_warn)
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
