// CPU kernels of the fused region-word similarity (contract: region_word.h).
//
// Padding words never enter a GEMM: the valid words of all captions are packed, normalised, into
// one V x d matrix wn (caption j owns rows off[j] .. off[j + 1]). Images are split across threads
// (at::parallel_for, static ranges: the per-thread d wn partials are summed in a fixed order, so
// results are deterministic); for each of its images i a thread builds rn_i (R x d) and
// G_i = rn_i rn_i^T (forward; saved as the gram output for the backward), then walks chunks of
// whole captions (<= kChunkRows packed rows, so that a tile stays in L2) with single-threaded
// ATen/MKL GEMMs on its own buffers and fused row epilogues:
//   sim = wn_chunk rn_i^T -> (A, p) = softmax epilogue -> H = A G_i -> q, cos
//   forward:  S[i, j] = lse over caption j's rows of gamma2 cos, / gamma2
//   backward: sim <- dsim and H <- A * dq in place, then dG_i += (A dq)^T A,
//             d wn_chunk += dsim rn_i (per-thread partial), d rn_i += dsim^T wn_chunk;
//             after the last chunk d rn_i += 2 dG_i rn_i and the normalisation's backward.
// Forward + backward = 4 GEMMs of V x R x d per image (sim twice, d wn, d rn), 3 of V x R x R
// (H twice, dG) and 2 of R x R x d (G, dG rn); working memory O(threads x (kChunkRows R + R d +
// V d)) plus the saved B R^2 gram, never B x B x T x R.
//
// Two epilogue implementations: a portable scalar one (fp64, and fp32 on CPUs without AVX-512)
// and an AVX-512 one for fp32, chosen at run time; FASTXMC_CPU_NO_AVX512=1 forces the scalar one.
#include "region_word.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FXMC_RW_AVX512 1
#include <immintrin.h>
#else
#define FXMC_RW_AVX512 0
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace fastxmc {
namespace {

constexpr double kNormEps = 1e-12;   // on the squared norm, as the reference's l2_normalize
// Packed word rows per tile: 2048 x R=256 fp32 = 2 MB. Bigger tiles mean fewer GEMM calls (MKL
// packs both operands on every call): 2048 rows measured 12% less CPU time than 512 at B = 64.
constexpr int64_t kChunkRows = 2048;

// The valid words, normalised and packed, with where they came from.
struct PackedWords {
  at::Tensor wn;              // (V, d) normalised valid words, working dtype
  at::Tensor inv;             // (V) their guarded inverse norms
  std::vector<int64_t> off;   // (B_cap + 1) first packed row of each caption
  std::vector<int64_t> src;   // (V) flat index j * T + t of each packed row in words
};

// Chunks of whole captions [j0, j1) with at most kChunkRows packed rows (or a single caption).
std::vector<std::pair<int64_t, int64_t>> caption_chunks(const std::vector<int64_t>& off) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  const int64_t n = static_cast<int64_t>(off.size()) - 1;
  int64_t j0 = 0;
  while (j0 < n) {
    int64_t j1 = j0 + 1;
    while (j1 < n && off[j1 + 1] - off[j0] <= kChunkRows) ++j1;
    chunks.emplace_back(j0, j1);
    j0 = j1;
  }
  return chunks;
}

int64_t max_chunk_rows(const std::vector<std::pair<int64_t, int64_t>>& chunks,
                       const std::vector<int64_t>& off) {
  int64_t rows = 1;
  for (const auto& c : chunks) rows = std::max(rows, off[c.second] - off[c.first]);
  return rows;
}

// ---------------------------------------------------------------------------------------------
// Row epilogues (one packed word row of R regions, or one d-vector): portable scalar versions
// (fp64, and fp32 on CPUs without AVX-512).
// ---------------------------------------------------------------------------------------------

// attn = softmax(gamma1 sim) over the row; returns p = sum_k attn_k sim_k.
template <typename T>
T softmax_row_scalar(const T* sim, T* attn, int64_t R, T gamma1) {
  T m = sim[0];
  for (int64_t k = 1; k < R; ++k) m = std::max(m, sim[k]);
  double z = 0, ps = 0;
  for (int64_t k = 0; k < R; ++k) {
    const T e = std::exp(gamma1 * (sim[k] - m));
    attn[k] = e;
    z += e;
    ps += static_cast<double>(e) * sim[k];
  }
  const T inv = static_cast<T>(1.0 / z);
  for (int64_t k = 0; k < R; ++k) attn[k] *= inv;
  return static_cast<T>(ps / z);
}

template <typename T>
double dot_row_scalar(const T* a, const T* b, int64_t n) {
  double acc = 0;
  for (int64_t k = 0; k < n; ++k) acc += static_cast<double>(a[k]) * b[k];
  return acc;
}

// The per-row coefficients of the backward epilogue.
template <typename T>
struct EpilogueRow {
  T dp, dq;     // d loss / d p_t and d loss / d q_t
  T row_dot;    // sum_k A_tk dA_tk = dp p + 2 dq q
  T gamma1;
};

// In place: sim <- dsim = A (dp + gamma1 (dp sim + 2 dq H - row_dot)), h <- A dq.
template <typename T>
void backward_row_scalar(const EpilogueRow<T>& c, T* sim, const T* attn, T* h, int64_t R) {
  const T two_dq = 2 * c.dq;
  for (int64_t k = 0; k < R; ++k) {
    const T a = attn[k];
    const T d_attn = c.dp * sim[k] + two_dq * h[k];
    sim[k] = a * (c.dp + c.gamma1 * (d_attn - c.row_dot));
    h[k] = a * c.dq;
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 fp32 versions (16 lanes; the tail of a row is handled with lane masks). Every function
// here carries the target attribute, so the intrinsics compile without -mavx512f for the file.
// ---------------------------------------------------------------------------------------------
#if FXMC_RW_AVX512
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h initialises its "undefined" vectors from themselves (the
// _mm512_undefined_ps idiom), which -Wall reports in every masked or reducing intrinsic.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define FXMC_RW_AVX512_FN __attribute__((target("avx512f,avx512dq,fma")))
#define FXMC_RW_AVX512_INLINE FXMC_RW_AVX512_FN inline __attribute__((always_inline))

constexpr int64_t kLanes = 16;

// Lanes [0, n) of a chunk: all 16 for a full chunk.
FXMC_RW_AVX512_INLINE __mmask16 first_lanes(int64_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// exp of 16 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2_hi),
// exp(r) by its degree-7 Taylor polynomial (truncation < 6e-9 relative), times 2^n with scalef.
// x < -87 (a subnormal or zero result) gives 0; NaN propagates (max/min return their second
// operand when it is NaN). Every caller passes x <= 0.
FXMC_RW_AVX512_INLINE __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(lo, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

FXMC_RW_AVX512_FN float softmax_row_avx512(const float* sim, float* attn, int64_t R,
                                           float gamma1) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t k = 0; k < R; k += kLanes) {
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, first_lanes(R - k), sim + k));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), g = _mm512_set1_ps(gamma1);
  __m512 z = _mm512_setzero_ps(), ps = _mm512_setzero_ps();
  for (int64_t k = 0; k < R; k += kLanes) {
    const __mmask16 lanes = first_lanes(R - k);
    const __m512 s = _mm512_maskz_loadu_ps(lanes, sim + k);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_mul_ps(g, _mm512_sub_ps(s, m))));
    _mm512_mask_storeu_ps(attn + k, lanes, e);
    z = _mm512_add_ps(z, e);
    ps = _mm512_fmadd_ps(e, s, ps);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(z);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < R; k += kLanes) {
    const __mmask16 lanes = first_lanes(R - k);
    _mm512_mask_storeu_ps(attn + k, lanes,
                          _mm512_mul_ps(vinv, _mm512_maskz_loadu_ps(lanes, attn + k)));
  }
  return _mm512_reduce_add_ps(ps) * inv;
}

FXMC_RW_AVX512_FN double dot_row_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + kLanes), _mm512_loadu_ps(b + k + kLanes), acc1);
  }
  for (; k < n; k += kLanes) {
    const __mmask16 lanes = first_lanes(n - k);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, a + k), _mm512_maskz_loadu_ps(lanes, b + k),
                           acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

FXMC_RW_AVX512_FN void backward_row_avx512(const EpilogueRow<float>& c, float* sim,
                                           const float* attn, float* h, int64_t R) {
  const __m512 dp = _mm512_set1_ps(c.dp), dq = _mm512_set1_ps(c.dq);
  const __m512 two_dq = _mm512_set1_ps(2 * c.dq), g = _mm512_set1_ps(c.gamma1);
  const __m512 row_dot = _mm512_set1_ps(c.row_dot);
  for (int64_t k = 0; k < R; k += kLanes) {
    const __mmask16 lanes = first_lanes(R - k);
    const __m512 a = _mm512_maskz_loadu_ps(lanes, attn + k);
    const __m512 s = _mm512_maskz_loadu_ps(lanes, sim + k);
    const __m512 hh = _mm512_maskz_loadu_ps(lanes, h + k);
    const __m512 d_attn = _mm512_fmadd_ps(dp, s, _mm512_mul_ps(two_dq, hh));
    const __m512 inner = _mm512_fmadd_ps(g, _mm512_sub_ps(d_attn, row_dot), dp);
    _mm512_mask_storeu_ps(sim + k, lanes, _mm512_mul_ps(a, inner));
    _mm512_mask_storeu_ps(h + k, lanes, _mm512_mul_ps(a, dq));
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FXMC_RW_AVX512

// ---------------------------------------------------------------------------------------------
// Dispatch: AVX-512 for fp32 where the CPU has it, unless FASTXMC_CPU_NO_AVX512 is set.
// ---------------------------------------------------------------------------------------------
bool use_avx512() {
#if FXMC_RW_AVX512
  static const bool yes = [] {
    const char* off = std::getenv("FASTXMC_CPU_NO_AVX512");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           !(off != nullptr && off[0] != '\0' && off[0] != '0');
  }();
  return yes;
#else
  return false;
#endif
}

float softmax_row(const float* sim, float* attn, int64_t R, float gamma1) {
#if FXMC_RW_AVX512
  if (use_avx512()) return softmax_row_avx512(sim, attn, R, gamma1);
#endif
  return softmax_row_scalar(sim, attn, R, gamma1);
}

double softmax_row(const double* sim, double* attn, int64_t R, double gamma1) {
  return softmax_row_scalar(sim, attn, R, gamma1);
}

double dot_row(const float* a, const float* b, int64_t n) {
#if FXMC_RW_AVX512
  if (use_avx512()) return dot_row_avx512(a, b, n);
#endif
  return dot_row_scalar(a, b, n);
}

double dot_row(const double* a, const double* b, int64_t n) { return dot_row_scalar(a, b, n); }

void backward_row(const EpilogueRow<float>& c, float* sim, const float* attn, float* h,
                  int64_t R) {
#if FXMC_RW_AVX512
  if (use_avx512()) return backward_row_avx512(c, sim, attn, h, R);
#endif
  backward_row_scalar(c, sim, attn, h, R);
}

void backward_row(const EpilogueRow<double>& c, double* sim, const double* attn, double* h,
                  int64_t R) {
  backward_row_scalar(c, sim, attn, h, R);
}

// ---------------------------------------------------------------------------------------------
// The L2 normalisation x -> x rsqrt(max(|x|^2, eps)) of d-vectors, and its backward.
// ---------------------------------------------------------------------------------------------
double guarded_inverse_norm(double n2) { return 1.0 / std::sqrt(std::max(n2, kNormEps)); }

template <typename T>
void normalize_row(const T* x, int64_t d, T* out, T* inv_out) {
  const double inv = guarded_inverse_norm(dot_row(x, x, d));
  const T u = static_cast<T>(inv);
  for (int64_t k = 0; k < d; ++k) out[k] = x[k] * u;
  if (inv_out != nullptr) *inv_out = u;
}

// In place: g <- u g - u^3 (x . g) x, the gradient through the normalisation (the second term
// only where the guard is inactive, |x|^2 > eps).
template <typename T>
void normalize_backward_row(const T* x, T* g, int64_t d) {
  const double n2 = dot_row(x, x, d);
  const double u = guarded_inverse_norm(n2);
  const double c = n2 > kNormEps ? u * u * u * dot_row(x, g, d) : 0.0;
  const T uu = static_cast<T>(u), cc = static_cast<T>(c);
  for (int64_t k = 0; k < d; ++k) g[k] = uu * g[k] - cc * x[k];
}

template <typename T>
PackedWords pack_words(const at::Tensor& words, const at::Tensor& mask) {
  const int64_t B = words.size(0), Tw = words.size(1), D = words.size(2);
  PackedWords pw;
  pw.off.assign(B + 1, 0);
  const bool* m = mask.data_ptr<bool>();
  for (int64_t j = 0; j < B; ++j) {
    for (int64_t t = 0; t < Tw; ++t) {
      if (m[j * Tw + t]) pw.src.push_back(j * Tw + t);
    }
    pw.off[j + 1] = static_cast<int64_t>(pw.src.size());
    TORCH_CHECK(pw.off[j + 1] > pw.off[j], "region_word: word_mask row ", j,
                " has no real token (all padding); every caption needs at least one");
  }
  const int64_t V = pw.off[B];
  pw.wn = at::empty({V, D}, words.options());
  pw.inv = at::empty({V}, words.options());
  const T* w = words.data_ptr<T>();
  T* wn = pw.wn.data_ptr<T>();
  T* inv = pw.inv.data_ptr<T>();
  at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) normalize_row(w + pw.src[v] * D, D, wn + v * D, inv + v);
  });
  return pw;
}

// Per-thread buffers of one image at a time.
template <typename T>
struct ImageTiles {
  at::Tensor rn;    // (R, d) normalised regions of the image
  at::Tensor gram;  // (R, R) rn rn^T: a view of the forward's gram output
  at::Tensor sim;   // (rows, R) similarities; dsim in the backward
  at::Tensor attn;  // (rows, R) attention
  at::Tensor h;     // (rows, R) A G; A * dq in the backward
  std::vector<T> p, q;

  ImageTiles(int64_t R, int64_t D, int64_t rows, const at::TensorOptions& opts)
      : rn(at::empty({R, D}, opts)),
        sim(at::empty({rows, R}, opts)), attn(at::empty({rows, R}, opts)),
        h(at::empty({rows, R}, opts)), p(rows), q(rows) {}

  // rn of image x_i (R x d, contiguous) and its Gram matrix gram_i (R x R): computed here in the
  // forward, saved by the forward for the backward.
  void load_image(const T* x_i, const at::Tensor& gram_i, bool compute_gram) {
    const int64_t R = rn.size(0), D = rn.size(1);
    T* out = rn.data_ptr<T>();
    for (int64_t k = 0; k < R; ++k) {
      normalize_row(x_i + k * D, D, out + k * D, static_cast<T*>(nullptr));
    }
    gram = gram_i;
    if (compute_gram) at::mm_out(gram, rn, rn.t());
  }

  // Tiles of the packed rows [r0, r0 + rows): sim, A, H and p, q.
  void compute(const at::Tensor& wn, int64_t r0, int64_t rows, T gamma1) {
    const int64_t R = rn.size(0);
    at::Tensor s = sim.narrow(0, 0, rows), a = attn.narrow(0, 0, rows), hh = h.narrow(0, 0, rows);
    at::mm_out(s, wn.narrow(0, r0, rows), rn.t());
    T* sp = s.data_ptr<T>();
    T* ap = a.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      p[r] = softmax_row(sp + r * R, ap + r * R, R, gamma1);
    }
    at::mm_out(hh, a, gram);
    const T* hp = hh.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) q[r] = static_cast<T>(dot_row(ap + r * R, hp + r * R, R));
  }

  T cos(int64_t r) const {
    return static_cast<T>(p[r] / std::sqrt(std::max(static_cast<double>(q[r]), kNormEps)));
  }
};

// S[i, j] for the captions [j0, j1) of a chunk whose first packed row is r0.
template <typename T>
void chunk_similarity(const ImageTiles<T>& tiles, const std::vector<int64_t>& off, int64_t j0,
                      int64_t j1, double gamma2, T* s_row) {
  const int64_t r0 = off[j0];
  for (int64_t j = j0; j < j1; ++j) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t r = off[j] - r0; r < off[j + 1] - r0; ++r) m = std::max(m, gamma2 * tiles.cos(r));
    double sum = 0;
    for (int64_t r = off[j] - r0; r < off[j + 1] - r0; ++r) {
      sum += std::exp(gamma2 * tiles.cos(r) - m);
    }
    s_row[j] = static_cast<T>((m + std::log(sum)) / gamma2);
  }
}

// Backward epilogue of a chunk: sim <- dsim and h <- A dq, for image i's row of grad_s and S.
template <typename T>
void chunk_backward_epilogue(ImageTiles<T>& tiles, const std::vector<int64_t>& off, int64_t j0,
                             int64_t j1, const T* grad_s_row, const T* s_row, T gamma1,
                             T gamma2) {
  const int64_t R = tiles.rn.size(0), r0 = off[j0];
  T* sp = tiles.sim.template data_ptr<T>();
  const T* ap = tiles.attn.template data_ptr<T>();
  T* hp = tiles.h.template data_ptr<T>();
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t r = off[j] - r0; r < off[j + 1] - r0; ++r) {
      const double q = tiles.q[r], p = tiles.p[r];
      const double u = 1.0 / std::sqrt(std::max(q, kNormEps));
      const double dcos = grad_s_row[j] * std::exp(gamma2 * (static_cast<double>(tiles.cos(r)) -
                                                              s_row[j]));
      const double dp = dcos * u;
      const double dq = q > kNormEps ? -0.5 * dcos * p * u * u * u : 0.0;
      const EpilogueRow<T> row{static_cast<T>(dp), static_cast<T>(dq),
                               static_cast<T>(dp * p + 2 * dq * q), gamma1};
      backward_row(row, sp + r * R, ap + r * R, hp + r * R, R);
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& X, const PackedWords& pw, double gamma1, double gamma2,
                  at::Tensor& S, at::Tensor& gram) {
  const int64_t B_img = X.size(0), R = X.size(1), D = X.size(2), B_cap = S.size(1);
  const auto chunks = caption_chunks(pw.off);
  const int64_t rows = max_chunk_rows(chunks, pw.off);
  const T* x = X.data_ptr<T>();
  T* s = S.data_ptr<T>();
  at::parallel_for(0, B_img, 1, [&](int64_t i0, int64_t i1) {
    // Worker threads start with the default dispatch state: skip the autograd layer here too.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ImageTiles<T> tiles(R, D, rows, X.options());
    for (int64_t i = i0; i < i1; ++i) {
      tiles.load_image(x + i * R * D, gram.select(0, i), /*compute_gram=*/true);
      for (const auto& [j0, j1] : chunks) {
        tiles.compute(pw.wn, pw.off[j0], pw.off[j1] - pw.off[j0], static_cast<T>(gamma1));
        chunk_similarity(tiles, pw.off, j0, j1, gamma2, s + i * B_cap);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_s, const at::Tensor& X, const at::Tensor& W,
                   const PackedWords& pw, const at::Tensor& S, const at::Tensor& gram,
                   double gamma1, double gamma2, at::Tensor& grad_x, at::Tensor& grad_w) {
  const int64_t B_img = X.size(0), R = X.size(1), D = X.size(2), B_cap = S.size(1);
  const int64_t V = pw.wn.size(0);
  const auto chunks = caption_chunks(pw.off);
  const int64_t rows = max_chunk_rows(chunks, pw.off);
  const int64_t nthreads = at::get_num_threads();
  const T* x = X.data_ptr<T>();
  // d wn summed over images: one partial per thread, added in thread order (deterministic).
  at::Tensor dwn_part = at::zeros({nthreads, V, D}, X.options());
  at::parallel_for(0, B_img, 1, [&](int64_t i0, int64_t i1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid < nthreads, "thread ", tid, " of ", nthreads);
    ImageTiles<T> tiles(R, D, rows, X.options());
    at::Tensor dgram = at::empty({R, R}, X.options());
    at::Tensor dwn = dwn_part.select(0, tid);
    for (int64_t i = i0; i < i1; ++i) {
      tiles.load_image(x + i * R * D, gram.select(0, i), /*compute_gram=*/false);
      at::Tensor drn = grad_x.select(0, i);
      bool first = true;
      for (const auto& [j0, j1] : chunks) {
        const int64_t r0 = pw.off[j0], n = pw.off[j1] - r0;
        tiles.compute(pw.wn, r0, n, static_cast<T>(gamma1));
        chunk_backward_epilogue(tiles, pw.off, j0, j1, grad_s.data_ptr<T>() + i * B_cap,
                                S.data_ptr<T>() + i * B_cap, static_cast<T>(gamma1),
                                static_cast<T>(gamma2));
        const at::Tensor dsim = tiles.sim.narrow(0, 0, n), a = tiles.attn.narrow(0, 0, n);
        const at::Tensor adq = tiles.h.narrow(0, 0, n);
        const int beta = first ? 0 : 1;  // beta = 0 ignores the uninitialized outputs
        at::addmm_out(dgram, dgram, adq.t(), a, beta, 1);
        at::Tensor dwn_chunk = dwn.narrow(0, r0, n);
        at::addmm_out(dwn_chunk, dwn_chunk, dsim, tiles.rn, 1, 1);
        at::addmm_out(drn, drn, dsim.t(), pw.wn.narrow(0, r0, n), beta, 1);
        first = false;
      }
      at::addmm_out(drn, drn, dgram, tiles.rn, 1, 2);
      T* g = drn.data_ptr<T>();
      for (int64_t k = 0; k < R; ++k) normalize_backward_row(x + (i * R + k) * D, g + k * D, D);
    }
  });
  at::Tensor dwn = dwn_part.select(0, 0);
  for (int64_t t = 1; t < nthreads; ++t) dwn.add_(dwn_part.select(0, t));
  const T* w = W.data_ptr<T>();
  T* gw = grad_w.data_ptr<T>();
  T* dw = dwn.data_ptr<T>();
  at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      normalize_backward_row(w + pw.src[v] * D, dw + v * D, D);
      std::memcpy(gw + pw.src[v] * D, dw + v * D, D * sizeof(T));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks and dtype handling.
// ---------------------------------------------------------------------------------------------
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// fp16/bf16/fp32 compute (and return) in fp32; fp64 stays fp64 (fp64 gradcheck).
at::ScalarType working_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A contiguous, detached copy in the working dtype (no copy when it already is one): the GEMMs run
// on OpenMP worker threads, and out= products refuse inputs that require grad.
at::Tensor working(const at::Tensor& t, at::ScalarType wt) { return t.detach().to(wt).contiguous(); }

void check_inputs(const char* fn, const at::Tensor& regions, const at::Tensor& words,
                  const at::Tensor& mask, double gamma1, double gamma2) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"regions", &regions},
                                {"words", &words}, {"word_mask", &mask}}) {
    TORCH_CHECK(t->defined(), fn, ": ", name, " is an undefined tensor");
    TORCH_CHECK(t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t->device());
  }
  TORCH_CHECK(regions.dim() == 3, fn, ": regions must be (B, R, d), got ", regions.sizes());
  TORCH_CHECK(words.dim() == 3, fn, ": words must be (B, T, d), got ", words.sizes());
  TORCH_CHECK(regions.size(2) == words.size(2), fn, ": regions ", regions.sizes(), " and words ",
              words.sizes(), " must have the same d");
  TORCH_CHECK(regions.size(1) > 0 && words.size(1) > 0, fn, ": R and T must be positive, got ",
              regions.sizes(), " and ", words.sizes());
  TORCH_CHECK(is_supported_dtype(regions.scalar_type()), fn,
              ": regions must be float32, float16, bfloat16 or float64, got ",
              regions.scalar_type());
  TORCH_CHECK(regions.scalar_type() == words.scalar_type(), fn,
              ": regions and words must have the same dtype, got ", regions.scalar_type(),
              " and ", words.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                  mask.size(0) == words.size(0) && mask.size(1) == words.size(1),
              fn, ": word_mask must be a bool (B, T) = ", words.sizes().slice(0, 2),
              " tensor, got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(gamma1 > 0 && gamma2 > 0, fn, ": gamma1 and gamma2 must be positive, got ", gamma1,
              " and ", gamma2);
}

void check_pair_matrix(const char* fn, const char* name, const at::Tensor& t, int64_t rows,
                       int64_t cols) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, fn, ": ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be floating point");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> region_word_forward_cpu(const at::Tensor& regions,
                                                          const at::Tensor& words,
                                                          const at::Tensor& word_mask,
                                                          double gamma1, double gamma2) {
  const char* fn = "region_word_forward_cpu";
  check_inputs(fn, regions, words, word_mask, gamma1, gamma2);
  const at::ScalarType wt = working_dtype(regions.scalar_type());
  const at::Tensor X = working(regions, wt), W = working(words, wt);
  const at::Tensor mask = word_mask.contiguous();
  at::Tensor S = at::empty({X.size(0), W.size(0)}, X.options());
  at::Tensor gram = at::empty({X.size(0), X.size(1), X.size(1)}, X.options());
  AT_DISPATCH_FLOATING_TYPES(wt, "region_word_cpu", [&] {
    const PackedWords pw = pack_words<scalar_t>(W, mask);
    forward_impl<scalar_t>(X, pw, gamma1, gamma2, S, gram);
  });
  return {S, gram};
}

std::tuple<at::Tensor, at::Tensor> region_word_backward_cpu(
    const at::Tensor& grad_s, const at::Tensor& regions, const at::Tensor& words,
    const at::Tensor& word_mask, const at::Tensor& s, const at::Tensor& gram, double gamma1,
    double gamma2) {
  const char* fn = "region_word_backward_cpu";
  check_inputs(fn, regions, words, word_mask, gamma1, gamma2);
  const int64_t B_img = regions.size(0), R = regions.size(1);
  check_pair_matrix(fn, "grad_s", grad_s, B_img, words.size(0));
  check_pair_matrix(fn, "s", s, B_img, words.size(0));
  TORCH_CHECK(gram.defined() && gram.device().is_cpu() && gram.dim() == 3 &&
                  gram.size(0) == B_img && gram.size(1) == R && gram.size(2) == R,
              fn, ": gram must be the forward's (", B_img, ", ", R, ", ", R, ") CPU tensor, got ",
              gram.defined() ? gram.sizes() : at::IntArrayRef{});
  const at::ScalarType wt = working_dtype(regions.scalar_type());
  const at::Tensor X = working(regions, wt), W = working(words, wt);
  const at::Tensor gs = working(grad_s, wt), S = working(s, wt), G = working(gram, wt);
  const at::Tensor mask = word_mask.contiguous();
  at::Tensor grad_x = at::empty(X.sizes(), X.options());
  at::Tensor grad_w = at::zeros(W.sizes(), W.options());  // padding words keep 0
  AT_DISPATCH_FLOATING_TYPES(wt, "region_word_cpu", [&] {
    const PackedWords pw = pack_words<scalar_t>(W, mask);
    backward_impl<scalar_t>(gs, X, W, pw, S, G, gamma1, gamma2, grad_x, grad_w);
  });
  return {grad_x, grad_w};
}

}  // namespace fastxmc

TORCH_LIBRARY_FRAGMENT(fastxmc, m) {
  m.def("region_word_forward(Tensor regions, Tensor words, Tensor word_mask, float gamma1, "
        "float gamma2) -> (Tensor, Tensor)");
  m.def("region_word_backward(Tensor grad_s, Tensor regions, Tensor words, Tensor word_mask, "
        "Tensor s, Tensor gram, float gamma1, float gamma2) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastxmc, CPU, m) {
  m.impl("region_word_forward", &fastxmc::region_word_forward_cpu);
  m.impl("region_word_backward", &fastxmc::region_word_backward_cpu);
}
