"""fastxmc: fused contrastive kernels and an XMC-GAN training engine for PyTorch.

The drop-in losses live in :mod:`fastxmc.losses`; ``python -m fastxmc.info`` reports which backends
this installation can run and why the others cannot.
"""
import importlib

__version__ = "0.1.0"


def __getattr__(name):
    # Subpackages load on first use, so light modules (e.g. fastxmc.data.shapes, needed by data
    # workers) do not pay for torch and the native extension.
    if name in ("losses", "ops", "reference", "data", "models", "train", "eval"):
        return importlib.import_module(f"fastxmc.{name}")
    raise AttributeError(f"module 'fastxmc' has no attribute {name!r}")
