// CUDA kernels of the fused modulated batch norm (contract and math: modulated_bn.h).
//
// Every pass is a small device functor f(offset, b, c) run by one of two launchers, which map
// threads to values so that each warp touches consecutive addresses in either layout:
//   reduce_kernel:      grid (channel blocks, B * n_splits). NCHW: a block sums one channel over a
//                       slice of its plane (256 threads along HW). NHWC: a block sums 32 channels
//                       (threadIdx.x) over a slice of pixel rows (8 rows at a time, threadIdx.y).
//                       It writes part[b * n_splits + split][2][C]: no atomics, deterministic.
//   elementwise_kernel: NCHW: grid (B * C planes, HW chunks of kChunk), 256 threads along HW.
//                       NHWC: grid (row chunks of kRows, channel tiles of 32), block (32, 8).
// Finalize kernels (one thread per channel) fold the partials in float64: statistics -> mean,
// invstd, var; gradient sums -> per-channel dgamma / dbeta and the dx coefficients k1, k2.
// Inputs float32 / float16 / bfloat16; all arithmetic float32.
#include "modulated_bn/modulated_bn.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#define MBN_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastxmc {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32;            // NHWC: channels per block (threadIdx.x)
constexpr int kTileRows = 8;          // NHWC: rows in flight per block (threadIdx.y)
constexpr int64_t kChunk = 1024;      // NCHW element-wise: values of a plane per block
constexpr int64_t kRows = 32;         // NHWC element-wise: pixel rows per block
constexpr int64_t kTargetBlocks = 1024;  // reduction blocks to aim for (several waves of SMs)
constexpr int kFinalizeThreads = 128;
static_assert(kTileC * kTileRows == kThreads, "NHWC blocks are 32 x 8 threads");

struct Geometry {
  int64_t B, C, HW;
  bool cl;  // channels_last
  int64_t n_splits, hw_per_split;  // reductions: HW slices per image
};

Geometry make_geometry(const at::Tensor& x) {
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3),
             !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast), 1, 1};
  const int64_t c_blocks = g.cl ? (g.C + kTileC - 1) / kTileC : g.C;
  const int64_t step = g.cl ? kTileRows : kThreads;  // values a block consumes per iteration
  const int64_t max_splits = std::max<int64_t>(1, (g.HW + step - 1) / step);
  int64_t splits = (kTargetBlocks + g.B * c_blocks - 1) / std::max<int64_t>(1, g.B * c_blocks);
  // grid.y = B * n_splits must stay <= 65535.
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, max_splits,
                                                   65535 / std::max<int64_t>(g.B, 1)}));
  g.hw_per_split = std::max<int64_t>(1, (g.HW + splits - 1) / splits);
  g.hw_per_split = (g.hw_per_split + step - 1) / step * step;
  g.n_splits = std::max<int64_t>(1, (g.HW + g.hw_per_split - 1) / g.hw_per_split);
  return g;
}

// ---------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

template <bool CL, class F>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(F f, float* __restrict__ part, int64_t C, int64_t HW, int64_t n_splits,
                  int64_t hw_per_split) {
  const int64_t b = blockIdx.y / n_splits;
  const int64_t hw0 = (blockIdx.y % n_splits) * hw_per_split;
  const int64_t hw1 = std::min(HW, hw0 + hw_per_split);
  float* out = part + static_cast<int64_t>(blockIdx.y) * 2 * C;
  float2 acc = make_float2(0.f, 0.f);
  if constexpr (!CL) {
    __shared__ float2 warp_part[kThreads / 32];
    const int64_t c = blockIdx.x;
    const int64_t base = (b * C + c) * HW;
    for (int64_t hw = hw0 + threadIdx.x; hw < hw1; hw += kThreads) {
      const float2 v = f(base + hw, b, c);
      acc.x += v.x;
      acc.y += v.y;
    }
    acc = warp_sum(acc);
    if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
      acc = threadIdx.x < kThreads / 32 ? warp_part[threadIdx.x] : make_float2(0.f, 0.f);
      acc = warp_sum(acc);
      if (threadIdx.x == 0) {
        out[c] = acc.x;
        out[C + c] = acc.y;
      }
    }
  } else {
    __shared__ float2 row_part[kTileRows][kTileC];
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
    if (c < C) {
      for (int64_t r = hw0 + threadIdx.y; r < hw1; r += kTileRows) {
        const float2 v = f((b * HW + r) * C + c, b, c);
        acc.x += v.x;
        acc.y += v.y;
      }
    }
    row_part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int k = 1; k < kTileRows; ++k) {
        acc.x += row_part[k][threadIdx.x].x;
        acc.y += row_part[k][threadIdx.x].y;
      }
      out[c] = acc.x;
      out[C + c] = acc.y;
    }
  }
}

template <bool CL, class F>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(F f, int64_t C, int64_t HW, int64_t rows) {
  if constexpr (!CL) {
    const int64_t p = blockIdx.x;  // plane b * C + c
    const int64_t b = p / C, c = p % C;
    const int64_t hw0 = static_cast<int64_t>(blockIdx.y) * kChunk;
    const int64_t hw1 = std::min(HW, hw0 + kChunk);
    for (int64_t hw = hw0 + threadIdx.x; hw < hw1; hw += kThreads) f(p * HW + hw, b, c);
  } else {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * kTileC + threadIdx.x;
    if (c >= C) return;
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
    const int64_t r1 = std::min(rows, r0 + kRows);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) f(r * C + c, r / HW, c);
  }
}

template <class F>
void launch_reduce(const F& f, const Geometry& g, float* part, cudaStream_t stream) {
  if (g.B * g.HW == 0) return;
  if (g.cl) {
    const dim3 grid((g.C + kTileC - 1) / kTileC, g.B * g.n_splits);
    reduce_kernel<true><<<grid, dim3(kTileC, kTileRows), 0, stream>>>(f, part, g.C, g.HW,
                                                                      g.n_splits, g.hw_per_split);
  } else {
    const dim3 grid(g.C, g.B * g.n_splits);
    reduce_kernel<false><<<grid, kThreads, 0, stream>>>(f, part, g.C, g.HW, g.n_splits,
                                                        g.hw_per_split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F>
void launch_elementwise(const F& f, const Geometry& g, cudaStream_t stream) {
  if (g.B * g.C * g.HW == 0) return;
  if (g.cl) {
    const dim3 grid((g.B * g.HW + kRows - 1) / kRows, (g.C + kTileC - 1) / kTileC);
    elementwise_kernel<true><<<grid, dim3(kTileC, kTileRows), 0, stream>>>(f, g.C, g.HW,
                                                                           g.B * g.HW);
  } else {
    const dim3 grid(g.B * g.C, (g.HW + kChunk - 1) / kChunk);
    elementwise_kernel<false><<<grid, kThreads, 0, stream>>>(f, g.C, g.HW, g.B * g.HW);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Pass functors: f(offset, b, c) for the value at element offset `offset` of image b, channel c.
// ---------------------------------------------------------------------------------------------
template <class T>
struct StatsF {
  const T* __restrict__ x;
  const float* __restrict__ shift;  // (C,) the channel's first value
  __device__ __forceinline__ float2 operator()(int64_t i, int64_t, int64_t c) const {
    const float d = static_cast<float>(x[i]) - shift[c];
    return make_float2(d, d * d);
  }
};

template <class T, bool PIXEL, bool RELU>
struct GradSumsF {
  const T* __restrict__ dy;
  const T* __restrict__ x;
  const T* __restrict__ g;
  const uint8_t* __restrict__ mask;
  const float* __restrict__ mean;
  const float* __restrict__ invstd;
  __device__ __forceinline__ float2 operator()(int64_t i, int64_t, int64_t c) const {
    float t = static_cast<float>(dy[i]);
    if constexpr (RELU) t *= static_cast<float>(mask[i]);
    if constexpr (PIXEL) t *= 1.f + static_cast<float>(g[i]);
    const float xh = (static_cast<float>(x[i]) - mean[c]) * invstd[c];
    return make_float2(t, t * xh);
  }
};

template <class T, bool PIXEL, bool RELU>
struct NormF {
  const T* __restrict__ x;
  const T* __restrict__ g;
  const T* __restrict__ beta;
  T* __restrict__ y;
  uint8_t* __restrict__ mask;
  const float* __restrict__ mean;
  const float* __restrict__ invstd;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t i, int64_t b, int64_t c) const {
    const float xh = (static_cast<float>(x[i]) - mean[c]) * invstd[c];
    const int64_t j = PIXEL ? i : b * C + c;
    float v = xh * (1.f + static_cast<float>(g[j])) + static_cast<float>(beta[j]);
    if constexpr (RELU) {
      v = v < 0.f ? 0.f : v;  // keeps NaN, as torch.relu
      mask[i] = v > 0.f;
    }
    y[i] = static_cast<T>(v);
  }
};

template <class T, bool PIXEL, bool RELU, bool NEED_DX, bool PIXEL_GRADS>
struct GradF {
  const T* __restrict__ dy;
  const T* __restrict__ x;
  const T* __restrict__ g;
  const uint8_t* __restrict__ mask;
  T* __restrict__ dx;
  T* __restrict__ dg;
  T* __restrict__ db;
  const float* __restrict__ mean;
  const float* __restrict__ invstd;
  const float* __restrict__ k1;
  const float* __restrict__ k2;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t i, int64_t b, int64_t c) const {
    float t = static_cast<float>(dy[i]);
    if constexpr (RELU) t *= static_cast<float>(mask[i]);
    const float xh = (static_cast<float>(x[i]) - mean[c]) * invstd[c];
    if constexpr (NEED_DX) {
      const float w = 1.f + static_cast<float>(g[PIXEL ? i : b * C + c]);
      dx[i] = static_cast<T>(invstd[c] * (t * w) - k1[c] - xh * k2[c]);
    }
    if constexpr (PIXEL_GRADS) {
      dg[i] = static_cast<T>(t * xh);
      db[i] = static_cast<T>(t);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Finalize kernels (one thread per channel).
// ---------------------------------------------------------------------------------------------
__global__ void stats_finalize_kernel(const float* __restrict__ part,
                                      const float* __restrict__ shift, float* __restrict__ mean,
                                      float* __restrict__ invstd, float* __restrict__ var,
                                      int64_t C, int64_t n_parts, double count, double eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s = 0, q = 0;
  for (int64_t p = 0; p < n_parts; ++p) {
    s += part[p * 2 * C + c];
    q += part[p * 2 * C + C + c];
  }
  const double dm = s / count;
  const double biased = fmax(q / count - dm * dm, 0.0);
  mean[c] = static_cast<float>(shift[c] + dm);
  invstd[c] = static_cast<float>(1.0 / sqrt(biased + eps));
  var[c] = static_cast<float>(biased * count / (count - 1));
}

template <class T>
__global__ void grad_finalize_kernel(const float* __restrict__ part, const T* __restrict__ g,
                                     const float* __restrict__ invstd, T* __restrict__ dg,
                                     T* __restrict__ db, float* __restrict__ k1,
                                     float* __restrict__ k2, int64_t B, int64_t C,
                                     int64_t n_splits, double count, bool pixel, bool training,
                                     bool channel_grads) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s1 = 0, s2 = 0;
  for (int64_t b = 0; b < B; ++b) {
    double sb = 0, qb = 0;
    for (int64_t sp = 0; sp < n_splits; ++sp) {
      const float* row = part + (b * n_splits + sp) * 2 * C;
      sb += row[c];
      qb += row[C + c];
    }
    if (channel_grads) {
      db[b * C + c] = static_cast<T>(static_cast<float>(sb));
      dg[b * C + c] = static_cast<T>(static_cast<float>(qb));
    }
    // Per channel the sums hold dym alone: dx_hat = dym * (1 + gamma[b, c]).
    const double w = pixel ? 1.0 : 1.0 + static_cast<double>(static_cast<float>(g[b * C + c]));
    s1 += w * sb;
    s2 += w * qb;
  }
  k1[c] = training ? static_cast<float>(invstd[c] * s1 / count) : 0.f;
  k2[c] = training ? static_cast<float>(invstd[c] * s2 / count) : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Drivers.
// ---------------------------------------------------------------------------------------------
template <class F>
void with_flag(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

#define MBN_FLAG(f) std::decay_t<decltype(f)>::value

at::MemoryFormat layout_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

void check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& gamma) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, fn, ": x must be a (B, C, H, W) CUDA tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), fn,
              ": x must be contiguous or channels_last (dense), got strides ", x.strides());
  TORCH_CHECK(gamma.device() == x.device() && gamma.scalar_type() == t, fn,
              ": gamma must be on x's device with x's dtype");
  if (gamma.dim() == 2) {
    TORCH_CHECK(gamma.size(0) == x.size(0) && gamma.size(1) == x.size(1) && gamma.is_contiguous(),
                fn, ": per-channel gamma must be a contiguous (B, C) tensor, got ", gamma.sizes());
  } else {
    TORCH_CHECK(gamma.sizes() == x.sizes() && gamma.is_contiguous(layout_of(x)), fn,
                ": per-pixel gamma must have x's shape and memory format");
  }
}

void check_pixel_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.sizes() == x.sizes() && t.strides() == x.strides(), fn,
              ": ", name, " must have x's device, shape and strides");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_bn_forward_cuda(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool relu) {
  const char* fn = "modulated_bn_forward_cuda";
  check_inputs(fn, x, gamma);
  TORCH_CHECK(beta.sizes() == gamma.sizes() && beta.strides() == gamma.strides() &&
                  beta.scalar_type() == gamma.scalar_type() && beta.device() == x.device(),
              fn, ": beta must match gamma (shape, strides, dtype, device)");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Geometry g = make_geometry(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = relu ? at::empty_like(x, x.options().dtype(at::kByte))
                         : at::empty({0}, x.options().dtype(at::kByte));
  at::Tensor mean, invstd, var;
  if (training) {
    TORCH_CHECK(g.B * g.HW > 1, fn, ": training needs more than one value per channel");
    mean = at::empty({g.C}, f32);
    invstd = at::empty({g.C}, f32);
    var = at::empty({g.C}, f32);
    // The shift of the sums: x[0, c, 0, 0].
    const at::Tensor shift = x.select(0, 0).select(1, 0).select(1, 0).to(at::kFloat).contiguous();
    at::Tensor part = at::empty({g.B * g.n_splits, 2, g.C}, f32);
    MBN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "modulated_bn_stats_cuda", [&] {
      launch_reduce(StatsF<scalar_t>{x.data_ptr<scalar_t>(), shift.data_ptr<float>()}, g,
                    part.data_ptr<float>(), stream);
    });
    const int blocks = static_cast<int>((g.C + kFinalizeThreads - 1) / kFinalizeThreads);
    stats_finalize_kernel<<<blocks, kFinalizeThreads, 0, stream>>>(
        part.data_ptr<float>(), shift.data_ptr<float>(), mean.data_ptr<float>(),
        invstd.data_ptr<float>(), var.data_ptr<float>(), g.C, part.size(0),
        static_cast<double>(g.B * g.HW), eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), fn,
                ": eval mode needs running_mean and running_var");
    TORCH_CHECK(running_mean->numel() == g.C && running_var->numel() == g.C, fn,
                ": running buffers must have C = ", g.C, " values");
    mean = running_mean->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
    invstd = (running_var->to(at::kFloat) + eps).rsqrt().contiguous();
    var = at::empty({0}, f32);
  }
  const bool pixel = gamma.dim() == 4;
  MBN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "modulated_bn_norm_cuda", [&] {
    with_flag(pixel, [&](auto kPixel) {
      with_flag(relu, [&](auto kRelu) {
        launch_elementwise(NormF<scalar_t, MBN_FLAG(kPixel), MBN_FLAG(kRelu)>{
                               x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
                               beta.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                               relu ? mask.data_ptr<uint8_t>() : nullptr, mean.data_ptr<float>(),
                               invstd.data_ptr<float>(), g.C},
                           g, stream);
      });
    });
  });
  return {y, mean, invstd, var, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_bn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mask, bool training, bool relu, bool need_dx,
    bool need_dmod) {
  const char* fn = "modulated_bn_backward_cuda";
  check_inputs(fn, x, gamma);
  check_pixel_like(fn, "grad_y", grad_y, x);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), fn, ": grad_y must have x's dtype");
  if (relu) {
    check_pixel_like(fn, "mask", mask, x);
    TORCH_CHECK(mask.scalar_type() == at::kByte, fn, ": mask must be uint8");
  }
  const Geometry g = make_geometry(x);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && invstd.scalar_type() == at::kFloat &&
                  mean.numel() == g.C && invstd.numel() == g.C && mean.is_contiguous() &&
                  invstd.is_contiguous() && mean.device() == x.device() &&
                  invstd.device() == x.device(),
              fn, ": mean and invstd must be contiguous float32 (C,) tensors on x's device");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool pixel = gamma.dim() == 4;
  // Outputs that are not needed are distinct empty tensors (outputs must not alias each other).
  const auto output_like = [&](const at::Tensor& t, bool needed) {
    return needed ? at::empty_like(t) : at::empty({0}, x.options());
  };
  at::Tensor dx = output_like(x, need_dx);
  at::Tensor dg = output_like(gamma, need_dmod);
  at::Tensor db = output_like(gamma, need_dmod);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor k1 = at::zeros({g.C}, f32), k2 = at::zeros({g.C}, f32);
  const bool channel_grads = need_dmod && !pixel;
  const bool pixel_grads = need_dmod && pixel;
  const uint8_t* mp = relu ? mask.data_ptr<uint8_t>() : nullptr;
  MBN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "modulated_bn_backward_cuda", [&] {
    const scalar_t* dyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    if ((training && need_dx) || channel_grads) {
      at::Tensor part = at::empty({g.B * g.n_splits, 2, g.C}, f32);
      with_flag(pixel, [&](auto kPixel) {
        with_flag(relu, [&](auto kRelu) {
          launch_reduce(GradSumsF<scalar_t, MBN_FLAG(kPixel), MBN_FLAG(kRelu)>{
                            dyp, xp, gp, mp, mean.data_ptr<float>(), invstd.data_ptr<float>()},
                        g, part.data_ptr<float>(), stream);
        });
      });
      const int blocks = static_cast<int>((g.C + kFinalizeThreads - 1) / kFinalizeThreads);
      grad_finalize_kernel<scalar_t><<<blocks, kFinalizeThreads, 0, stream>>>(
          part.data_ptr<float>(), gp, invstd.data_ptr<float>(),
          channel_grads ? dg.data_ptr<scalar_t>() : nullptr,
          channel_grads ? db.data_ptr<scalar_t>() : nullptr, k1.data_ptr<float>(),
          k2.data_ptr<float>(), g.B, g.C, g.n_splits, static_cast<double>(g.B * g.HW), pixel,
          training, channel_grads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!need_dx && !pixel_grads) return;
    with_flag(pixel, [&](auto kPixel) {
      with_flag(relu, [&](auto kRelu) {
        with_flag(need_dx, [&](auto kDx) {
          with_flag(pixel_grads, [&](auto kPixelGrads) {
            if constexpr (MBN_FLAG(kDx) || MBN_FLAG(kPixelGrads)) {
              launch_elementwise(
                  GradF<scalar_t, MBN_FLAG(kPixel), MBN_FLAG(kRelu), MBN_FLAG(kDx),
                        MBN_FLAG(kPixelGrads)>{
                      dyp, xp, gp, mp, need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                      pixel_grads ? dg.data_ptr<scalar_t>() : nullptr,
                      pixel_grads ? db.data_ptr<scalar_t>() : nullptr, mean.data_ptr<float>(),
                      invstd.data_ptr<float>(), k1.data_ptr<float>(), k2.data_ptr<float>(), g.C},
                  g, stream);
            }
          });
        });
      });
    });
  });
  return {dx, dg, db};
}

}  // namespace fastxmc

TORCH_LIBRARY_IMPL(fastxmc, CUDA, m) {
  m.impl("modulated_bn_forward", &fastxmc::modulated_bn_forward_cuda);
  m.impl("modulated_bn_backward", &fastxmc::modulated_bn_backward_cuda);
}
