// CPU kernels of the fused word attention (contract and math: word_attention.h).
//
// Per batch element the work is a few thin GEMMs (R x T x D with T ~ 17..64), so the kernels
// parallelise over work items (b, range of region rows) and run single-threaded ATen GEMMs (MKL;
// sequential inside a parallel region) on each. An item walks its rows in chunks whose queries,
// upstream gradients and query gradients fit in L2 together (kChunkBytes), and per chunk:
//   forward:  the rows' inverse norms; G = q_c W^T (rows x T) into a per-thread buffer; the masked
//             softmax of rho iq G in place -> P and lse; context_c = P W, written in place.
//   backward: G = q_c W^T and dP = g_c W^T; a row epilogue turns them into P and A = rho iq dS and
//             gives each row's coefficient beta of the normalisation term;
//             grad_q_c = beta q_c + A W (a row-scaled copy of q, then one GEMM accumulating into
//             it); the item's grad W^ partial += P^T g_c + A^T q_c (skipped, with the words'
//             pass below, by word_attention_backward_queries: G's words are frozen embeddings).
// Queries and grad_context are read, and context and grad_queries written, in place in either of
// two layouts per batch element: rows (R x D, row-major) or channel-major (the transpose of a
// D x R block with contiguous rows: G's 16x16 conv output, flattened and transposed). The GEMMs
// take both as they are (BLAS transpose flags); the row helpers below walk either. So G's queries
// are not copied to rows, and its context comes back in the conv layout G reshapes it to.
// W (T x D) is the batch element's normalised words, padding rows zeroed, made once per b by a
// prologue; a last pass per b sums the items' partials and applies the words' normalisation
// backward. So q and g are read from memory once per pass, and beyond the inputs and outputs only
// O(B T D) is allocated (W, the partials) plus per-thread (chunk x T) scratch.
//
// The row loops below (sums of squares, row scaling, softmax epilogues) are plain C++; the
// softmax work is O(R T) per b against the GEMMs' O(R T D), so they are not hand-vectorised.
#include "word_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastxmc {
namespace {

constexpr double kNormEps = 1e-12;           // on |x|^2, as the reference code's l2_normalize
constexpr int64_t kChunkBytes = 1ll << 20;   // q, g and grad_q chunk of one item: half the L2
constexpr int64_t kSumLanes = 16;            // independent partial sums of sum_squares

// ---------------------------------------------------------------------------------------------
// Row helpers.
// ---------------------------------------------------------------------------------------------

// sum_i x_i^2, with kSumLanes interleaved partial sums (the compiler can vectorise them without
// reassociating anything).
template <typename scalar_t>
scalar_t sum_squares(const scalar_t* x, int64_t n) {
  scalar_t acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int64_t j = 0; j < kSumLanes; ++j) acc[j] += x[i + j] * x[i + j];
  }
  scalar_t s = 0;
  for (; i < n; ++i) s += x[i] * x[i];
  for (int64_t j = 0; j < kSumLanes; ++j) s += acc[j];
  return s;
}

// The guarded inverse norm rsqrt(max(|x|^2, eps)) of a row with squared norm sq, and whether the
// guard is inactive (the gradient then has the projection term; torch's clamp_min passes the
// gradient at equality).
template <typename scalar_t>
struct InvNorm {
  scalar_t inv;
  bool unclamped;
};

template <typename scalar_t>
InvNorm<scalar_t> inv_norm_of(scalar_t sq) {
  const scalar_t eps = static_cast<scalar_t>(kNormEps);
  return {scalar_t(1) / std::sqrt(std::max(sq, eps)), sq >= eps};
}

template <typename scalar_t>
InvNorm<scalar_t> inv_norm(const scalar_t* x, int64_t n) {
  return inv_norm_of(sum_squares(x, n));
}

// A (rows x D) block is walked along its rows when its columns are adjacent (stride(1) == 1),
// else it is channel-major (stride(0) == 1) and walked column by column, each column contiguous.
bool rows_contiguous(const at::Tensor& x) { return x.stride(1) == 1; }

// sq[r] = |x_r|^2 for every row of a (rows x D) block in either layout.
template <typename scalar_t>
void row_sum_squares(const at::Tensor& x, scalar_t* sq) {
  const int64_t rows = x.size(0), D = x.size(1);
  const scalar_t* p = x.data_ptr<scalar_t>();
  if (rows_contiguous(x)) {
    for (int64_t r = 0; r < rows; ++r) sq[r] = sum_squares(p + r * x.stride(0), D);
    return;
  }
  std::fill(sq, sq + rows, scalar_t(0));
  for (int64_t k = 0; k < D; ++k) {
    const scalar_t* col = p + k * x.stride(1);
    for (int64_t r = 0; r < rows; ++r) sq[r] += col[r] * col[r];
  }
}

// dst_r = scale[r] * src_r for every row of two (rows x D) blocks, each in either layout.
template <typename scalar_t>
void scale_rows(const at::Tensor& src, const scalar_t* scale, at::Tensor& dst) {
  const int64_t rows = src.size(0), D = src.size(1);
  const scalar_t* x = src.data_ptr<scalar_t>();
  scalar_t* y = dst.data_ptr<scalar_t>();
  const int64_t xr = src.stride(0), xk = src.stride(1), yr = dst.stride(0), yk = dst.stride(1);
  if (rows_contiguous(dst)) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < D; ++k) y[r * yr + k] = scale[r] * x[r * xr + k * xk];
    }
    return;
  }
  for (int64_t k = 0; k < D; ++k) {
    for (int64_t r = 0; r < rows; ++r) y[k * yk + r] = scale[r] * x[r * xr + k * xk];
  }
}

// In place: g[t] = q_r . w^_t on entry, P_rt on exit (0 on padding). Returns the row's lse of
// s_rt = scale * g[t] over the valid words (scale = rho * iq_r).
template <typename scalar_t>
scalar_t softmax_row(scalar_t* g, const bool* valid, int64_t T, scalar_t scale) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    if (valid[t]) m = std::max(m, scale * g[t]);
  }
  scalar_t sum = 0;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t e = valid[t] ? std::exp(scale * g[t] - m) : scalar_t(0);
    g[t] = e;
    sum += e;
  }
  const scalar_t inv = scalar_t(1) / sum;
  for (int64_t t = 0; t < T; ++t) g[t] *= inv;
  return m + std::log(sum);
}

// One row of the backward epilogue, in place: g[t] = q_r . w^_t -> P_rt and dp[t] = g_r . w^_t ->
// A_rt = scale * dS_rt (scale = rho * iq_r). p is T elements of scratch. Returns
// e_r = sum_t dS_rt s_rt (= q^_r . grad q^_r), from the unscaled g before it is overwritten.
template <typename scalar_t>
scalar_t backward_row(scalar_t* g, scalar_t* dp, scalar_t* p, const bool* valid, int64_t T,
                      scalar_t scale, scalar_t lse) {
  scalar_t dot = 0;  // sum_t P_rt dP_rt
  for (int64_t t = 0; t < T; ++t) {
    p[t] = valid[t] ? std::exp(scale * g[t] - lse) : scalar_t(0);
    dot += p[t] * dp[t];
  }
  scalar_t e = 0;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t ds = p[t] * (dp[t] - dot);
    e += ds * g[t];
    g[t] = p[t];
    dp[t] = scale * ds;
  }
  return scale * e;
}

// ---------------------------------------------------------------------------------------------
// Work layout and per-thread scratch.
// ---------------------------------------------------------------------------------------------

// Items are (b, split) with split in [0, splits); each covers `rows` region rows (the last one of
// a b fewer), walked in chunks of `chunk` rows.
struct Layout {
  int64_t chunk;
  int64_t splits;
  int64_t rows;  // per item, a multiple of chunk

  int64_t items(int64_t B) const { return B * splits; }
};

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <typename scalar_t>
Layout make_layout(int64_t B, int64_t R, int64_t D, int64_t nthreads) {
  const int64_t row_bytes = 3 * std::max<int64_t>(D, 1) * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t max_rows = std::max<int64_t>(16, kChunkBytes / row_bytes);
  const int64_t chunks = ceil_div(std::max<int64_t>(R, 1), max_rows);
  const int64_t chunk = ceil_div(std::max<int64_t>(R, 1), chunks);  // even chunks
  // Split R only when B alone gives fewer than 2 items per thread.
  const int64_t want = B >= 2 * nthreads ? 1 : ceil_div(2 * nthreads, std::max<int64_t>(B, 1));
  const int64_t splits = std::min(want, chunks);
  const int64_t rows = ceil_div(chunks, splits) * chunk;
  return {chunk, ceil_div(std::max<int64_t>(R, 1), rows), rows};
}

// Per-thread (chunk x T) buffers for the GEMM outputs, and per-row / per-word scratch.
template <typename scalar_t>
struct Scratch {
  at::Tensor g, dp, row, word;  // (threads, chunk, T) x 2, (threads, chunk), (threads, T)

  Scratch(int64_t nthreads, int64_t chunk, int64_t T, const at::TensorOptions& opts, bool backward)
      : g(at::empty({nthreads, chunk, T}, opts)),
        dp(backward ? at::empty({nthreads, chunk, T}, opts) : at::Tensor()),
        row(at::empty({nthreads, chunk}, opts)),
        word(at::empty({nthreads, T}, opts)) {}
};

// The normalised words W (B, T, D), their inverse norms and whether each word's norm guard is
// inactive (1) or active (0). Padding words are all 0, so they take no part in any product and
// get a zero gradient.
struct Words {
  at::Tensor normed, inv, unclamped;  // (B, T, D), (B, T), (B, T) in the working dtype
};

template <typename scalar_t>
Words normalise_words(const at::Tensor& words, const bool* mask) {
  const int64_t B = words.size(0), T = words.size(1), D = words.size(2);
  Words out{at::empty_like(words), at::empty({B, T}, words.options()),
            at::empty({B, T}, words.options())};
  const scalar_t* w = words.data_ptr<scalar_t>();
  scalar_t* wn = out.normed.data_ptr<scalar_t>();
  scalar_t* inv = out.inv.data_ptr<scalar_t>();
  scalar_t* keep = out.unclamped.data_ptr<scalar_t>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!mask[i]) {  // padding: zeros, whatever the values (even non-finite ones)
        std::fill(wn + i * D, wn + (i + 1) * D, scalar_t(0));
        inv[i] = keep[i] = scalar_t(0);
        continue;
      }
      const InvNorm<scalar_t> n = inv_norm(w + i * D, D);
      for (int64_t k = 0; k < D; ++k) wn[i * D + k] = w[i * D + k] * n.inv;
      inv[i] = n.inv;
      keep[i] = n.unclamped ? scalar_t(1) : scalar_t(0);
    }
  });
  return out;
}

// Runs body(item, thread) over the items, one item per task; GEMMs inside run single-threaded.
template <typename F>
void for_each_item(int64_t items, int64_t nthreads, const F& body) {
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // Worker threads start with the default dispatch state: skip the autograd layer here too.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < nthreads, "thread ", thread, " of ", nthreads);
    for (int64_t item = begin; item < end; ++item) body(item, thread);
  });
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_chunk(const at::Tensor& q_c, const at::Tensor& W, const bool* valid, scalar_t rho,
                   at::Tensor G, scalar_t* iq, scalar_t* lse, at::Tensor ctx_c) {
  const int64_t rows = q_c.size(0), T = W.size(0);
  row_sum_squares(q_c, iq);
  for (int64_t r = 0; r < rows; ++r) iq[r] = inv_norm_of(iq[r]).inv;
  at::mm_out(G, q_c, W.t());
  scalar_t* g = G.data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) lse[r] = softmax_row(g + r * T, valid, T, rho * iq[r]);
  at::mm_out(ctx_c, G, W);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& Q, const Words& words, const bool* mask, double rho,
                  at::Tensor& context, at::Tensor& lse) {
  const int64_t B = Q.size(0), R = Q.size(1), T = words.normed.size(1), D = Q.size(2);
  const int64_t nthreads = at::get_num_threads();
  const Layout lay = make_layout<scalar_t>(B, R, D, nthreads);
  const Scratch<scalar_t> scratch(nthreads, lay.chunk, T, Q.options(), /*backward=*/false);
  for_each_item(lay.items(B), nthreads, [&](int64_t item, int64_t thread) {
    const int64_t b = item / lay.splits;
    const int64_t end = std::min(R, (item % lay.splits + 1) * lay.rows);
    const at::Tensor W = words.normed.select(0, b);
    for (int64_t r0 = (item % lay.splits) * lay.rows; r0 < end; r0 += lay.chunk) {
      const int64_t rows = std::min(lay.chunk, end - r0);
      forward_chunk<scalar_t>(Q.select(0, b).narrow(0, r0, rows), W, mask + b * T,
                              static_cast<scalar_t>(rho),
                              scratch.g.select(0, thread).narrow(0, 0, rows),
                              scratch.row.select(0, thread).template data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>() + b * R + r0,
                              context.select(0, b).narrow(0, r0, rows));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

// One chunk's tensors: its rows of q, g and grad_q, and the item's (T x D) grad W^ partial
// (undefined when the words' gradient is not wanted).
struct BwdChunk {
  at::Tensor q, g, grad_q, part;
};

template <typename scalar_t>
void backward_chunk(const BwdChunk& c, const at::Tensor& W, const bool* valid, scalar_t rho,
                    const scalar_t* lse, at::Tensor G, at::Tensor dP, scalar_t* beta,
                    scalar_t* p_row) {
  const int64_t rows = c.q.size(0), T = W.size(0);
  at::mm_out(G, c.q, W.t());
  at::mm_out(dP, c.g, W.t());
  scalar_t* g = G.data_ptr<scalar_t>();
  scalar_t* dp = dP.data_ptr<scalar_t>();
  row_sum_squares(c.q, beta);  // |q_r|^2, replaced by beta_r row by row
  for (int64_t r = 0; r < rows; ++r) {
    const InvNorm<scalar_t> n = inv_norm_of(beta[r]);
    const scalar_t e = backward_row(g + r * T, dp + r * T, p_row, valid, T, rho * n.inv, lse[r]);
    beta[r] = n.unclamped ? -e * n.inv * n.inv : scalar_t(0);
  }
  // grad_q = beta q + A W: the row-scaled copy first, then one GEMM accumulating into it.
  at::Tensor grad_q = c.grad_q;
  scale_rows(c.q, beta, grad_q);
  at::addmm_out(grad_q, grad_q, dP, W);
  if (!c.part.defined()) return;
  // grad W^ += P^T g + A^T q.
  at::Tensor part = c.part;
  at::addmm_out(part, part, G.t(), c.g);
  at::addmm_out(part, part, dP.t(), c.q);
}

// grad_w_t = iw_t (grad W^_t - keep_t W_t (W_t . grad W^_t)) for one batch element, from the sum
// of its items' partials; padding words (W_t = 0, grad W^_t = 0) get 0.
template <typename scalar_t>
void words_backward(const at::Tensor& parts, const Words& words, int64_t b, at::Tensor grad_w_b) {
  const int64_t T = grad_w_b.size(0), D = grad_w_b.size(1);
  at::sum_out(grad_w_b, parts, {0});
  scalar_t* gw = grad_w_b.data_ptr<scalar_t>();
  const scalar_t* wn = words.normed.data_ptr<scalar_t>() + b * T * D;
  const scalar_t* inv = words.inv.data_ptr<scalar_t>() + b * T;
  const scalar_t* keep = words.unclamped.data_ptr<scalar_t>() + b * T;
  for (int64_t t = 0; t < T; ++t) {
    scalar_t* row = gw + t * D;
    const scalar_t* w = wn + t * D;
    scalar_t dot = 0;
    for (int64_t k = 0; k < D; ++k) dot += w[k] * row[k];
    const scalar_t proj = keep[t] * dot;
    for (int64_t k = 0; k < D; ++k) row[k] = inv[t] * (row[k] - proj * w[k]);
  }
}

template <typename scalar_t>
void backward_impl(const at::Tensor& Gc, const at::Tensor& Q, const Words& words,
                   const bool* mask, const at::Tensor& lse, double rho, at::Tensor& grad_q,
                   at::Tensor* grad_w) {
  const int64_t B = Q.size(0), R = Q.size(1), T = words.normed.size(1), D = Q.size(2);
  const int64_t nthreads = at::get_num_threads();
  const Layout lay = make_layout<scalar_t>(B, R, D, nthreads);
  const Scratch<scalar_t> scratch(nthreads, lay.chunk, T, Q.options(), /*backward=*/true);
  const at::Tensor parts = grad_w ? at::zeros({B, lay.splits, T, D}, Q.options()) : at::Tensor();
  for_each_item(lay.items(B), nthreads, [&](int64_t item, int64_t thread) {
    const int64_t b = item / lay.splits, split = item % lay.splits;
    const int64_t end = std::min(R, (split + 1) * lay.rows);
    const at::Tensor W = words.normed.select(0, b);
    for (int64_t r0 = split * lay.rows; r0 < end; r0 += lay.chunk) {
      const int64_t rows = std::min(lay.chunk, end - r0);
      const BwdChunk c{Q.select(0, b).narrow(0, r0, rows), Gc.select(0, b).narrow(0, r0, rows),
                       grad_q.select(0, b).narrow(0, r0, rows),
                       grad_w ? parts.select(0, b).select(0, split) : at::Tensor()};
      backward_chunk<scalar_t>(c, W, mask + b * T, static_cast<scalar_t>(rho),
                               lse.data_ptr<scalar_t>() + b * R + r0,
                               scratch.g.select(0, thread).narrow(0, 0, rows),
                               scratch.dp.select(0, thread).narrow(0, 0, rows),
                               scratch.row.select(0, thread).template data_ptr<scalar_t>(),
                               scratch.word.select(0, thread).template data_ptr<scalar_t>());
    }
  });
  if (!grad_w) return;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b = begin; b < end; ++b) {
      words_backward<scalar_t>(parts.select(0, b), words, b, grad_w->select(0, b));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks and dtype handling.
// ---------------------------------------------------------------------------------------------
void check_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

void check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& w,
                  const at::Tensor& mask, double rho) {
  check_cpu(fn, "queries", q);
  check_cpu(fn, "words", w);
  check_cpu(fn, "word_mask", mask);
  check_word_attention_shapes(fn, q, w, mask, rho);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, fn,
              ": queries must be float32, float16, bfloat16 or float64, got ", dt);
}

void check_rows(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_cpu(fn, name, t);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(1), fn, ": ", name,
              " must have shape (B, R) = (", q.size(0), ", ", q.size(1), "), got ", t.sizes());
}

// fp16/bf16/fp32 compute (and return) in fp32; fp64 stays fp64 (fp64 gradcheck).
at::ScalarType working_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous copy in the working dtype (no copy when t already is one), detached: the GEMMs run
// on OpenMP worker threads, and out= products refuse inputs that require grad.
at::Tensor working(const at::Tensor& t, at::ScalarType wt) {
  return t.detach().to(wt).contiguous();
}

// Whether (B, R, D) t is channel-major per batch element: the transpose of a (B, D, R) tensor whose
// (D, R) blocks are contiguous, as G's flattened and transposed conv output and the gradient that
// comes back to it are. fastxmc.ops.word_attention mirrors this test for its fake outputs.
bool channel_major(const at::Tensor& t) {
  return t.size(1) > 1 && t.size(2) > 1 && t.stride(1) == 1 && t.stride(2) == t.size(1);
}

// Like working(), but a channel-major t stays channel-major (the kernels read it in place).
at::Tensor working_rows(const at::Tensor& t, at::ScalarType wt) {
  const at::Tensor w = t.detach().to(wt);  // keeps a dense tensor's strides
  return channel_major(w) ? w : w.contiguous();
}

// An uninitialised (B, R, D) output in the layout of `like` (channel-major or contiguous).
at::Tensor empty_rows_like(const at::Tensor& like, const at::TensorOptions& opts) {
  if (!channel_major(like)) return at::empty(like.sizes(), opts);
  return at::empty({like.size(0), like.size(2), like.size(1)}, opts).transpose(1, 2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> word_attention_forward_cpu(
    const at::Tensor& queries, const at::Tensor& words, const at::Tensor& word_mask, double rho) {
  constexpr const char* fn = "word_attention_forward_cpu";
  check_inputs(fn, queries, words, word_mask, rho);
  const at::ScalarType wt = working_dtype(queries.scalar_type());
  const at::Tensor Q = working_rows(queries, wt), Wd = working(words, wt);
  const at::Tensor mask = word_mask.contiguous();
  at::Tensor context = empty_rows_like(queries, Q.options());
  at::Tensor lse = at::empty({Q.size(0), Q.size(1)}, Q.options());
  AT_DISPATCH_FLOATING_TYPES(wt, fn, [&] {
    const Words w = normalise_words<scalar_t>(Wd, mask.data_ptr<bool>());
    forward_impl<scalar_t>(Q, w, mask.data_ptr<bool>(), rho, context, lse);
  });
  return {context, lse};
}

namespace {

// The backward of both entry points; grad_w null: the queries' gradient only.
void backward_cpu(const char* fn, const at::Tensor& grad_context, const at::Tensor& queries,
                  const at::Tensor& words, const at::Tensor& word_mask, const at::Tensor& lse,
                  double rho, at::Tensor& grad_q, at::Tensor* grad_w) {
  check_inputs(fn, queries, words, word_mask, rho);
  check_cpu(fn, "grad_context", grad_context);
  TORCH_CHECK(grad_context.sizes() == queries.sizes(), fn, ": grad_context must have the queries' "
              "shape ", queries.sizes(), ", got ", grad_context.sizes());
  check_rows(fn, "lse", lse, queries);
  const at::ScalarType wt = working_dtype(queries.scalar_type());
  const at::Tensor Q = working_rows(queries, wt), Wd = working(words, wt);
  const at::Tensor Gc = working_rows(grad_context, wt), L = working(lse, wt);
  const at::Tensor mask = word_mask.contiguous();
  grad_q = empty_rows_like(queries, Q.options());
  if (grad_w) *grad_w = at::empty(Wd.sizes(), Wd.options());
  AT_DISPATCH_FLOATING_TYPES(wt, "word_attention_backward_cpu", [&] {
    const Words w = normalise_words<scalar_t>(Wd, mask.data_ptr<bool>());
    backward_impl<scalar_t>(Gc, Q, w, mask.data_ptr<bool>(), L, rho, grad_q, grad_w);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> word_attention_backward_cpu(
    const at::Tensor& grad_context, const at::Tensor& queries, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& lse, double rho) {
  at::Tensor grad_q, grad_w;
  backward_cpu("word_attention_backward_cpu", grad_context, queries, words, word_mask, lse, rho,
               grad_q, &grad_w);
  return {grad_q, grad_w};
}

at::Tensor word_attention_backward_queries_cpu(
    const at::Tensor& grad_context, const at::Tensor& queries, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& lse, double rho) {
  at::Tensor grad_q;
  backward_cpu("word_attention_backward_queries_cpu", grad_context, queries, words, word_mask, lse,
               rho, grad_q, nullptr);
  return grad_q;
}

}  // namespace fastxmc

TORCH_LIBRARY_FRAGMENT(fastxmc, m) {
  m.def("word_attention_forward(Tensor queries, Tensor words, Tensor word_mask, float rho) "
        "-> (Tensor, Tensor)");
  m.def("word_attention_backward(Tensor grad_context, Tensor queries, Tensor words, "
        "Tensor word_mask, Tensor lse, float rho) -> (Tensor, Tensor)");
  // The queries' gradient alone (G's word embeddings are frozen): CPU only.
  m.def("word_attention_backward_queries(Tensor grad_context, Tensor queries, Tensor words, "
        "Tensor word_mask, Tensor lse, float rho) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastxmc, CPU, m) {
  m.impl("word_attention_forward", &fastxmc::word_attention_forward_cpu);
  m.impl("word_attention_backward", &fastxmc::word_attention_backward_cpu);
  m.impl("word_attention_backward_queries", &fastxmc::word_attention_backward_queries_cpu);
}
