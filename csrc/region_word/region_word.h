// Fused region-word similarity: the core of XMC-GAN's word loss (region_word_loss).
//
// Inputs: regions (B_img, R, d), words (B_cap, T, d), word_mask (B_cap, T) bool (true = real
// token; every caption has one), gamma1, gamma2 > 0. With wn / rn the words / regions normalised as
// x * rsqrt(max(|x|^2, 1e-12)) and, for image i, caption j and word t:
//   sim_tk = wn_t . rn_ik                      (T x R per pair; all pairs: one (B T) x (B R) GEMM)
//   A_t    = softmax over regions k(gamma1 sim_t)
//   p_t    = sum_k A_tk sim_tk                 (= wn_t . c_t, with the context c_t = A_t rn_i)
//   H_t    = A_t G_i,  G_i = rn_i rn_i^T      (R x R Gram matrix of image i)
//   q_t    = sum_k A_tk H_tk                   (= |c_t|^2)
//   cos_t  = p_t * rsqrt(max(q_t, 1e-12))      (= cos(w_t, c_t), guarded like the reference)
//   S[i, j] = logsumexp over valid t(gamma2 cos_t) / gamma2
// Forward returns (S (B_img, B_cap), gram (B_img, R, R) = the G_i, saved for the backward; the
// Triton kernels do not use G and return an empty gram). Nothing else is saved: the backward
// recomputes the (B_cap T x R) tiles of every image.
//
// Backward, with upstream grad_s (B_img, B_cap) and the forward's S and gram:
//   dcos_t = grad_s[i, j] exp(gamma2 (cos_t - S[i, j])) on valid words, 0 on padding
//   u = rsqrt(max(q, 1e-12)), dp = dcos u, dq = -dcos p u^3 / 2 (0 where q <= 1e-12)
//   dA = dp sim + 2 dq H, and sum_k A_tk dA_tk = dp p + 2 dq q, so
//   dsim = A (dp + gamma1 (dA - dp p - 2 dq q)),   dG_i = sum over j, t of dq_t A_t^T A_t
//   d wn_j += dsim rn_i,   d rn_i += dsim^T wn_j + 2 dG_i rn_i
//   then through the normalisations: dx = u dxn - u^3 (x . dxn) x (u dxn where |x|^2 <= 1e-12).
// Returns (grad_regions (B_img, R, d), grad_words (B_cap, T, d)); padding words get 0.
// Inputs may be float32, float16 or bfloat16 (computed and returned in float32); the CPU kernels
// also take float64 (computed and returned in float64, for gradcheck). Memory: O(B (R + T) d +
// threads x tile), never B x B x T x R.
#pragma once
#include <torch/types.h>
#include <tuple>

namespace fastxmc {

std::tuple<at::Tensor, at::Tensor> region_word_forward_cpu(const at::Tensor& regions,
                                                          const at::Tensor& words,
                                                          const at::Tensor& word_mask,
                                                          double gamma1, double gamma2);

std::tuple<at::Tensor, at::Tensor> region_word_backward_cpu(
    const at::Tensor& grad_s, const at::Tensor& regions, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& s, const at::Tensor& gram, double gamma1,
    double gamma2);

#ifdef FASTXMC_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> region_word_forward_cuda(const at::Tensor& regions,
                                                           const at::Tensor& words,
                                                           const at::Tensor& word_mask,
                                                           double gamma1, double gamma2);

std::tuple<at::Tensor, at::Tensor> region_word_backward_cuda(
    const at::Tensor& grad_s, const at::Tensor& regions, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& s, const at::Tensor& gram, double gamma1,
    double gamma2);
#endif

}  // namespace fastxmc
