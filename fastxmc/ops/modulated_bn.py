"""Modulated batch norm (XMC-GAN's self-modulation and per-pixel modulation in G).

``modulated_batch_norm(x, gamma, beta, ...)`` = ``BN_noaffine(x) * (1 + gamma) + beta`` (+ ReLU),
gamma/beta per channel (B, C) or per pixel (B, C, H, W). Backends live in ``registry``; the oracle
is :func:`fastxmc.reference.modulated_bn.modulated_batch_norm_reference`.
"""
from __future__ import annotations

import torch

from fastxmc.ops.checks import check_float_tensor, check_like, check_positive
from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.reference.modulated_bn import modulated_batch_norm_reference


def _reference_unsupported(req: Request) -> list:
    return [] if req.dtype.is_floating_point else [f"dtype {req.dtype} is not floating point"]


_KERNELS = {"reference": modulated_batch_norm_reference}

registry = OpRegistry(op="modulated_batch_norm", priority={"default": ["reference"]})
registry.register(Backend("reference", _reference_unsupported, "plain PyTorch composition (oracle)"))


def _check_modulation(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    b, c = x.shape[:2]
    if tuple(t.shape) not in ((b, c), tuple(x.shape)):
        raise ValueError(f"{name} must have shape (B, C) = {(b, c)} (per channel) or (B, C, H, W) = "
                         f"{tuple(x.shape)} (per pixel), got {tuple(t.shape)}")
    check_like(name, t, "x", x)


def _check_buffer(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (C,) or None, got {type(t).__name__}")
    if tuple(t.shape) != (x.shape[1],):
        raise ValueError(f"{name} must have shape (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
    if t.device != x.device or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor on {x.device}, got {t.dtype} on {t.device}")


def _check(x, gamma, beta, running_mean, running_var, training, momentum, eps) -> None:
    check_float_tensor("x", x, 4, "(B, C, H, W)")
    _check_modulation("gamma", gamma, x)
    _check_modulation("beta", beta, x)
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must have one shape")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is not None:
        _check_buffer("running_mean", running_mean, x)
        _check_buffer("running_var", running_var, x)
    elif not training:
        raise ValueError("training=False needs running_mean and running_var (eval mode uses them)")
    if training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"x {tuple(x.shape)}: training mode needs more than one value per channel")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    check_positive("eps", eps)


def modulated_batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         running_mean: torch.Tensor | None = None,
                         running_var: torch.Tensor | None = None, *, training: bool = True,
                         momentum: float = 0.1, eps: float = 1e-5, relu: bool = False,
                         impl: str | None = None) -> torch.Tensor:
    """``BN_noaffine(x) * (1 + gamma) + beta``, then ReLU when ``relu``.

    Args:
        x: (B, C, H, W) float, any memory format (channels_last works).
        gamma, beta: (B, C) per-channel or (B, C, H, W) per-pixel modulation, x's dtype/device.
        running_mean, running_var: (C,) buffers; training mode updates them in place with
            PyTorch's convention (``new = (1 - momentum) * old + momentum * batch``, unbiased
            variance); eval mode (``training=False``) normalises with them.
        training: batch statistics (True) or the running buffers (False).
        momentum, eps: as ``torch.nn.functional.batch_norm``.
        relu: apply ReLU to the result (fused in the fast backends).
        impl: force a backend; default: ``FASTXMC_IMPL``, else the fastest that fits.
    Returns:
        (B, C, H, W) in x's dtype; gradients for x, gamma and beta.
    """
    _check(x, gamma, beta, running_mean, running_var, training, momentum, eps)
    backend = registry.select(Request(x.device, x.dtype), impl)
    return _KERNELS[backend](x, gamma, beta, running_mean, running_var, training=bool(training),
                             momentum=float(momentum), eps=float(eps), relu=bool(relu))
