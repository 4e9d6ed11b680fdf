"""Exponential moving average of the generator (XMC-GAN evaluates and samples with it)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(generator: nn.Module) -> nn.Module:
    """A frozen copy of ``generator`` in eval mode (its BN layers use the running statistics)."""
    ema = copy.deepcopy(generator)
    return ema.eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, generator: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * live`` for every parameter, then the buffers (BN running
    statistics) copied from the live generator, as the reference code does (it keeps one set of
    batch statistics, the live G's). Call after every G step."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must lie in [0, 1], got {decay}")
    ema_params, live_params = list(ema.parameters()), list(generator.parameters())
    if len(ema_params) != len(live_params):
        raise ValueError(f"EMA copy has {len(ema_params)} parameters but the generator has "
                         f"{len(live_params)}; build the EMA with make_ema(generator)")
    torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1.0 - decay)
    for ema_buffer, live_buffer in zip(ema.buffers(), generator.buffers()):
        ema_buffer.copy_(live_buffer)
