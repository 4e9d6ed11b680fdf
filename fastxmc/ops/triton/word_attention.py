"""Triton kernels of the fused word attention (XMC-GAN's attention in G).

Math contract: ``csrc/word_attention/word_attention.h``; oracle:
:func:`fastxmc.reference.region_word.word_attention_reference`. queries q (B, R, D), words
w (B, T, D), word_mask (B, T) bool; q^ / w^ the guarded L2-normalised rows (padding words: w^ = 0),
``s = rho q^ w^T`` (R x T per b), ``P = masked softmax over t``, ``context = P w^``.

* forward: one program per (b, block of BLOCK_R rows). Pass 1 walks D in BLOCK_D chunks and
  accumulates the raw products q w^T (BLOCK_R x BLOCK_T) together with the squared norms of the
  rows and of the words, so both normalisations are applied to the small tile afterwards. The
  masked softmax runs in registers; pass 2 walks D again for ``context = P (w * iw)``. Outputs:
  context (B, R, D) fp32 and lse (B, R) fp32, the only thing the backward keeps.
* backward: same grid. Pass 1 recomputes q w^T and g w^T (g = grad_context); the epilogue forms
  P = exp(s - lse), dS = P (dP - rowsum(P dP)), A = rho iq dS and the per-row coefficient of the
  normalisation term; pass 2 writes ``grad_q = beta q + A w^`` (the program owns its rows) and
  this program's share ``P^T g + A^T q`` of grad w^ into a (B, R blocks, T, D) fp32 partial
  buffer, which the host sums (deterministic, no atomics) before the words' normalisation
  backward (O(B T D), plain torch).

T is padded to BLOCK_T = max(16, next power of two) (tl.dot needs >= 16), so every tile is in
registers; T is a caption length (17 to 64 here). Every input is upcast to fp32 in the kernel and
the products use ``input_precision="ieee"``: the op is memory-bound (T is small), so tensor cores
would buy little, and fp32 keeps the results at the reference's accuracy for every input dtype.

CPU testing: with ``TRITON_INTERPRET=1`` set before fastxmc is imported (``fastxmc.ops.triton.runtime``),
the same kernels run on CPU tensors through Triton's interpreter, with one small fixed tile config.
"""
import torch
from torch import Tensor

from fastxmc.ops.triton.runtime import INTERPRET as _INTERPRET
from fastxmc.ops.triton.runtime import tl, triton, triton_unavailable_reason  # noqa: F401

NORM_EPS = 1e-12  # on the squared norm, as the reference code's l2_normalize
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The one config used under the interpreter; BLOCK_D != BLOCK_R so a transposed index shows up.
_INTERPRETER_CONFIG = {"BLOCK_R": 16, "BLOCK_D": 32}
_GPU_BWD_BLOCK_R = 32  # the backward's rows per program on GPU


if triton is not None:

    # Indexing: rows, words and in-tile offsets are int32 (R * D < 2^31, checked on the host); the
    # batch element's offset goes into a 64-bit base pointer.
    @triton.jit
    def _rows_tile(base, rows, row_ok, ks, k_ok, D):
        """(BLOCK_R, BLOCK_D) fp32 tile of a row-major (rows x D) matrix, 0 outside."""
        return tl.load(base + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _words_tile_t(base, ts, valid, ks, k_ok, D):
        """(BLOCK_D, BLOCK_T) fp32 tile of the words, transposed; 0 outside and on padding (so
        padding values, even non-finite ones, never reach a product)."""
        return tl.load(base + ts[None, :] * D + ks[:, None], mask=valid[None, :] & k_ok[:, None],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _words_tile(base, ts, valid, ks, k_ok, D):
        """(BLOCK_T, BLOCK_D) fp32 tile of the words; 0 outside and on padding."""
        return tl.load(base + ts[:, None] * D + ks[None, :], mask=valid[:, None] & k_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _inv_norm(sq):
        return 1.0 / tl.sqrt(tl.maximum(sq, 1e-12))

    @triton.jit
    def _valid_words(mask_ptr, b, T, BLOCK_T: tl.constexpr):
        """(BLOCK_T,) word indices and their validity (inside T and not padding)."""
        ts = tl.arange(0, BLOCK_T)
        t_ok = ts < T
        real = tl.load(mask_ptr + b.to(tl.int64) * T + ts, mask=t_ok, other=0) != 0
        return ts, t_ok, t_ok & real

    # ------------------------------------------------------------------ forward
    @triton.jit
    def _word_attention_fwd_kernel(
            q_ptr, w_ptr, mask_ptr,        # q (B, R, D), w (B, T, D) contiguous; mask (B, T) uint8
            ctx_ptr, lse_ptr,              # out: context (B, R, D) fp32, lse (B, R) fp32
            R, T, D, rho,
            BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ts, t_ok, valid = _valid_words(mask_ptr, b, T, BLOCK_T)
        q_base = q_ptr + b.to(tl.int64) * R * D
        w_base = w_ptr + b.to(tl.int64) * T * D

        # Pass 1: raw products and squared norms.
        acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        q_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        w_sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            q = _rows_tile(q_base, rows, row_ok, ks, k_ok, D)                 # (BR, BD)
            w_t = _words_tile_t(w_base, ts, valid, ks, k_ok, D)                # (BD, BT)
            acc = tl.dot(q, w_t, acc, input_precision="ieee")
            q_sq += tl.sum(q * q, axis=1)
            w_sq += tl.sum(w_t * w_t, axis=0)
        iq = _inv_norm(q_sq)
        iw = tl.where(valid, _inv_norm(w_sq), 0.0)                            # padding: w^ = 0

        # Masked softmax over the words (every caption has a valid word: no empty row).
        s = tl.where(valid[None, :], rho * acc * iq[:, None] * iw[None, :], float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        total = tl.sum(p, axis=1)
        p = p / total[:, None]
        tl.store(lse_ptr + b.to(tl.int64) * R + rows, m + tl.log(total), mask=row_ok)

        # Pass 2: context = P w^.
        ctx_base = ctx_ptr + b.to(tl.int64) * R * D
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            w_n = _words_tile(w_base, ts, valid, ks, k_ok, D) * iw[:, None]      # (BT, BD)
            c = tl.dot(p, w_n, input_precision="ieee")
            tl.store(ctx_base + rows[:, None] * D + ks[None, :], c,
                     mask=row_ok[:, None] & k_ok[None, :])

    # ------------------------------------------------------------------ backward
    @triton.jit
    def _word_attention_bwd_kernel(
            g_ptr, q_ptr, w_ptr, mask_ptr, lse_ptr,   # g, q (B, R, D); w (B, T, D); lse (B, R)
            gq_ptr,                                   # out (B, R, D) fp32, fully written
            part_ptr,                                 # out (B, cdiv(R, BLOCK_R), T, D) fp32
            R, T, D, rho,
            BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        rblk = tl.program_id(1)
        rows = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ts, t_ok, valid = _valid_words(mask_ptr, b, T, BLOCK_T)
        q_base = q_ptr + b.to(tl.int64) * R * D
        g_base = g_ptr + b.to(tl.int64) * R * D
        w_base = w_ptr + b.to(tl.int64) * T * D

        # Pass 1: recompute q w^T and g w^T (raw), and the squared norms.
        acc_s = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        acc_dp = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        q_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        w_sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            q = _rows_tile(q_base, rows, row_ok, ks, k_ok, D)
            g = _rows_tile(g_base, rows, row_ok, ks, k_ok, D)
            w_t = _words_tile_t(w_base, ts, valid, ks, k_ok, D)
            acc_s = tl.dot(q, w_t, acc_s, input_precision="ieee")
            acc_dp = tl.dot(g, w_t, acc_dp, input_precision="ieee")
            q_sq += tl.sum(q * q, axis=1)
            w_sq += tl.sum(w_t * w_t, axis=0)
        iq = _inv_norm(q_sq)
        iw = tl.where(valid, _inv_norm(w_sq), 0.0)

        # Epilogue on the (BLOCK_R, BLOCK_T) tile. Rows past R and padding words get P = 0.
        live = row_ok[:, None] & valid[None, :]
        s = tl.where(live, rho * acc_s * iq[:, None] * iw[None, :], 0.0)
        lse = tl.load(lse_ptr + b.to(tl.int64) * R + rows, mask=row_ok, other=0.0)
        p = tl.where(live, tl.exp(s - lse[:, None]), 0.0)
        dp = acc_dp * iw[None, :]                                   # g_r . w^_t
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        e = tl.sum(ds * s, axis=1)                                  # q^_r . grad q^_r
        a = rho * iq[:, None] * ds
        beta = tl.where(q_sq >= 1e-12, -e * iq * iq, 0.0)           # 0 where the norm guard acts

        # Pass 2: grad_q = beta q + A w^ (rows owned by this program) and the grad w^ partial.
        gq_base = gq_ptr + b.to(tl.int64) * R * D
        part_base = part_ptr + (b.to(tl.int64) * tl.num_programs(1) + rblk) * T * D
        a_t = tl.trans(a)
        p_t = tl.trans(p)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            q = _rows_tile(q_base, rows, row_ok, ks, k_ok, D)
            g = _rows_tile(g_base, rows, row_ok, ks, k_ok, D)
            w_n = _words_tile(w_base, ts, valid, ks, k_ok, D) * iw[:, None]
            gq = beta[:, None] * q + tl.dot(a, w_n, input_precision="ieee")
            tl.store(gq_base + rows[:, None] * D + ks[None, :], gq,
                     mask=row_ok[:, None] & k_ok[None, :])
            gw = tl.dot(p_t, g, input_precision="ieee")
            gw = tl.dot(a_t, q, gw, input_precision="ieee")          # (BT, BD)
            tl.store(part_base + ts[:, None] * D + ks[None, :], gw,
                     mask=t_ok[:, None] & k_ok[None, :])

    # ------------------------------------------------------------------ autotuned wrappers (GPU)
    def _tune_configs():
        return [triton.Config({"BLOCK_R": br, "BLOCK_D": bd}, num_warps=w, num_stages=2)
                for br in (32, 64) for bd in (32, 64, 128) for w in (4, 8)]

    _fwd_tuned = triton.autotune(configs=_tune_configs(), key=["D", "BLOCK_T"])(
        _word_attention_fwd_kernel)

    def _bwd_configs():
        # BLOCK_R is fixed: the host allocates the grad w^ partials (one slot per block of rows)
        # before a config is chosen. Every run overwrites all its outputs, so autotuning's trial
        # runs leave nothing behind.
        return [triton.Config({"BLOCK_R": _GPU_BWD_BLOCK_R, "BLOCK_D": bd}, num_warps=w,
                              num_stages=2) for bd in (32, 64, 128) for w in (4, 8)]

    _bwd_tuned = triton.autotune(configs=_bwd_configs(), key=["D", "BLOCK_T"])(
        _word_attention_bwd_kernel)


# ---------------------------------------------------------------------- host side
def _require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"fastxmc Triton word_attention kernels cannot run: {reason}")


def _check_inputs(queries, words, word_mask) -> None:
    for name, t in (("queries", queries), ("words", words)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D torch.Tensor")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if queries.shape[1] * queries.shape[2] >= 2 ** 31:
        raise ValueError(f"queries {tuple(queries.shape)} too large: R * d must be < 2^31")
    if tuple(word_mask.shape) != tuple(words.shape[:2]) or word_mask.dtype != torch.bool:
        raise ValueError(f"word_mask must be bool (B, T) = {tuple(words.shape[:2])}")


def _block_t(T: int) -> int:
    return max(16, triton.next_power_of_2(max(T, 1)))


def _launch_shape(queries: Tensor, words: Tensor):
    B, R, D = queries.shape
    return B, R, words.shape[1], D


def word_attention_forward_triton(queries: Tensor, words: Tensor, word_mask: Tensor,
                                  rho: float) -> tuple:
    """(context (B, R, D) fp32, lse (B, R) fp32); inputs contiguous."""
    _require_triton(queries.device)
    _check_inputs(queries, words, word_mask)
    B, R, T, D = _launch_shape(queries, words)
    context = torch.empty(B, R, D, device=queries.device, dtype=torch.float32)
    lse = torch.empty(B, R, device=queries.device, dtype=torch.float32)
    if B == 0 or R == 0:
        return context, lse
    mask = word_mask.to(torch.uint8)
    args = (queries, words, mask, context, lse, R, T, D, float(rho))
    if _INTERPRET:
        grid = (B, triton.cdiv(R, _INTERPRETER_CONFIG["BLOCK_R"]))
        _word_attention_fwd_kernel[grid](*args, BLOCK_T=_block_t(T), **_INTERPRETER_CONFIG)
    else:
        _fwd_tuned[lambda meta: (B, triton.cdiv(R, meta["BLOCK_R"]))](*args, BLOCK_T=_block_t(T))
    return context, lse


def words_backward(words: Tensor, word_mask: Tensor, grad_normed: Tensor) -> Tensor:
    """grad w from grad w^ (B, T, D) through the guarded normalisation; padding words get 0."""
    w = words.float().masked_fill(~word_mask[..., None], 0.0)  # grad w^ is 0 there too
    sq = w.pow(2).sum(-1, keepdim=True)
    inv = torch.rsqrt(sq.clamp_min(NORM_EPS))
    w_n = w * inv
    keep = (sq >= NORM_EPS).float()
    proj = keep * (w_n * grad_normed).sum(-1, keepdim=True)
    return inv * (grad_normed - proj * w_n)


def word_attention_backward_triton(grad_context: Tensor, queries: Tensor, words: Tensor,
                                   word_mask: Tensor, lse: Tensor, rho: float) -> tuple:
    """(grad_queries (B, R, D) fp32, grad_words (B, T, D) fp32); inputs contiguous."""
    _require_triton(queries.device)
    _check_inputs(queries, words, word_mask)
    B, R, T, D = _launch_shape(queries, words)
    grad_q = torch.empty(B, R, D, device=queries.device, dtype=torch.float32)
    block_r = _INTERPRETER_CONFIG["BLOCK_R"] if _INTERPRET else _GPU_BWD_BLOCK_R
    parts = torch.zeros(B, triton.cdiv(R, block_r), T, D, device=queries.device,
                        dtype=torch.float32)
    if B > 0 and R > 0:
        args = (grad_context, queries, words, word_mask.to(torch.uint8), lse.float().contiguous(),
                grad_q, parts, R, T, D, float(rho))
        grid = (B, triton.cdiv(R, block_r))
        if _INTERPRET:
            _word_attention_bwd_kernel[grid](*args, BLOCK_T=_block_t(T), **_INTERPRETER_CONFIG)
        else:
            _bwd_tuned[grid](*args, BLOCK_T=_block_t(T))
    return grad_q, words_backward(words, word_mask, parts.sum(dim=1))
