"""XMC-GAN networks: :class:`Generator`, :class:`Discriminator` and their building blocks.

See docs/design.md, "Generator" and "Discriminator"; parameter counts at 128px, width 96, z 128, text_dim 768 match the
authors' reference code exactly (G 78,507,779, D 87,911,713).
"""
from torch import nn

from fastxmc.models.discriminator import Discriminator, DiscriminatorOutput
from fastxmc.models.generator import Generator
from fastxmc.models.modulation import SelfModulationBN, SpatialModulationBN


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars (spectral norm's u/v vectors are buffers and do not count)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["Generator", "Discriminator", "DiscriminatorOutput", "SelfModulationBN",
           "SpatialModulationBN", "count_parameters"]
