// CUDA implementation of the fused word attention (contract and math: word_attention.h).
//
// One thread block per (block of kRows region rows, batch element b): grid (ceil(R / kRows), B),
// kThreads threads. Every product is fp32 FMA on CUDA cores: T is a caption length (17..64), so
// each row's work is 2 T D FLOPs against 2 D loads and the op is bound by memory, not FLOPs.
//   pass 1: walk D in kDc-wide slices staged in shared memory (the block's rows of q, also of
//           g = grad_context in the backward, and the words in kTc-word tiles), accumulating the
//           raw products q w^T (and g w^T) into a (kRows x T) shared tile, plus the squared norms
//           of the rows and of the words;
//   epilogue: one warp per row: the normalisations, masked softmax (forward: P and lse; backward:
//           P = exp(s - lse), dS, A = rho iq dS and the row's coefficient beta of the norm term);
//   pass 2: walk D again: forward context = P w^; backward grad_q = beta q + A w^ (rows owned by
//           the block) and the block's share P^T g + A^T q of grad w^, written to a
//           (B, row blocks, T, D) fp32 partial buffer that the host sums (deterministic, no
//           atomics) before the words' normalisation backward (O(B T D), ATen ops).
// The (kRows x T) tiles live in dynamic shared memory (T is not known at compile time); blocks
// that need more than the default 48 KB opt in, up to the device's limit.
#include "word_attention/word_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

// The dtypes of the contract, without the double instantiation of AT_DISPATCH_FLOATING_TYPES_AND2.
#define FASTXMC_WA_DISPATCH(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastxmc {
namespace {

constexpr int kRows = 32;      // region rows per block
constexpr int kDc = 32;        // slice of D staged in shared memory
constexpr int kTc = 32;        // words per staged tile
constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr float kNormEps = 1e-12f;  // on |x|^2, as the reference code's l2_normalize
static_assert(kRows * kDc == 4 * kThreads, "a (kRows x kDc) tile is 4 elements per thread");
static_assert(kTc * kDc == 4 * kThreads, "a (kTc x kDc) tile is 4 elements per thread");

// Padded by one column so that both row-wise and column-wise warp accesses avoid bank conflicts.
using RowSlice = float[kRows][kDc + 1];
using WordSlice = float[kTc][kDc + 1];

struct Shape {
  int64_t R, T, D;
};

// dst[r][kk] = src[row0 + r, k0 + kk] as fp32; 0 outside the nrows x D matrix and on the rows
// that `keep` (when given) marks false: padding words never reach a product, whatever they hold.
template <typename scalar_t, int ROWS>
__device__ __forceinline__ void stage(float (&dst)[ROWS][kDc + 1], const scalar_t* __restrict__ src,
                                      int64_t row0, int64_t nrows, int64_t D, int64_t k0,
                                      const bool* __restrict__ keep = nullptr) {
  for (int e = threadIdx.x; e < ROWS * kDc; e += kThreads) {
    const int r = e / kDc, kk = e % kDc;
    const int64_t row = row0 + r, k = k0 + kk;
    const bool ok = row < nrows && k < D && (keep == nullptr || keep[row]);
    dst[r][kk] = ok ? static_cast<float>(src[row * D + k]) : 0.f;
  }
}

// Adds the squares of each staged row to sq[row] (threads [0, ROWS) own one row each).
template <int ROWS>
__device__ __forceinline__ void add_squares(const float (&tile)[ROWS][kDc + 1], float* sq, int n) {
  const int r = threadIdx.x;
  if (r < ROWS && r < n) {
    float s = 0.f;
#pragma unroll 8
    for (int kk = 0; kk < kDc; ++kk) s = fmaf(tile[r][kk], tile[r][kk], s);
    sq[r] += s;
  }
}

// acc[r][t0 + c] += rows[r] . words[c] over one D slice, for the (kRows x kTc) pairs (ld: T + 1).
__device__ __forceinline__ void add_products(float* acc, int ld, const RowSlice& rows,
                                             const WordSlice& words, int t0, int nt) {
  for (int e = threadIdx.x; e < kRows * kTc; e += kThreads) {
    const int r = e / kTc, c = e % kTc;
    if (c < nt) {
      float s = 0.f;
#pragma unroll 8
      for (int kk = 0; kk < kDc; ++kk) s = fmaf(rows[r][kk], words[c][kk], s);
      acc[r * ld + t0 + c] += s;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float inv_norm(float sq) { return rsqrtf(fmaxf(sq, kNormEps)); }

// Words of the tile starting at t0: kTc, fewer in the last tile.
__device__ __forceinline__ int words_in_tile(int64_t T, int64_t t0) {
  return static_cast<int>(T - t0 < kTc ? T - t0 : kTc);
}

// Dynamic shared memory of one block: the (kRows x (T + 1)) tiles, then per-word values.
struct Dyn {
  float* s;   // (kRows, T + 1): q w^T, then P
  float* dp;  // (kRows, T + 1): g w^T, then A (backward only)
  float* iw;  // (T,): squared norms of the words, then their inverse norms (0 on padding)
};

__device__ __forceinline__ Dyn carve(float* base, int64_t T, bool backward) {
  const int64_t tile = kRows * (T + 1);
  return {base, backward ? base + tile : nullptr, base + (backward ? 2 : 1) * tile};
}

size_t dyn_bytes(int64_t T, bool backward) {
  return sizeof(float) * ((backward ? 2 : 1) * kRows * (T + 1) + T);
}

// Pass 1: raw products of the block's rows of x (and of y, when not null) with the words, the
// rows' squared norms (qsq) and the words' inverse norms (dyn.iw; 0 on padding).
template <typename scalar_t>
__device__ void pass1(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                      const scalar_t* __restrict__ w, const bool* __restrict__ mask,
                      int64_t row0, const Shape& sh, Dyn dyn, RowSlice& xs, RowSlice& ys,
                      WordSlice& ws, float* qsq) {
  const int ld = static_cast<int>(sh.T + 1);
  for (int e = threadIdx.x; e < kRows * ld; e += kThreads) {
    dyn.s[e] = 0.f;
    if (y != nullptr) dyn.dp[e] = 0.f;
  }
  for (int e = threadIdx.x; e < sh.T; e += kThreads) dyn.iw[e] = 0.f;
  if (threadIdx.x < kRows) qsq[threadIdx.x] = 0.f;
  for (int64_t k0 = 0; k0 < sh.D; k0 += kDc) {
    __syncthreads();  // the zero-fill above, or the previous slice's last reads of xs / ys
    stage<scalar_t, kRows>(xs, x, row0, sh.R, sh.D, k0);
    if (y != nullptr) stage<scalar_t, kRows>(ys, y, row0, sh.R, sh.D, k0);
    for (int64_t t0 = 0; t0 < sh.T; t0 += kTc) {
      const int nt = words_in_tile(sh.T, t0);
      stage<scalar_t, kTc>(ws, w, t0, sh.T, sh.D, k0, mask);
      __syncthreads();
      if (t0 == 0) add_squares<kRows>(xs, qsq, kRows);
      add_squares<kTc>(ws, dyn.iw + t0, nt);
      add_products(dyn.s, ld, xs, ws, static_cast<int>(t0), nt);
      if (y != nullptr) add_products(dyn.dp, ld, ys, ws, static_cast<int>(t0), nt);
      __syncthreads();  // the next tile overwrites ws
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < sh.T; t += kThreads) {
    dyn.iw[t] = mask[t] ? inv_norm(dyn.iw[t]) : 0.f;
  }
  __syncthreads();
}

// out[j] += sum_t coef[r][t] w^[t][kk] over the words, for this thread's 4 elements
// (r, kk) = (e / kDc, e % kDc), e = threadIdx.x + j kThreads, of a (kRows x kDc) output slice.
template <typename scalar_t>
__device__ void add_coef_times_words(float (&out)[4], const float* coef, int ld,
                                     const scalar_t* __restrict__ w, const bool* __restrict__ mask,
                                     const float* iw, const Shape& sh, int64_t k0, WordSlice& ws) {
  for (int64_t t0 = 0; t0 < sh.T; t0 += kTc) {
    const int nt = words_in_tile(sh.T, t0);
    stage<scalar_t, kTc>(ws, w, t0, sh.T, sh.D, k0, mask);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int e = threadIdx.x + j * kThreads;
      const int r = e / kDc, kk = e % kDc;
      float acc = out[j];
      for (int c = 0; c < nt; ++c) {
        acc = fmaf(coef[r * ld + t0 + c], ws[c][kk] * iw[t0 + c], acc);
      }
      out[j] = acc;
    }
    __syncthreads();  // the next tile overwrites ws
  }
}

// Writes this thread's 4 elements of a (kRows x kDc) slice of a (R x D) fp32 matrix.
__device__ __forceinline__ void store_slice(float* dst, const float (&v)[4], int64_t row0,
                                            int64_t k0, const Shape& sh) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int e = threadIdx.x + j * kThreads;
    const int64_t row = row0 + e / kDc, k = k0 + e % kDc;
    if (row < sh.R && k < sh.D) dst[row * sh.D + k] = v[j];
  }
}

// grid (row blocks, B). context (B, R, D) and lse (B, R) fp32.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    word_attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ w,
                                  const bool* __restrict__ mask, Shape sh, float rho,
                                  float* __restrict__ context, float* __restrict__ lse) {
  extern __shared__ float dyn_smem[];
  __shared__ RowSlice qs;
  __shared__ WordSlice ws;
  __shared__ float qsq[kRows];
  const int64_t b = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const scalar_t* qb = q + b * sh.R * sh.D;
  const scalar_t* wb = w + b * sh.T * sh.D;
  const bool* mb = mask + b * sh.T;
  const Dyn dyn = carve(dyn_smem, sh.T, false);
  const int ld = static_cast<int>(sh.T + 1);

  pass1<scalar_t>(qb, static_cast<const scalar_t*>(nullptr), wb, mb, row0, sh, dyn, qs, qs, ws,
                  qsq);

  // Masked softmax, one warp per row; the tile becomes P.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kRows; r += kWarps) {
    float* s = dyn.s + r * ld;
    const float scale = rho * inv_norm(qsq[r]);
    float m = -INFINITY;
    for (int t = lane; t < sh.T; t += 32) {
      s[t] = mb[t] ? scale * s[t] * dyn.iw[t] : -INFINITY;
      m = fmaxf(m, s[t]);
    }
    m = warp_max(m);  // finite: every caption has a valid word
    float sum = 0.f;
    for (int t = lane; t < sh.T; t += 32) {
      s[t] = expf(s[t] - m);  // 0 on padding
      sum += s[t];
    }
    sum = warp_sum(sum);
    for (int t = lane; t < sh.T; t += 32) s[t] /= sum;
    if (lane == 0 && row0 + r < sh.R) lse[b * sh.R + row0 + r] = m + logf(sum);
  }
  __syncthreads();

  // Pass 2: context = P w^.
  for (int64_t k0 = 0; k0 < sh.D; k0 += kDc) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    add_coef_times_words<scalar_t>(acc, dyn.s, ld, wb, mb, dyn.iw, sh, k0, ws);
    store_slice(context + b * sh.R * sh.D, acc, row0, k0, sh);
  }
}

// Backward epilogue, one warp per row: dp -> A = rho iq dS, s -> P; beta[r] = the coefficient
// of q_r in grad_q (-e iq^2, or 0 where the norm guard is active). Two passes over each row (the
// second recomputes P after the row reduction sum_t P dP).
__device__ void backward_epilogue(Dyn dyn, const bool* __restrict__ mb,
                                  const float* __restrict__ lse_b, const float* qsq, float* beta,
                                  int64_t row0, const Shape& sh, float rho) {
  const int ld = static_cast<int>(sh.T + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kRows; r += kWarps) {
    float* s = dyn.s + r * ld;
    float* dp = dyn.dp + r * ld;
    const bool live_row = row0 + r < sh.R;
    const float lse = live_row ? lse_b[row0 + r] : 0.f;
    const float iq = inv_norm(qsq[r]);
    const float scale = rho * iq;
    float dot = 0.f;
    for (int t = lane; t < sh.T; t += 32) {
      const bool live = live_row && mb[t];
      s[t] = live ? scale * s[t] * dyn.iw[t] : 0.f;  // s_rt (0 where P is 0)
      dp[t] *= dyn.iw[t];                            // g_r . w^_t
      if (live) dot += expf(s[t] - lse) * dp[t];
    }
    dot = warp_sum(dot);
    float e = 0.f;
    for (int t = lane; t < sh.T; t += 32) {
      const bool live = live_row && mb[t];
      const float p = live ? expf(s[t] - lse) : 0.f;
      const float ds = p * (dp[t] - dot);
      e += ds * s[t];
      s[t] = p;
      dp[t] = scale * ds;
    }
    e = warp_sum(e);
    if (lane == 0) beta[r] = qsq[r] >= kNormEps ? -e * iq * iq : 0.f;
  }
  __syncthreads();
}

// This block's share of grad w^ for one D slice: part[t][k0 + kk] = sum_r P[r][t] gs[r][kk] +
// A[r][t] qs[r][kk] over the block's rows (rows past R have P = A = 0).
__device__ void words_partial(float* part, const Dyn& dyn, const RowSlice& qs, const RowSlice& gs,
                              int64_t k0, const Shape& sh) {
  const int ld = static_cast<int>(sh.T + 1);
  for (int e = threadIdx.x; e < sh.T * kDc; e += kThreads) {
    const int t = e / kDc, kk = e % kDc;
    const int64_t k = k0 + kk;
    if (k >= sh.D) continue;
    float acc = 0.f;
#pragma unroll 8
    for (int r = 0; r < kRows; ++r) {
      acc = fmaf(dyn.s[r * ld + t], gs[r][kk], acc);
      acc = fmaf(dyn.dp[r * ld + t], qs[r][kk], acc);
    }
    part[t * sh.D + k] = acc;
  }
}

// grid (row blocks, B). grad_q (B, R, D) fp32; part (B, row blocks, T, D) fp32, fully written.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    word_attention_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ q,
                                   const scalar_t* __restrict__ w, const bool* __restrict__ mask,
                                   const float* __restrict__ lse, Shape sh, float rho,
                                   float* __restrict__ grad_q, float* __restrict__ part) {
  extern __shared__ float dyn_smem[];
  __shared__ RowSlice qs;
  __shared__ RowSlice gs;
  __shared__ WordSlice ws;
  __shared__ float qsq[kRows];
  __shared__ float beta[kRows];
  const int64_t b = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const scalar_t* qb = q + b * sh.R * sh.D;
  const scalar_t* gb = g + b * sh.R * sh.D;
  const scalar_t* wb = w + b * sh.T * sh.D;
  const bool* mb = mask + b * sh.T;
  const Dyn dyn = carve(dyn_smem, sh.T, true);
  const int ld = static_cast<int>(sh.T + 1);

  pass1<scalar_t>(qb, gb, wb, mb, row0, sh, dyn, qs, gs, ws, qsq);
  backward_epilogue(dyn, mb, lse + b * sh.R, qsq, beta, row0, sh, rho);

  float* part_b = part + (b * gridDim.x + blockIdx.x) * sh.T * sh.D;
  for (int64_t k0 = 0; k0 < sh.D; k0 += kDc) {
    stage<scalar_t, kRows>(qs, qb, row0, sh.R, sh.D, k0);
    stage<scalar_t, kRows>(gs, gb, row0, sh.R, sh.D, k0);
    __syncthreads();
    float acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int e = threadIdx.x + j * kThreads;
      acc[j] = beta[e / kDc] * qs[e / kDc][e % kDc];
    }
    add_coef_times_words<scalar_t>(acc, dyn.dp, ld, wb, mb, dyn.iw, sh, k0, ws);
    store_slice(grad_q + b * sh.R * sh.D, acc, row0, k0, sh);
    words_partial(part_b, dyn, qs, gs, k0, sh);
    __syncthreads();  // the next slice overwrites qs / gs
  }
}

// ---- host side ------------------------------------------------------------------------------

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

void check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& w, const at::Tensor& mask,
                  double rho) {
  TORCH_CHECK(q.is_cuda(), fn, ": queries must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(w.device() == q.device(), fn, ": words must be on the queries' device ", q.device(),
              ", got ", w.device());
  TORCH_CHECK(mask.device() == q.device(), fn, ": word_mask must be on the queries' device ",
              q.device(), ", got ", mask.device());
  check_word_attention_shapes(fn, q, w, mask, rho);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": queries must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(q.size(0) <= 65535, fn, ": B = ", q.size(0), " exceeds the supported 65535");
}

// Lets `kernel` use `bytes` of dynamic shared memory (opting in past the default 48 KB).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, size_t static_bytes, const char* fn) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes + static_bytes <= prop->sharedMemPerBlockOptin, fn,
              ": captions of this length need ", bytes + static_bytes, " bytes of shared memory "
              "per block, more than the device's ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// grad w from grad w^ (B, T, D) through the guarded normalisation; padding words get 0.
at::Tensor words_backward(const at::Tensor& words, const at::Tensor& mask,
                          const at::Tensor& grad_n) {
  // Padding words are zeroed (grad w^ is 0 there too), so their gradient is 0 whatever they hold.
  const at::Tensor w = words.to(at::kFloat).masked_fill(mask.logical_not().unsqueeze(-1), 0.0);
  const at::Tensor sq = w.pow(2).sum(-1, /*keepdim=*/true);
  const at::Tensor inv = at::rsqrt(sq.clamp_min(kNormEps));
  const at::Tensor w_n = w * inv;
  const at::Tensor keep = (sq >= kNormEps).to(at::kFloat);
  const at::Tensor proj = keep * (w_n * grad_n).sum(-1, /*keepdim=*/true);
  return inv * (grad_n - proj * w_n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> word_attention_forward_cuda(
    const at::Tensor& queries, const at::Tensor& words, const at::Tensor& word_mask, double rho) {
  constexpr const char* fn = "fastxmc::word_attention_forward (CUDA)";
  check_inputs(fn, queries, words, word_mask, rho);
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const at::Tensor q = queries.contiguous(), w = words.contiguous(), mask = word_mask.contiguous();
  const Shape sh{q.size(1), w.size(1), q.size(2)};
  const int64_t B = q.size(0);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor context = at::empty({B, sh.R, sh.D}, f32);
  at::Tensor lse = at::empty({B, sh.R}, f32);
  if (B == 0 || sh.R == 0) return {context, lse};
  const dim3 grid(static_cast<unsigned>(ceil_div(sh.R, kRows)), static_cast<unsigned>(B));
  const size_t smem = dyn_bytes(sh.T, false);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTXMC_WA_DISPATCH(q.scalar_type(), "word_attention_forward_cuda", [&] {
    auto kernel = word_attention_forward_kernel<scalar_t>;
    allow_dynamic_smem(kernel, smem, sizeof(RowSlice) + sizeof(WordSlice), fn);
    kernel<<<grid, kThreads, smem, stream>>>(q.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                             mask.data_ptr<bool>(), sh, static_cast<float>(rho),
                                             context.data_ptr<float>(), lse.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {context, lse};
}

std::tuple<at::Tensor, at::Tensor> word_attention_backward_cuda(
    const at::Tensor& grad_context, const at::Tensor& queries, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& lse, double rho) {
  constexpr const char* fn = "fastxmc::word_attention_backward (CUDA)";
  check_inputs(fn, queries, words, word_mask, rho);
  TORCH_CHECK(grad_context.device() == queries.device() && grad_context.sizes() == queries.sizes(),
              fn, ": grad_context must have the queries' shape ", queries.sizes(),
              " and device, got ", grad_context.sizes(), " on ", grad_context.device());
  TORCH_CHECK(lse.device() == queries.device() && lse.dim() == 2 &&
                  lse.size(0) == queries.size(0) && lse.size(1) == queries.size(1),
              fn, ": lse must be (B, R) on the queries' device, got ", lse.sizes());
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const at::Tensor q = queries.contiguous(), w = words.contiguous(), mask = word_mask.contiguous();
  const at::Tensor g = grad_context.to(q.scalar_type()).contiguous();
  const at::Tensor l = lse.to(at::kFloat).contiguous();
  const Shape sh{q.size(1), w.size(1), q.size(2)};
  const int64_t B = q.size(0);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor grad_q = at::empty({B, sh.R, sh.D}, f32);
  const int64_t blocks = ceil_div(sh.R, kRows);
  at::Tensor part = at::empty({B, blocks, sh.T, sh.D}, f32);
  if (B == 0 || sh.R == 0) return {grad_q, at::zeros({B, sh.T, sh.D}, f32)};
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(B));
  const size_t smem = dyn_bytes(sh.T, true);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTXMC_WA_DISPATCH(q.scalar_type(), "word_attention_backward_cuda", [&] {
    auto kernel = word_attention_backward_kernel<scalar_t>;
    allow_dynamic_smem(kernel, smem, 2 * sizeof(RowSlice) + sizeof(WordSlice), fn);
    kernel<<<grid, kThreads, smem, stream>>>(g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                             w.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
                                             l.data_ptr<float>(), sh, static_cast<float>(rho),
                                             grad_q.data_ptr<float>(), part.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, words_backward(w, mask, part.sum(1))};
}

}  // namespace fastxmc

TORCH_LIBRARY_IMPL(fastxmc, CUDA, m) {
  m.impl("word_attention_forward", &fastxmc::word_attention_forward_cuda);
  m.impl("word_attention_backward", &fastxmc::word_attention_backward_cuda);
}
