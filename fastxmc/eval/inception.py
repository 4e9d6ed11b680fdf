"""InceptionV3 pool features and logits from a LOCAL weights file (nothing is downloaded).

Two layouts of the same state-dict key names (torchvision's ``Inception3`` module names) load:

- ``"tf"``: the 2015-12-05 TensorFlow Inception graph used by the reference FID / IS code, as
  ported to PyTorch by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``); torch-fidelity
  ships the same network (``weights-inception-2015-12-05-6726825d.pth``). Recognised by its
  1008-way ``fc``. The TF graph pools differently from torchvision's blocks: the average pools of
  the pool branches of Mixed_5b..Mixed_7b exclude the zero padding from their mean, and Mixed_7c's
  pool branch is a max pool. Its logits are taken *without* the fc bias, as the original Inception
  Score code does (torch-fidelity calls them ``logits_unbiased``).
- ``"torchvision"``: a state dict of ``torchvision.models.inception_v3`` (any ``fc`` width, the
  ``AuxLogits`` head is ignored); logits include the bias.

Images in [0, 1] of any size are resized to 299x299 (bilinear, ``align_corners=False``, as
pytorch-fid does) and mapped to [-1, 1], the input range of both weight sets. Features are the
2048-d average-pooled output of Mixed_7c (``pool3``, the FID feature).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux,
                                          InceptionB, InceptionC, InceptionD, InceptionE)

__all__ = ["INPUT_SIZE", "FEATURE_DIM", "TF_NUM_CLASSES", "InceptionOutput", "InceptionV3",
           "load_inception", "build_inception_network"]

INPUT_SIZE = 299
FEATURE_DIM = 2048
TF_NUM_CLASSES = 1008
VARIANTS = ("tf", "torchvision")


class InceptionOutput(NamedTuple):
    features: torch.Tensor   # (B, 2048) float32 pool3 features
    logits: torch.Tensor     # (B, num_classes) float32


# ---------------------------------------------------------------------------- TF pooling variants
def _avg_pool_excluding_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPoolBranch:
    """Mixin for torchvision blocks whose last output is ``branch_pool(avg_pool(x))``: recompute
    that branch with the TF graph's pooling (``tf_pool``), keeping every parameter name.

    The parent's pool branch is computed and discarded; it is a 1x1 conv, a small share of the block.
    """
    tf_pool = staticmethod(_avg_pool_excluding_padding)

    def _forward(self, x: torch.Tensor) -> list:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self.tf_pool(x))
        return outputs


class _TFInceptionA(_TFPoolBranch, InceptionA):
    pass


class _TFInceptionC(_TFPoolBranch, InceptionC):
    pass


class _TFInceptionE(_TFPoolBranch, InceptionE):
    pass


def build_inception_network(variant: str, num_classes: int) -> Inception3:
    """An uninitialised InceptionV3 (no aux head) of ``variant`` ("tf" or "torchvision")."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    blocks = [BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, InceptionAux]
    if variant == "tf":
        blocks = [BasicConv2d, _TFInceptionA, InceptionB, _TFInceptionC, InceptionD, _TFInceptionE,
                  InceptionAux]
    net = Inception3(num_classes=num_classes, aux_logits=False, transform_input=False,
                     inception_blocks=blocks, init_weights=False)
    if variant == "tf":
        net.Mixed_7c.tf_pool = _max_pool
    return net


# ---------------------------------------------------------------------------- the feature module
class InceptionV3(nn.Module):
    """Frozen InceptionV3 in eval mode: ``forward(images) -> InceptionOutput(features, logits)``.

    images: (B, 3, H, W) float in [0, 1], any H, W. Build it with :func:`load_inception`.
    """

    def __init__(self, net: Inception3, variant: str):
        super().__init__()
        self.variant = variant
        self.num_classes = net.fc.out_features
        self.fc = net.fc
        net.fc, net.dropout = nn.Identity(), nn.Identity()   # net(x) now returns the pool3 features
        self.net = net
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionV3":
        # Always frozen: batch-norm statistics must never change.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, H, W) in [0, 1], got "
                             f"{tuple(images.shape)} {images.dtype}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        features = self.net(x * 2 - 1)
        bias = self.fc.bias if self.variant == "torchvision" else None
        return InceptionOutput(features, F.linear(features, self.fc.weight, bias))


# ---------------------------------------------------------------------------- loading
def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {path} not found: fastxmc never downloads weights; pass the "
            f"path of a local file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, torch-fidelity's "
            f"weights-inception-2015-12-05-6726825d.pth, or a torchvision inception_v3 state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled modules, TorchScript archives, corrupt files
        raise ValueError(f"Inception weights file {path} is not a loadable state dict "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"Inception weights file {path} is not an InceptionV3 state dict "
                         f"(no 'fc.weight' entry)")
    return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


def _detect_variant(state: dict, variant: str) -> str:
    if variant == "auto":
        return "tf" if state["fc.weight"].shape[0] == TF_NUM_CLASSES else "torchvision"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'auto' or one of {VARIANTS}, got {variant!r}")
    return variant


def load_inception(path, *, variant: str = "auto", device="cpu") -> InceptionV3:
    """Load InceptionV3 weights from the local file ``path`` (see the module docstring).

    variant: "auto" (``"tf"`` when ``fc`` has 1008 outputs, else ``"torchvision"``), "tf" or
    "torchvision". Raises FileNotFoundError for a missing file and ValueError, naming the path,
    for anything that is not a matching InceptionV3 state dict.
    """
    path = Path(path)
    state = _read_state_dict(path)
    variant = _detect_variant(state, variant)
    net = build_inception_network(variant, num_classes=state["fc.weight"].shape[0])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:   # missing / unexpected keys, shape mismatches
        raise ValueError(f"Inception weights file {path} does not match InceptionV3 ({variant}): "
                         f"{str(e)[:600]}") from None
    return InceptionV3(net, variant).to(device)
