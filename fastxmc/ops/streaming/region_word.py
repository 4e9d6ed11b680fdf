"""Streaming PyTorch implementation of the region-word similarity (the ``torch`` backend).

Contract: ``csrc/region_word/region_word.h``; oracle:
:func:`fastxmc.reference.region_word.region_word_similarity_reference`. Works on any device.

Images are processed in blocks of ``bi`` so that at most ``bi x B x T x R`` attention values exist
at once (``CHUNK_ELEMENTS``); the backward recomputes each block's tiles from the inputs instead of
storing them (only the (B, R, R) Gram matrices are saved), with a hand-derived gradient (no
autograd graph over the tiles). For image i, caption
j and word t (``wn`` / ``rn`` the L2-normalised words / regions, ``G_i = rn_i rn_i^T``):

    sim_tk = wn_t . rn_k,   A_t = softmax_k(g1 sim_t),   p_t = sum_k A_tk sim_tk  (= wn_t . c_t)
    H_t = A_t G_i,          q_t = sum_k A_tk H_tk  (= |c_t|^2),   cos_t = p_t rsqrt(max(q_t, eps))
    S_ij = logsumexp over valid t(g2 cos_t) / g2

Backward, from dS_ij: ``dcos_t = dS_ij exp(g2 (cos_t - S_ij))`` on valid words (0 on padding),
``dp = dcos u``, ``dq = -dcos p u^3 / 2`` (0 where the guard ``q <= eps`` holds), with
``u = rsqrt(max(q, eps))``; ``dA = dp sim + 2 dq H``, whose row dot with A is ``dp p + 2 dq q``, so
``dsim = A (dp + g1 (dA - dp p - 2 dq q))``; ``dG_i = sum_{j,t} dq_t A_t^T A_t``. Then
``d wn_j += dsim rn_i``, ``d rn_i = dsim^T wn_j + 2 dG_i rn_i`` and finally the two normalisations.
"""
from __future__ import annotations

import torch

from fastxmc.reference.region_word import NORM_EPS

# Elements of one (bi, B*T, R) tile (4M fp32 = 16 MB); the backward holds about six such tiles.
CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _image_blocks(n_images: int, per_image: int):
    step = max(1, min(n_images, CHUNK_ELEMENTS // max(per_image, 1)))
    for start in range(0, n_images, step):
        yield start, min(n_images, start + step)


def _normalized(x: torch.Tensor):
    """(x / |x|, 1 / |x|) with the oracle's guard |x|^2 >= eps; the inverse norm is (..., 1)."""
    inv = torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp_min(NORM_EPS))
    return x * inv, inv


def normalize_backward(x: torch.Tensor, inv: torch.Tensor, grad_xn: torch.Tensor) -> torch.Tensor:
    """Gradient through ``xn = x * rsqrt(max(|x|^2, eps))``: ``u dxn - u^3 (x . dxn) x`` where the
    guard is inactive (|x|^2 > eps), ``u dxn`` where it clamps."""
    live = (x.pow(2).sum(-1, keepdim=True) > NORM_EPS).to(x.dtype)
    return inv * grad_xn - (live * inv.pow(3) * (x * grad_xn).sum(-1, keepdim=True)) * x


class _Block:
    """The recomputed tiles of images [i0, i1) against every caption: shapes (bi, B*T, R).
    ``gram``: the block's (bi, R, R) Gram matrices, computed here when None (the forward)."""

    def __init__(self, rn_blk, wn_flat, gamma1, gram=None):
        self.rn = rn_blk                                             # (bi, R, d)
        self.sim = torch.matmul(wn_flat, rn_blk.transpose(1, 2))     # (bi, BT, R)
        self.attn = torch.softmax(gamma1 * self.sim, dim=-1)
        self.p = (self.attn * self.sim).sum(-1)                      # (bi, BT)
        self.gram = torch.matmul(rn_blk, rn_blk.transpose(1, 2)) if gram is None else gram
        self.h = torch.matmul(self.attn, self.gram)                  # (bi, BT, R)
        self.q = (self.attn * self.h).sum(-1)                        # (bi, BT)
        self.u = torch.rsqrt(self.q.clamp_min(NORM_EPS))

    def masked_cos(self, word_mask):
        """(bi, B, T) cos(w_t, c_t), -inf on padding words."""
        bi, b, t = self.p.shape[0], word_mask.shape[0], word_mask.shape[1]
        cos = (self.p * self.u).view(bi, b, t)
        return cos.masked_fill(~word_mask[None], float("-inf"))


def region_word_forward_torch(regions, words, word_mask, gamma1: float, gamma2: float):
    """(S (B_img, B_cap), gram (B_img, R, R)) in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(regions)
    rn, _ = _normalized(regions.to(acc))
    wn, _ = _normalized(words.to(acc))
    b, t, r = words.shape[0], words.shape[1], regions.shape[1]
    wn_flat = wn.reshape(b * t, -1)
    s = torch.empty(regions.shape[0], b, dtype=acc, device=regions.device)
    gram = torch.empty(regions.shape[0], r, r, dtype=acc, device=regions.device)
    for i0, i1 in _image_blocks(regions.shape[0], b * t * r):
        blk = _Block(rn[i0:i1], wn_flat, gamma1)
        gram[i0:i1] = blk.gram
        s[i0:i1] = torch.logsumexp(gamma2 * blk.masked_cos(word_mask), dim=-1) / gamma2
    return s, gram


def _block_backward(blk: _Block, grad_s, s, word_mask, gamma1, gamma2):
    """dsim (bi, BT, R) and dG (bi, R, R) of one block."""
    bi = blk.p.shape[0]
    cos = blk.masked_cos(word_mask)                                  # (bi, B, T)
    weight = torch.exp(gamma2 * (cos - s[:, :, None]))               # softmax over words; 0 on pads
    dcos = (grad_s[:, :, None] * weight).reshape(bi, -1)             # (bi, BT)
    dp = dcos * blk.u
    live = (blk.q > NORM_EPS).to(dp.dtype)
    dq = -0.5 * live * dcos * blk.p * blk.u.pow(3)
    row_dot = dp * blk.p + 2 * dq * blk.q
    d_attn = dp[..., None] * blk.sim + 2 * dq[..., None] * blk.h
    dsim = blk.attn * (dp[..., None] + gamma1 * (d_attn - row_dot[..., None]))
    dgram = torch.matmul((blk.attn * dq[..., None]).transpose(1, 2), blk.attn)
    return dsim, dgram


def region_word_backward_torch(grad_s, regions, words, word_mask, s, gram, gamma1: float,
                               gamma2: float):
    """(grad_regions (B, R, d), grad_words (B, T, d)) in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(regions)
    r_acc, w_acc = regions.to(acc), words.to(acc)
    rn, r_inv = _normalized(r_acc)
    wn, w_inv = _normalized(w_acc)
    b, t, r = words.shape[0], words.shape[1], regions.shape[1]
    wn_flat = wn.reshape(b * t, -1)
    grad_s, s = grad_s.to(acc), s.to(acc)
    d_wn = torch.zeros_like(wn_flat)
    d_rn = torch.empty_like(rn)
    for i0, i1 in _image_blocks(regions.shape[0], b * t * r):
        blk = _Block(rn[i0:i1], wn_flat, gamma1, gram[i0:i1].to(acc))
        dsim, dgram = _block_backward(blk, grad_s[i0:i1], s[i0:i1], word_mask, gamma1, gamma2)
        # d wn += sum over the block's images of dsim_i rn_i: one GEMM with K = bi * R.
        d_wn.addmm_(dsim.transpose(0, 1).reshape(b * t, -1), blk.rn.reshape(-1, blk.rn.shape[-1]))
        d_rn[i0:i1] = torch.matmul(dsim.transpose(1, 2), wn_flat) + 2 * torch.matmul(dgram, blk.rn)
    grad_regions = normalize_backward(r_acc, r_inv, d_rn)
    grad_words = normalize_backward(w_acc, w_inv, d_wn.view_as(wn))
    return grad_regions, grad_words
