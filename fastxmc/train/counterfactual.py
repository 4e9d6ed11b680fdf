"""Counterfactual captions: text-side hard negatives for G in a frozen dual encoder (shapes dataset).

``--loss.counterfactual_weight=W`` (ours, off by default) adds to G's loss, for every fake whose
caption names an attribute ``a`` of ``loss.counterfactual_attributes`` (default ``shape``)::

    CE( [cos(E_img(fake), E_txt(describe(obj with a = v))) / t  for every value v of a],  true value )

with ``E`` the frozen dual encoder of ``loss.dual_encoder``, ``obj`` the image's object record
(``attributes.jsonl``) and ``describe`` :func:`fastxmc.data.shapes.describe_object`'s one fixed
wording. The candidates differ only in ``a``, so the term asks for exactly that attribute, whatever
else the batch holds. Why: the batch-contrastive terms (D's and the DAMSM-style ``loss.dual_weight``)
only ask for an attribute when it tells the batch's captions apart, and in a random batch of 16 the
colour and position almost always do; on the shapes data G then drew every shape as the same blob
even against an encoder that tells shapes apart (docs/results.md). Batches of pairs that differ only in shape
(``data.group_by=color+size+position``) did raise G's shapes, but lost the position pairs; these
negatives need no batch structure, so the preset's pairs stay.

The candidates are one wording (the caption's own wording is not compared), so the term cannot be
lowered by matching a wording style; all candidates share the image's other attributes. Samples whose
image has more than one object, and attributes the drawn caption does not name
(:func:`~fastxmc.data.shapes.named_attributes`: size and position are optional in the templates), are
left out of the mean. Every description of the attribute grid (864 for the shapes vocabularies) is
encoded once at start by the data's frozen text encoder and the dual encoder's text tower, so a step
costs one (B, V, E) product per attribute.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from fastxmc.data.shapes import ATTRIBUTE_VALUES, describe_object, named_attributes, read_attributes

__all__ = ["GRID_AXES", "parse_attributes", "description_grid", "grid_ids", "CounterfactualTerm",
           "build_counterfactual_term"]

# The description grid's axes, in mixed-radix order (the last varies fastest).
GRID_AXES = ("size", "color", "shape", "position")
_RADIX = tuple(len(ATTRIBUTE_VALUES[a]) for a in GRID_AXES)
OPTION = "loss.counterfactual_attributes"


def parse_attributes(spec: str) -> tuple:
    """``"shape+position"`` -> ``("shape", "position")``; errors name the option."""
    names = tuple(part.strip() for part in str(spec).split("+"))
    unknown = [n for n in names if n not in ATTRIBUTE_VALUES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"{OPTION} must be a '+'-joined set of {list(ATTRIBUTE_VALUES)} with no "
                         f"attribute named twice, got {spec!r}")
    return names


def description_grid() -> list:
    """``describe_object`` of every (size, colour, shape, position), in :func:`grid_ids` order."""
    values = [ATTRIBUTE_VALUES[a] for a in GRID_AXES]
    return [describe_object(dict(zip(GRID_AXES, combo))) for combo in itertools.product(*values)]


def grid_ids(codes: torch.Tensor) -> torch.Tensor:
    """(..., 4) value indices along :data:`GRID_AXES` -> (...) rows of :func:`description_grid`."""
    ids = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=codes.device)
    for axis, radix in enumerate(_RADIX):
        ids = ids * radix + codes[..., axis]
    return ids


def object_codes(obj: dict) -> list:
    """An object record's value indices along :data:`GRID_AXES`."""
    return [ATTRIBUTE_VALUES[a].index(obj[a]) for a in GRID_AXES]


class CounterfactualTerm:
    """The term for one training split (see the module docstring).

    Args:
        text_features: (M, E) the dual encoder's sentence features of :func:`description_grid`.
        codes: (N, 4) int64 value indices of each sample's object (:func:`object_codes`); a row of
            -1 marks a sample that is left out (more than one object).
        named: (N, C, A) bool: whether caption c of sample n names attribute k of ``attributes``
            (False past a sample's last caption).
        attributes: the attributes asked for, e.g. ``("shape",)``.
        temperature: of the logits (XMC-GAN's 0.1, ``loss.temperature``).
    """

    def __init__(self, text_features: torch.Tensor, codes: torch.Tensor, named: torch.Tensor,
                 attributes: tuple, temperature: float):
        if text_features.shape[0] != int(np.prod(_RADIX)):
            raise ValueError(f"text_features must have one row per grid description ({np.prod(_RADIX)}), "
                             f"got {tuple(text_features.shape)}")
        if codes.shape[0] != named.shape[0] or named.shape[2] != len(attributes):
            raise ValueError(f"codes (N, 4) and named (N, C, {len(attributes)}) disagree: "
                             f"{tuple(codes.shape)} and {tuple(named.shape)}")
        self.text = F.normalize(text_features.detach().float(), dim=-1)
        self.attributes, self.temperature = tuple(attributes), float(temperature)
        # What counts, and per attribute every sample's candidate rows and true value (fixed for the run).
        self.counts = named & (codes[:, None, :1] >= 0)                # (N, C, A)
        kept = codes.clamp(min=0)                                      # left-out rows: any valid id
        self.candidates, self.targets = [], []
        for attribute in attributes:
            axis = GRID_AXES.index(attribute)
            candidates = kept[:, None, :].repeat(1, _RADIX[axis], 1)   # (N, V, 4)
            candidates[:, :, axis] = torch.arange(_RADIX[axis])
            self.candidates.append(grid_ids(candidates))              # (N, V)
            self.targets.append(kept[:, axis])                         # (N,)

    def to(self, device) -> "CounterfactualTerm":
        self.text, self.counts = self.text.to(device), self.counts.to(device)
        self.candidates = [c.to(device) for c in self.candidates]
        self.targets = [t.to(device) for t in self.targets]
        return self

    def __call__(self, image_features: torch.Tensor, index: torch.Tensor,
                 caption: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the (sample, attribute) pairs that count; ``image_features``
        (B, E) of the fakes drawn for samples ``index`` (B,) with captions ``caption`` (B,)."""
        image = F.normalize(image_features.float(), dim=-1)
        counts = self.counts[index, caption]                           # (B, A)
        total = image.new_zeros(())
        for k, (candidates, targets) in enumerate(zip(self.candidates, self.targets)):
            text = self.text[candidates[index]]                        # (B, V, E)
            logits = torch.einsum("be,bve->bv", image, text) / self.temperature
            loss = F.cross_entropy(logits, targets[index], reduction="none")
            total = total + (loss * counts[:, k]).sum()
        return total / counts.sum().clamp(min=1)


def sample_codes_and_named(records: list, attribute_records: list, attributes: tuple) -> tuple:
    """(codes (N, 4), named (N, C, A)) of a split's ``records`` (:class:`~fastxmc.data.sources.Record`)
    from its ``attributes.jsonl`` records."""
    by_image = {r["image"]: r["objects"] for r in attribute_records}
    n, c = len(records), max(len(r.captions) for r in records)
    codes = np.full((n, 4), -1, np.int64)
    named = np.zeros((n, c, len(attributes)), bool)
    for i, record in enumerate(records):
        objects = by_image.get(record.image)
        if objects is None:
            raise ValueError(f"attributes.jsonl has no record of image {record.image!r}")
        if len(objects) != 1:
            continue                     # a caption of two objects: not a single description
        codes[i] = object_codes(objects[0])
        for j, caption in enumerate(record.captions):
            said = named_attributes(caption)
            named[i, j] = [a in said for a in attributes]
    return torch.from_numpy(codes), torch.from_numpy(named)


@torch.no_grad()
def grid_text_features(dual, encode_captions, chunk: int = 256) -> torch.Tensor:
    """(M, E) sentence features of :func:`description_grid` in ``dual``'s text tower; ``encode_captions``
    is the loader's (the run's frozen text encoder, tokenization and rounding)."""
    strings = description_grid()
    parts = []
    for start in range(0, len(strings), chunk):
        sentence, words, mask = encode_captions(strings[start:start + chunk])
        parts.append(dual.encode_sentence(sentence, words, mask))
    return torch.cat(parts)


def build_counterfactual_term(loss_cfg, loader, dual) -> CounterfactualTerm:
    """The term for ``loader``'s split (a shapes dataset) with ``dual``, a
    :class:`~fastxmc.train.losses.FrozenDualEncoder`."""
    data = loader.data   # a shapes split: validate() has checked data.dataset
    attributes = parse_attributes(loss_cfg.counterfactual_attributes)
    codes, named = sample_codes_and_named(data.records, read_attributes(data.root / data.split), attributes)
    features = grid_text_features(dual, loader.encode_captions)
    return CounterfactualTerm(features, codes, named, attributes, loss_cfg.temperature)
