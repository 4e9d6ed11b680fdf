"""Triton kernels of the fused modulated batch norm (contract: ``csrc/modulated_bn/modulated_bn.h``).

``y = BN_noaffine(x) * (1 + gamma) + beta`` (then ReLU), x (B, C, H, W) dense in NCHW or NHWC
(channels_last) memory, gamma/beta per channel (B, C) or per pixel (x's shape and strides). Every
kernel sees a tensor as (B, C, HW) with strides (s_b, s_c, s_hw): NCHW (C HW, HW, 1), NHWC (HW C, 1,
C). Triton specializes an integer argument equal to 1, so the contiguous axis is known at compile
time and the loads of a [BLOCK_C, BLOCK_HW] tile are coalesced along it; the tile shape is chosen
per layout (:func:`_tiles`). Every accumulation is fp32 (the cross-program merges fp64).

Forward (training): ``_reduce_kernel`` (statistics) -> ``_stats_finalize_kernel`` -> ``_norm_kernel``.
Backward: [``_reduce_kernel`` (gradient sums) -> ``_grad_finalize_kernel``] -> ``_grad_kernel``.
A reduction program owns (image b, slice of HW, channel block) and writes its partial sums to
``part[b * n_splits + split, 2, C]`` (no atomics: deterministic); the finalize kernels fold them.
The statistics are shifted sums (shift = the channel's first value), as in the CPU kernel.

CPU testing: with ``TRITON_INTERPRET=1`` set before import, the kernels run on CPU tensors through
Triton's interpreter (see :mod:`fastxmc.ops.triton.infonce`), with small tiles.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastxmc.ops.triton.runtime import INTERPRET as _INTERPRET
from fastxmc.ops.triton.runtime import triton, triton_unavailable_reason

if triton is not None:
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Reduction programs to aim for: several waves on an H100's 132 SMs; under the interpreter enough
# that the small test shapes split HW across programs (the partial merge is then exercised).
_GPU_TARGET_PROGRAMS = 1024
_INTERPRETER_TARGET_PROGRAMS = 64


if triton is not None:

    @triton.jit
    def _tile(c0, hw0, C, HW, s_c, s_hw, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """Channel indices (BLOCK_C,), in-image offsets and validity of a [BLOCK_C, BLOCK_HW] tile."""
        cs = c0 + tl.arange(0, BLOCK_C)
        hws = hw0 + tl.arange(0, BLOCK_HW)
        ok = (cs < C)[:, None] & (hws < HW)[None, :]
        offs = cs[:, None].to(tl.int64) * s_c + hws[None, :].to(tl.int64) * s_hw
        return cs, offs, ok

    @triton.jit
    def _reduce_kernel(
            x_ptr, dy_ptr, g_ptr, mask_ptr,        # (B, C, HW) views with strides (s_b, s_c, s_hw)
            mean_ptr, invstd_ptr,                  # (C,) fp32 (gradient sums only)
            part_ptr,                              # out (B * n_splits, 2, C) fp32
            C, HW, s_b, s_c, s_hw, hw_per_split, n_splits,
            GRAD: tl.constexpr, PIXEL: tl.constexpr, RELU: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """Per (b, channel) partial sums over a slice of HW.

        GRAD=False (statistics): d = x - shift, sums (d, d^2).
        GRAD=True: dym = dy * mask, w = 1 + g (PIXEL) or 1, sums (dym w, dym w x_hat).
        """
        pid_bs = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = pid_bs // n_splits
        split = pid_bs % n_splits
        base = b.to(tl.int64) * s_b
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        if GRAD:
            mean = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
            invstd = tl.load(invstd_ptr + cs, mask=c_ok, other=0.0)
        else:
            shift = tl.load(x_ptr + cs.to(tl.int64) * s_c, mask=c_ok, other=0.0).to(tl.float32)
        acc0 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
        hw_start = split * hw_per_split
        for hw0 in range(hw_start, tl.minimum(hw_start + hw_per_split, HW), BLOCK_HW):
            _, offs, ok = _tile(pid_c * BLOCK_C, hw0, C, HW, s_c, s_hw, BLOCK_C, BLOCK_HW)
            x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
            if GRAD:
                t = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
                if RELU:
                    t = t * tl.load(mask_ptr + base + offs, mask=ok, other=0).to(tl.float32)
                if PIXEL:
                    t = t * (1.0 + tl.load(g_ptr + base + offs, mask=ok, other=0.0).to(tl.float32))
                acc0 += t
                acc1 += t * ((x - mean[:, None]) * invstd[:, None])
            else:
                d = tl.where(ok, x - shift[:, None], 0.0)
                acc0 += d
                acc1 += d * d
        out = part_ptr + pid_bs.to(tl.int64) * 2 * C + cs
        tl.store(out, tl.sum(acc0, axis=1), mask=c_ok)
        tl.store(out + C, tl.sum(acc1, axis=1), mask=c_ok)

    @triton.jit
    def _stats_finalize_kernel(part_ptr, x_ptr, mean_ptr, invstd_ptr, var_ptr, C, n_parts, s_c,
                               count, eps, BLOCK_C: tl.constexpr):
        """mean, invstd, unbiased var (C,) fp32 from the statistics partials (merged in fp64)."""
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        s = tl.zeros((BLOCK_C,), dtype=tl.float64)
        q = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for p in range(0, n_parts):
            row = part_ptr + p * 2 * C + cs
            s += tl.load(row, mask=c_ok, other=0.0).to(tl.float64)
            q += tl.load(row + C, mask=c_ok, other=0.0).to(tl.float64)
        shift = tl.load(x_ptr + cs.to(tl.int64) * s_c, mask=c_ok, other=0.0).to(tl.float64)
        dm = s / count
        biased = tl.maximum(q / count - dm * dm, 0.0)
        tl.store(mean_ptr + cs, (shift + dm).to(tl.float32), mask=c_ok)
        tl.store(invstd_ptr + cs, (1.0 / tl.sqrt(biased + eps)).to(tl.float32), mask=c_ok)
        tl.store(var_ptr + cs, (biased * count / (count - 1)).to(tl.float32), mask=c_ok)

    @triton.jit
    def _norm_kernel(x_ptr, g_ptr, b_ptr, y_ptr, mask_ptr, mean_ptr, invstd_ptr,
                     C, HW, s_b, s_c, s_hw, n_hw_blocks,
                     PIXEL: tl.constexpr, RELU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """y = (x - mean) * invstd * (1 + g) + beta (then ReLU and the uint8 mask y > 0)."""
        bi = tl.program_id(0) // n_hw_blocks
        hw0 = (tl.program_id(0) % n_hw_blocks) * BLOCK_HW
        pid_c = tl.program_id(1)
        base = bi.to(tl.int64) * s_b
        cs, offs, ok = _tile(pid_c * BLOCK_C, hw0, C, HW, s_c, s_hw, BLOCK_C, BLOCK_HW)
        c_ok = cs < C
        x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + cs, mask=c_ok, other=0.0)
        xh = (x - mean[:, None]) * invstd[:, None]
        if PIXEL:
            g = tl.load(g_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
            beta = tl.load(b_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
            y = xh * (1.0 + g) + beta
        else:
            g = tl.load(g_ptr + bi * C + cs, mask=c_ok, other=0.0).to(tl.float32)
            beta = tl.load(b_ptr + bi * C + cs, mask=c_ok, other=0.0).to(tl.float32)
            y = xh * (1.0 + g)[:, None] + beta[:, None]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)
            tl.store(mask_ptr + base + offs, (y > 0.0).to(tl.uint8), mask=ok)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _grad_finalize_kernel(part_ptr, g_ptr, invstd_ptr, dg_ptr, db_ptr, k1_ptr, k2_ptr,
                              B, C, n_splits, count,
                              PIXEL: tl.constexpr, TRAINING: tl.constexpr,
                              CHANNEL_GRADS: tl.constexpr, BLOCK_C: tl.constexpr):
        """From the gradient partials: per-channel dgamma / dbeta (B, C) when CHANNEL_GRADS, and
        the dx coefficients k1 = invstd * mean_c(dx_hat), k2 = invstd * mean_c(dx_hat * x_hat)
        (zero in eval mode)."""
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        s1 = tl.zeros((BLOCK_C,), dtype=tl.float64)
        s2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for bi in range(0, B):
            sb = tl.zeros((BLOCK_C,), dtype=tl.float64)
            qb = tl.zeros((BLOCK_C,), dtype=tl.float64)
            for sp in range(0, n_splits):
                row = part_ptr + (bi * n_splits + sp).to(tl.int64) * 2 * C + cs
                sb += tl.load(row, mask=c_ok, other=0.0).to(tl.float64)
                qb += tl.load(row + C, mask=c_ok, other=0.0).to(tl.float64)
            if CHANNEL_GRADS:  # via fp32: the interpreter mishandles fp64 -> bf16 directly
                tl.store(db_ptr + bi * C + cs, sb.to(tl.float32).to(db_ptr.dtype.element_ty),
                         mask=c_ok)
                tl.store(dg_ptr + bi * C + cs, qb.to(tl.float32).to(dg_ptr.dtype.element_ty),
                         mask=c_ok)
            if PIXEL:
                s1 += sb
                s2 += qb
            else:  # per channel the sums hold dym alone: dx_hat = dym * (1 + gamma[b, c])
                w = 1.0 + tl.load(g_ptr + bi * C + cs, mask=c_ok, other=0.0).to(tl.float64)
                s1 += w * sb
                s2 += w * qb
        invstd = tl.load(invstd_ptr + cs, mask=c_ok, other=0.0).to(tl.float64)
        if TRAINING:
            k1 = invstd * s1 / count
            k2 = invstd * s2 / count
        else:
            k1 = tl.zeros((BLOCK_C,), dtype=tl.float64)
            k2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
        tl.store(k1_ptr + cs, k1.to(tl.float32), mask=c_ok)
        tl.store(k2_ptr + cs, k2.to(tl.float32), mask=c_ok)

    @triton.jit
    def _grad_kernel(dy_ptr, x_ptr, g_ptr, mask_ptr, dx_ptr, dg_ptr, db_ptr,
                     mean_ptr, invstd_ptr, k1_ptr, k2_ptr,
                     C, HW, s_b, s_c, s_hw, n_hw_blocks,
                     PIXEL: tl.constexpr, RELU: tl.constexpr, NEED_DX: tl.constexpr,
                     PIXEL_GRADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """dx = invstd * dym * (1 + g) - k1 - x_hat * k2; per pixel dgamma = dym * x_hat,
        dbeta = dym (PIXEL_GRADS)."""
        bi = tl.program_id(0) // n_hw_blocks
        hw0 = (tl.program_id(0) % n_hw_blocks) * BLOCK_HW
        pid_c = tl.program_id(1)
        base = bi.to(tl.int64) * s_b
        cs, offs, ok = _tile(pid_c * BLOCK_C, hw0, C, HW, s_c, s_hw, BLOCK_C, BLOCK_HW)
        c_ok = cs < C
        t = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
        if RELU:
            t = t * tl.load(mask_ptr + base + offs, mask=ok, other=0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + cs, mask=c_ok, other=0.0)
        xh = (x - mean[:, None]) * invstd[:, None]
        if NEED_DX:
            if PIXEL:
                w = 1.0 + tl.load(g_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
            else:
                w = (1.0 + tl.load(g_ptr + bi * C + cs, mask=c_ok, other=0.0).to(tl.float32))[:, None]
            k1 = tl.load(k1_ptr + cs, mask=c_ok, other=0.0)
            k2 = tl.load(k2_ptr + cs, mask=c_ok, other=0.0)
            dx = invstd[:, None] * (t * w) - k1[:, None] - xh * k2[:, None]
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if PIXEL_GRADS:
            tl.store(dg_ptr + base + offs, (t * xh).to(dg_ptr.dtype.element_ty), mask=ok)
            tl.store(db_ptr + base + offs, t.to(db_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------- host side
class _Geometry:
    """(B, C, HW) view of a dense NCHW / NHWC tensor, its tiles and reduction splits."""

    def __init__(self, x: Tensor):
        self.B, self.C = x.shape[0], x.shape[1]
        self.HW = x.shape[2] * x.shape[3]
        self.channels_last = not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        s_b, s_c, s_h, s_w = x.stride()
        # The in-image offset of pixel p = h W + w is p * s_w in both layouts.
        self.strides = (s_b, s_c, s_w)
        self.block_c, self.block_hw, self.warps = _tiles(self.channels_last)
        self.n_c_blocks = triton.cdiv(self.C, self.block_c)
        self.n_hw_blocks = triton.cdiv(self.HW, self.block_hw)
        target = _INTERPRETER_TARGET_PROGRAMS if _INTERPRET else _GPU_TARGET_PROGRAMS
        wanted = triton.cdiv(target, max(1, self.B * self.n_c_blocks))
        splits = max(1, min(self.n_hw_blocks, wanted))
        self.hw_per_split = triton.cdiv(self.n_hw_blocks, splits) * self.block_hw
        self.n_splits = triton.cdiv(self.HW, self.hw_per_split)

    @property
    def count(self) -> int:
        return self.B * self.HW


def _tiles(channels_last: bool) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps): long along the contiguous axis (HW for NCHW, C for NHWC).
    Under the interpreter: small tiles, so that shapes of a few values cross tile edges."""
    if _INTERPRET:
        return (8, 4, 1) if channels_last else (2, 8, 1)
    return (64, 32, 8) if channels_last else (4, 512, 8)


def _require(x: Tensor) -> None:
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"fastxmc Triton modulated_batch_norm kernels cannot run: {reason}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype}")
    if x.dim() != 4 or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"x must be a dense (B, C, H, W) tensor in NCHW or channels_last memory, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")


def _reduce(geo: _Geometry, x: Tensor, dy: Tensor, g: Tensor, mask: Tensor, mean: Tensor,
            invstd: Tensor, grad: bool, pixel: bool, relu: bool) -> Tensor:
    part = torch.empty((geo.B * geo.n_splits, 2, geo.C), device=x.device, dtype=torch.float32)
    grid = (geo.B * geo.n_splits, geo.n_c_blocks)
    _reduce_kernel[grid](x, dy, g, mask, mean, invstd, part, geo.C, geo.HW, *geo.strides,
                         geo.hw_per_split, geo.n_splits, GRAD=grad, PIXEL=pixel, RELU=relu,
                         BLOCK_C=geo.block_c, BLOCK_HW=geo.block_hw, num_warps=geo.warps)
    return part


def _statistics(geo: _Geometry, x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    part = _reduce(geo, x, x, x, x, x, x, grad=False, pixel=False, relu=False)
    mean, invstd, var = (torch.empty(geo.C, device=x.device, dtype=torch.float32)
                         for _ in range(3))
    fin_block = 16 if _INTERPRET else 128
    _stats_finalize_kernel[(triton.cdiv(geo.C, fin_block),)](
        part, x, mean, invstd, var, geo.C, part.shape[0], geo.strides[1], float(geo.count),
        float(eps), BLOCK_C=fin_block)
    return mean, invstd, var


def _elementwise_grid(geo: _Geometry) -> tuple:
    # The long axis first: grid axes 1 and 2 are limited to 65535 programs.
    return (geo.B * geo.n_hw_blocks, geo.n_c_blocks)


def modulated_bn_forward_triton(x: Tensor, gamma: Tensor, beta: Tensor,
                                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                training: bool, eps: float, relu: bool
                                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, var, mask) as the C++ contract; mean / invstd / var fp32."""
    _require(x)
    geo = _Geometry(x)
    pixel = gamma.dim() == 4
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8) if relu else x.new_empty(0, dtype=torch.uint8)
    if training:
        mean, invstd, var = _statistics(geo, x, eps)
    else:
        # Fresh tensors: a custom op's outputs must not alias its inputs.
        mean = running_mean.detach().to(torch.float32, copy=True)
        invstd = torch.rsqrt(running_var.detach().to(torch.float32) + eps)
        var = x.new_empty(0, dtype=torch.float32)
    if x.numel() > 0:
        _norm_kernel[_elementwise_grid(geo)](
            x, gamma, beta, y, mask if relu else y, mean, invstd, geo.C, geo.HW, *geo.strides,
            geo.n_hw_blocks, PIXEL=pixel, RELU=relu, BLOCK_C=geo.block_c,
            BLOCK_HW=geo.block_hw, num_warps=geo.warps)
    return y, mean, invstd, var, mask


def modulated_bn_backward_triton(grad_y: Tensor, x: Tensor, gamma: Tensor, mean: Tensor,
                                 invstd: Tensor, mask: Tensor, training: bool, relu: bool,
                                 need_dx: bool, need_dmod: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) as the C++ contract; an output not needed is an empty (0,) tensor."""
    _require(x)
    geo = _Geometry(x)
    pixel = gamma.dim() == 4
    # Outputs that are not needed are distinct empty tensors (outputs must not alias each other).
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dg = torch.empty_like(gamma) if need_dmod else x.new_empty(0)
    db = torch.empty_like(gamma) if need_dmod else x.new_empty(0)
    mask_arg = mask if relu else x
    k1 = torch.zeros(geo.C, device=x.device, dtype=torch.float32)
    k2 = torch.zeros(geo.C, device=x.device, dtype=torch.float32)
    channel_grads = need_dmod and not pixel
    if (training and need_dx) or channel_grads:
        part = _reduce(geo, x, grad_y, gamma, mask_arg, mean, invstd, grad=True, pixel=pixel,
                       relu=relu)
        fin_block = 16 if _INTERPRET else 128
        _grad_finalize_kernel[(triton.cdiv(geo.C, fin_block),)](
            part, gamma, invstd, dg if channel_grads else k1, db if channel_grads else k1, k1, k2,
            geo.B, geo.C, geo.n_splits, float(geo.count), PIXEL=pixel, TRAINING=training,
            CHANNEL_GRADS=channel_grads, BLOCK_C=fin_block)
    pixel_grads = need_dmod and pixel
    if (need_dx or pixel_grads) and x.numel() > 0:
        _grad_kernel[_elementwise_grid(geo)](
            grad_y, x, gamma, mask_arg, dx if need_dx else x, dg if pixel_grads else x,
            db if pixel_grads else x, mean, invstd, k1, k2, geo.C, geo.HW, *geo.strides,
            geo.n_hw_blocks, PIXEL=pixel, RELU=relu, NEED_DX=need_dx, PIXEL_GRADS=pixel_grads,
            BLOCK_C=geo.block_c, BLOCK_HW=geo.block_hw, num_warps=geo.warps)
    return dx, dg, db
