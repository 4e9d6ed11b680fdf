"""Counterfactual caption probe of a run's discriminator (shapes dataset).

G learns to draw an attribute only as far as D's image-text matching tells captions that name it
correctly from captions that don't. The probe asks D directly. For each single-object validation
image it compares D's matching score for a plain description of the image (``"a small red circle
at the top"``, :func:`~fastxmc.data.shapes.describe_object`) with its score for the same
description with one attribute changed to another value, drawn at random. The score is the
cosine of D's image feature and D's sentence projection, the quantity the sentence contrastive
loss trains.

It is reported per attribute (shape, colour, size, position), on the real images and on G_ema's
samples for the same descriptions:

- ``accuracy``: the fraction of images whose true description scores higher (a tie counts one
  half, so a D blind to the attribute scores 0.5);
- ``gap``: the mean score difference.

A high accuracy on real images means D can tell the attribute. A much lower one on G's samples
then means that G does not draw it.

With a dual encoder (``dual=``, the evaluator's), the same probe is also run on its image-text
cosine: how far the instrument behind R-precision (and the DAMSM-style term, ``loss.dual_weight``)
can tell each attribute, on the same real images and samples.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastxmc.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, describe_object, read_attributes

PROBE_ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}


def counterfactual(obj: dict, attribute: str, rng: random.Random) -> dict:
    """``obj`` with ``attribute`` changed to another of its values, drawn by ``rng``."""
    values = [v for v in PROBE_ATTRIBUTES[attribute] if v != obj[attribute]]
    return {**obj, attribute: rng.choice(values)}


def caption_probe(score: Callable, objects: list, seed: int) -> dict:
    """The probe's numbers for one image set.

    ``score(captions) -> (N,)`` scores the set's N images against one caption each; ``objects`` are
    the images' object records, in the same order. Returns ``{attribute: {"accuracy", "gap"}}``
    and the mean score of the true descriptions under ``"true_score"``."""
    true = score([describe_object(o) for o in objects]).double()
    rng = random.Random(seed)
    result = {"true_score": true.mean().item()}
    for attribute in PROBE_ATTRIBUTES:
        changed = score([describe_object(counterfactual(o, attribute, rng)) for o in objects]).double()
        wins = (true > changed).double() + 0.5 * (true == changed).double()
        result[attribute] = {"accuracy": wins.mean().item(), "gap": (true - changed).mean().item()}
    return result


def single_object_records(folder, limit: int) -> list:
    """(image path, object record) of the first ``limit`` single-object images of a split folder."""
    folder = Path(folder)
    out = []
    for record in read_attributes(folder):
        if len(record["objects"]) == 1:
            out.append((folder / record["image"], record["objects"][0]))
            if len(out) == limit:
                break
    return out


def read_images(paths: list, resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) float images in [0, 1]."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.BICUBIC)
            arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class DiscriminatorScore:
    """``score(captions)``: the cosine of D's features of a fixed image set and D's projection of
    the captions (encoded by ``encode(captions) -> (sentence, words, mask)``)."""

    def __init__(self, discriminator, images: torch.Tensor, encode: Callable, batch_size: int = 64):
        self.d, self.encode = discriminator, encode
        device = next(discriminator.parameters()).device
        self.device = device
        with torch.no_grad():
            feats = [self._image_features(chunk.to(device)) for chunk in images.split(batch_size)]
        self.features = F.normalize(torch.cat(feats).float(), dim=1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        # D's forward needs a sentence per image; the features do not depend on it.
        dummy = torch.zeros(images.shape[0], self.d.text_dim, device=images.device)
        return self.d(images, dummy).features

    @torch.no_grad()
    def __call__(self, captions: list) -> torch.Tensor:
        sentence = self.encode(captions)[0].to(self.device)
        projected = F.normalize(self.d.project_sentence(sentence).float(), dim=1)
        return (self.features * projected).sum(dim=1).cpu()


class DualEncoderScore:
    """``score(captions)``: the cosine of a dual encoder's global features of a fixed image set
    (resized to its resolution) and its sentence embeddings of the captions (encoded by
    ``encode(captions) -> (sentence, words, mask)``), the score R-precision ranks by."""

    def __init__(self, dual, images: torch.Tensor, encode: Callable, batch_size: int = 64):
        self.dual, self.encode, self.batch_size = dual, encode, batch_size
        self.device = next(dual.parameters()).device
        with torch.no_grad():
            feats = [dual.encode_image(dual.at_resolution(chunk).to(self.device)).global_feature.float()
                     for chunk in images.split(batch_size)]
        self.features = F.normalize(torch.cat(feats), dim=1)

    @torch.no_grad()
    def __call__(self, captions: list) -> torch.Tensor:
        sentence, words, mask = (t.to(self.device) for t in self.encode(captions))
        text = torch.cat([self.dual.encode_text(*(t[i:i + self.batch_size] for t in (sentence, words, mask)))
                          .sentence.float() for i in range(0, len(captions), self.batch_size)])
        return (self.features * F.normalize(text, dim=1)).sum(dim=1).cpu()


@torch.no_grad()
def probe_discriminator(run, val_folder, encode: Callable, n: int, seed: int,
                        batch_size: int = 64, dual=None) -> dict:
    """The probe of ``run`` (a :class:`~fastxmc.train.checkpoint.LoadedRun` with its D) on the
    first ``n`` single-object images of ``val_folder`` and on G_ema's samples for their
    descriptions (z drawn from ``seed``). With ``dual`` (a DualEncoder), also the same probe of its
    score under ``"dual"``: ``{"real": ..., "generated": ...}``."""
    if run.D is None:
        raise ValueError("the probe needs the run's discriminator: load_run(..., discriminator=True)")
    records = single_object_records(val_folder, n)
    if not records:
        raise ValueError(f"{val_folder} has no single-object images to probe")
    objects = [obj for _, obj in records]
    resolution = run.D.resolution
    real = read_images([path for path, _ in records], resolution)
    device = next(run.G_ema.parameters()).device
    sentence, words, mask = encode([describe_object(o) for o in objects])
    z_gen = torch.Generator().manual_seed(seed)
    fakes = []
    for start in range(0, len(objects), batch_size):
        rows = slice(start, start + batch_size)
        z = torch.randn(sentence[rows].shape[0], run.config.model.z_dim, generator=z_gen)
        fakes.append(run.G_ema(z.to(device), sentence[rows].to(device), words[rows].to(device),
                               mask[rows].to(device)).float().clamp(0, 1).cpu())
    result = {"n": len(objects)}
    image_sets = (("real", real), ("generated", torch.cat(fakes)))
    for name, images in image_sets:
        result[name] = caption_probe(DiscriminatorScore(run.D, images, encode, batch_size), objects, seed)
    if dual is not None:
        result["dual"] = {name: caption_probe(DualEncoderScore(dual, images, encode, batch_size), objects, seed)
                          for name, images in image_sets}
    return result
