// Fused modulated batch norm: y = BN_noaffine(x) * (1 + gamma) + beta, then ReLU when `relu`.
//
// Shapes and layout. x is (B, C, H, W) and dense in ONE of two memory formats: contiguous (NCHW) or
// channels_last (NHWC); the Python layer converts anything else. gamma and beta are either per
// channel, (B, C) contiguous, or per pixel, (B, C, H, W) in x's memory format. n = B * H * W values
// per channel. "Acc" is the accumulation dtype: float64 for float64 inputs, float32 otherwise
// (float16 / bfloat16 inputs are read and written in their dtype, computed in float32).
//
// forward(x, gamma, beta, running_mean?, running_var?, training, eps, relu)
//     -> (y, mean, invstd, var, mask)
//   training: mean[c] = batch mean, invstd[c] = 1 / sqrt(biased batch variance + eps), var[c] =
//             unbiased batch variance (for the caller's running-buffer update; the op itself
//             mutates nothing). The statistics are one pass of shifted sums (shift = the channel's
//             first value, x[0, c, 0, 0]) in Acc partials (CPU: each vector lane sums at most 64
//             values; GPU: per thread, a slice of one image) that are merged in float64.
//   eval:     mean = running_mean, invstd = 1 / sqrt(running_var + eps) (Acc), var is empty (0,).
//   y:        x's dtype and strides.   mean, invstd: (C,) Acc.
//   mask:     uint8 with x's strides, 1 where y > 0 (relu only; an empty (0,) tensor otherwise):
//             what the backward needs of the ReLU, 1 byte per value.
//   The backward saves x, gamma, mean, invstd and mask; never y or beta.
//
// backward(grad_y, x, gamma, mean, invstd, mask, training, relu, need_dx, need_dmod)
//     -> (dx, dgamma, dbeta)
//   With x_hat = (x - mean) * invstd, dym = grad_y * mask (grad_y without relu) and
//   dx_hat = dym * (1 + gamma):
//     training: dx = invstd * (dx_hat - mean_c(dx_hat) - x_hat * mean_c(dx_hat * x_hat)),
//               mean_c over the n values of the channel;
//     eval:     dx = invstd * dx_hat;
//     dgamma = dym * x_hat, dbeta = dym: per pixel, or summed over (H, W) for per-channel gamma.
//   grad_y has x's strides. dx has x's strides and dtype, dgamma / dbeta gamma's; an output that
//   is not needed (need_dx / need_dmod false) is an empty (0,) tensor.
//   Passes: one reduction pass (per (b, c) sums of dym * w and dym * w * x_hat, w = 1 + gamma per
//   pixel, 1 per channel) when dx is needed in training or gamma is per channel, then one
//   element-wise pass when dx or a per-pixel dgamma / dbeta is needed.
//   Every reduction is split into work items whose partial sums are merged in a fixed order, so
//   results do not depend on the number of threads.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

namespace fastxmc {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_bn_forward_cpu(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_bn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mask, bool training, bool relu, bool need_dx,
    bool need_dmod);

#ifdef FASTXMC_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_bn_forward_cuda(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_bn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mask, bool training, bool relu, bool need_dx,
    bool need_dmod);
#endif

}  // namespace fastxmc
