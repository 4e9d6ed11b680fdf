"""XMC-GAN's residual blocks (G up-blocks, D down-blocks) and the initialisation both networks share.

Every conv and linear layer has a bias (as the reference code). Layers are built plain; the networks
initialise them with :func:`init_glorot_` and the discriminator then wraps each one in spectral norm
with :func:`add_spectral_norm_` (the power-iteration vectors start from the initialised weights).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from fastxmc.models.modulation import SelfModulationBN, SpatialModulationBN

# Standard deviation of a unit normal truncated to [-2, 2]: JAX's glorot_normal draws from that
# truncated normal and divides by this so the variance is exactly 2 / (fan_in + fan_out).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def glorot_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Xavier/Glorot normal in place, the reference code's ``glorot_normal`` (truncated at 2 sigma).

    Fans follow PyTorch's convention for (out, in, kh, kw): fan_in = in*kh*kw, fan_out = out*kh*kw.
    """
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def _layers(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def init_glorot_(module: nn.Module) -> None:
    """Glorot-normal weights and zero biases for every Conv2d/Linear in ``module`` (before spectral norm)."""
    for layer in _layers(module):
        if parametrize.is_parametrized(layer):
            raise ValueError(f"init_glorot_ must run before parametrizations are added ({layer})")
        glorot_normal_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def add_spectral_norm_(module: nn.Module) -> None:
    """Spectral norm on every Conv2d/Linear of ``module``: one power iteration per training forward,
    u/v updated only in training mode (eval reuses the stored vectors)."""
    for layer in _layers(module):
        spectral_norm(layer, n_power_iterations=1)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 (pixel repetition, as ``jax.image.resize(..., "nearest")`` for x2)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C + 2, H, W): x, then the coordinate channels (CoordConv, Liu et al. 2018)
    x (left -1 .. right 1) and y (top -1 .. bottom 1)."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y]).expand(n, -1, -1, -1)
    return torch.cat([x, coords], dim=1)


def with_saturation(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 4, H, W): x, then its saturation ``max - min`` over the channels."""
    return torch.cat([x, x.amax(1, keepdim=True) - x.amin(1, keepdim=True)], dim=1)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1)


class UpBlock(nn.Module):
    """G's residual up-block: ``MBN -> ReLU -> up x2 -> conv3x3 -> MBN -> ReLU -> conv3x3``, shortcut
    ``up x2 -> conv1x1``. MBN is :class:`SelfModulationBN` (cond (B, cond_dim)) or, with ``spatial``,
    :class:`SpatialModulationBN` (cond (B, cond_dim, h, w) at any size, nearest-resized per norm).

    forward(x (B, in, H, W), cond) -> (B, out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, spatial: bool):
        super().__init__()
        norm = SpatialModulationBN if spatial else SelfModulationBN
        self.norm1 = norm(in_channels, cond_dim)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = norm(out_channels, cond_dim)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = conv1x1(in_channels, out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(upsample2(self.norm1(x, cond, relu=True)))
        h = self.conv2(self.norm2(h, cond, relu=True))
        # conv1x1 before the upsampling: the same values (both are pointwise), 4x fewer FLOPs.
        return h + upsample2(self.shortcut(x))


class OptimizedDownBlock(nn.Module):
    """D's first block (no pre-activation): ``conv3x3 -> ReLU -> conv3x3 -> avgpool2``, shortcut
    ``avgpool2 -> conv1x1``. forward(x (B, in, H, W)) -> (B, out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = conv1x1(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class DownBlock(nn.Module):
    """D's pre-activation block: ``ReLU -> conv3x3 -> ReLU -> conv3x3 -> [avgpool2]``; the shortcut has
    a conv1x1 when the block downsamples or changes the width (identity otherwise).

    forward(x (B, in, H, W)) -> (B, out, H/2, W/2) (or (B, out, H, W) without ``downsample``).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.conv1 = conv3x3(in_channels, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        needs_projection = downsample or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels) if needs_projection else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._pool(self.conv2(F.relu(self.conv1(F.relu(x)))))
        # The reference convolves then pools the shortcut; pooling first gives the same values.
        skip = self._pool(x)
        return h + (self.shortcut(skip) if self.shortcut is not None else skip)
