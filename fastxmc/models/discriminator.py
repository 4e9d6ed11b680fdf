"""XMC-GAN discriminator (docs/design.md, "Discriminator", checked against the authors' ``xmc_net.Discriminator``).

    h      = optimized block, then pre-activation down-blocks                images in [0, 1], as given
    p      = sum over H, W of ReLU(h)                                       (B, 16w) global feature
    e      = Linear(text_dim -> 16w)(sentence)                              (B, 16w) sentence projection
    logit  = Linear(16w -> 1)(p) + <p, e>                                   projection discriminator
    regions= conv1x1(text_dim) of the 16x16 block output, flattened         (B, 256, text_dim)

Spectral norm on every conv and linear layer (one power iteration per training forward, u updated
only in training), Glorot-normal weights, zero biases, a bias on every layer.

Width multipliers (optimized block, then (multiplier, downsample) per block); every architecture ends
with two 16w blocks at 4x4:
    32:  4 | 8, 16, 16(no down)             64: 2 | 4, 8, 16, 16(no down)
    128: 1 | 2, 4, 8, 16, 16(no down) (code)     256: 1 | 2, 4, 8, 8, 16, 16(no down) (code)
32 and 64 are ours: every spatial size keeps the 128 model's width (regions at 16x16 have 4w
channels; 8w at 256).

``coords=True`` (ours, off by default) appends two coordinate channels (x and y in [-1, 1], CoordConv,
Liu et al. 2018) to the input. The global feature is a sum over positions, so without them D's only
cue to *where* something is comes from the zero padding at the borders; with them the sentence
projection and the contrastive heads can check captions such as "at the top left" directly.

``saturation=True`` (ours, off by default) appends the input's saturation, ``max - min`` over the RGB
channels, before the coordinate channels. Where objects are drawn in saturated colours on muted
backgrounds (the shapes data) that channel is the objects' silhouette. Measured with this D as a plain
shape classifier (32px, width 16, batch 16, Adam 2e-4, no GAN): shape accuracy 0.73 after 1500 steps
with the channel and without spectral norm, 0.30 with both (0.78 by step 3000), and 0.20-0.24 without
the channel (chance 0.17; with or without spectral norm) while colour was learnt within 750-1000 steps
in every case.

``spectral_norm=False`` (ours; the paper's D always has it) builds D without spectral norm, for
regularising it with the R1 penalty instead (``loss.r1_gamma``): in the measurement above spectral
norm alone cut the shape accuracy from 0.73 to 0.30, and a larger learning rate (5e-4) did not make
up for it (0.19).

``input_scale=2`` (ours, 1 by default) enlarges the input 2x (bilinear) and runs the architecture of
twice the resolution on it (a 32px D becomes the 64px one: one more block, regions still 16x16). The
first block pools by 2 right after its two convolutions, and on the 32px shapes data a small object
is ~7 pixels across; enlarged, the first block sees it at twice the size. Measured as a plain 6-way
shape classifier as above, with spectral norm and the saturation channel: shape accuracy 0.95 by
step 2000 (0.40 at 1500) against 0.64 by step 2250 without the enlargement.

``num_classes=C`` (ours, 0 by default) adds an auxiliary classifier, ``Linear(16w -> C)(p)`` (spectral
norm like every layer), whose logits are the ``classes`` field of the output: AC-GAN's label head
(Odena et al. 2017), trained on real images' class labels (``loss.class_weight``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastxmc.models.blocks import (DownBlock, OptimizedDownBlock, add_spectral_norm_, conv1x1,
                                   init_glorot_, with_coordinates, with_saturation)
from fastxmc.models.whitening import SentenceWhitening

D_ARCHITECTURES = {
    32: (4, ((8, True), (16, True), (16, False))),
    64: (2, ((4, True), (8, True), (16, True), (16, False))),
    128: (1, ((2, True), (4, True), (8, True), (16, True), (16, False))),
    256: (1, ((2, True), (4, True), (8, True), (8, True), (16, True), (16, False))),
}
REGION_SIZE = 16  # region features come from the 16x16 map: R = 256


class DiscriminatorOutput(NamedTuple):
    logits: torch.Tensor    # (N,) projection-discriminator logit per image
    features: torch.Tensor  # (N, 16w) sum-pooled global feature p
    regions: torch.Tensor   # (N, 256, text_dim) region features for the word loss
    sentence: torch.Tensor  # (B, 16w) sentence projection e (N = k * B, see Discriminator.forward)
    classes: torch.Tensor | None = None  # (N, C) auxiliary class logits (num_classes > 0), else None


def _build_blocks(resolution: int, width: int, in_channels: int = 3):
    """The block list and the index of the block whose output is the 16x16 region map."""
    first, rest = D_ARCHITECTURES[resolution]
    blocks = [OptimizedDownBlock(in_channels, first * width)]
    channels, size = first * width, resolution // 2
    region_block = 0 if size == REGION_SIZE else None
    for multiplier, downsample in rest:
        blocks.append(DownBlock(channels, multiplier * width, downsample))
        channels, size = multiplier * width, size // 2 if downsample else size
        if size == REGION_SIZE:
            region_block = len(blocks) - 1
    return nn.ModuleList(blocks), region_block, blocks[region_block].conv2.out_channels


class Discriminator(nn.Module):
    """D(images, sentence) -> :class:`DiscriminatorOutput`.

    Args:
        resolution: 32, 64, 128 or 256.
        text_dim: width of the sentence and word embeddings (768 for BERT-base).
        width: base channel width df (96; smaller for the CPU presets).
        coords: append x/y coordinate channels to the input (see the module docstring).
        whiten_sentence: read the sentence through a :class:`SentenceWhitening` (as the Generator).
        num_classes, saturation, spectral_norm, input_scale: see the module docstring.
    """

    def __init__(self, resolution: int, text_dim: int, width: int = 96, *, coords: bool = False,
                 whiten_sentence: bool = False, num_classes: int = 0, saturation: bool = False,
                 spectral_norm: bool = True, input_scale: int = 1):
        super().__init__()
        if resolution not in D_ARCHITECTURES:
            raise ValueError(f"resolution must be one of {sorted(D_ARCHITECTURES)}, got {resolution!r}")
        if input_scale not in (1, 2) or isinstance(input_scale, bool):
            raise ValueError(f"input_scale must be 1 or 2, got {input_scale!r}")
        if resolution * input_scale not in D_ARCHITECTURES:
            raise ValueError(f"input_scale={input_scale} needs a D architecture for "
                             f"{resolution * input_scale}px; resolution {resolution} has none")
        for name, value in (("text_dim", text_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes, self.saturation = num_classes, bool(saturation)
        self.resolution, self.text_dim, self.width, self.coords = resolution, text_dim, width, bool(coords)
        self.input_scale = input_scale
        architecture = resolution * input_scale
        self.blocks, self.region_block, region_channels = _build_blocks(
            architecture, width, 3 + self.saturation + 2 * self.coords)
        feature_dim = D_ARCHITECTURES[architecture][1][-1][0] * width
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, 1)
        self.whitening = SentenceWhitening(text_dim) if whiten_sentence else None
        self.sentence_proj = nn.Linear(text_dim, feature_dim)
        self.region_proj = conv1x1(region_channels, text_dim)
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes else None
        init_glorot_(self)
        if spectral_norm:
            add_spectral_norm_(self)

    def _check_inputs(self, images, sentence) -> None:
        res = self.resolution
        if (not isinstance(images, torch.Tensor) or images.dim() != 4
                or tuple(images.shape[1:]) != (3, res, res)):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (N, 3, {res}, {res}), got {shape}")
        if not isinstance(sentence, torch.Tensor) or sentence.dim() != 2 \
                or sentence.shape[1] != self.text_dim:
            shape = tuple(sentence.shape) if isinstance(sentence, torch.Tensor) else type(sentence).__name__
            raise ValueError(f"sentence must have shape (B, {self.text_dim}), got {shape}")
        if sentence.shape[0] == 0 or images.shape[0] % sentence.shape[0]:
            raise ValueError(f"the image count ({images.shape[0]}) must be a multiple of the sentence "
                             f"count ({sentence.shape[0]})")

    def project_sentence(self, sentence: torch.Tensor) -> torch.Tensor:
        """D's embedding of sentences (B, text_dim) -> (B, 16w): the ``sentence`` field of
        :meth:`forward`'s output, without running the image tower."""
        if self.whitening is not None:
            sentence = self.whitening(sentence)
        return self.sentence_proj(sentence)

    def forward(self, images: torch.Tensor, sentence: torch.Tensor) -> DiscriminatorOutput:
        """images (N, 3, res, res) in [0, 1], sentence (B, text_dim) with N = k * B: the sentences are
        tiled k times for the projection (as the reference code does for concat(real, fake) with
        k = 2). Returns logits (N,), features (N, 16w), regions (N, 256, text_dim), sentence (B, 16w)
        and, with ``num_classes``, class logits (N, C).
        """
        self._check_inputs(images, sentence)
        if self.input_scale != 1:
            images = F.interpolate(images, scale_factor=self.input_scale, mode="bilinear",
                                   align_corners=False)
        h = with_saturation(images) if self.saturation else images
        h = with_coordinates(h) if self.coords else h
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index == self.region_block:
                region_map = h                                         # (N, C, 16, 16), pre-ReLU
        features = F.relu(h).sum(dim=(2, 3))                           # (N, 16w)
        sentence_emb = self.project_sentence(sentence)                 # (B, 16w)
        tiled = sentence_emb.repeat(images.shape[0] // sentence.shape[0], 1)
        logits = self.head(features).squeeze(1) + (features * tiled).sum(dim=1)
        regions = self.region_proj(region_map).flatten(2).transpose(1, 2)  # (N, 256, text_dim)
        classes = self.classifier(features) if self.classifier is not None else None
        return DiscriminatorOutput(logits, features, regions, sentence_emb, classes)
