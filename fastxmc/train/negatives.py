"""Caption negatives from the whole training split for the sentence terms (``loss.text_negatives``).

XMC-GAN's sentence term ``C(p, e)`` asks D (on real images) and G (on fakes) to rank each image's
caption above the batch's other captions. An attribute matters to it only when it tells the batch's
captions apart: in a batch of 16 shapes captions, colour, position and size nearly always do, so D
never learns to read the shape, and G never has to draw it (see the shapes runs of docs/results.md). The
contrastive terms of pretrained dual encoders learn shapes only at batch 512.

Here every step also draws ``K`` captions of *other* images of the split from the text cache. Their
sentence embeddings go through D's sentence projection (the same ``Linear`` as the batch's, with
gradient) and join the image->text direction of both sentence terms as extra negatives; the
text->image direction is unchanged. The text side costs one (K, E) x (E, F) product per D call: no
images are read or generated. Because the text encoder is frozen the extra captions are never stale,
unlike a MoCo queue of past keys, and only D's (current) projection is applied to them.

False negatives: a caption of another image may describe the anchor just as well (the same shape and
colour, the position not named). Captions of the batch's own images and, on labelled data, captions
whose image has a primary label that occurs in the batch are never drawn. On the shapes data the
label is shape x colour, so every extra caption differs from each anchor's object in shape or colour.

Draws are a function of the run seed, the rank and the batch (its sample and caption indices), so a
resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import numpy as np
import torch

# Label ids for drawn captions of unlabelled images: unique, and below every id pair_labels() makes.
_UNLABELLED_BASE = -(1 << 40)
_SALT = 0x7E47  # separates these draws from the loader's, which use (seed, epoch) streams


class CaptionNegatives:
    """Draws ``count`` captions of other images for one batch (see the module docstring).

    Args:
        loader: the training split's :class:`fastxmc.data.loader.Loader`.
        count: captions per draw (``loss.text_negatives``), > 0.
        seed, rank: the run's seed and this process's rank.
    """

    def __init__(self, loader, count: int, *, seed: int, rank: int = 0):
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise ValueError(f"loss.text_negatives must be an int > 0 to draw captions, got {count!r}")
        self.loader, self.count, self.seed, self.rank = loader, count, seed, rank
        self.owners = loader.caption_owners()                    # (n_captions,) sample index
        self.caption_labels = loader.primary_labels()[self.owners]  # (n_captions,) -1: none

    def rng(self, index: np.ndarray, caption: np.ndarray) -> np.random.Generator:
        entropy = [_SALT, self.seed, self.rank, *index.tolist(), *caption.tolist()]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def allowed(self, index: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Flat numbers of the captions a batch may draw: not of its images, not of its labels."""
        keep = ~np.isin(self.owners, index)
        labelled = labels[labels >= 0]
        if labelled.size:
            keep &= ~np.isin(self.caption_labels, labelled)
        return np.flatnonzero(keep)

    def draw(self, index, caption, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sentences (K, E) float32, label ids (K,) int64)`` on the loader's device, for the
        batch's ``index``, ``caption`` and primary ``labels`` (B,) tensors. Label ids are the drawn
        captions' primary labels, or unique ids below every batch id where an image has none."""
        index, caption, labels = (torch.as_tensor(x).reshape(-1).cpu().numpy().astype(np.int64)
                                  for x in (index, caption, labels))
        allowed = self.allowed(index, labels)
        if allowed.size == 0:
            raise ValueError("loss.text_negatives: every caption of the split belongs to the batch's "
                             "images or labels; there is nothing to draw negatives from")
        flat = allowed[self.rng(index, caption).integers(allowed.size, size=self.count)]
        ids = self.caption_labels[flat]
        ids = np.where(ids >= 0, ids, _UNLABELLED_BASE - np.arange(self.count))
        device = self.loader.device
        return self.loader.caption_sentences(flat), torch.from_numpy(ids).to(device)


def build_negatives(loss_cfg, loader, *, seed: int, rank: int = 0) -> CaptionNegatives | None:
    """The run's :class:`CaptionNegatives`, or None when ``loss.text_negatives`` is 0."""
    if not loss_cfg.text_negatives:
        return None
    return CaptionNegatives(loader, loss_cfg.text_negatives, seed=seed, rank=rank)
