"""What the native (C++/CUDA) and Triton backends of every op can run: the ``unsupported(request)``
functions of the registries (:mod:`fastxmc.ops.registry`), shared so that every op reports a
missing build, a wrong device or an unsupported dtype with the same words."""
from __future__ import annotations

from functools import partial

import torch

from fastxmc import _extension
from fastxmc.ops.registry import Request

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = FUSED_DTYPES + (torch.float64,)


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def floating_unsupported(req: Request) -> list:
    """The plain PyTorch backends: any floating dtype on any device."""
    return [] if req.dtype.is_floating_point else [f"dtype {req.dtype} is not floating point"]


def _native_unsupported(kernel: str, device_type: str, dtypes, req: Request) -> list:
    why = []
    key = device_type.upper()
    if not _extension.extension_loaded():
        why.append(_extension.extension_error())
    elif not _extension.has_kernel(kernel, key):
        why.append("the extension was built without CUDA kernels (FASTXMC_CUDA=0 or no toolkit)"
                   if key == "CUDA" else f"the extension has no {kernel} CPU kernel (rebuild it)")
    if req.device.type != device_type:
        why.append(f"tensors are on {req.device.type}, not {device_type}")
    if req.dtype not in dtypes:
        why.append(f"dtype {req.dtype} is not {_dtype_names(dtypes)}")
    return why


def native_cpu(kernel: str, dtypes=CPU_DTYPES):
    """``unsupported`` of a C++ CPU backend whose forward op is ``fastxmc::<kernel>``."""
    return partial(_native_unsupported, kernel, "cpu", dtypes)


def native_cuda(kernel: str, dtypes=FUSED_DTYPES):
    """``unsupported`` of a C++/CUDA backend whose forward op is ``fastxmc::<kernel>``."""
    return partial(_native_unsupported, kernel, "cuda", dtypes)


def _triton_unsupported(unavailable_reason, dtypes, req: Request) -> list:
    why = []
    reason = unavailable_reason(req.device)
    if reason:
        why.append(reason)
    if req.dtype not in dtypes:
        why.append(f"dtype {req.dtype} is not {_dtype_names(dtypes)}")
    return why


def triton(unavailable_reason, dtypes=FUSED_DTYPES):
    """``unsupported`` of a Triton backend; ``unavailable_reason(device)`` says why Triton can't run."""
    return partial(_triton_unsupported, unavailable_reason, dtypes)
