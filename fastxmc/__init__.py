"""fastxmc: fused contrastive kernels and an XMC-GAN training engine for PyTorch.

The drop-in losses live in :mod:`fastxmc.losses`; ``python -m fastxmc.info`` reports which backends
this installation can run and why the others cannot.
"""
__version__ = "0.1.0"

from fastxmc import losses  # noqa: E402,F401  (public API: fastxmc.losses.info_nce, ...)
