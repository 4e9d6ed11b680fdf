"""``python -m fastxmc.sample``: images of a trained run for your own captions.

    python -m fastxmc.sample --run DIR --caption "a small red circle at the top" --n 8 --out grid.png

Loads the run's config and G_ema from its latest checkpoint (or ``--checkpoint``), encodes the
captions with the run's frozen text encoder (same tokenization, truncation and float16 rounding as
the training cache), and writes a grid: one row per caption, ``--n`` images (different z, drawn
from ``--seed``) per row, the caption under every image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastxmc.atomic import FileWriteError
from fastxmc.train.checkpoint import load_run
from fastxmc.train.samples import SampleSet, render_grid, generate, write_grid


def caption_encoder(config):
    """``encode(captions) -> (sentence (N, E), words (N, T, E), word_mask (N, T))``, float32/bool CPU
    tensors, with the run's frozen text encoder loaded once (same tokenization, truncation and
    float16 rounding as the training cache)."""
    from fastxmc.data.text import FrozenTextEncoder

    encoder = FrozenTextEncoder(config.data.text_encoder)
    max_tokens = config.data.resolved_max_tokens()

    def encode(captions: list) -> tuple:
        encoded = encoder.encode(captions, max_tokens)
        return (torch.from_numpy(encoded.sentence).float(), torch.from_numpy(encoded.words).float(),
                torch.from_numpy(encoded.mask).bool())
    return encode


def encode(config, captions: list) -> tuple:
    """:func:`caption_encoder` of ``config`` applied to ``captions`` once."""
    return caption_encoder(config)(captions)


def sample_grid(run_dir, captions: list, n: int, seed: int = 0, device: str = "cpu",
                checkpoint=None):
    """The PIL grid of ``n`` samples per caption from the run in ``run_dir``."""
    if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
        raise ValueError(f"captions must be non-empty strings, got {captions!r}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    run = load_run(run_dir, device=device, checkpoint=checkpoint)
    sentence, words, mask = encode(run.config, captions)
    if sentence.shape[1] != run.text_dim:
        raise ValueError(f"the text encoder gives {sentence.shape[1]}-d embeddings but the run was "
                         f"trained on {run.text_dim}-d ones")
    repeat = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731  row-major: caption, then z
    z = torch.randn(n, run.config.model.z_dim, generator=torch.Generator().manual_seed(seed))
    samples = SampleSet([c for c in captions for _ in range(n)], repeat(sentence), repeat(words),
                        repeat(mask), z.repeat(len(captions), 1))
    return render_grid(generate(run.G_ema, samples), samples.captions, columns=n), run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastxmc.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (python -m fastxmc.train --out)")
    parser.add_argument("--caption", action="append", required=True,
                        help="a caption (repeat for several rows)")
    parser.add_argument("--n", type=int, default=8, help="images per caption (default 8)")
    parser.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise vectors")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the newest valid one)")
    args = parser.parse_args(argv)
    try:
        grid, run = sample_grid(args.run, args.caption, args.n, args.seed, args.device,
                                args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"fastxmc.sample: error: {err}", file=sys.stderr)
        return 2
    try:
        path = write_grid(grid, args.out)
    except FileWriteError as err:
        print(f"fastxmc.sample: error: {err}", file=sys.stderr)
        return 3
    print(f"wrote {path} ({len(args.caption)} x {args.n} samples, step {run.step} of {Path(args.run)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
