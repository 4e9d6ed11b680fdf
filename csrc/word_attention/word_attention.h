// Fused word attention of XMC-GAN's generator (the reference code's attention_for_g).
//
// Inputs: queries q (B, R, D), words w (B, T, D), word_mask (B, T) bool (True = real token; every
// caption has one), rho > 0. With the reference code's guarded normalisation
//   x^ = x * ix,  ix = rsqrt(max(|x|^2, 1e-12))                   for x = q_r and x = w_t,
// and w^_t := 0 for padding words (their attention is 0, so their values never matter):
//   s_rt = rho * q^_r . w^_t                                        (B, R, T), never stored
//   P_rt = softmax over the valid t of s_rt (0 on padding)
//   context_r = sum_t P_rt w^_t                                     (B, R, D)
//
// forward(queries, words, word_mask, rho) -> (context, lse)
//   context (B, R, D) and lse (B, R) = log sum over valid t of exp(s_rt), in the working dtype:
//   fp32 for float32 / float16 / bfloat16 inputs, fp64 for float64 (CPU only, for gradcheck).
//   lse is all the backward keeps besides the inputs (P = exp(s - lse) once s is recomputed).
//
// backward(grad_context g, queries, words, word_mask, lse, rho) -> (grad_queries, grad_words),
// both in the working dtype:
//   dP_rt = g_r . w^_t,   dS_rt = P_rt (dP_rt - sum_t' P_rt' dP_rt')
//   grad q^_r = rho sum_t dS_rt w^_t          grad w^_t = sum_r P_rt g_r + rho dS_rt q^_r
//   grad x = ix (grad x^ - x^ (x^ . grad x^)), or ix grad x^ where the clamp is active
//   (|x|^2 < 1e-12), with q^_r . grad q^_r = sum_t dS_rt s_rt. Padding words get a zero gradient.
// So the backward recomputes the two (R x T) products s and dP from q, g and w^; the (B, R, T)
// attention is never kept. Every product and reduction accumulates in the working dtype.
// Layout (CPU): queries and grad_context may be channel-major per batch element (strides
// (*, 1, R): G's (B, D, H, W) conv output flattened and transposed); they are read in place, and
// context / grad_queries then come back in that layout. Otherwise outputs are contiguous.
#pragma once
#include <torch/types.h>
#include <tuple>

namespace fastxmc {

// The shape, mask and rho checks both backends share (device and dtype rules differ per backend).
inline void check_word_attention_shapes(const char* fn, const at::Tensor& q, const at::Tensor& w,
                                        const at::Tensor& mask, double rho) {
  TORCH_CHECK(q.dim() == 3, fn, ": queries must be 3-D (B, R, D), got shape ", q.sizes());
  TORCH_CHECK(w.dim() == 3, fn, ": words must be 3-D (B, T, D), got shape ", w.sizes());
  TORCH_CHECK(w.size(0) == q.size(0) && w.size(2) == q.size(2), fn,
              ": queries (B, R, D) and words (B, T, D) must agree on B and D, got ", q.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == q.scalar_type(), fn, ": words must have the queries' dtype ",
              q.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, fn, ": word_mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == w.size(0) && mask.size(1) == w.size(1), fn,
              ": word_mask must have shape (B, T) = (", w.size(0), ", ", w.size(1), "), got ",
              mask.sizes());
  TORCH_CHECK(rho > 0, fn, ": rho must be positive, got ", rho);
}

std::tuple<at::Tensor, at::Tensor> word_attention_forward_cpu(
    const at::Tensor& queries, const at::Tensor& words, const at::Tensor& word_mask, double rho);

std::tuple<at::Tensor, at::Tensor> word_attention_backward_cpu(
    const at::Tensor& grad_context, const at::Tensor& queries, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& lse, double rho);

// grad_queries alone (the words' gradient is not computed): for frozen word embeddings.
at::Tensor word_attention_backward_queries_cpu(
    const at::Tensor& grad_context, const at::Tensor& queries, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& lse, double rho);

#ifdef FASTXMC_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> word_attention_forward_cuda(
    const at::Tensor& queries, const at::Tensor& words, const at::Tensor& word_mask, double rho);

std::tuple<at::Tensor, at::Tensor> word_attention_backward_cuda(
    const at::Tensor& grad_context, const at::Tensor& queries, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& lse, double rho);
#endif

}  // namespace fastxmc
