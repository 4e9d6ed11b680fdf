"""Modulated batch norm (XMC-GAN's self-modulation and per-pixel modulation in G).

``modulated_batch_norm(x, gamma, beta, ...)`` = ``BN_noaffine(x) * (1 + gamma) + beta`` (+ ReLU),
gamma/beta per channel (B, C) or per pixel (B, C, H, W). The oracle is
:func:`fastxmc.reference.modulated_bn.modulated_batch_norm_reference`; the contract of the fused
backends is ``csrc/modulated_bn/modulated_bn.h``.

Layers (as :mod:`fastxmc.ops.infonce`): per-backend forward / backward kernels (``_KERNELS``), one
``torch.library`` custom op pair with fake implementations (``torch.compile(fullgraph=True)``
traces through it), autograd wiring, the backend registry, and the public function. The custom ops
are functional; the running buffers are updated next to them with in-place torch ops, so compiled
graphs see the buffer mutation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastxmc import _extension
from fastxmc.ops import backends
from fastxmc.ops.checks import check_float_tensor, check_like, check_positive
from fastxmc.ops.registry import Backend, OpRegistry, Request
from fastxmc.ops.triton import modulated_bn as triton_mbn
from fastxmc.reference.modulated_bn import modulated_batch_norm_reference


# Register the compiled ops (torch.ops.fastxmc.*) now; a missing build is reported, not raised.
_extension.extension_loaded()


# ---------------------------------------------------------------- backends' kernels
def _native_forward(x, gamma, beta, running_mean, running_var, training, eps, relu):
    return torch.ops.fastxmc.modulated_bn_forward(x, gamma, beta, running_mean, running_var,
                                                  training, eps, relu)


def _native_backward(grad_y, x, gamma, mean, invstd, mask, training, relu, need_dx, need_dmod):
    return torch.ops.fastxmc.modulated_bn_backward(grad_y, x, gamma, mean, invstd, mask, training,
                                                   relu, need_dx, need_dmod)


# The C++ ops dispatch on the tensors' device, so "cpu" and "cuda" share the entry points.
_KERNELS = {
    "cpu": (_native_forward, _native_backward),
    "cuda": (_native_forward, _native_backward),
    "triton": (triton_mbn.modulated_bn_forward_triton, triton_mbn.modulated_bn_backward_triton),
}


# ---------------------------------------------------------------- what each backend supports
_cpu_unsupported = backends.native_cpu("modulated_bn_forward")
_cuda_unsupported = backends.native_cuda("modulated_bn_forward")
_triton_unsupported = backends.triton(triton_mbn.triton_unavailable_reason)


# Request feature: a CPU call whose x holds at most SMALL_CPU_VALUES values. There the C++ kernels'
# fixed costs (the custom-op dispatch, about 0.1 ms a call, and a backward that parallelizes poorly
# over 4 x 4 or 8 x 8 planes) outweigh the passes they save, so the reference goes first. Measured on
# 2 AVX-512 cores, forward + backward in training mode: the kernels take 1.0-1.7x (per channel) and
# 1.1-2.6x (per pixel) the reference's time at 65536 and 131072 values, 0.5-1.07x at 196608-262144,
# 0.6-0.8x from 524288 (the shapes preset's G: its 16 x 256 x 4 x 4 block took 1.3-1.4x).
SMALL = "small"
SMALL_CPU_VALUES = 1 << 17

registry = OpRegistry(
    op="modulated_batch_norm",
    # Triton on CPU (the interpreter) only runs when forced.
    priority={"cuda": ["triton", "cuda", "reference"],
              "cpu": ["cpu", "reference"],
              "cpu+small": ["reference", "cpu"],
              "default": ["reference"]},
)
registry.register(Backend("reference", backends.floating_unsupported, "plain PyTorch composition (oracle)"))
registry.register(Backend("cpu", _cpu_unsupported, "C++ kernels (csrc/), 2 passes fwd, 2 bwd"))
registry.register(Backend("triton", _triton_unsupported, "Triton GPU kernels"))
registry.register(Backend("cuda", _cuda_unsupported, "C++/CUDA kernels (csrc/)"))


def request_for(device: torch.device, dtype: torch.dtype, values: int | None = None) -> Request:
    """The registry request of a call whose x holds ``values`` values (None: not known)."""
    device = torch.device(device)
    small = device.type == "cpu" and values is not None and values <= SMALL_CPU_VALUES
    return Request(device, dtype, frozenset({SMALL}) if small else frozenset())


# ---------------------------------------------------------------- the custom op pair
def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout the fused kernels use for x: channels_last when x is stored so (and is not also
    plain contiguous, as when C = 1 or H = W = 1), else contiguous (NCHW)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("fastxmc::modulated_batch_norm", mutates_args=())
def modulated_bn_op(x: Tensor, gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], training: bool, eps: float, relu: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, var, mask): see csrc/modulated_bn/modulated_bn.h. x and per-pixel
    gamma / beta arrive dense in one memory format (see :func:`_fused`)."""
    forward, _ = _KERNELS[backend]
    return tuple(forward(x, gamma, beta, running_mean, running_var, training, eps, relu))


@modulated_bn_op.register_fake
def _(x, gamma, beta, running_mean, running_var, training, eps, relu, backend):
    c, acc = x.shape[1], _acc_dtype(x)
    mask = torch.empty_like(x, dtype=torch.uint8) if relu else x.new_empty(0, dtype=torch.uint8)
    return (torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc),
            x.new_empty(c if training else 0, dtype=acc), mask)


@torch.library.custom_op("fastxmc::modulated_batch_norm_backward", mutates_args=())
def modulated_bn_backward_op(grad_y: Tensor, x: Tensor, gamma: Tensor, mean: Tensor,
                             invstd: Tensor, mask: Tensor, training: bool, relu: bool,
                             need_dx: bool, need_dmod: bool, backend: str
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta); an output not needed is an empty (0,) tensor."""
    _, backward = _KERNELS[backend]
    return tuple(backward(grad_y, x, gamma, mean, invstd, mask, training, relu, need_dx,
                          need_dmod))


@modulated_bn_backward_op.register_fake
def _(grad_y, x, gamma, mean, invstd, mask, training, relu, need_dx, need_dmod, backend):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(gamma) if need_dmod else x.new_empty(0),
            torch.empty_like(gamma) if need_dmod else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, gamma, _beta, _rm, _rv, training, _eps, relu, backend = inputs
    _y, mean, invstd, var, mask = output
    # x_hat is recomputed from x, mean and invstd; beta and y are not needed.
    ctx.save_for_backward(x, gamma, mean, invstd, mask)
    ctx.mark_non_differentiable(mean, invstd, var, mask)
    ctx.params = (training, relu, backend)


def _backward(ctx, grad_y, *_stats_grads):
    x, gamma, mean, invstd, mask = ctx.saved_tensors
    training, relu, backend = ctx.params
    need_dx, need_gamma, need_beta = ctx.needs_input_grad[:3]
    none = (None,) * 6
    if grad_y is None or not (need_dx or need_gamma or need_beta):
        return (None, None, None) + none
    grad_y = grad_y.contiguous(memory_format=memory_format_of(x))
    dx, dgamma, dbeta = modulated_bn_backward_op(grad_y, x, gamma, mean, invstd, mask, training,
                                                 relu, need_dx, need_gamma or need_beta, backend)
    return (dx if need_dx else None, dgamma if need_gamma else None,
            dbeta if need_beta else None) + none


modulated_bn_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- fused call + buffers
def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                    momentum: float) -> None:
    """PyTorch's convention: new = (1 - momentum) * old + momentum * batch (unbiased variance)."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def _fused(x, gamma, beta, running_mean, running_var, training, momentum, eps, relu, backend):
    # Dense inputs in one layout: channels_last stays channels_last (no copy), anything else
    # (e.g. a strided view) becomes NCHW. Per-pixel gamma / beta follow x.
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    if gamma.dim() == 4:
        gamma, beta = gamma.contiguous(memory_format=fmt), beta.contiguous(memory_format=fmt)
    else:
        gamma, beta = gamma.contiguous(), beta.contiguous()
    y, mean, _invstd, var, _mask = modulated_bn_op(
        x, gamma, beta, None if training else running_mean, None if training else running_var,
        training, eps, relu, backend)
    if training and running_mean is not None:
        _update_running(running_mean, running_var, mean, var, momentum)
    return y


# ---------------------------------------------------------------- argument checks
def _check_modulation(name: str, t, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    b, c = x.shape[:2]
    if tuple(t.shape) not in ((b, c), tuple(x.shape)):
        raise ValueError(f"{name} must have shape (B, C) = {(b, c)} (per channel) or (B, C, H, W) = "
                         f"{tuple(x.shape)} (per pixel), got {tuple(t.shape)}")
    check_like(name, t, "x", x)


def _check_buffer(name: str, t, x: Tensor) -> None:
    if not isinstance(t, Tensor):
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
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    check_positive("eps", eps)


# ---------------------------------------------------------------- public function
@torch._dynamo.assume_constant_result
def _choose_backend(device: torch.device, dtype: torch.dtype, values: int, impl) -> str:
    # Evaluated eagerly while torch.compile traces (the choice reads files and the environment).
    return registry.select(request_for(device, dtype, values), impl)


def modulated_batch_norm(x: Tensor, gamma: Tensor, beta: Tensor,
                         running_mean: Tensor | None = None,
                         running_var: Tensor | None = None, *, training: bool = True,
                         momentum: float = 0.1, eps: float = 1e-5, relu: bool = False,
                         impl: str | None = None) -> Tensor:
    """``BN_noaffine(x) * (1 + gamma) + beta``, then ReLU when ``relu``.

    Args:
        x: (B, C, H, W) float, any memory format (NCHW and channels_last run without copies).
        gamma, beta: (B, C) per-channel or (B, C, H, W) per-pixel modulation, x's dtype/device.
        running_mean, running_var: (C,) buffers; training mode updates them in place with
            PyTorch's convention (``new = (1 - momentum) * old + momentum * batch``, unbiased
            variance); eval mode (``training=False``) normalises with them.
        training: batch statistics (True) or the running buffers (False).
        momentum, eps: as ``torch.nn.functional.batch_norm``.
        relu: apply ReLU to the result (fused in the fast backends).
        impl: force a backend ("reference", "cpu", "triton", "cuda"); default: ``FASTXMC_IMPL``,
            else the fastest that fits (cpu on CPU, the reference there for x of at most
            ``SMALL_CPU_VALUES`` values; triton then cuda on GPUs).
    Returns:
        (B, C, H, W) in x's dtype and memory format; gradients for x, gamma and beta. The fused
        backends accumulate in float32 (float64 for float64 inputs) and keep for the backward only
        x, gamma, the per-channel mean / invstd and, with ``relu``, a uint8 mask.
    """
    _check(x, gamma, beta, running_mean, running_var, training, momentum, eps)
    # A compiled graph takes the size-independent choice: its shapes may be symbolic there.
    values = None if torch.compiler.is_compiling() else x.numel()
    backend = _choose_backend(x.device, x.dtype, values, impl)
    if backend == "reference":
        return modulated_batch_norm_reference(
            x, gamma, beta, running_mean, running_var, training=bool(training),
            momentum=float(momentum), eps=float(eps), relu=bool(relu))
    return _fused(x, gamma, beta, running_mean, running_var, bool(training), float(momentum),
                  float(eps), bool(relu), backend)
