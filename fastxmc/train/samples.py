"""Sample grids: G_ema on a fixed set of captions and a fixed z, each caption written under its image.

During training the grid is written every ``run.sample_every`` steps and at the end to
``DIR/samples/step-<step, 6 digits>.png`` (e.g. ``step-000250.png``; also to TensorBoard). The captions are the first ``run.num_samples``
samples of the validation split (the training split when the dataset has no validation split),
the z are drawn from a generator seeded with the run's seed: the same across the run and its
resumptions, so grids of different steps are comparable. ``DIR/samples/captions.json`` lists them.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fastxmc.atomic import atomic_write, atomic_write_text

SAMPLES_DIR = "samples"
_PAD = 4             # pixels between cells
_MIN_CELL = 128      # small images are enlarged (nearest) to at least this width
_TEXT_LINES = 4      # caption lines under each image


class SampleSet(NamedTuple):
    """Inputs of a sample grid: N captions, their embeddings and N noise vectors."""
    captions: list
    sentence: torch.Tensor   # (N, E)
    words: torch.Tensor      # (N, T, E)
    word_mask: torch.Tensor  # (N, T) bool
    z: torch.Tensor          # (N, z_dim)


def fixed_z(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """(n, z_dim) standard normal noise from a private generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(int(seed) + 20_231_106)
    return torch.randn(n, z_dim, generator=gen)


def sample_set_from_loader(loader, n: int, z_dim: int, seed: int) -> SampleSet:
    """The first ``n`` samples of ``loader`` (not shuffled): their captions and embeddings."""
    captions, sentence, words, mask = [], [], [], []
    for batch in loader:
        captions += loader.captions(batch["index"], batch["caption"])
        sentence.append(batch["sentence"])
        words.append(batch["words"])
        mask.append(batch["word_mask"])
        if len(captions) >= n:
            break
    if not captions:
        raise ValueError("the sample loader yielded no batch: the split is empty")
    n = min(n, len(captions))
    cat = lambda parts: torch.cat(parts)[:n].cpu()  # noqa: E731
    return SampleSet(captions[:n], cat(sentence), cat(words), cat(mask), fixed_z(n, z_dim, seed))


@torch.no_grad()
def generate(generator: torch.nn.Module, samples: SampleSet, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) float images in [0, 1] on the CPU; ``generator`` should be in eval mode."""
    device = next(generator.parameters()).device
    out = []
    for start in range(0, len(samples.captions), batch_size):
        part = slice(start, start + batch_size)
        out.append(generator(samples.z[part].to(device), samples.sentence[part].to(device),
                             samples.words[part].to(device),
                             samples.word_mask[part].to(device)).float().cpu())
    return torch.cat(out).clamp(0, 1)


def _font():
    return ImageFont.load_default()


def _wrap(caption: str, width_px: int, font) -> list:
    char_px = max(1.0, font.getlength("abcdefghij") / 10)
    lines = textwrap.wrap(caption, width=max(4, int(width_px // char_px))) or [""]
    if len(lines) > _TEXT_LINES:
        lines = lines[:_TEXT_LINES]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def render_grid(images: torch.Tensor, captions: list, columns: int = 8) -> Image.Image:
    """A white PNG-ready grid: ``images`` (N, 3, H, W) in [0, 1], ``captions[i]`` under image i."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions")
    n, _, h, w = images.shape
    scale = max(1, -(-_MIN_CELL // w))
    cell_w, img_h = w * scale, h * scale
    font = _font()
    left, top, right, bottom = font.getbbox("Ag")
    line_h = bottom - top + 2
    cell_h = img_h + _TEXT_LINES * line_h + _PAD
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * (cell_w + _PAD) + _PAD, rows * (cell_h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        x = _PAD + (i % columns) * (cell_w + _PAD)
        y = _PAD + (i // columns) * (cell_h + _PAD)
        tile = Image.fromarray(pixels[i]).resize((cell_w, img_h), Image.NEAREST)
        grid.paste(tile, (x, y))
        for k, line in enumerate(_wrap(captions[i], cell_w, font)):
            draw.text((x, y + img_h + 2 + k * line_h - top), line, fill="black", font=font)
    return grid


def sample_grid(generator, samples: SampleSet, columns: int = 8) -> Image.Image:
    return render_grid(generate(generator, samples), samples.captions, columns)


def write_grid(grid: Image.Image, path) -> Path:
    """Save atomically (a reader never sees a partial PNG)."""
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"), durable=False)


def grid_path(run_dir, step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step-{step:06d}.png"


def write_captions(run_dir, samples: SampleSet) -> None:
    atomic_write_text(json.dumps(samples.captions, indent=1) + "\n",
                      Path(run_dir) / SAMPLES_DIR / "captions.json")


def grid_array(grid: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, for TensorBoard."""
    return np.asarray(grid.convert("RGB"))
