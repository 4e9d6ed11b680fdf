// CUDA implementation of the fused similarity log-sum-exp (contract and math: infonce.h).
//
// Both kernels run one thread block per (row tile, column tile) of S = scale * a b^T:
//   grid.x = column tiles (ceil(M / kBN)), grid.y = row tiles (ceil(N / kBM)), kThreads per block.
// Each block computes its kBM x kBN tile of a b^T once, staging kBK-wide slices of a and b in shared
// memory (fp32 FMA on CUDA cores; tensor-core MMA (wmma / mma.sync) is the next step).
//   forward:  per-row partial LSE over the tile's columns -> row_part[col_tile, i]   (num_col_tiles, N)
//             per-column partial LSE over the tile's rows -> col_part[row_tile, j]   (num_row_tiles, M)
//             merged on the host with at::logsumexp(partials, 0).
//   backward: recompute the tile, form dS in shared memory, then for each kBK-wide slice of D:
//             grad_a[i, k] += scale * sum_j dS[i, j] b[j, k], grad_b[j, k] += scale * sum_i dS[i, j] a[i, k]
//             with atomicAdd into fp32 outputs; grad_scale += sum dS * (a b^T) via a block reduction.
// Out-of-range rows / columns / D entries are loaded as 0 and masked out of every reduction.
#include "infonce/infonce.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <limits>

// The dtypes of the contract, without the double instantiation of AT_DISPATCH_FLOATING_TYPES_AND2.
#define FASTXMC_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastxmc {
namespace {

constexpr int kBM = 64;                  // rows of a per tile
constexpr int kBN = 64;                  // rows of b (columns of S) per tile
constexpr int kBK = 32;                  // slice of D staged in shared memory
constexpr int kThreads = 256;            // 16 x 16 threads, each owning a 4 x 4 micro-tile
constexpr int kThreadsPerDim = 16;
constexpr int kTM = kBM / kThreadsPerDim;  // 4 rows per thread
constexpr int kTN = kBN / kThreadsPerDim;  // 4 columns per thread
static_assert(kThreadsPerDim * kThreadsPerDim == kThreads, "16 x 16 thread layout");
static_assert(kBM + kBN <= kThreads, "forward reduces one row or one column per thread");
static_assert(kBK == 32, "slices are loaded and consumed one warp (32 consecutive k) at a time");

// Shared-memory slices are k-major, [kBK][rows + 1]: the +1 pad keeps both the loads
// (consecutive k, same row) and the reads (consecutive rows, same k) free of bank conflicts.
template <int ROWS>
using Slice = float[kBK][ROWS + 1];

// dst[kk][r] = src[row0 + r, k0 + kk] as fp32, or 0 outside the (nrows x D) matrix.
template <typename scalar_t, int ROWS>
__device__ __forceinline__ void load_slice(Slice<ROWS>& dst, const scalar_t* __restrict__ src,
                                           int64_t row0, int64_t nrows, int64_t D, int64_t k0) {
  for (int e = threadIdx.x; e < ROWS * kBK; e += kThreads) {
    const int r = e / kBK;
    const int kk = e % kBK;
    const int64_t row = row0 + r;
    const int64_t k = k0 + kk;
    dst[kk][r] = (row < nrows && k < D) ? static_cast<float>(src[row * D + k]) : 0.f;
  }
}

// acc[ii][jj] = a[row0 + ty + 16 ii] . b[col0 + tx + 16 jj]  (0 for out-of-range rows / columns).
template <typename scalar_t>
__device__ __forceinline__ void tile_dot(float (&acc)[kTM][kTN], Slice<kBM>& as, Slice<kBN>& bs,
                                         const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                         int64_t row0, int64_t col0, int64_t N, int64_t M, int64_t D) {
  const int tx = threadIdx.x % kThreadsPerDim;
  const int ty = threadIdx.x / kThreadsPerDim;
#pragma unroll
  for (int ii = 0; ii < kTM; ++ii) {
#pragma unroll
    for (int jj = 0; jj < kTN; ++jj) acc[ii][jj] = 0.f;
  }
  for (int64_t k0 = 0; k0 < D; k0 += kBK) {
    load_slice<scalar_t, kBM>(as, a, row0, N, D, k0);
    load_slice<scalar_t, kBN>(bs, b, col0, M, D, k0);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      float av[kTM];
      float bv[kTN];
#pragma unroll
      for (int ii = 0; ii < kTM; ++ii) av[ii] = as[kk][ty + kThreadsPerDim * ii];
#pragma unroll
      for (int jj = 0; jj < kTN; ++jj) bv[jj] = bs[kk][tx + kThreadsPerDim * jj];
#pragma unroll
      for (int ii = 0; ii < kTM; ++ii) {
#pragma unroll
        for (int jj = 0; jj < kTN; ++jj) acc[ii][jj] = fmaf(av[ii], bv[jj], acc[ii][jj]);
      }
    }
    __syncthreads();  // the next slice overwrites as / bs
  }
}

// Whether S[i, j] takes part: inside the matrix and not an excluded self pair (j == i + diag_offset).
__device__ __forceinline__ bool pair_allowed(int64_t i, int64_t j, int64_t N, int64_t M,
                                             int64_t diag_offset, bool exclude_diag) {
  return i < N && j < M && !(exclude_diag && j - i == diag_offset);
}

// log(sum_k exp(v[k * stride])) for k < n; -inf when every entry is -inf (an empty set).
__device__ __forceinline__ float strided_lse(const float* v, int n, int stride) {
  float mx = -INFINITY;
  for (int k = 0; k < n; ++k) mx = fmaxf(mx, v[k * stride]);
  if (mx == -INFINITY) return -INFINITY;
  float sum = 0.f;
  for (int k = 0; k < n; ++k) sum += expf(v[k * stride] - mx);
  return mx + logf(sum);
}

// grid (num_col_tiles, num_row_tiles). row_part: (num_col_tiles, N); col_part: (num_row_tiles, M)
// or nullptr when the column LSE is not wanted.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    infonce_lse_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                               const float* __restrict__ scale_ptr, int64_t N, int64_t M, int64_t D,
                               int64_t diag_offset, bool exclude_diag, float* __restrict__ row_part,
                               float* __restrict__ col_part) {
  __shared__ Slice<kBM> as;
  __shared__ Slice<kBN> bs;
  __shared__ float s_tile[kBM][kBN + 1];  // masked S tile (-inf where a pair does not take part)

  const int64_t col_tile = blockIdx.x;
  const int64_t row_tile = blockIdx.y;
  const int64_t row0 = row_tile * kBM;
  const int64_t col0 = col_tile * kBN;

  float acc[kTM][kTN];
  tile_dot<scalar_t>(acc, as, bs, a, b, row0, col0, N, M, D);

  const float scale = *scale_ptr;
  const int tx = threadIdx.x % kThreadsPerDim;
  const int ty = threadIdx.x / kThreadsPerDim;
#pragma unroll
  for (int ii = 0; ii < kTM; ++ii) {
#pragma unroll
    for (int jj = 0; jj < kTN; ++jj) {
      const int r = ty + kThreadsPerDim * ii;
      const int c = tx + kThreadsPerDim * jj;
      s_tile[r][c] = pair_allowed(row0 + r, col0 + c, N, M, diag_offset, exclude_diag)
                         ? scale * acc[ii][jj]
                         : -INFINITY;
    }
  }
  __syncthreads();

  // Threads [0, kBM) reduce one row each, threads [kBM, kBM + kBN) one column each.
  const int t = threadIdx.x;
  if (t < kBM) {
    const int64_t i = row0 + t;
    if (i < N) row_part[col_tile * N + i] = strided_lse(&s_tile[t][0], kBN, 1);
  } else if (col_part != nullptr && t < kBM + kBN) {
    const int c = t - kBM;
    const int64_t j = col0 + c;
    if (j < M) col_part[row_tile * M + j] = strided_lse(&s_tile[0][c], kBM, kBN + 1);
  }
}

// Sum of v over the block; the result is valid in thread 0 only. red: kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += red[w];
  }
  return total;
}

// grid (num_col_tiles, num_row_tiles). grad_col / col_lse are nullptr when the columns are not used.
// grad_a (N, D), grad_b (M, D) and grad_scale (1) are fp32 and zero-initialised.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    infonce_lse_backward_kernel(const float* __restrict__ grad_row, const float* __restrict__ grad_col,
                                const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                const float* __restrict__ scale_ptr, const float* __restrict__ row_lse,
                                const float* __restrict__ col_lse, int64_t N, int64_t M, int64_t D,
                                int64_t diag_offset, bool exclude_diag, float* __restrict__ grad_a,
                                float* __restrict__ grad_b, float* __restrict__ grad_scale) {
  __shared__ Slice<kBM> as;
  __shared__ Slice<kBN> bs;
  __shared__ float ds_tile[kBM][kBN + 1];  // dS, 0 where a pair does not take part
  __shared__ float red[kThreads / 32];

  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kBN;

  float acc[kTM][kTN];
  tile_dot<scalar_t>(acc, as, bs, a, b, row0, col0, N, M, D);

  const float scale = *scale_ptr;
  const int tx = threadIdx.x % kThreadsPerDim;
  const int ty = threadIdx.x / kThreadsPerDim;

  // The upstream gradients and LSEs of this thread's 4 rows and 4 columns.
  float g_row[kTM], lse_row[kTM], g_col[kTN], lse_col[kTN];
#pragma unroll
  for (int ii = 0; ii < kTM; ++ii) {
    const int64_t i = row0 + ty + kThreadsPerDim * ii;
    g_row[ii] = i < N ? grad_row[i] : 0.f;
    lse_row[ii] = i < N ? row_lse[i] : -INFINITY;
  }
#pragma unroll
  for (int jj = 0; jj < kTN; ++jj) {
    const int64_t j = col0 + tx + kThreadsPerDim * jj;
    const bool use = grad_col != nullptr && j < M;
    g_col[jj] = use ? grad_col[j] : 0.f;
    lse_col[jj] = use ? col_lse[j] : -INFINITY;
  }

  // dS[i, j] = g_row[i] p_row + g_col[j] p_col; a term whose LSE is -inf is 0 (empty set, never NaN).
  float scale_grad = 0.f;
#pragma unroll
  for (int ii = 0; ii < kTM; ++ii) {
#pragma unroll
    for (int jj = 0; jj < kTN; ++jj) {
      const int r = ty + kThreadsPerDim * ii;
      const int c = tx + kThreadsPerDim * jj;
      float ds = 0.f;
      if (pair_allowed(row0 + r, col0 + c, N, M, diag_offset, exclude_diag)) {
        const float s = scale * acc[ii][jj];
        if (lse_row[ii] != -INFINITY) ds += g_row[ii] * expf(s - lse_row[ii]);
        if (lse_col[jj] != -INFINITY) ds += g_col[jj] * expf(s - lse_col[jj]);
      }
      ds_tile[r][c] = ds;
      scale_grad += ds * acc[ii][jj];
    }
  }
  const float block_scale_grad = block_sum(scale_grad, red);  // also publishes ds_tile (syncthreads)
  if (threadIdx.x == 0) atomicAdd(grad_scale, block_scale_grad);
  __syncthreads();

  for (int64_t k0 = 0; k0 < D; k0 += kBK) {
    load_slice<scalar_t, kBM>(as, a, row0, N, D, k0);
    load_slice<scalar_t, kBN>(bs, b, col0, M, D, k0);
    __syncthreads();
    // A warp covers the 32 k of one row: ds_tile reads broadcast, as / bs reads hit 32 banks.
    for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
      const int r = e / kBK;
      const int kk = e % kBK;
      const int64_t i = row0 + r;
      const int64_t k = k0 + kk;
      if (i < N && k < D) {
        float sum = 0.f;
#pragma unroll 8
        for (int c = 0; c < kBN; ++c) sum = fmaf(ds_tile[r][c], bs[kk][c], sum);
        atomicAdd(&grad_a[i * D + k], scale * sum);
      }
    }
    for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
      const int c = e / kBK;
      const int kk = e % kBK;
      const int64_t j = col0 + c;
      const int64_t k = k0 + kk;
      if (j < M && k < D) {
        float sum = 0.f;
#pragma unroll 8
        for (int r = 0; r < kBM; ++r) sum = fmaf(ds_tile[r][c], as[kk][r], sum);
        atomicAdd(&grad_b[j * D + k], scale * sum);
      }
    }
    __syncthreads();  // the next slice overwrites as / bs
  }
}

// ---- host side ------------------------------------------------------------------------------

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got device ", a.device());
  TORCH_CHECK(b.device() == a.device(), op, ": b must be on a's device ", a.device(), ", got ", b.device());
  TORCH_CHECK(scale.device() == a.device(), op, ": scale must be on a's device ", a.device(), ", got ",
              scale.device());
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D (N, D), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, op, ": b must be 2-D (M, D), got shape ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same feature size D, got a ", a.sizes(),
              " and b ", b.sizes());
  const auto dtype = a.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": a must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(b.scalar_type() == dtype, op, ": b must have a's dtype ", dtype, ", got ", b.scalar_type());
  TORCH_CHECK(a.is_contiguous(), op, ": a must be contiguous (call .contiguous()), got strides ", a.strides());
  TORCH_CHECK(b.is_contiguous(), op, ": b must be contiguous (call .contiguous()), got strides ", b.strides());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must be a 0-dim tensor, got shape ", scale.sizes());
}

// Checks an (n,) per-row / per-column vector and returns it as contiguous fp32 (upstream gradients
// may arrive expanded, with stride 0).
at::Tensor checked_vector(const at::Tensor& v, int64_t n, const at::Tensor& a, const char* name,
                          const char* op) {
  TORCH_CHECK(v.device() == a.device(), op, ": ", name, " must be on a's device ", a.device(), ", got ",
              v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": ", name, " must have shape (", n, "), got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": ", name, " must be floating point, got ",
              v.scalar_type());
  return v.to(at::kFloat).contiguous();
}

// Grid of (column tiles, row tiles); gridDim.y is limited to 65535.
dim3 tile_grid(int64_t N, int64_t M, const char* op) {
  const int64_t row_tiles = ceil_div(N, kBM);
  const int64_t col_tiles = ceil_div(M, kBN);
  TORCH_CHECK(row_tiles <= 65535, op, ": N = ", N, " rows exceeds the supported maximum ", 65535 * kBM);
  TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), op, ": M = ", M, " is too large");
  return dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> infonce_lse_forward_cuda(const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& scale, int64_t diag_offset,
                                                            bool exclude_diag, bool with_cols) {
  constexpr const char* op = "fastxmc::infonce_lse_forward (CUDA)";
  check_inputs(a, b, scale, op);
  const c10::cuda::CUDAGuard device_guard(a.device());
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  const auto f32 = a.options().dtype(at::kFloat);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  if (N == 0 || M == 0) {  // every set is empty: -inf, no launch
    return {at::full({N}, neg_inf, f32), with_cols ? at::full({M}, neg_inf, f32) : at::empty({0}, f32)};
  }
  const dim3 grid = tile_grid(N, M, op);
  at::Tensor row_part = at::empty({static_cast<int64_t>(grid.x), N}, f32);
  at::Tensor col_part = with_cols ? at::empty({static_cast<int64_t>(grid.y), M}, f32) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FASTXMC_DISPATCH_FLOAT_HALF_BF16(a.scalar_type(), "infonce_lse_forward_cuda", [&] {
    infonce_lse_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), scale.data_ptr<float>(), N, M, D, diag_offset,
        exclude_diag, row_part.data_ptr<float>(), with_cols ? col_part.data_ptr<float>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor row_lse = at::logsumexp(row_part, {0});
  at::Tensor col_lse = with_cols ? at::logsumexp(col_part, {0}) : at::empty({0}, f32);
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_lse_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse, int64_t diag_offset,
    bool exclude_diag, bool with_cols) {
  constexpr const char* op = "fastxmc::infonce_lse_backward (CUDA)";
  check_inputs(a, b, scale, op);
  const c10::cuda::CUDAGuard device_guard(a.device());
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  const at::Tensor g_row = checked_vector(grad_row, N, a, "grad_row", op);
  const at::Tensor l_row = checked_vector(row_lse, N, a, "row_lse", op);
  at::Tensor g_col, l_col;  // undefined when the columns take no part
  if (with_cols) {
    g_col = checked_vector(grad_col, M, a, "grad_col", op);
    l_col = checked_vector(col_lse, M, a, "col_lse", op);
  }

  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor grad_a = at::zeros({N, D}, f32);
  at::Tensor grad_b = at::zeros({M, D}, f32);
  at::Tensor grad_scale = at::zeros({}, f32);
  if (N == 0 || M == 0) return {grad_a, grad_b, grad_scale};  // S is empty: every gradient is 0

  const dim3 grid = tile_grid(N, M, op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* g_col_ptr = with_cols ? g_col.data_ptr<float>() : nullptr;
  const float* l_col_ptr = with_cols ? l_col.data_ptr<float>() : nullptr;

  FASTXMC_DISPATCH_FLOAT_HALF_BF16(a.scalar_type(), "infonce_lse_backward_cuda", [&] {
    infonce_lse_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        g_row.data_ptr<float>(), g_col_ptr, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
        scale.data_ptr<float>(), l_row.data_ptr<float>(), l_col_ptr, N, M, D, diag_offset, exclude_diag,
        grad_a.data_ptr<float>(), grad_b.data_ptr<float>(), grad_scale.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_a, grad_b, grad_scale};
}

}  // namespace fastxmc
