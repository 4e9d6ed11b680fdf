"""Triton kernels of the fused region-word similarity (XMC-GAN's word loss core).

Math contract: ``csrc/region_word/region_word.h``; oracle:
:func:`fastxmc.reference.region_word.region_word_similarity_reference`.

The host normalises the words (``wn``, (B_cap T) x d) and regions (``rn``, B_img x R x d) in fp32
(O(B (T + R) d) memory) and finishes with O(B^2 T) torch ops; the kernels do the O(B^2 T R d) part.
A program owns image i and a block of ``BLOCK_M`` (caption, word) rows, and holds whole region
rows: R is padded to ``RP`` = next power of two (<= ``MAX_REGIONS``), so the softmax over regions
needs no online rescaling. Instead of the Gram matrix the kernels use the context directly,
chunked over d: ``C = A rn_i[:, dc]`` (BLOCK_M x BLOCK_D), ``q = |c_t|^2 = sum over chunks of
rowsum(C^2)`` and ``H = A G_i = sum over chunks of C rn_i[:, dc]^T``; every operand of ``tl.dot``
is then a whole tile (Triton cannot slice a register tile by columns).

* forward: sim = wn_blk rn_i^T (loop over d), A = softmax(gamma1 sim), p = rowsum(A sim),
  q (loop over d), ``cos = p rsqrt(max(q, eps))`` stored to a (B_img, B_cap T) fp32 buffer; the
  host takes the masked log-sum-exp over each caption's words (O(B^2 T)).
* backward: the same recomputation plus H, then in registers ``dcos`` (from grad_s, S and the
  mask), dp, dq and ``dsim = A (dp + gamma1 (dp sim + 2 dq H - dp p - 2 dq q))``; per d chunk
  ``d wn_blk += dsim rn_i[:, dc]`` and ``d rn_i[:, dc] += dsim^T wn_blk[:, dc] + (2 dq A)^T C``.
  Both go to fp32 buffers with ``atomic_add`` (d wn rows are shared by all images, d rn_i by all
  row blocks), so their last bits vary run to run. The host applies the normalisations' backward.

All tiles are fp32 (fp16/bf16 inputs are upcast once on the host, as the reference does) and the
dots use ``input_precision="ieee"`` so the results match the fp32 oracle (no TF32).

CPU testing: with ``TRITON_INTERPRET=1`` set before fastxmc is imported, the kernels run on CPU
tensors in Triton's interpreter with one small fixed tile config (see ``fastxmc.ops.triton.runtime``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastxmc.ops.triton.runtime import INTERPRET as _INTERPRET
from fastxmc.ops.triton.runtime import tl, triton, triton_unavailable_reason  # noqa: F401

NORM_EPS = 1e-12           # on squared norms, as the reference's l2_normalize
MAX_REGIONS = 256          # R is held whole in registers: RP x BLOCK_M fp32 tiles
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_D": 16}

_TUNE = [(bm, bd, w) for bm in (16, 32) for bd in (32, 64) for w in (4, 8)]


if triton is not None:

    @triton.jit
    def _program_tile(NW, R, D, BLOCK_M: tl.constexpr, RP: tl.constexpr):
        """This program's image and block of BLOCK_M word rows: (img, in-block rows, rows, row_ok,
        regions, region_ok, and the element offsets of the word block and of the image's regions).
        The offsets are 64-bit; everything indexed inside a tile stays int32."""
        img = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        r_loc = tl.arange(0, BLOCK_M)
        rows = pid_m * BLOCK_M + r_loc
        ks = tl.arange(0, RP)
        return (img, r_loc, rows, rows < NW, ks, ks < R, pid_m.to(tl.int64) * BLOCK_M * D,
                img * R * D)

    @triton.jit
    def _similarity_tile(wn_blk_ptr, rn_img_ptr, r_loc, ks, row_ok, k_ok, D,
                         BLOCK_M: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr):
        """(BLOCK_M, RP) sim = wn_blk rn_i^T; 0 in padded rows / regions."""
        sim = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            w = tl.load(wn_blk_ptr + r_loc[:, None] * D + ds[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)          # (BM, BD)
            r_t = tl.load(rn_img_ptr + ks[None, :] * D + ds[:, None],
                          mask=k_ok[None, :] & d_ok[:, None], other=0.0)          # (BD, RP)
            sim = tl.dot(w, r_t, sim, input_precision="ieee")
        return sim

    @triton.jit
    def _attention(sim, k_ok, gamma1):
        """A = softmax over the real regions of gamma1 sim, and p = rowsum(A sim)."""
        logits = tl.where(k_ok[None, :], gamma1 * sim, float("-inf"))
        m = tl.max(logits, axis=1)
        e = tl.exp(logits - m[:, None])                  # 0 on padded regions
        attn = e / tl.sum(e, axis=1)[:, None]
        return attn, tl.sum(attn * sim, axis=1)

    @triton.jit
    def _similarity_attention(wn_blk_ptr, rn_img_ptr, r_loc, ks, row_ok, k_ok, D, gamma1,
                              BLOCK_M: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr):
        """sim, its attention A and p = rowsum(A sim) for the program's word block and image."""
        sim = _similarity_tile(wn_blk_ptr, rn_img_ptr, r_loc, ks, row_ok, k_ok, D, BLOCK_M, RP, BLOCK_D)
        attn, p = _attention(sim, k_ok, gamma1)
        return sim, attn, p

    @triton.jit
    def _region_chunk(rn_img_ptr, ks, k_ok, d0, D, RP: tl.constexpr, BLOCK_D: tl.constexpr):
        """rn_i[:, d0:d0 + BLOCK_D] as an (RP, BLOCK_D) tile, and the chunk's column indices."""
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        r = tl.load(rn_img_ptr + ks[:, None] * D + ds[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        return r, ds, d_ok

    @triton.jit
    def _region_word_fwd_kernel(
            wn_ptr, rn_ptr,            # wn (NW, D), rn (B_img, R, D) fp32 contiguous
            cos_ptr,                   # out (B_img, NW) fp32
            NW, R, D, gamma1,
            RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        img, r_loc, rows, row_ok, ks, k_ok, wn_blk_off, rn_img_off = _program_tile(NW, R, D, BLOCK_M, RP)
        wn_blk_ptr, rn_img_ptr = wn_ptr + wn_blk_off, rn_ptr + rn_img_off
        sim, attn, p = _similarity_attention(wn_blk_ptr, rn_img_ptr, r_loc, ks, row_ok, k_ok, D, gamma1,
                                             BLOCK_M, RP, BLOCK_D)
        q = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            r, ds, d_ok = _region_chunk(rn_img_ptr, ks, k_ok, d0, D, RP, BLOCK_D)
            c = tl.dot(attn, r, input_precision="ieee")                         # (BM, BD)
            q += tl.sum(c * c, axis=1)
        cos = p / tl.sqrt(tl.maximum(q, 1e-12))
        tl.store(cos_ptr + img * NW + rows, cos, mask=row_ok)

    @triton.jit
    def _region_word_bwd_kernel(
            wn_ptr, rn_ptr,            # wn (NW, D), rn (B_img, R, D) fp32 contiguous
            mask_ptr,                  # (NW,) int8, 1 = real word
            grad_s_ptr, s_ptr,         # (B_img, B_cap) fp32
            d_wn_ptr, d_rn_ptr,        # out, zero-filled fp32, accumulated with atomics
            NW, B_cap, T, R, D, gamma1, gamma2,
            RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        img, r_loc, rows, row_ok, ks, k_ok, wn_blk_off, rn_img_off = _program_tile(NW, R, D, BLOCK_M, RP)
        wn_blk_ptr, rn_img_ptr = wn_ptr + wn_blk_off, rn_ptr + rn_img_off
        d_wn_blk_ptr, d_rn_img_ptr = d_wn_ptr + wn_blk_off, d_rn_ptr + rn_img_off
        sim, attn, p = _similarity_attention(wn_blk_ptr, rn_img_ptr, r_loc, ks, row_ok, k_ok, D, gamma1,
                                             BLOCK_M, RP, BLOCK_D)
        q = tl.zeros((BLOCK_M,), dtype=tl.float32)
        h = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            r, ds, d_ok = _region_chunk(rn_img_ptr, ks, k_ok, d0, D, RP, BLOCK_D)
            c = tl.dot(attn, r, input_precision="ieee")                         # (BM, BD)
            q += tl.sum(c * c, axis=1)
            h = tl.dot(c, tl.trans(r), h, input_precision="ieee")               # (BM, RP)

        # d loss / d cos_t: softmax over the caption's words of gamma2 cos, times grad_s[i, j].
        u = 1.0 / tl.sqrt(tl.maximum(q, 1e-12))
        cos = p * u
        cap = rows // T
        valid = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        g = tl.load(grad_s_ptr + img * B_cap + cap, mask=row_ok, other=0.0)
        s = tl.load(s_ptr + img * B_cap + cap, mask=row_ok, other=0.0)
        dcos = tl.where(valid, g * tl.exp(gamma2 * (cos - s)), 0.0)
        dp = dcos * u
        dq = tl.where(q > 1e-12, -0.5 * dcos * p * u * u * u, 0.0)
        row_dot = dp * p + 2.0 * dq * q
        d_attn = dp[:, None] * sim + (2.0 * dq)[:, None] * h
        dsim = attn * (dp[:, None] + gamma1 * (d_attn - row_dot[:, None]))     # 0 on padding
        attn_dq = attn * (2.0 * dq)[:, None]

        for d0 in range(0, D, BLOCK_D):
            r, ds, d_ok = _region_chunk(rn_img_ptr, ks, k_ok, d0, D, RP, BLOCK_D)
            w_mask = row_ok[:, None] & d_ok[None, :]
            w = tl.load(wn_blk_ptr + r_loc[:, None] * D + ds[None, :], mask=w_mask, other=0.0)
            d_wn = tl.dot(dsim, r, input_precision="ieee")                      # (BM, BD)
            tl.atomic_add(d_wn_blk_ptr + r_loc[:, None] * D + ds[None, :], d_wn, mask=w_mask,
                          sem="relaxed")
            c = tl.dot(attn, r, input_precision="ieee")                         # (BM, BD)
            d_rn = tl.dot(tl.trans(dsim), w, input_precision="ieee")            # (RP, BD)
            d_rn = tl.dot(tl.trans(attn_dq), c, d_rn, input_precision="ieee")
            tl.atomic_add(d_rn_img_ptr + ks[:, None] * D + ds[None, :], d_rn,
                          mask=k_ok[:, None] & d_ok[None, :], sem="relaxed")

    def _configs():
        return [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=2)
                for bm, bd, w in _TUNE]

    _fwd_tuned = triton.autotune(configs=_configs(), key=["RP", "D"])(_region_word_fwd_kernel)
    _bwd_tuned = triton.autotune(configs=_configs(), key=["RP", "D"],
                                 reset_to_zero=["d_wn_ptr", "d_rn_ptr"])(_region_word_bwd_kernel)


# ---------------------------------------------------------------------- host side
def _require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"fastxmc Triton region_word kernels cannot run: {reason}")


def _padded_regions(r: int) -> int:
    if r > MAX_REGIONS:
        raise ValueError(f"the Triton region_word kernels hold at most {MAX_REGIONS} regions per "
                         f"image, got R = {r}; use the cuda, torch or cpu backend")
    return max(16, triton.next_power_of_2(r))


def _normalized(x: Tensor) -> Tuple[Tensor, Tensor]:
    """fp32 (x / |x|, 1 / |x|) with the reference's guard; the inverse norm is (..., 1)."""
    x = x.float()
    inv = torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp_min(NORM_EPS))
    return (x * inv).contiguous(), inv


def _launch(kernel_raw, kernel_tuned, grid_rows: int, n_images: int, args: tuple, meta: dict):
    if _INTERPRET:
        cfg = _INTERPRETER_CONFIG
        kernel_raw[(n_images, triton.cdiv(grid_rows, cfg["BLOCK_M"]))](*args, **meta, **cfg)
    else:
        kernel_tuned[lambda m: (n_images, triton.cdiv(grid_rows, m["BLOCK_M"]))](*args, **meta)


def region_word_forward_triton(regions: Tensor, words: Tensor, word_mask: Tensor, gamma1: float,
                               gamma2: float) -> Tuple[Tensor, Tensor]:
    """(S (B_img, B_cap) fp32, an empty gram: these kernels do not use the Gram matrices)."""
    _require_triton(regions.device)
    b_img, r, d = regions.shape
    b_cap, t = word_mask.shape
    rp = _padded_regions(r)
    rn, _ = _normalized(regions)
    wn, _ = _normalized(words.reshape(b_cap * t, d))
    cos = torch.empty(b_img, b_cap * t, device=regions.device, dtype=torch.float32)
    _launch(_region_word_fwd_kernel, _fwd_tuned, b_cap * t, b_img,
            (wn, rn, cos, b_cap * t, r, d, float(gamma1)), dict(RP=rp))
    cos = cos.view(b_img, b_cap, t).masked_fill(~word_mask[None], float("-inf"))
    return torch.logsumexp(gamma2 * cos, dim=-1) / gamma2, cos.new_empty(0)


def _normalize_backward(x: Tensor, inv: Tensor, grad_xn: Tensor) -> Tensor:
    live = (x.pow(2).sum(-1, keepdim=True) > NORM_EPS).float()
    return inv * grad_xn - (live * inv.pow(3) * (x * grad_xn).sum(-1, keepdim=True)) * x


def region_word_backward_triton(grad_s: Tensor, regions: Tensor, words: Tensor, word_mask: Tensor,
                                s: Tensor, gram: Tensor, gamma1: float, gamma2: float
                                ) -> Tuple[Tensor, Tensor]:
    """(grad_regions (B_img, R, d), grad_words (B_cap, T, d)), fp32; ``gram`` is unused."""
    _require_triton(regions.device)
    b_img, r, d = regions.shape
    b_cap, t = word_mask.shape
    rp = _padded_regions(r)
    rn, r_inv = _normalized(regions)
    words_flat = words.reshape(b_cap * t, d).float()
    wn, w_inv = _normalized(words_flat)
    d_rn = torch.zeros_like(rn)
    d_wn = torch.zeros_like(wn)
    mask = word_mask.reshape(-1).to(torch.int8).contiguous()
    _launch(_region_word_bwd_kernel, _bwd_tuned, b_cap * t, b_img,
            (wn, rn, mask, grad_s.float().contiguous(), s.float().contiguous(), d_wn, d_rn,
             b_cap * t, b_cap, t, r, d, float(gamma1), float(gamma2)), dict(RP=rp))
    grad_regions = _normalize_backward(regions.float(), r_inv, d_rn)
    grad_words = _normalize_backward(words_flat, w_inv, d_wn).view(b_cap, t, d)
    return grad_regions, grad_words
