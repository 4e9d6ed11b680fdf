// Fused similarity log-sum-exp: the core of InfoNCE / SupCon.
//
// With S = scale * a b^T (a: N x D, b: M x D, scale a 0-dim fp32 tensor), and the optional
// exclusion of the "self" pairs (i, j) with j == i + diag_offset (when exclude_diag):
//   row_lse[i] = logsumexp over allowed j of S[i, j]        (N, fp32)
//   col_lse[j] = logsumexp over allowed i of S[i, j]        (M, fp32; empty when !with_cols)
// An empty set gives -inf.
//
// Backward, with upstream grad_row (N) and grad_col (M, or empty when !with_cols):
//   dS[i, j] = grad_row[i] * exp(S[i, j] - row_lse[i]) + grad_col[j] * exp(S[i, j] - col_lse[j])
//              (a term is 0 where its lse is -inf or the pair is excluded)
//   grad_a = scale * dS b          (N x D, fp32)
//   grad_b = scale * dS^T a        (M x D, fp32)
//   grad_scale = sum_ij dS[i, j] * (a_i . b_j)   (0-dim, fp32)
// a and b may be float32, float16 or bfloat16 (every accumulation fp32, outputs fp32); the CPU
// kernels also take float64 (computed and returned in float64, for gradcheck).
#pragma once
#include <torch/types.h>
#include <tuple>

namespace fastxmc {

std::tuple<at::Tensor, at::Tensor> infonce_lse_forward_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    int64_t diag_offset, bool exclude_diag, bool with_cols);

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse,
    int64_t diag_offset, bool exclude_diag, bool with_cols);

#ifdef FASTXMC_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> infonce_lse_forward_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    int64_t diag_offset, bool exclude_diag, bool with_cols);

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_lse_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse,
    int64_t diag_offset, bool exclude_diag, bool with_cols);
#endif

}  // namespace fastxmc
