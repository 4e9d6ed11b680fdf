// CUDA implementation of the fused region-word similarity (contract and math: region_word.h).
//
// The host walks blocks of bi images (bi x B_cap T x R fp32 tiles, <= kTileBytes each) and runs,
// per block, cuBLAS GEMMs through ATen (fp32; TF32 only if the user enabled it for matmuls) and
// three fused row kernels, one warp per (image, caption word) row of R regions:
//   sim = wn rn_b^T              at::bmm, (bi, NW, R) with NW = B_cap T (padding rows included)
//   softmax_rows_kernel          A = softmax(gamma1 sim), p = rowsum(A sim)
//   H = A G_b                    at::bmm; G = rn rn^T (B_img, R, R) by the forward, saved
//   forward:  cos_rows_kernel    q = rowsum(A H), cos = p rsqrt(max(q, eps))
//             caption_lse_kernel S[i, j] = lse over caption j's real words of gamma2 cos, / gamma2
//   backward: backward_rows_kernel  q, cos, dcos, dp, dq, then sim <- dsim and H <- A dq in place
//             dG_b = (A dq)^T A, d wn += dsim_b rn_b, d rn_b = dsim_b^T wn + 2 dG_b rn_b (GEMMs)
// The normalisations and their backward are ATen element-wise ops. Working memory: three tiles
// plus O(B (R + T) d); never B x B x T x R. The same orchestration, in PyTorch, is the streaming
// backend (fastxmc/ops/streaming/region_word.py).
#include "region_word/region_word.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastxmc {
namespace {

constexpr float kNormEps = 1e-12f;          // on squared norms, as the reference's l2_normalize
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;            // warps (rows) per thread block
constexpr int kThreads = kRowsPerBlock * kWarp;
constexpr int kLseThreads = 256;
constexpr int64_t kTileBytes = 256ll << 20;  // one (bi, NW, R) fp32 tile; three are live

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Row index of this warp, or -1 past the last row. Whole warps exit together (shuffles stay safe).
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  return row < rows ? row : -1;
}

// attn = softmax over the R regions of gamma1 sim (attn may alias sim); p = rowsum(attn sim).
__global__ void softmax_rows_kernel(const float* sim, float* attn, float* __restrict__ p,
                                    int64_t rows, int R, float gamma1) {
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % kWarp;
  const float* s = sim + row * R;
  float* a = attn + row * R;
  float m = -INFINITY;
  for (int k = lane; k < R; k += kWarp) m = fmaxf(m, s[k]);
  m = warp_max(m);
  float z = 0.f, ps = 0.f;
  for (int k = lane; k < R; k += kWarp) {
    const float sk = s[k];
    const float e = expf(gamma1 * (sk - m));
    z += e;
    ps += e * sk;
    a[k] = e;  // each lane rewrites only the elements it read
  }
  const float inv = 1.f / warp_sum(z);
  ps = warp_sum(ps);
  for (int k = lane; k < R; k += kWarp) a[k] *= inv;
  if (lane == 0) p[row] = ps * inv;
}

// cos = p rsqrt(max(rowsum(attn h), eps)) per row.
__global__ void cos_rows_kernel(const float* __restrict__ attn, const float* __restrict__ h,
                                const float* __restrict__ p, float* __restrict__ cos, int64_t rows,
                                int R) {
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % kWarp;
  float q = 0.f;
  for (int k = lane; k < R; k += kWarp) q += attn[row * R + k] * h[row * R + k];
  q = warp_sum(q);
  if (lane == 0) cos[row] = p[row] * rsqrtf(fmaxf(q, kNormEps));
}

// S[b, j] = lse over the real words t of caption j of gamma2 cos[b, j T + t], / gamma2; a thread
// per (image of the block, caption). s points at the block's first row of S.
__global__ void caption_lse_kernel(const float* __restrict__ cos, const bool* __restrict__ mask,
                                   float* __restrict__ s, int64_t pairs, int64_t B_cap, int T,
                                   float gamma2) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kLseThreads + threadIdx.x;
  if (pair >= pairs) return;
  const int64_t j = pair % B_cap;
  const float* c = cos + pair * T;  // pair = b B_cap + j, so its rows start at b NW + j T
  const bool* valid = mask + j * T;
  float m = -INFINITY;
  for (int t = 0; t < T; ++t) {
    if (valid[t]) m = fmaxf(m, gamma2 * c[t]);
  }
  float sum = 0.f;
  for (int t = 0; t < T; ++t) {
    if (valid[t]) sum += expf(gamma2 * c[t] - m);
  }
  s[pair] = (m + logf(sum)) / gamma2;
}

// Per row (b, j, t): q, cos, dcos = grad_s[b, j] exp(gamma2 (cos - S[b, j])) on real words (0 on
// padding), dp, dq; then sim <- dsim = A (dp + gamma1 (dp sim + 2 dq H - dp p - 2 dq q)) and
// h <- A dq in place. grad_s / s point at the block's first row of (B_img, B_cap).
__global__ void backward_rows_kernel(float* sim, const float* __restrict__ attn, float* h,
                                     const float* __restrict__ p, const bool* __restrict__ mask,
                                     const float* __restrict__ grad_s, const float* __restrict__ s,
                                     int64_t rows, int64_t B_cap, int T, int R, float gamma1,
                                     float gamma2) {
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t nw = B_cap * T;
  const int64_t b = row / nw, word = row % nw, pair = b * B_cap + word / T;
  const float* a = attn + row * R;
  float* sr = sim + row * R;
  float* hr = h + row * R;
  float q = 0.f;
  for (int k = lane; k < R; k += kWarp) q += a[k] * hr[k];
  q = warp_sum(q);  // every lane has read its h before any lane overwrites it below
  const float u = rsqrtf(fmaxf(q, kNormEps));
  const float pr = p[row];
  const float dcos = mask[word] ? grad_s[pair] * expf(gamma2 * (pr * u - s[pair])) : 0.f;
  const float dp = dcos * u;
  const float dq = q > kNormEps ? -0.5f * dcos * pr * u * u * u : 0.f;
  const float row_dot = dp * pr + 2.f * dq * q;
  for (int k = lane; k < R; k += kWarp) {
    const float ak = a[k];
    const float d_attn = dp * sr[k] + 2.f * dq * hr[k];
    sr[k] = ak * (dp + gamma1 * (d_attn - row_dot));
    hr[k] = ak * dq;
  }
}

int64_t row_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
struct Normalized {
  at::Tensor x;    // fp32 input, contiguous
  at::Tensor inv;  // (..., 1) guarded inverse norms
  at::Tensor xn;   // x * inv
};

Normalized normalize(const at::Tensor& t) {
  Normalized n;
  n.x = t.detach().to(at::kFloat).contiguous();
  n.inv = at::rsqrt(n.x.pow(2).sum(-1, true).clamp_min(kNormEps));
  n.xn = n.x * n.inv;
  return n;
}

// u dxn - u^3 (x . dxn) x, the second term only where |x|^2 > eps.
at::Tensor normalize_backward(const Normalized& n, const at::Tensor& grad_xn) {
  const at::Tensor live = (n.x.pow(2).sum(-1, true) > kNormEps).to(at::kFloat);
  return n.inv * grad_xn - live * n.inv.pow(3) * (n.x * grad_xn).sum(-1, true) * n.x;
}

// Images per block so that one (bi, NW, R) fp32 tile stays within kTileBytes.
int64_t images_per_block(int64_t B_img, int64_t NW, int64_t R) {
  const int64_t per_image = std::max<int64_t>(1, NW * R * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(1, std::min(B_img, kTileBytes / per_image));
}

// The recomputed tiles of images [i0, i0 + bi): sim (bi, NW, R), attn, H = A G, p (bi, NW).
struct BlockTiles {
  at::Tensor rn, sim, attn, h, p;
};

BlockTiles block_tiles(const at::Tensor& rn, const at::Tensor& wn, const at::Tensor& gram,
                       int64_t i0, int64_t bi, float gamma1, bool keep_sim, cudaStream_t stream) {
  BlockTiles t;
  const int64_t NW = wn.size(0), R = rn.size(1);
  t.rn = rn.narrow(0, i0, bi);
  t.sim = at::bmm(wn.unsqueeze(0).expand({bi, NW, wn.size(1)}), t.rn.transpose(1, 2));
  t.attn = keep_sim ? at::empty_like(t.sim) : t.sim;
  t.p = at::empty({bi, NW}, t.sim.options());
  const int64_t rows = bi * NW;
  if (rows > 0) {
    softmax_rows_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(
        t.sim.data_ptr<float>(), t.attn.data_ptr<float>(), t.p.data_ptr<float>(), rows,
        static_cast<int>(R), gamma1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  t.h = at::bmm(t.attn, gram.narrow(0, i0, bi));
  return t;
}

void check_inputs(const char* fn, const at::Tensor& regions, const at::Tensor& words,
                  const at::Tensor& mask, double gamma1, double gamma2) {
  TORCH_CHECK(regions.is_cuda() && words.is_cuda() && mask.is_cuda(), fn,
              ": regions, words and word_mask must be CUDA tensors");
  TORCH_CHECK(words.device() == regions.device() && mask.device() == regions.device(), fn,
              ": regions, words and word_mask must be on one device");
  TORCH_CHECK(regions.dim() == 3 && words.dim() == 3, fn, ": regions (B, R, d) and words (B, T, d) "
              "must be 3-D, got ", regions.sizes(), " and ", words.sizes());
  TORCH_CHECK(regions.size(2) == words.size(2), fn, ": regions ", regions.sizes(), " and words ",
              words.sizes(), " must have the same d");
  TORCH_CHECK(regions.size(1) > 0 && words.size(1) > 0, fn, ": R and T must be positive");
  const auto dt = regions.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": regions must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(words.scalar_type() == dt, fn, ": regions and words must have the same dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                  mask.size(0) == words.size(0) && mask.size(1) == words.size(1),
              fn, ": word_mask must be a bool (B, T) tensor matching words, got ",
              mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(gamma1 > 0 && gamma2 > 0, fn, ": gamma1 and gamma2 must be positive");
  // Checked on the host (one sync): an all-padding caption would make S = -inf.
  TORCH_CHECK(mask.numel() == 0 || mask.any(1).all().item<bool>(), fn,
              ": every caption of word_mask needs at least one real token");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> region_word_forward_cuda(const at::Tensor& regions,
                                                           const at::Tensor& words,
                                                           const at::Tensor& word_mask,
                                                           double gamma1, double gamma2) {
  const char* fn = "region_word_forward_cuda";
  check_inputs(fn, regions, words, word_mask, gamma1, gamma2);
  const c10::cuda::CUDAGuard device_guard(regions.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B_img = regions.size(0), R = regions.size(1), D = regions.size(2);
  const int64_t B_cap = words.size(0), T = words.size(1), NW = B_cap * T;
  const at::Tensor rn = normalize(regions).xn;
  const at::Tensor wn = normalize(words).xn.view({NW, D});
  const at::Tensor mask = word_mask.contiguous();
  at::Tensor S = at::empty({B_img, B_cap}, rn.options());
  const at::Tensor gram = at::bmm(rn, rn.transpose(1, 2));
  const int64_t bi_max = images_per_block(B_img, NW, R);
  for (int64_t i0 = 0; i0 < B_img; i0 += bi_max) {
    const int64_t bi = std::min(bi_max, B_img - i0);
    const BlockTiles t =
        block_tiles(rn, wn, gram, i0, bi, static_cast<float>(gamma1), false, stream);
    at::Tensor cos = at::empty({bi, NW}, rn.options());
    cos_rows_kernel<<<row_blocks(bi * NW), kThreads, 0, stream>>>(
        t.attn.data_ptr<float>(), t.h.data_ptr<float>(), t.p.data_ptr<float>(),
        cos.data_ptr<float>(), bi * NW, static_cast<int>(R));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t pairs = bi * B_cap;
    caption_lse_kernel<<<(pairs + kLseThreads - 1) / kLseThreads, kLseThreads, 0, stream>>>(
        cos.data_ptr<float>(), mask.data_ptr<bool>(), S.data_ptr<float>() + i0 * B_cap, pairs,
        B_cap, static_cast<int>(T), static_cast<float>(gamma2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {S, gram};
}

std::tuple<at::Tensor, at::Tensor> region_word_backward_cuda(
    const at::Tensor& grad_s, const at::Tensor& regions, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& s, const at::Tensor& gram, double gamma1,
    double gamma2) {
  const char* fn = "region_word_backward_cuda";
  check_inputs(fn, regions, words, word_mask, gamma1, gamma2);
  const int64_t B_img = regions.size(0), R = regions.size(1), D = regions.size(2);
  const int64_t B_cap = words.size(0), T = words.size(1), NW = B_cap * T;
  for (const auto* t : {&grad_s, &s}) {
    TORCH_CHECK(t->is_cuda() && t->dim() == 2 && t->size(0) == B_img && t->size(1) == B_cap, fn,
                ": grad_s and s must be CUDA (", B_img, ", ", B_cap, ") tensors, got ",
                t->sizes());
  }
  TORCH_CHECK(gram.is_cuda() && gram.dim() == 3 && gram.size(0) == B_img && gram.size(1) == R &&
                  gram.size(2) == R,
              fn, ": gram must be the forward's (", B_img, ", ", R, ", ", R, ") CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(regions.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Normalized r = normalize(regions), w = normalize(words);
  const at::Tensor G = gram.detach().to(at::kFloat).contiguous();
  const at::Tensor wn = w.xn.view({NW, D});
  const at::Tensor mask = word_mask.contiguous();
  const at::Tensor gs = grad_s.detach().to(at::kFloat).contiguous();
  const at::Tensor S = s.detach().to(at::kFloat).contiguous();
  at::Tensor d_wn = at::zeros({NW, D}, wn.options());
  at::Tensor d_rn = at::empty_like(r.xn);
  const int64_t bi_max = images_per_block(B_img, NW, R);
  for (int64_t i0 = 0; i0 < B_img; i0 += bi_max) {
    const int64_t bi = std::min(bi_max, B_img - i0);
    BlockTiles t = block_tiles(r.xn, wn, G, i0, bi, static_cast<float>(gamma1), true, stream);
    backward_rows_kernel<<<row_blocks(bi * NW), kThreads, 0, stream>>>(
        t.sim.data_ptr<float>(), t.attn.data_ptr<float>(), t.h.data_ptr<float>(),
        t.p.data_ptr<float>(), mask.data_ptr<bool>(), gs.data_ptr<float>() + i0 * B_cap,
        S.data_ptr<float>() + i0 * B_cap, bi * NW, B_cap, static_cast<int>(T),
        static_cast<int>(R), static_cast<float>(gamma1), static_cast<float>(gamma2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor& dsim = t.sim;                              // (bi, NW, R)
    const at::Tensor dgram = at::bmm(t.h.transpose(1, 2), t.attn);  // (A dq)^T A: (bi, R, R)
    for (int64_t b = 0; b < bi; ++b) d_wn.addmm_(dsim[b], t.rn[b]);
    at::Tensor d_rn_blk = d_rn.narrow(0, i0, bi);
    at::bmm_out(d_rn_blk, dsim.transpose(1, 2), wn.unsqueeze(0).expand({bi, NW, D}));
    d_rn_blk.baddbmm_(dgram, t.rn, 1, 2);
  }
  at::Tensor grad_regions = normalize_backward(r, d_rn);
  at::Tensor grad_words = normalize_backward(w, d_wn.view({B_cap, T, D}));
  return {grad_regions, grad_words};
}

}  // namespace fastxmc

TORCH_LIBRARY_IMPL(fastxmc, CUDA, m) {
  m.impl("region_word_forward", &fastxmc::region_word_forward_cuda);
  m.impl("region_word_backward", &fastxmc::region_word_backward_cuda);
}
