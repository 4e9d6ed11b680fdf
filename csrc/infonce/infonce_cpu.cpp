// CPU kernels of the fused similarity log-sum-exp (contract: infonce.h).
//
// The N x M similarity matrix is never stored. It is walked in column tiles of bn columns (one
// parallel region per tile); inside a region every thread takes a contiguous range of rows and, for
// bm rows at a time, computes the tile G = a_sub b_tile^T (unscaled) with a single-threaded GEMM
// (ATen -> MKL; MKL runs sequentially inside a parallel region) into its own buffer of <= 8 MB, so
// that the fused epilogue finds G in cache:
//   forward:  row (max, sum) run across tiles (online log-sum-exp); each thread folds its rows into
//             column (max, sum) partials, merged in double when the tile is done;
//   backward: G is overwritten in place with dS, then grad_a[sub] += scale dS b_tile and the
//             thread's grad_b partial += scale dS^T a_sub (summed over threads, in thread order,
//             when the tile is done); grad_scale = sum dS * G is accumulated in double.
// So forward + backward cost 4 GEMMs of N x M x D plus element-wise epilogues, with O(threads x
// (bm bn + bn D)) <= 64 MB of working memory and two barriers per column tile.
//
// Two epilogue implementations: a portable scalar one (fp64, and fp32 on CPUs without AVX-512) and
// an AVX-512 one for fp32 (16-lane GCC/Clang vectors, branch-free exp), chosen at run time. Why not
// target_clones: GCC lowers the vector comparisons of not-yet-cloned helpers for the baseline ISA,
// which scalarized every mask; functions that carry the AVX-512 target from the start do not have
// that problem. FASTXMC_CPU_NO_AVX512=1 forces the scalar epilogue (to test it on AVX-512 CPUs).
#include "infonce.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifndef _OPENMP
// at::parallel_for is inline OpenMP code: without -fopenmp it runs serially here.
#pragma message("infonce_cpu.cpp built without OpenMP: one-thread epilogues, threaded GEMMs")
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FXMC_AVX512 1
#else
#define FXMC_AVX512 0
#endif

namespace fastxmc {
namespace {

// Tile shape. Measured at N = M = 16384, D = 256, fp32, 2 threads, as fwd + bwd time over the time
// of 4 mm of the full product: 512 x 1024 tiles 1.21, 512 x 2048 1.16, 1024 x 2048 1.14.
// Single-threaded GEMMs lose efficiency on small tiles (each call re-packs its operands), while the
// epilogue wants the tile to stay in cache. Working memory stays <= 64 MB: 32 MB of tiles, 32 MB
// of grad_b partials.
constexpr int64_t kTileCols = 2048;
constexpr int64_t kTileBytes = 8ll << 20;         // per thread, when the 32 MB allow it
constexpr int64_t kAllTilesBytes = 32ll << 20;
constexpr int64_t kMaxPartialBytes = 32ll << 20;  // all threads' grad_b partials together
constexpr int64_t kMaxTileRows = 1024;  // also bounds the rows summed in fp32 per column partial
constexpr int64_t kRowTile = 2048;      // columns summed in fp32 per row before going to double
constexpr int64_t kLanes = 16;          // fp32 lanes of the AVX-512 epilogue

// The excluded column of global row i inside the tile [c0, c0 + w), as a tile index, or -1.
inline int64_t excluded_col(int64_t i, int64_t diag_offset, bool exclude, int64_t c0, int64_t w) {
  if (!exclude) return -1;
  const int64_t j = i + diag_offset - c0;
  return (j >= 0 && j < w) ? j : -1;
}

// One bm x w tile of the forward, with the running row statistics it updates.
template <typename T>
struct FwdTile {
  const T* G;         // rows x w tile of a b^T (unscaled), row stride ld
  int64_t ld;
  int64_t w;          // tile columns c0 .. c0 + w - 1
  int64_t c0;
  int64_t row0;       // global index of the tile's first row
  T scale;
  int64_t diag_offset;
  bool exclude;
  T* row_max;         // per global row: running max of s over the tiles so far (-inf: none yet)
  double* row_sum;    // per global row: running sum of exp(s - row_max)
};

// One bm x w tile of the backward.
template <typename T>
struct BwdTile {
  T* G;               // rows x w tile, overwritten with dS
  int64_t ld;
  int64_t w;
  int64_t c0;
  int64_t row0;
  T scale;
  int64_t diag_offset;
  bool exclude;
  const T* gr;        // per global row: grad_row and row_lse, sanitized (see sanitize_coefs)
  const T* rl;
  const T* gc;        // per tile column (padded to whole lanes): grad_col and col_lse, sanitized;
  const T* cl;        // null when !with_cols
};

// Folds a block's (max m, sum s) into the running (max rm, sum rs): the online log-sum-exp step.
inline void fold_running(double m, double s, double& rm, double& rs) {
  if (!(s > 0)) return;
  if (m > rm) {
    rs = rs * std::exp(rm - m) + s;
    rm = m;
  } else {
    rs += s * std::exp(m - rm);
  }
}

// ---------------------------------------------------------------------------------------------
// Portable scalar epilogues: fp64 (gradcheck), and fp32 where AVX-512 is missing.
// ---------------------------------------------------------------------------------------------

// Adds exp(s) to a (max m, sum c) pair, rescaling whichever side has the smaller max.
template <typename T>
inline void fold_max_sum(T s, T& m, T& c) {
  if (s > m) {
    c = c * std::exp(m - s) + T(1);
    m = s;
  } else {
    c += std::exp(s - m);
  }
}

// Rows [rb, re) of a tile: the running row statistics, and the column partials (cm, cs) when cm
// is not null.
template <typename T>
void fwd_rows_scalar(const FwdTile<T>& p, int64_t rb, int64_t re, T* cm, T* cs) {
  for (int64_t r = rb; r < re; ++r) {
    const int64_t i = p.row0 + r;
    const T* g = p.G + r * p.ld;
    const int64_t jx = excluded_col(i, p.diag_offset, p.exclude, p.c0, p.w);
    T m = p.row_max[i];
    for (int64_t j = 0; j < p.w; ++j) {
      if (j != jx) m = std::max(m, g[j] * p.scale);
    }
    if (m == -std::numeric_limits<T>::infinity()) continue;  // nothing allowed so far
    double sum = 0;
    for (int64_t j = 0; j < p.w; ++j) {
      if (j == jx) continue;
      const T s = g[j] * p.scale;
      sum += std::exp(s - m);
      if (cm != nullptr) fold_max_sum(s, cm[j], cs[j]);
    }
    p.row_sum[i] = p.row_sum[i] * std::exp(static_cast<double>(p.row_max[i]) - m) + sum;
    p.row_max[i] = m;
  }
}

// Rows [rb, re) of a tile: G -> dS in place; returns their sum of dS * G.
template <typename T>
double bwd_rows_scalar(const BwdTile<T>& p, int64_t rb, int64_t re) {
  double acc = 0;
  for (int64_t r = rb; r < re; ++r) {
    const int64_t i = p.row0 + r;
    T* g = p.G + r * p.ld;
    const int64_t jx = excluded_col(i, p.diag_offset, p.exclude, p.c0, p.w);
    for (int64_t j = 0; j < p.w; ++j) {
      const T gv = g[j];
      const T s = gv * p.scale;
      T ds = p.gr[i] * std::exp(s - p.rl[i]);
      if (p.gc != nullptr) ds += p.gc[j] * std::exp(s - p.cl[j]);
      if (j == jx) ds = 0;
      g[j] = ds;
      acc += static_cast<double>(ds) * gv;
    }
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// AVX-512 fp32 epilogues. Every function here carries the target attribute (see the top comment).
// Tile rows are padded to whole 16-lane vectors (ld % 16 == 0); lanes past w are masked out.
// ---------------------------------------------------------------------------------------------
#if FXMC_AVX512
#if defined(__GNUC__) && !defined(__clang__)
// GCC warns that 64-byte vector arguments changed ABI in GCC 4.6; these helpers are all inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define FXMC_AVX512_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define FXMC_AVX512_INLINE FXMC_AVX512_FN inline __attribute__((always_inline))

typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));  // lane indices and masks (all ones = true)
typedef float VF8 __attribute__((vector_size(32)));
typedef double VD __attribute__((vector_size(64)));

FXMC_AVX512_INLINE VF splat(float x) { return VF{} + x; }
FXMC_AVX512_INLINE VI splat_i(int32_t x) { return VI{} + x; }
FXMC_AVX512_INLINE VI lane_index(int64_t j) {
  return VI{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + static_cast<int32_t>(j);
}

FXMC_AVX512_INLINE VF load(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(VF));
  return v;
}

FXMC_AVX512_INLINE void store(float* p, VF v) { std::memcpy(p, &v, sizeof(VF)); }

FXMC_AVX512_INLINE double hsum(VF x) {
  double s = 0;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

FXMC_AVX512_INLINE double hsum(VD x) {
  double s = 0;
  for (int i = 0; i < kLanes / 2; ++i) s += x[i];
  return s;
}

FXMC_AVX512_INLINE float hmax(VF x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

// Lanes 0-7 (half 0) or 8-15 (half 1) of x, widened to double.
FXMC_AVX512_INLINE VD widen_half(VF x, int half) {
  VF8 h;
  std::memcpy(&h, reinterpret_cast<const float*>(&x) + 8 * half, sizeof(VF8));
  return __builtin_convertvector(h, VD);
}

// Lanes that are real columns (< w) and not the row's excluded column jx (-1: none).
FXMC_AVX512_INLINE VI allowed(VI jv, int64_t w, int64_t jx) {
  return (jv < splat_i(static_cast<int32_t>(w))) & (jv != splat_i(static_cast<int32_t>(jx)));
}

// True when lanes j..j+15 need masking: they hold the excluded column or run past w. At most two
// chunks per row do, so the others skip the mask arithmetic (a predictable branch).
FXMC_AVX512_INLINE bool needs_mask(int64_t j, int64_t w, int64_t jx) {
  return j + kLanes > w || (jx >= j && jx < j + kLanes);
}

// exp of 16 floats, branch-free: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), exp(r) by its degree-7
// Taylor polynomial (truncation < 1e-8 relative; measured < 1 ulp overall), 2^n added to the
// exponent bits. x < -86.98 (where 2^n would leave the normal range) and -inf flush to 0 and NaN
// propagates; x is clamped at 88.72, so large x saturate at 3.4e38 instead of +inf (every caller
// passes x <= ~0: a value minus a max or an lse).
FXMC_AVX512_INLINE VF fast_exp(VF x) {
  const VF lo = splat(-86.98f), hi = splat(88.72f);
  const VF magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer (low bits)
  VF xc = x < lo ? lo : x;              // vmaxps / vminps
  xc = xc > hi ? hi : xc;
  const VF t = xc * 1.44269504f + magic;
  const VF n = t - magic;
  VF r = xc - n * 0.693359375f;  // ln2 = 0.693359375 (exact in 9 bits) - 2.12194440e-4
  r = r + n * 2.12194440e-4f;
  VF p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI n_int = (VI)t - (VI)magic;
  const VF y = (VF)((VI)p + (n_int << 23));
  return x < lo ? VF{} : (x != x ? x : y);
}

// Pass 1: max of m0 and of s = scale * g over the allowed columns.
FXMC_AVX512_INLINE float row_max(const float* g, int64_t w, int64_t jx, float scale, float m0) {
  VF m = splat(m0);
  for (int64_t j = 0; j < w; j += kLanes) {
    const VF s = load(g + j) * scale;
    if (needs_mask(j, w, jx)) {
      m = (allowed(lane_index(j), w, jx) & (s > m)) ? s : m;
    } else {
      m = s > m ? s : m;  // vmaxps
    }
  }
  return hmax(m);
}

// One chunk of pass 2: acc += exp(s - rmax) and, when kCols, the fold of s into the column
// partials (cm, cs) with one exp: d = s - cm, e = exp(-|d|) rescales whichever side has the
// smaller max.
template <bool kCols, bool kMasked>
FXMC_AVX512_INLINE void sum_chunk(VF s, VI ok, float rmax, VF& acc, float* cm, float* cs) {
  const VF er = fast_exp(s - rmax);
  acc += kMasked ? (ok ? er : VF{}) : er;
  if (kCols) {
    const VF m = load(cm), c = load(cs);
    const VF d = s - m;
    const VI up = d > VF{};
    const VF e = fast_exp(up ? -d : d);
    const VF c_new = up ? c * e + 1.0f : c + e;
    store(cs, kMasked ? (ok ? c_new : c) : c_new);
    store(cm, (kMasked ? (ok & up) : up) ? s : m);
  }
}

// Pass 2 (the row is in L1/L2 now): sum of exp(s - rmax) over the allowed columns, and the column
// partials when kCols. fp32 sums over kRowTile columns at most, then double.
template <bool kCols>
FXMC_AVX512_INLINE double row_sum(const float* g, int64_t w, int64_t jx, float scale, float rmax,
                                  float* cm, float* cs) {
  double rsum = 0;
  for (int64_t j0 = 0; j0 < w; j0 += kRowTile) {
    const int64_t j1 = std::min(w, j0 + kRowTile);
    VF acc = VF{};
    for (int64_t j = j0; j < j1; j += kLanes) {
      const VF s = load(g + j) * scale;
      if (needs_mask(j, w, jx)) {
        sum_chunk<kCols, true>(s, allowed(lane_index(j), w, jx), rmax, acc, cm + j, cs + j);
      } else {
        sum_chunk<kCols, false>(s, VI{}, rmax, acc, cm + j, cs + j);
      }
    }
    rsum += hsum(acc);
  }
  return rsum;
}

FXMC_AVX512_FN void fwd_rows_avx512(const FwdTile<float>& p, int64_t rb, int64_t re, float* cm,
                                    float* cs) {
  for (int64_t r = rb; r < re; ++r) {
    const int64_t i = p.row0 + r;
    const float* g = p.G + r * p.ld;
    const int64_t jx = excluded_col(i, p.diag_offset, p.exclude, p.c0, p.w);
    const float m = row_max(g, p.w, jx, p.scale, p.row_max[i]);
    if (m == -std::numeric_limits<float>::infinity()) continue;  // nothing allowed so far
    const double sum = cm != nullptr ? row_sum<true>(g, p.w, jx, p.scale, m, cm, cs)
                                     : row_sum<false>(g, p.w, jx, p.scale, m, cm, cs);
    p.row_sum[i] = p.row_sum[i] * std::exp(static_cast<double>(p.row_max[i]) - m) + sum;
    p.row_max[i] = m;
  }
}

// One chunk of a backward row: dS = gr exp(s - rl) + gc exp(s - cl) (0 where masked), written over
// G; acc_lo/acc_hi += dS * G in double.
template <bool kCols, bool kMasked>
FXMC_AVX512_INLINE void bwd_chunk(float* g, const float* gc, const float* cl, VI ok, float scale,
                                  float gr, float rl, VD& acc_lo, VD& acc_hi) {
  const VF gv = load(g);
  const VF s = gv * scale;
  VF ds = gr * fast_exp(s - rl);
  if (kCols) ds += load(gc) * fast_exp(s - load(cl));
  if (kMasked) ds = ok ? ds : VF{};
  store(g, ds);
  const VF prod = ds * gv;
  acc_lo += widen_half(prod, 0);
  acc_hi += widen_half(prod, 1);
}

// One row: G -> dS in place (two exps per element, no dependency between lanes or rows); returns
// sum dS * G in double.
template <bool kCols>
FXMC_AVX512_INLINE double bwd_row(const BwdTile<float>& p, float* g, int64_t jx, float gr,
                                  float rl) {
  const int64_t w = p.w;  // locals: the stores to g could otherwise alias p's fields
  const float scale = p.scale;
  const float* gc = p.gc;
  const float* cl = p.cl;
  VD acc_lo = VD{}, acc_hi = VD{};
  for (int64_t j = 0; j < w; j += kLanes) {
    if (needs_mask(j, w, jx)) {
      bwd_chunk<kCols, true>(g + j, gc + j, cl + j, allowed(lane_index(j), w, jx), scale, gr, rl,
                             acc_lo, acc_hi);
    } else {
      bwd_chunk<kCols, false>(g + j, gc + j, cl + j, VI{}, scale, gr, rl, acc_lo, acc_hi);
    }
  }
  return hsum(acc_lo) + hsum(acc_hi);
}

FXMC_AVX512_FN double bwd_rows_avx512(const BwdTile<float>& p, int64_t rb, int64_t re) {
  double acc = 0;
  for (int64_t r = rb; r < re; ++r) {
    const int64_t i = p.row0 + r;
    const int64_t jx = excluded_col(i, p.diag_offset, p.exclude, p.c0, p.w);
    float* g = p.G + r * p.ld;
    acc += p.gc != nullptr ? bwd_row<true>(p, g, jx, p.gr[i], p.rl[i])
                           : bwd_row<false>(p, g, jx, p.gr[i], p.rl[i]);
  }
  return acc;
}
#endif  // FXMC_AVX512

// ---------------------------------------------------------------------------------------------
// Dispatch.
// ---------------------------------------------------------------------------------------------
bool use_avx512() {
#if FXMC_AVX512
  static const bool yes = [] {
    const char* off = std::getenv("FASTXMC_CPU_NO_AVX512");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           !(off != nullptr && off[0] != '\0' && off[0] != '0');
  }();
  return yes;
#else
  return false;
#endif
}

void fwd_rows(const FwdTile<float>& p, int64_t rb, int64_t re, float* cm, float* cs) {
#if FXMC_AVX512
  if (use_avx512()) return fwd_rows_avx512(p, rb, re, cm, cs);
#endif
  fwd_rows_scalar(p, rb, re, cm, cs);
}

void fwd_rows(const FwdTile<double>& p, int64_t rb, int64_t re, double* cm, double* cs) {
  fwd_rows_scalar(p, rb, re, cm, cs);
}

double bwd_rows(const BwdTile<float>& p, int64_t rb, int64_t re) {
#if FXMC_AVX512
  if (use_avx512()) return bwd_rows_avx512(p, rb, re);
#endif
  return bwd_rows_scalar(p, rb, re);
}

double bwd_rows(const BwdTile<double>& p, int64_t rb, int64_t re) {
  return bwd_rows_scalar(p, rb, re);
}

// An lse of -inf (empty set) must contribute 0, never 0 * inf: map it to (g, lse) = (0, +inf), so
// that g * exp(s - lse) = 0 * 0. Pads to `len` with the same neutral pair.
template <typename T>
void sanitize_coefs(const T* g, const T* lse, int64_t n, int64_t len, T* g_out, T* lse_out) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < len; ++i) {
    const bool live = i < n && lse[i] != -inf;
    g_out[i] = live ? g[i] : T(0);
    lse_out[i] = live ? lse[i] : inf;
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers: tiles, GEMMs, per-thread buffers.
// ---------------------------------------------------------------------------------------------
template <typename T>
constexpr int64_t lanes() {
  return sizeof(T) == sizeof(float) ? kLanes : 1;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct TileShape {
  int64_t bm;   // rows per GEMM call
  int64_t bn;   // columns per tile, a multiple of the lane count
  int64_t ld;   // row stride of the tile buffers (= bn)
};

template <typename T>
TileShape tile_shape(int64_t N, int64_t M, int64_t D, int64_t nthreads) {
  int64_t bn = std::min(kTileCols, std::max<int64_t>(M, 1));
  // The grad_b partials hold nthreads x bn x D values.
  while (bn > 64 && nthreads * bn * D * static_cast<int64_t>(sizeof(T)) > kMaxPartialBytes) bn /= 2;
  bn = round_up(bn, lanes<T>());
  const int64_t ld = bn;
  const int64_t tile_bytes = std::min(kTileBytes, kAllTilesBytes / std::max<int64_t>(nthreads, 1));
  int64_t bm = tile_bytes / (ld * static_cast<int64_t>(sizeof(T)));
  bm = std::max<int64_t>(16, std::min(bm, kMaxTileRows));
  bm = std::min(bm, std::max<int64_t>(N, 1));
  return {bm, bn, ld};
}

// Rows per thread in a tile's parallel region: at least ~64K elements, so that small problems do
// not pay thread wake-ups (a region that runs on one thread lets MKL thread its GEMMs instead).
int64_t grain_rows(int64_t w) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, w));
}

// Per-thread scratch: the tile buffer (bm x ld, zeroed once so that padding lanes hold numbers).
struct ThreadTiles {
  at::Tensor buf;  // nthreads x bm x ld

  ThreadTiles(int64_t nthreads, const TileShape& sh, const at::TensorOptions& opts)
      : buf(at::zeros({nthreads, sh.bm, sh.ld}, opts)) {}
  // Thread t's tile, viewed as the (rows x w) output of a GEMM.
  at::Tensor view(int64_t t, int64_t rows, int64_t w) const {
    return buf.select(0, t).narrow(0, 0, rows).narrow(1, 0, w);
  }
};

// Folds a thread's fp32 column partial (cm, cs) of one row block into its double state (dm, ds)
// for the current tile, and resets the partial.
template <typename T>
void flush_col_partial(T* cm, T* cs, double* dm, double* ds, int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    fold_running(cm[j], cs[j], dm[j], ds[j]);
    cm[j] = -std::numeric_limits<T>::infinity();
    cs[j] = 0;
  }
}

template <typename T>
void forward_impl(const at::Tensor& A, const at::Tensor& B, double scale, int64_t diag_offset,
                  bool exclude, bool with_cols, at::Tensor& row_lse, at::Tensor& col_lse) {
  const int64_t N = A.size(0), M = B.size(0), D = A.size(1);
  const int64_t nthreads = at::get_num_threads();
  const TileShape sh = tile_shape<T>(N, M, D, nthreads);
  const ThreadTiles tiles(nthreads, sh, A.options());
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor rmax = at::full({N}, -inf, A.options());
  at::Tensor rsum = at::zeros({N}, A.options().dtype(at::kDouble));
  // Column state per thread: fp32 partial of one row block (cm, cs), double state of the tile.
  at::Tensor part, state;
  if (with_cols) {
    part = at::empty({nthreads, 2, sh.ld}, A.options());
    part.select(1, 0).fill_(-inf);
    part.select(1, 1).zero_();
    state = at::empty({nthreads, 2, sh.ld}, A.options().dtype(at::kDouble));
  }
  for (int64_t c0 = 0; c0 < M; c0 += sh.bn) {
    const int64_t w = std::min(sh.bn, M - c0);
    const at::Tensor b_t = B.narrow(0, c0, w).t();
    if (with_cols) {
      state.select(1, 0).fill_(-inf);
      state.select(1, 1).zero_();
    }
    at::parallel_for(0, N, grain_rows(w), [&](int64_t rb, int64_t re) {
      // Worker threads start with the default dispatch state: skip the autograd layer here too.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const int64_t t = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(t < nthreads, "thread ", t, " of ", nthreads);
      T* cm = with_cols ? part.data_ptr<T>() + 2 * t * sh.ld : nullptr;
      double* dm = with_cols ? state.data_ptr<double>() + 2 * t * sh.ld : nullptr;
      for (int64_t r0 = rb; r0 < re; r0 += sh.bm) {
        const int64_t rows = std::min(sh.bm, re - r0);
        at::Tensor G = tiles.view(t, rows, w);
        at::mm_out(G, A.narrow(0, r0, rows), b_t);
        const FwdTile<T> p{G.data_ptr<T>(), sh.ld, w, c0, r0, static_cast<T>(scale), diag_offset,
                           exclude, rmax.data_ptr<T>(), rsum.data_ptr<double>()};
        fwd_rows(p, 0, rows, cm, with_cols ? cm + sh.ld : nullptr);
        if (with_cols) flush_col_partial(cm, cm + sh.ld, dm, dm + sh.ld, w);
      }
    });
    if (with_cols) {
      // Threads without rows left their state at (-inf, 0), which folds to nothing.
      T* out = col_lse.data_ptr<T>() + c0;
      const double* st = state.data_ptr<double>();
      for (int64_t j = 0; j < w; ++j) {
        double m = -inf, s = 0;
        for (int64_t t = 0; t < nthreads; ++t) {
          fold_running(st[2 * t * sh.ld + j], st[(2 * t + 1) * sh.ld + j], m, s);
        }
        out[j] = static_cast<T>(m + std::log(s));  // an empty column: -inf + log(0) = -inf
      }
    }
  }
  const T* m = rmax.data_ptr<T>();
  const double* s = rsum.data_ptr<double>();
  T* out = row_lse.data_ptr<T>();
  for (int64_t i = 0; i < N; ++i) out[i] = static_cast<T>(m[i] + std::log(s[i]));  // empty: -inf
}

template <typename T>
void backward_impl(const at::Tensor& A, const at::Tensor& B, double scale,
                   const at::Tensor& grad_row, const at::Tensor& row_lse,
                   const at::Tensor& grad_col, const at::Tensor& col_lse, int64_t diag_offset,
                   bool exclude, bool with_cols, at::Tensor& grad_a, at::Tensor& grad_b,
                   double& grad_scale) {
  const int64_t N = A.size(0), M = B.size(0), D = A.size(1);
  const int64_t nthreads = at::get_num_threads();
  const TileShape sh = tile_shape<T>(N, M, D, nthreads);
  const ThreadTiles tiles(nthreads, sh, A.options());
  at::Tensor rows_c = at::empty({2, N}, A.options());
  sanitize_coefs<T>(grad_row.data_ptr<T>(), row_lse.data_ptr<T>(), N, N, rows_c.data_ptr<T>(),
                    rows_c.data_ptr<T>() + N);
  const int64_t Mp = round_up(M, sh.bn);  // every tile's padded lanes stay inside the arrays
  at::Tensor cols_c;
  if (with_cols) {
    cols_c = at::empty({2, Mp}, A.options());
    sanitize_coefs<T>(grad_col.data_ptr<T>(), col_lse.data_ptr<T>(), M, Mp, cols_c.data_ptr<T>(),
                      cols_c.data_ptr<T>() + Mp);
  }
  at::Tensor gb_part = at::empty({nthreads, sh.bn, D}, A.options());
  std::vector<double> partial(nthreads, 0.0);
  std::vector<char> used(nthreads);
  if (M == 0 || D == 0) grad_a.zero_();
  if (N == 0 || D == 0) grad_b.zero_();
  for (int64_t c0 = 0; c0 < M; c0 += sh.bn) {
    const int64_t w = std::min(sh.bn, M - c0);
    const at::Tensor b_tile = B.narrow(0, c0, w);
    const at::Tensor b_t = b_tile.t();
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, N, grain_rows(w), [&](int64_t rb, int64_t re) {
      // Worker threads start with the default dispatch state: skip the autograd layer here too.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const int64_t t = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(t < nthreads, "thread ", t, " of ", nthreads);
      at::Tensor gb = gb_part.select(0, t).narrow(0, 0, w);
      for (int64_t r0 = rb; r0 < re; r0 += sh.bm) {
        const int64_t rows = std::min(sh.bm, re - r0);
        at::Tensor G = tiles.view(t, rows, w);
        const at::Tensor a_sub = A.narrow(0, r0, rows);
        at::mm_out(G, a_sub, b_t);
        const BwdTile<T> p{G.data_ptr<T>(), sh.ld, w, c0, r0, static_cast<T>(scale), diag_offset,
                           exclude, rows_c.data_ptr<T>(), rows_c.data_ptr<T>() + N,
                           with_cols ? cols_c.data_ptr<T>() + c0 : nullptr,
                           with_cols ? cols_c.data_ptr<T>() + Mp + c0 : nullptr};
        partial[t] += bwd_rows(p, 0, rows);
        // G now holds dS. beta = 0 on first use ignores the uninitialized outputs.
        at::Tensor ga = grad_a.narrow(0, r0, rows);
        at::addmm_out(ga, ga, G, b_tile, /*beta=*/c0 == 0 ? 0 : 1, /*alpha=*/scale);
        at::addmm_out(gb, gb, G.t(), a_sub, /*beta=*/used[t] ? 1 : 0, /*alpha=*/scale);
        used[t] = 1;
      }
    });
    // grad_b rows of this tile: the threads' partials, summed in thread order (deterministic).
    at::Tensor gb_out = grad_b.narrow(0, c0, w);
    bool first = true;
    for (int64_t t = 0; t < nthreads; ++t) {
      if (!used[t]) continue;
      const at::Tensor gb = gb_part.select(0, t).narrow(0, 0, w);
      if (first) {
        gb_out.copy_(gb);
      } else {
        gb_out.add_(gb);
      }
      first = false;
    }
    if (first) gb_out.zero_();
  }
  grad_scale = 0;
  for (double v : partial) grad_scale += v;
}

// ---------------------------------------------------------------------------------------------
// Argument checks and dtype handling.
// ---------------------------------------------------------------------------------------------
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// fp16/bf16/fp32 compute (and return) in fp32; fp64 stays fp64 (fp64 gradcheck).
at::ScalarType working_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu_tensor(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

void check_vector(const char* fn, const char* name, const at::Tensor& t, int64_t n) {
  check_cpu_tensor(fn, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, fn, ": ", name, " must have shape (", n,
              "), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_inputs(const char* fn, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& scale) {
  check_cpu_tensor(fn, "a", a);
  check_cpu_tensor(fn, "b", b);
  TORCH_CHECK(a.dim() == 2, fn, ": a must be 2-D (N, D), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, fn, ": b must be 2-D (M, D), got shape ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), fn, ": a and b must have the same feature size D, got a ",
              a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(is_supported_dtype(a.scalar_type()), fn,
              ": a must be float32, float16, bfloat16 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), fn, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(scale.defined() && scale.dim() == 0, fn, ": scale must be a 0-dim tensor, got shape ",
              scale.defined() ? scale.sizes() : at::IntArrayRef{});
}

// A contiguous copy in the working dtype (no copy when a already is one), detached: the GEMMs below
// run on OpenMP worker threads, which do not inherit the caller's autograd exclusion, and out=
// products refuse inputs that require grad.
at::Tensor working(const at::Tensor& t, at::ScalarType wt) {
  return t.detach().to(wt).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> infonce_lse_forward_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    int64_t diag_offset, bool exclude_diag, bool with_cols) {
  const char* fn = "infonce_lse_forward_cpu";
  check_inputs(fn, a, b, scale);
  const at::ScalarType wt = working_dtype(a.scalar_type());
  const at::Tensor A = working(a, wt), B = working(b, wt);
  const double s = scale.item<double>();
  at::Tensor row_lse = at::empty({A.size(0)}, A.options());
  at::Tensor col_lse = at::empty({with_cols ? B.size(0) : 0}, A.options());
  AT_DISPATCH_FLOATING_TYPES(wt, "infonce_lse_forward_cpu", [&] {
    forward_impl<scalar_t>(A, B, s, diag_offset, exclude_diag, with_cols, row_lse, col_lse);
  });
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse,
    int64_t diag_offset, bool exclude_diag, bool with_cols) {
  const char* fn = "infonce_lse_backward_cpu";
  check_inputs(fn, a, b, scale);
  const int64_t N = a.size(0), M = b.size(0);
  check_vector(fn, "grad_row", grad_row, N);
  check_vector(fn, "row_lse", row_lse, N);
  if (with_cols) {
    check_vector(fn, "grad_col", grad_col, M);
    check_vector(fn, "col_lse", col_lse, M);
  }
  const at::ScalarType wt = working_dtype(a.scalar_type());
  const at::Tensor A = working(a, wt), B = working(b, wt);
  const at::Tensor gr = working(grad_row, wt), rl = working(row_lse, wt);
  const at::Tensor gc = with_cols ? working(grad_col, wt) : at::Tensor();
  const at::Tensor cl = with_cols ? working(col_lse, wt) : at::Tensor();
  const double s = scale.item<double>();
  at::Tensor grad_a = at::empty({N, A.size(1)}, A.options());
  at::Tensor grad_b = at::empty({M, A.size(1)}, A.options());
  double grad_scale = 0;
  AT_DISPATCH_FLOATING_TYPES(wt, "infonce_lse_backward_cpu", [&] {
    backward_impl<scalar_t>(A, B, s, gr, rl, gc, cl, diag_offset, exclude_diag, with_cols, grad_a,
                            grad_b, grad_scale);
  });
  return {grad_a, grad_b, at::scalar_tensor(grad_scale, A.options())};
}

}  // namespace fastxmc
