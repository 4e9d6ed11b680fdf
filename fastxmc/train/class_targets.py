"""What D's class head predicts (``loss.class_weight``, ``loss.class_target``).

``loss.class_target=label`` (the default): the data's primary label, one head over all classes.

On the shapes data the head can instead predict attributes of the primary object, ``+``-joined:
``shape`` (6-way), ``color`` (8-way), ``position`` (9-way, the 3x3 cell). With several, the head is
one linear layer whose logits are the attributes' blocks side by side, and the class term is the
sum of one cross-entropy per block (:func:`fastxmc.train.losses.class_loss`).

Real images are scored against their own primary object. A fake is scored against what its caption
says: every shapes caption names the primary object's shape and colour, but only some name its
position (:func:`fastxmc.data.shapes.named_positions`). Where the caption does not, the fake's
position target is -1 (left out), so G is never asked to guess a position from a caption that does
not give one.

Why position: a head trained on the shape alone learns features that ignore where the object is,
and in the shape-only runs of docs/results.md G then drew every object in one corner. A head that
must also say where keeps D's features, and so G's gradient, aware of the layout.
"""
from __future__ import annotations

import numpy as np
import torch

from fastxmc.data.shapes import ATTRIBUTE_VALUES, named_positions, primary_objects

__all__ = ["CLASS_ATTRIBUTES", "parse_class_target", "attribute_blocks", "head_sizes", "ClassTargets"]

# The shapes attributes the class head can predict, in the order of its logit blocks. Sizes are left
# out: in two-object captions a size word may belong to either object.
CLASS_ATTRIBUTES = ("shape", "color", "position")


def parse_class_target(text: str) -> tuple:
    """``loss.class_target`` parsed: ``("label",)``, or the named attributes in
    :data:`CLASS_ATTRIBUTES` order; errors name the option."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"loss.class_target must be 'label' or a '+'-joined subset of "
                         f"{list(CLASS_ATTRIBUTES)}, got {text!r}")
    if text.strip() == "label":
        return ("label",)
    names = [name.strip() for name in text.split("+")]
    unknown = [name for name in names if name not in CLASS_ATTRIBUTES]
    if unknown:
        raise ValueError(f"loss.class_target must be 'label' or a '+'-joined subset of "
                         f"{list(CLASS_ATTRIBUTES)}, got {text!r} ({unknown[0]!r} is neither)")
    if len(set(names)) != len(names):
        raise ValueError(f"loss.class_target={text!r} names an attribute twice")
    return tuple(name for name in CLASS_ATTRIBUTES if name in names)


def attribute_blocks(text: str) -> tuple | None:
    """The widths of the class head's logit blocks for attribute targets, one per attribute (e.g.
    ``(6, 9)`` for ``shape+position``); None for ``label`` (one block over the data's classes)."""
    attributes = parse_class_target(text)
    if attributes == ("label",):
        return None
    return tuple(len(ATTRIBUTE_VALUES[name]) for name in attributes)


def head_sizes(text: str, num_classes: int) -> tuple:
    """The widths of the class head's logit blocks: ``(num_classes,)`` for ``label``, else
    :func:`attribute_blocks`."""
    return attribute_blocks(text) or (num_classes,)


class ClassTargets:
    """The class head's targets of a batch: :meth:`real` for the real images, :meth:`fake` for the
    fakes of a caption branch. For ``label``, both are the batch's primary labels (B,); for
    attributes, (B, A) indexes into each attribute's values, -1 where there is no target."""

    def __init__(self, attributes: tuple, table: torch.Tensor | None = None,
                 stated: torch.Tensor | None = None):
        self.attributes = attributes
        self.table = table      # (N, A) int64: the primary object's attributes per sample
        self.stated = stated    # (N, C, A) bool: caption c of sample n states attribute a

    @classmethod
    def for_loader(cls, text: str, loader, device) -> "ClassTargets":
        """The targets of ``loss.class_target=text`` over ``loader``'s split."""
        attributes = parse_class_target(text)
        if attributes == ("label",):
            return cls(attributes)
        data = loader.data
        records = data.records
        objects = primary_objects(data.root / data.split, [r.image for r in records])
        table = np.array([[ATTRIBUTE_VALUES[a].index(o[a]) for a in attributes] for o in objects],
                         np.int64)
        # every caption states the shape and colour; the position only where it names it
        stated = np.ones((len(records), max(len(r.captions) for r in records), len(attributes)), bool)
        if "position" in attributes:
            column = attributes.index("position")
            for n, (record, obj) in enumerate(zip(records, objects)):
                for c, caption in enumerate(record.captions):
                    stated[n, c, column] = obj["position"] in named_positions(caption)
        return cls(attributes, torch.from_numpy(table).to(device), torch.from_numpy(stated).to(device))

    def real(self, batch: dict) -> torch.Tensor:
        if self.table is None:
            return batch["label"]
        return self.table[batch["index"]]

    def fake(self, batch: dict, caption_key: str = "caption") -> torch.Tensor:
        """The targets of the fakes drawn from ``batch[caption_key]`` (each sample's caption index)."""
        if self.table is None:
            return batch["label"]
        stated = self.stated[batch["index"], batch[caption_key]]
        return torch.where(stated, self.table[batch["index"]], -1)
