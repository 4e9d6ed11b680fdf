"""Exponential moving average of the generator (XMC-GAN evaluates and samples with it)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(generator: nn.Module) -> nn.Module:
    """A frozen copy of ``generator`` in eval mode (its BN layers use the running statistics)."""
    ema = copy.deepcopy(generator)
    return ema.eval().requires_grad_(False)


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """The decay of the update after G step ``step`` (1-based). With ``warmup``, TensorFlow's
    ``ExponentialMovingAverage(num_updates=step)`` rule ``min(decay, (1 + step) / (10 + step))``:
    early G_ema follows G instead of holding the random initial weights for ~1/(1 - decay) steps
    (at 0.995, 60% of G_ema is still the initialisation after 100 steps)."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


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


def _running_stat_modules(module: nn.Module) -> list:
    """Every submodule that keeps BN running statistics (torch BN and fastxmc's modulated BN)."""
    return [m for m in module.modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor) and hasattr(m, "momentum")]


@torch.no_grad()
def recompute_bn_statistics(generator: nn.Module, batches) -> int:
    """BigGAN's "standing statistics": replace the BN running statistics of ``generator`` by the
    average of its batch statistics over ``batches`` (tuples of G's forward arguments), then leave it
    in eval mode. Returns how many batches were used.

    Why: the EMA copy's weights differ from the live G's, so the live G's statistics (which
    :func:`update_ema` copies, as the reference code does) do not match the EMA network's
    activations when the weights move fast (short runs, high decay): its eval-mode samples wash out
    to white or black. The k-th batch gets momentum 1/(k+1), which makes the running value the exact
    mean over the batches."""
    modules = _running_stat_modules(generator)
    momenta = [m.momentum for m in modules]
    generator.train()
    count = 0
    try:
        for count, inputs in enumerate(batches, start=1):
            for m in modules:
                m.momentum = 1.0 / count
            generator(*inputs)
    finally:
        for m, momentum in zip(modules, momenta):
            m.momentum = momentum
        generator.eval()
    if count == 0:
        raise ValueError("recompute_bn_statistics needs at least one batch")
    return count
