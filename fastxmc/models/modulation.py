"""XMC-GAN's modulated batch norms: ``BN_noaffine(x) * (1 + gamma) + beta``, gamma/beta from a condition.

- :class:`SelfModulationBN`: per-channel gamma, beta = Linear(cond) (the first two G blocks, cond = the
  global condition ``concat(Linear(sentence), z)``).
- :class:`SpatialModulationBN`: per-pixel gamma, beta = conv1x1(cond) (attentional self-modulation, cond =
  the spatial condition ``concat(word context, tiled global condition)``).

Both own ``running_mean`` / ``running_var`` buffers (PyTorch momentum 0.1 = Flax 0.9, eps 1e-5, batch
statistics per device) and call :func:`fastxmc.ops.modulated_batch_norm`: training mode normalises with
the batch statistics and updates the buffers, eval mode (the EMA generator, sampling) uses the buffers.
The gamma/beta layers keep PyTorch's default init here; the networks that own them re-initialise every
layer (see :func:`fastxmc.models.blocks.init_glorot_`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastxmc.ops import modulated_batch_norm


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _ModulatedBN(nn.Module):
    """Shared buffers and the call into the op; subclasses turn ``cond`` into (gamma, beta)."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        _check_size("channels", channels)
        self.channels, self.momentum, self.eps = channels, momentum, eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _check_x(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a (B, {self.channels}, H, W) tensor, got {shape}")

    def _normalize(self, x, gamma, beta, relu: bool) -> torch.Tensor:
        # Under autocast the layers producing gamma/beta may return another dtype than x.
        return modulated_batch_norm(
            x, gamma.to(x.dtype), beta.to(x.dtype), self.running_mean, self.running_var,
            training=self.training, momentum=self.momentum, eps=self.eps, relu=relu)

    def extra_repr(self) -> str:
        return f"{self.channels}, momentum={self.momentum}, eps={self.eps}"


class SelfModulationBN(_ModulatedBN):
    """Per-channel modulation: ``BN(x) * (1 + gamma) + beta`` with gamma, beta = Linear(cond_dim -> C).

    forward(x (B, C, H, W), cond (B, cond_dim), relu=False) -> (B, C, H, W).
    """

    def __init__(self, channels: int, cond_dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__(channels, momentum, eps)
        _check_size("cond_dim", cond_dim)
        self.cond_dim = cond_dim
        # Two layers, as the reference code (their Xavier init depends on the output width C).
        self.gamma = nn.Linear(cond_dim, channels)
        self.beta = nn.Linear(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, relu: bool = False) -> torch.Tensor:
        self._check_x(x)
        if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (x.shape[0], self.cond_dim):
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must have shape (B, cond_dim) = {(x.shape[0], self.cond_dim)}, "
                             f"got {shape}")
        return self._normalize(x, self.gamma(cond), self.beta(cond), relu)


def _resize_nearest(t: torch.Tensor, size) -> torch.Tensor:
    return t if tuple(t.shape[-2:]) == tuple(size) else F.interpolate(t, size=size, mode="nearest")


class SpatialModulationBN(_ModulatedBN):
    """Per-pixel modulation: ``BN(x) * (1 + gamma) + beta`` with gamma, beta = conv1x1(cond_channels -> C).

    forward(x (B, C, H, W), cond (B, cond_channels, h, w), relu=False) -> (B, C, H, W); the condition
    is nearest-resized to (H, W). A 1x1 conv is pointwise and nearest resizing only copies pixels, so
    the two commute exactly: the conv runs at whichever of (h, w) and (H, W) is smaller (in G the
    16x16 condition serves every later block without ever upsampling its 1024 channels).
    """

    def __init__(self, channels: int, cond_channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__(channels, momentum, eps)
        _check_size("cond_channels", cond_channels)
        self.cond_channels = cond_channels
        self.gamma = nn.Conv2d(cond_channels, channels, 1)
        self.beta = nn.Conv2d(cond_channels, channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, relu: bool = False) -> torch.Tensor:
        self._check_x(x)
        if (not isinstance(cond, torch.Tensor) or cond.dim() != 4 or cond.shape[0] != x.shape[0]
                or cond.shape[1] != self.cond_channels):
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must have shape (B, cond_channels, h, w) = "
                             f"({x.shape[0]}, {self.cond_channels}, h, w), got {shape}")
        size = x.shape[-2:]
        if cond.shape[-2] * cond.shape[-1] > size[0] * size[1]:
            cond = _resize_nearest(cond, size)
        gamma = _resize_nearest(self.gamma(cond), size)
        beta = _resize_nearest(self.beta(cond), size)
        return self._normalize(x, gamma, beta, relu)
