// CPU kernels of the fused modulated batch norm (contract: modulated_bn.h) and the op schemas.
//
// Layouts without copies. NCHW: a work item is one (b, c) plane of H*W contiguous values, whose
// per-channel parameters are scalars. NHWC (channels_last): a work item is a run of pixel rows of
// C contiguous values, whose per-channel parameters are vectors over c. Both are written once, as
// "runs" of contiguous values whose parameters are either broadcast (kVec = false) or loaded per
// lane (kVec = true); per-channel parameter arrays are padded to whole vectors (Cp) for the latter.
//
// Passes (memory-bound: each reads or writes every value once):
//   forward:  [training] statistics reduction -> per (b, c) shifted sums -> mean, invstd, var;
//             normalize-modulate(-ReLU) element-wise pass writing y (and the uint8 ReLU mask);
//   backward: [when needed] reduction of per (b, c) sums of dym * w and dym * w * x_hat;
//             element-wise pass writing dx (and per-pixel dgamma, dbeta).
// NCHW with enough channels runs both passes of a direction a group of channels at a time
// (reduction over the group's planes, then the element-wise pass while those planes are in L2),
// which saves one read of the inputs from memory; otherwise each pass runs over all the data.
// Reductions: each work item writes its own partial (float32 vector accumulators, flushed into
// float64 every kFlushValues values or kFlushRows rows); partials are merged serially in a fixed
// order, so results are the same for any thread count. Work items are handed out dynamically
// (parallel_chunks), which keeps a pass going when a thread loses its core on a busy machine.
//
// Vectorization: the kernels use GCC vector types of 64 bytes (16 floats / 8 doubles) in
// always-inline functions. Each pass has two instantiations: one with the AVX-512 target attribute
// (the vectors become single zmm instructions) and a baseline one (lowered to SSE2), chosen at run
// time; FASTXMC_CPU_NO_AVX512=1 forces the baseline one (to test it on AVX-512 machines).
#include "modulated_bn.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MBN_X86 1
#else
#define MBN_X86 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vector arguments "changed ABI in GCC 4.6": every such helper here is inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define MBN_INLINE inline __attribute__((always_inline))
#define MBN_AVX512_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

namespace fastxmc {
namespace {

// Values per float32 accumulator block before flushing into float64 (NCHW planes), and pixel rows
// per block (NHWC): each lane then sums at most 64 values in float32.
constexpr int64_t kFlushValues = 1024;
constexpr int64_t kFlushRows = 64;
// Work items per parallel chunk: at least this many values, so tiny problems stay on one thread.
constexpr int64_t kGrainValues = 32768;
// NHWC reductions: about this many work items in all (partials: items x 2 x Cp doubles).
constexpr int64_t kTargetItems = 256;
// NCHW passes go one channel per work item when there are at least this many channels per thread.
constexpr int64_t kMinChannelsPerThread = 4;
// Work is handed out in about this many chunks per thread (see parallel_chunks).
constexpr int64_t kChunksPerThread = 8;
// NCHW channel groups (see channel_items_body): values read as one stream per image, and the
// most values per tensor a group keeps in cache between its two passes (1 MB of float32).
constexpr int64_t kMinStreamValues = 2048;
constexpr int64_t kMaxGroupValues = 262144;

// ---------------------------------------------------------------------------------------------
// Vector helpers (always inline: they take the target of the pass that inlines them).
// ---------------------------------------------------------------------------------------------
template <class A>
struct Pack;
template <>
struct Pack<float> {
  static constexpr int L = 16;
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t M __attribute__((vector_size(64)));
  typedef uint8_t U8 __attribute__((vector_size(16)));
  typedef uint16_t U16 __attribute__((vector_size(32)));
  typedef uint32_t U32 __attribute__((vector_size(64)));
};
template <>
struct Pack<double> {
  static constexpr int L = 8;
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t M __attribute__((vector_size(64)));
  typedef uint8_t U8 __attribute__((vector_size(8)));
};
template <class A>
using Vec = typename Pack<A>::V;
template <class A>
using Lanes = typename Pack<A>::M;
template <class A>
constexpr int kL = Pack<A>::L;

// L values of storage type T at p, as Acc lanes.
template <class A, class T>
MBN_INLINE Vec<A> load(const T* p) {
  Vec<A> v;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bfloat16 is the top half of a float32: widen the bits and shift.
    typename Pack<float>::U16 h;
    std::memcpy(&h, p, sizeof h);
    const typename Pack<float>::U32 w = __builtin_convertvector(h, typename Pack<float>::U32) << 16;
    std::memcpy(&v, &w, sizeof v);
  } else {
    A t[kL<A>];
    for (int j = 0; j < kL<A>; ++j) t[j] = static_cast<A>(p[j]);
    std::memcpy(&v, t, sizeof v);
  }
  return v;
}

template <class A, class T>
MBN_INLINE void store(T* p, const Vec<A>& v) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    A t[kL<A>];
    std::memcpy(t, &v, sizeof v);
    for (int j = 0; j < kL<A>; ++j) p[j] = static_cast<T>(t[j]);  // c10: round to nearest even
  }
}

// The first n < L values at p; the other lanes read 0.
template <class A, class T>
MBN_INLINE Vec<A> load_n(const T* p, int64_t n) {
  T t[kL<A>];
  for (int j = 0; j < kL<A>; ++j) t[j] = j < n ? p[j] : static_cast<T>(0.0f);
  return load<A>(t);
}

template <class A, class T>
MBN_INLINE void store_n(T* p, const Vec<A>& v, int64_t n) {
  T t[kL<A>];
  store<A>(t, v);
  for (int64_t j = 0; j < n; ++j) p[j] = t[j];
}

template <class A>
MBN_INLINE Vec<A> splat(A x) {
  return Vec<A>{} + x;
}

// Lanes j < n all ones, the others zero.
template <class A>
MBN_INLINE Lanes<A> first_lanes(int64_t n) {
  Lanes<A> m;
  for (int j = 0; j < kL<A>; ++j) m[j] = j < n ? -1 : 0;
  return m;
}

// The ReLU mask bytes, one per lane (compare with 0 where it is used: GCC 12 scalarizes a vector
// comparison whose result is kept as a value). The bytes are spread to the lanes with a byte
// shuffle: GCC 12 turns a widening __builtin_convertvector of bytes into one conversion per lane.
template <class A>
MBN_INLINE Lanes<A> mask_bytes(const uint8_t* p) {
  typename Pack<A>::U8 m;
  std::memcpy(&m, p, sizeof m);
  typedef uint8_t Bytes __attribute__((vector_size(64)));
  Bytes spread;
  if constexpr (kL<A> == 16) {  // byte j -> byte 4 j (the low byte of 32-bit lane j)
    spread = __builtin_shufflevector(m, m, 0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1,
                                     -1, 4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1,
                                     8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                     12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1,
                                     -1);
  } else {  // byte j -> byte 8 j (the low byte of 64-bit lane j)
    spread = __builtin_shufflevector(m, m, 0, -1, -1, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1,
                                     -1, -1, 2, -1, -1, -1, -1, -1, -1, -1, 3, -1, -1, -1, -1, -1,
                                     -1, -1, 4, -1, -1, -1, -1, -1, -1, -1, 5, -1, -1, -1, -1, -1,
                                     -1, -1, 6, -1, -1, -1, -1, -1, -1, -1, 7, -1, -1, -1, -1, -1,
                                     -1, -1);
  }
  Lanes<A> w;
  std::memcpy(&w, &spread, sizeof w);
  return w & 0xFF;  // the other bytes of each lane are undefined
}

template <class A>
MBN_INLINE Lanes<A> mask_bytes_n(const uint8_t* p, int64_t n) {
  uint8_t t[kL<A>] = {};
  for (int64_t j = 0; j < n; ++j) t[j] = p[j];
  return mask_bytes<A>(t);
}

template <class A>
MBN_INLINE typename Pack<A>::U8 positive(const Vec<A>& y) {
  return __builtin_convertvector((y > Vec<A>{}) & 1, typename Pack<A>::U8);
}

template <class A>
MBN_INLINE void store_mask(uint8_t* p, const Vec<A>& y) {
  const typename Pack<A>::U8 m = positive<A>(y);
  std::memcpy(p, &m, sizeof m);  // a constant size: one vector store, not a memcpy call
}

template <class A>
MBN_INLINE void store_mask_n(uint8_t* p, const Vec<A>& y, int64_t n) {
  const typename Pack<A>::U8 m = positive<A>(y);
  std::memcpy(p, &m, static_cast<size_t>(n));
}

// max(y, 0) that keeps NaN (as torch.relu does).
template <class A>
MBN_INLINE Vec<A> relu(const Vec<A>& y) {
  return y < Vec<A>{} ? Vec<A>{} : y;
}

// The sum of the lanes, added in float64 as a pairwise tree (a few shuffles: an NCHW pass calls
// it for every plane, and planes of 8 x 8 values are short).
template <class A>
MBN_INLINE double hsum(const Vec<A>& v) {
  typedef double D8 __attribute__((vector_size(64)));
  typedef double D4 __attribute__((vector_size(32)));
  typedef double D2 __attribute__((vector_size(16)));
  D8 d;
  if constexpr (kL<A> == 16) {
    typedef float F8 __attribute__((vector_size(32)));
    const F8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const F8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    d = __builtin_convertvector(lo, D8) + __builtin_convertvector(hi, D8);
  } else {
    d = v;
  }
  const D4 a = __builtin_shufflevector(d, d, 0, 1, 2, 3) + __builtin_shufflevector(d, d, 4, 5, 6, 7);
  const D2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}

// A per-channel parameter of a run: p[0] broadcast once (NCHW run; loaded before the loop, so the
// loop's stores cannot force a reload) or the lanes p[i..] at in-run offset i (NHWC row, p padded
// to Cp).
template <bool kVec, class A>
struct Param {
  const A* p;
  Vec<A> v;
  MBN_INLINE explicit Param(const A* ptr) : p(ptr), v(kVec ? Vec<A>{} : splat<A>(ptr[0])) {}
  MBN_INLINE Vec<A> at(int64_t i) const {
    if constexpr (kVec) {
      return load<A>(p + i);
    } else {
      return v;
    }
  }
};

// The accumulator of in-run offset i: one per run (NCHW) or one per channel vector (NHWC).
template <bool kVec, class A>
MBN_INLINE Vec<A>& slot(Vec<A>* acc, int64_t i) {
  return kVec ? acc[i / kL<A>] : acc[0];
}

// ---------------------------------------------------------------------------------------------
// Runs: n contiguous values (a plane part, or one pixel row).
// ---------------------------------------------------------------------------------------------

// Forward statistics: s += d, q += d * d with d = x - shift.
template <bool kVec, class A, class T>
MBN_INLINE void stats_run(const T* x, int64_t n, const A* shift, Vec<A>* s, Vec<A>* q) {
  constexpr int L = kL<A>;
  const Param<kVec, A> k(shift);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const Vec<A> d = load<A>(x + i) - k.at(i);
    slot<kVec, A>(s, i) += d;
    slot<kVec, A>(q, i) += d * d;
  }
  if (i < n) {
    const Vec<A> d = first_lanes<A>(n - i) ? load_n<A>(x + i, n - i) - k.at(i) : Vec<A>{};
    slot<kVec, A>(s, i) += d;
    slot<kVec, A>(q, i) += d * d;
  }
}

// Stores a run's lanes [i, i + m) of v (all L when full), and the ReLU mask y > 0 when kRelu.
template <bool kRelu, class A, class T>
MBN_INLINE void store_output(T* y, uint8_t* mask, int64_t i, const Vec<A>& v, int64_t m,
                             bool full) {
  if (full) {
    store<A>(y + i, v);
    if constexpr (kRelu) store_mask<A>(mask + i, v);
  } else {
    store_n<A>(y + i, v, m);
    if constexpr (kRelu) store_mask_n<A>(mask + i, v, m);
  }
}

// Normalize-modulate with per-pixel gamma / beta: y = (x - mean) * invstd * (1 + g) + b.
template <bool kVec, bool kRelu, class A, class T>
MBN_INLINE void norm_run_pixel(const T* x, const T* g, const T* b, T* y, uint8_t* mask, int64_t n,
                               const A* mean, const A* invstd) {
  constexpr int L = kL<A>;
  const Param<kVec, A> mu(mean), is(invstd);
  for (int64_t i = 0; i < n; i += L) {
    const bool full = i + L <= n;
    const int64_t m = full ? L : n - i;
    const Vec<A> xv = full ? load<A>(x + i) : load_n<A>(x + i, m);
    const Vec<A> gv = full ? load<A>(g + i) : load_n<A>(g + i, m);
    const Vec<A> bv = full ? load<A>(b + i) : load_n<A>(b + i, m);
    Vec<A> v = (xv - mu.at(i)) * is.at(i) * (1 + gv) + bv;
    if constexpr (kRelu) v = relu<A>(v);
    store_output<kRelu, A>(y, mask, i, v, m, full);
  }
}

// Normalize-modulate with per-channel gamma / beta folded into scale = invstd * (1 + gamma) and
// beta: y = (x - mean) * scale + beta.
template <bool kVec, bool kRelu, class A, class T>
MBN_INLINE void norm_run_channel(const T* x, T* y, uint8_t* mask, int64_t n, const A* mean,
                                 const A* scale, const A* beta) {
  constexpr int L = kL<A>;
  const Param<kVec, A> mu(mean), sc(scale), bt(beta);
  for (int64_t i = 0; i < n; i += L) {
    const bool full = i + L <= n;
    const int64_t m = full ? L : n - i;
    const Vec<A> xv = full ? load<A>(x + i) : load_n<A>(x + i, m);
    Vec<A> v = (xv - mu.at(i)) * sc.at(i) + bt.at(i);
    if constexpr (kRelu) v = relu<A>(v);
    store_output<kRelu, A>(y, mask, i, v, m, full);
  }
}

// dym = dy where the ReLU mask is set (kRelu) or dy, for lanes [i, i + L) of a run (the first m
// lanes when partial).
template <bool kRelu, class A, class T>
MBN_INLINE Vec<A> masked_grad(const T* dy, const uint8_t* mask, int64_t m, bool full) {
  const Vec<A> d = full ? load<A>(dy) : load_n<A>(dy, m);
  if constexpr (kRelu) {
    const Lanes<A> bytes = full ? mask_bytes<A>(mask) : mask_bytes_n<A>(mask, m);
    return bytes != 0 ? d : Vec<A>{};
  }
  return d;
}

// Backward reduction: s += dym * w, q += dym * w * x_hat, w = 1 + g (kPixel) or 1. Lanes past n
// read dy = 0, so they add nothing.
template <bool kVec, bool kPixel, bool kRelu, class A, class T>
MBN_INLINE void bwd_sums_run(const T* dy, const T* x, const T* g, const uint8_t* mask, int64_t n,
                             const A* mean, const A* invstd, Vec<A>* s, Vec<A>* q) {
  constexpr int L = kL<A>;
  const Param<kVec, A> mu(mean), is(invstd);
  for (int64_t i = 0; i < n; i += L) {
    const bool full = i + L <= n;
    const int64_t m = full ? L : n - i;
    Vec<A> t = masked_grad<kRelu, A>(dy + i, kRelu ? mask + i : nullptr, m, full);
    if constexpr (kPixel) t *= 1 + (full ? load<A>(g + i) : load_n<A>(g + i, m));
    const Vec<A> xv = full ? load<A>(x + i) : load_n<A>(x + i, m);
    const Vec<A> xh = (xv - mu.at(i)) * is.at(i);
    slot<kVec, A>(s, i) += t;
    slot<kVec, A>(q, i) += t * xh;
  }
}

// Backward element-wise pass, per-pixel gamma: dx = invstd * dym * (1 + g) - k1 - x_hat * k2,
// dgamma = dym * x_hat, dbeta = dym.
template <bool kVec, bool kRelu, bool kDx, bool kDmod, class A, class T>
MBN_INLINE void bwd_elem_run_pixel(const T* dy, const T* x, const T* g, const uint8_t* mask, T* dx,
                                   T* dg, T* db, int64_t n, const A* mean, const A* invstd,
                                   const A* k1, const A* k2) {
  constexpr int L = kL<A>;
  const Param<kVec, A> mu(mean), is(invstd), off(k1), slope(k2);
  for (int64_t i = 0; i < n; i += L) {
    const bool full = i + L <= n;
    const int64_t m = full ? L : n - i;
    const Vec<A> t = masked_grad<kRelu, A>(dy + i, kRelu ? mask + i : nullptr, m, full);
    const Vec<A> xv = full ? load<A>(x + i) : load_n<A>(x + i, m);
    const Vec<A> xh = (xv - mu.at(i)) * is.at(i);
    if constexpr (kDx) {
      const Vec<A> gv = full ? load<A>(g + i) : load_n<A>(g + i, m);
      const Vec<A> d = is.at(i) * (t * (1 + gv)) - off.at(i) - xh * slope.at(i);
      store_output<false, A>(dx, nullptr, i, d, m, full);
    }
    if constexpr (kDmod) {
      store_output<false, A>(dg, nullptr, i, t * xh, m, full);
      store_output<false, A>(db, nullptr, i, t, m, full);
    }
  }
}

// Backward element-wise pass, per-channel gamma: dx = dym * c1 - k1 - (x - mean) * c2 with
// c1 = invstd * (1 + gamma), c2 = invstd * k2.
template <bool kVec, bool kRelu, class A, class T>
MBN_INLINE void bwd_elem_run_channel(const T* dy, const T* x, const uint8_t* mask, T* dx,
                                     int64_t n, const A* mean, const A* c1, const A* k1,
                                     const A* c2) {
  constexpr int L = kL<A>;
  const Param<kVec, A> mu(mean), scale(c1), off(k1), slope(c2);
  for (int64_t i = 0; i < n; i += L) {
    const bool full = i + L <= n;
    const int64_t m = full ? L : n - i;
    const Vec<A> t = masked_grad<kRelu, A>(dy + i, kRelu ? mask + i : nullptr, m, full);
    const Vec<A> xv = full ? load<A>(x + i) : load_n<A>(x + i, m);
    const Vec<A> d = t * scale.at(i) - off.at(i) - (xv - mu.at(i)) * slope.at(i);
    store_output<false, A>(dx, nullptr, i, d, m, full);
  }
}

// ---------------------------------------------------------------------------------------------
// Work items. A pass object `op` has run<kVec>(offset, n, b, c): the run of n values at element
// offset `offset`, of batch b, whose parameters start at channel c (NCHW: its channel; NHWC: 0).
// ---------------------------------------------------------------------------------------------
struct Geometry {
  int64_t B, C, HW, Cp;  // Cp: C rounded up to whole vectors
  bool cl;               // channels_last (NHWC) storage
  // NCHW with enough channels for every thread: passes run channel group by channel group
  // (reduce_then_elementwise_per_channel); else plane- / row-parallel passes.
  bool blocked;
  int64_t group;  // channels per group: planes of at least kMinStreamValues values in all
  int64_t rows_per_item;  // NHWC reductions: pixel rows per work item (within one image)
  int64_t items_per_image;

  int64_t count() const { return B * HW; }
  int64_t reduce_items() const { return cl ? B * items_per_image : B * C; }
  int64_t elem_items() const { return cl ? B * HW : B * C; }
  int64_t values_per_elem_item() const { return cl ? C : HW; }
  int64_t values_per_reduce_item() const { return cl ? rows_per_item * C : HW; }
};

// The two sums of NCHW plane p = b * C + c into out[0], out[1]: float32 lanes over blocks of
// kFlushValues values, each block's lanes added into float64 in order.
template <class A, class Op>
MBN_INLINE void plane_sums(const Op& op, const Geometry& g, int64_t p, double* out) {
  double s = 0, q = 0;
  for (int64_t o = 0; o < g.HW; o += kFlushValues) {
    Vec<A> vs{}, vq{};
    op.template run<false>(p * g.HW + o, std::min(kFlushValues, g.HW - o), p / g.C, p % g.C, &vs,
                           &vq);
    s += hsum<A>(vs);
    q += hsum<A>(vq);
  }
  out[0] = s;
  out[1] = q;
}

// Reduction items [i0, i1) -> partials. NCHW: part[item][2] (item = b * C + c). NHWC:
// part[item][2][Cp] (item = b * items_per_image + j: rows [j R, (j + 1) R) of image b).
template <class A, class Op>
MBN_INLINE void reduce_items_body(const Op& op, const Geometry& g, int64_t i0, int64_t i1,
                                  double* part) {
  constexpr int L = kL<A>;
  if (!g.cl) {
    for (int64_t p = i0; p < i1; ++p) plane_sums<A>(op, g, p, part + 2 * p);
    return;
  }
  const int64_t nv = g.Cp / L;
  // 2 * nv accumulator vectors, 64-byte aligned by hand (a std::vector of GCC vector types does
  // not get the vector's alignment).
  std::vector<A> storage(static_cast<size_t>(2 * g.Cp + L));
  const auto addr = reinterpret_cast<uintptr_t>(storage.data());
  Vec<A>* acc = reinterpret_cast<Vec<A>*>((addr + sizeof(Vec<A>) - 1) / sizeof(Vec<A>) * sizeof(Vec<A>));
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t b = it / g.items_per_image;
    const int64_t r0 = (it % g.items_per_image) * g.rows_per_item;
    const int64_t r1 = std::min(g.HW, r0 + g.rows_per_item);
    double* ds = part + it * 2 * g.Cp;
    std::fill(ds, ds + 2 * g.Cp, 0.0);
    for (int64_t r = r0; r < r1; r += kFlushRows) {
      for (int64_t k = 0; k < 2 * nv; ++k) acc[k] = Vec<A>{};
      for (int64_t rr = r; rr < std::min(r1, r + kFlushRows); ++rr) {
        op.template run<true>((b * g.HW + rr) * g.C, g.C, b, 0, acc, acc + nv);
      }
      for (int64_t k = 0; k < nv; ++k) {
        for (int j = 0; j < L; ++j) {
          ds[k * L + j] += acc[k][j];
          ds[g.Cp + k * L + j] += acc[nv + k][j];
        }
      }
    }
  }
}

// Element-wise items [i0, i1): NCHW planes (b * C + c) or NHWC pixel rows (b * HW + r).
template <class Op>
MBN_INLINE void elem_items_body(const Op& op, const Geometry& g, int64_t i0, int64_t i1) {
  for (int64_t it = i0; it < i1; ++it) {
    if (g.cl) {
      op.template run<true>(it * g.C, g.C, it / g.HW, 0);
    } else {
      op.template run<false>(it * g.HW, g.HW, it / g.C, it % g.C);
    }
  }
}

// NCHW, channels [c0, c1) taken in groups of g.group consecutive channels: the reduction over a
// group's B x group planes into sums[b][c][2], then finish(sums, c) for each of its channels
// (their parameters), then the element-wise pass over the same planes while they are still in
// cache. Image b's planes of a group are adjacent in memory, so each image is read as one
// stream of group * HW values (planes of 8 x 8 values alone defeat the prefetcher). The sums are
// the same, in the same order, as those of reduce() (plane_sums), so both paths give the same bits.
template <class A, class RedOp, class Finish, class ElemOp>
MBN_INLINE void channel_items_body(const RedOp& red, const Finish& finish, const ElemOp& elem,
                                   const Geometry& g, int64_t c0, int64_t c1, double* sums) {
  for (int64_t cg = c0; cg < c1; cg += g.group) {
    const int64_t ce = std::min(c1, cg + g.group);
    for (int64_t b = 0; b < g.B; ++b) {
      for (int64_t c = cg; c < ce; ++c) {
        plane_sums<A>(red, g, b * g.C + c, sums + 2 * (b * g.C + c));
      }
    }
    for (int64_t c = cg; c < ce; ++c) finish(static_cast<const double*>(sums), c);
    for (int64_t b = 0; b < g.B; ++b) {
      for (int64_t c = cg; c < ce; ++c) {
        elem.template run<false>((b * g.C + c) * g.HW, g.HW, b, c);
      }
    }
  }
}

bool use_avx512() {
#if MBN_X86
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

// The two instantiations of each pass: AVX-512 and baseline.
#if MBN_X86
template <class A, class Op>
MBN_AVX512_FN void reduce_items_avx512(const Op& op, const Geometry& g, int64_t i0, int64_t i1,
                                       double* part) {
  reduce_items_body<A>(op, g, i0, i1, part);
}
template <class Op>
MBN_AVX512_FN void elem_items_avx512(const Op& op, const Geometry& g, int64_t i0, int64_t i1) {
  elem_items_body(op, g, i0, i1);
}
template <class A, class RedOp, class Finish, class ElemOp>
MBN_AVX512_FN void channel_items_avx512(const RedOp& red, const Finish& finish, const ElemOp& elem,
                                        const Geometry& g, int64_t c0, int64_t c1, double* sums) {
  channel_items_body<A>(red, finish, elem, g, c0, c1, sums);
}
#endif

template <class A, class Op>
void reduce_items_baseline(const Op& op, const Geometry& g, int64_t i0, int64_t i1, double* part) {
  reduce_items_body<A>(op, g, i0, i1, part);
}
template <class Op>
void elem_items_baseline(const Op& op, const Geometry& g, int64_t i0, int64_t i1) {
  elem_items_body(op, g, i0, i1);
}
template <class A, class RedOp, class Finish, class ElemOp>
void channel_items_baseline(const RedOp& red, const Finish& finish, const ElemOp& elem,
                            const Geometry& g, int64_t c0, int64_t c1, double* sums) {
  channel_items_body<A>(red, finish, elem, g, c0, c1, sums);
}

int64_t grain(int64_t values_per_item) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_item));
}

// Runs f(i0, i1) over [0, n) in chunks handed out through an atomic counter (at least `min_chunk`
// items, about kChunksPerThread per thread): on a busy machine a thread that loses its core does
// not hold up the pass, as a static split would. Each item is processed once, by whichever
// thread, and writes only its own outputs, so results do not depend on the schedule.
template <class F>
void parallel_chunks(int64_t n, int64_t min_chunk, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max(min_chunk, (n + threads * kChunksPerThread - 1) /
                                                (threads * kChunksPerThread));
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t k = next++; k < chunks; k = next++) f(k * chunk, std::min(n, (k + 1) * chunk));
  });
}

// Runs every reduction item (in parallel) and merges the partials into sums[b][c][2], in order.
template <class A, class Op>
std::vector<double> reduce(const Op& op, const Geometry& g) {
  const int64_t items = g.reduce_items();
  std::vector<double> part(static_cast<size_t>(items * 2 * (g.cl ? g.Cp : 1)));
  parallel_chunks(items, grain(g.values_per_reduce_item()), [&](int64_t i0, int64_t i1) {
#if MBN_X86
    if (use_avx512()) return reduce_items_avx512<A>(op, g, i0, i1, part.data());
#endif
    reduce_items_baseline<A>(op, g, i0, i1, part.data());
  });
  if (!g.cl) return part;
  std::vector<double> sums(static_cast<size_t>(g.B * g.C * 2), 0.0);
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t j = 0; j < g.items_per_image; ++j) {
      const double* p = part.data() + (b * g.items_per_image + j) * 2 * g.Cp;
      for (int64_t c = 0; c < g.C; ++c) {
        sums[(b * g.C + c) * 2] += p[c];
        sums[(b * g.C + c) * 2 + 1] += p[g.Cp + c];
      }
    }
  }
  return sums;
}

// NCHW reduction + finish + element-wise pass, one channel per work item (see channel_items_body).
// Returns sums[b][c][2] as reduce() does.
template <class A, class RedOp, class Finish, class ElemOp>
std::vector<double> reduce_then_elementwise_per_channel(const RedOp& red, const Finish& finish,
                                                        const ElemOp& elem, const Geometry& g) {
  std::vector<double> sums(static_cast<size_t>(g.B * g.C * 2));
  parallel_chunks(g.C, std::max(g.group, grain(g.B * g.HW)), [&](int64_t c0, int64_t c1) {
#if MBN_X86
    if (use_avx512()) return channel_items_avx512<A>(red, finish, elem, g, c0, c1, sums.data());
#endif
    channel_items_baseline<A>(red, finish, elem, g, c0, c1, sums.data());
  });
  return sums;
}

template <class Op>
void elementwise(const Op& op, const Geometry& g) {
  parallel_chunks(g.elem_items(), grain(g.values_per_elem_item()), [&](int64_t i0, int64_t i1) {
#if MBN_X86
    if (use_avx512()) return elem_items_avx512(op, g, i0, i1);
#endif
    elem_items_baseline(op, g, i0, i1);
  });
}

// ---------------------------------------------------------------------------------------------
// Pass objects.
// ---------------------------------------------------------------------------------------------
template <class A, class T>
struct StatsOp {
  const T* x;
  const A* shift;  // (Cp)
  template <bool kVec>
  MBN_INLINE void run(int64_t off, int64_t n, int64_t, int64_t c, Vec<A>* s, Vec<A>* q) const {
    stats_run<kVec, A>(x + off, n, shift + c, s, q);
  }
};

template <class A, class T, bool kRelu>
struct NormPixelOp {
  const T* x; const T* g; const T* b; T* y; uint8_t* mask;
  const A* mean; const A* invstd;  // (Cp)
  template <bool kVec>
  MBN_INLINE void run(int64_t off, int64_t n, int64_t, int64_t c) const {
    norm_run_pixel<kVec, kRelu, A>(x + off, g + off, b + off, y + off, kRelu ? mask + off : nullptr,
                                   n, mean + c, invstd + c);
  }
};

template <class A, class T, bool kRelu>
struct NormChannelOp {
  const T* x; T* y; uint8_t* mask;
  const A* mean;                   // (Cp)
  const A* scale; const A* beta;   // (B, Cp)
  int64_t Cp;
  template <bool kVec>
  MBN_INLINE void run(int64_t off, int64_t n, int64_t b, int64_t c) const {
    norm_run_channel<kVec, kRelu, A>(x + off, y + off, kRelu ? mask + off : nullptr, n, mean + c,
                                     scale + b * Cp + c, beta + b * Cp + c);
  }
};

template <class A, class T, bool kPixel, bool kRelu>
struct BwdSumsOp {
  const T* dy; const T* x; const T* g; const uint8_t* mask;
  const A* mean; const A* invstd;  // (Cp)
  template <bool kVec>
  MBN_INLINE void run(int64_t off, int64_t n, int64_t, int64_t c, Vec<A>* s, Vec<A>* q) const {
    bwd_sums_run<kVec, kPixel, kRelu, A>(dy + off, x + off, kPixel ? g + off : nullptr,
                                         kRelu ? mask + off : nullptr, n, mean + c, invstd + c, s,
                                         q);
  }
};

template <class A, class T, bool kRelu, bool kDx, bool kDmod>
struct BwdPixelOp {
  const T* dy; const T* x; const T* g; const uint8_t* mask; T* dx; T* dg; T* db;
  const A* mean; const A* invstd; const A* k1; const A* k2;  // (Cp)
  template <bool kVec>
  MBN_INLINE void run(int64_t off, int64_t n, int64_t, int64_t c) const {
    bwd_elem_run_pixel<kVec, kRelu, kDx, kDmod, A>(
        dy + off, x + off, g + off, kRelu ? mask + off : nullptr, kDx ? dx + off : nullptr,
        kDmod ? dg + off : nullptr, kDmod ? db + off : nullptr, n, mean + c, invstd + c, k1 + c,
        k2 + c);
  }
};

template <class A, class T, bool kRelu>
struct BwdChannelOp {
  const T* dy; const T* x; const uint8_t* mask; T* dx;
  const A* mean; const A* k1; const A* c2;  // (Cp)
  const A* c1;                              // (B, Cp)
  int64_t Cp;
  template <bool kVec>
  MBN_INLINE void run(int64_t off, int64_t n, int64_t b, int64_t c) const {
    bwd_elem_run_channel<kVec, kRelu, A>(dy + off, x + off, kRelu ? mask + off : nullptr, dx + off,
                                         n, mean + c, c1 + b * Cp + c, k1 + c, c2 + c);
  }
};

// Calls f(std::bool_constant<v>{}): turns a run-time flag into a template argument.
template <class F>
void with_flag(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers.
// ---------------------------------------------------------------------------------------------
Geometry make_geometry(const at::Tensor& x, int64_t lanes) {
  Geometry g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.Cp = (g.C + lanes - 1) / lanes * lanes;
  g.cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.blocked = !g.cl && g.C >= kMinChannelsPerThread * at::get_num_threads();
  // A group's planes of one image stream kMinStreamValues values or more, and all its planes
  // (about kMaxGroupValues values per tensor) stay in L2 between the two passes.
  const int64_t stream = (kMinStreamValues + g.HW - 1) / std::max<int64_t>(1, g.HW);
  const int64_t cached = kMaxGroupValues / std::max<int64_t>(1, g.B * g.HW);
  g.group = std::max<int64_t>(1, std::min(stream, cached));
  // NHWC reductions: about kTargetItems items, each of at least kGrainValues values when possible.
  const int64_t per_image = std::max<int64_t>(1, (kTargetItems + g.B - 1) / std::max<int64_t>(1, g.B));
  int64_t rows = std::max<int64_t>(1, (g.HW + per_image - 1) / per_image);
  rows = std::max(rows, kGrainValues / std::max<int64_t>(1, g.C));
  g.rows_per_item = std::max<int64_t>(1, std::min(rows, g.HW));
  g.items_per_image = (g.HW + g.rows_per_item - 1) / g.rows_per_item;
  return g;
}

template <class A>
std::vector<A> padded(const Geometry& g, int64_t rows = 1) {
  return std::vector<A>(static_cast<size_t>(rows * g.Cp), A(0));
}

// mean, invstd and unbiased var of channel c from the per (b, c) shifted sums sums[b][c][2].
template <class A>
void channel_stats(const Geometry& g, const double* sums, int64_t c, A shift, double eps, A* mean,
                   A* invstd, A* var) {
  const double n = static_cast<double>(g.count());
  double s = 0, q = 0;
  for (int64_t b = 0; b < g.B; ++b) {
    s += sums[(b * g.C + c) * 2];
    q += sums[(b * g.C + c) * 2 + 1];
  }
  const double dm = s / n;
  const double biased = std::max(q / n - dm * dm, 0.0);
  mean[c] = static_cast<A>(shift + dm);
  invstd[c] = static_cast<A>(1.0 / std::sqrt(biased + eps));
  var[c] = static_cast<A>(biased * n / (n - 1));
}

// Per-channel modulation of channel c as (B, Cp) arrays: scale = invstd * (1 + gamma), beta.
template <class A, class T>
void fold_channel_modulation(const Geometry& g, int64_t c, A invstd, const T* gamma, const T* beta,
                             A* scale, A* beta_acc) {
  for (int64_t b = 0; b < g.B; ++b) {
    scale[b * g.Cp + c] = static_cast<A>(invstd * (1 + static_cast<A>(gamma[b * g.C + c])));
    beta_acc[b * g.Cp + c] = static_cast<A>(beta[b * g.C + c]);
  }
}

template <class T, class A>
void forward_impl(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                  const at::Tensor& rm, const at::Tensor& rv, bool training, double eps, bool relu,
                  at::Tensor& y, at::Tensor& mean_out, at::Tensor& invstd_out, at::Tensor& var_out,
                  at::Tensor& mask) {
  const Geometry g = make_geometry(x, kL<A>);
  const bool pixel = gamma.dim() == 4;
  const T *xp = x.data_ptr<T>(), *gp = gamma.data_ptr<T>(), *bp = beta.data_ptr<T>();
  std::vector<A> shift = padded<A>(g), mean = padded<A>(g), invstd = padded<A>(g);
  std::vector<A> scale = padded<A>(g, pixel ? 0 : g.B), beta_acc = padded<A>(g, pixel ? 0 : g.B);
  A* var = training ? var_out.data_ptr<A>() : nullptr;
  // Channel c's parameters once the statistics pass has produced its sums.
  const auto finish_channel = [&](const double* sums, int64_t c) {
    channel_stats<A>(g, sums, c, shift[c], eps, mean.data(), invstd.data(), var);
    if (!pixel) fold_channel_modulation<A>(g, c, invstd[c], gp, bp, scale.data(), beta_acc.data());
  };
  if (training) {
    // The shift of the sums: the channel's first value (b = 0, pixel 0).
    for (int64_t c = 0; c < g.C; ++c) shift[c] = static_cast<A>(xp[g.cl ? c : c * g.HW]);
  } else {
    const at::Tensor m = rm.to(at::kDouble).contiguous(), v = rv.to(at::kDouble).contiguous();
    for (int64_t c = 0; c < g.C; ++c) {
      mean[c] = static_cast<A>(m.data_ptr<double>()[c]);
      invstd[c] = static_cast<A>(1.0 / std::sqrt(v.data_ptr<double>()[c] + eps));
      if (!pixel) fold_channel_modulation<A>(g, c, invstd[c], gp, bp, scale.data(), beta_acc.data());
    }
  }
  uint8_t* mp = relu ? mask.data_ptr<uint8_t>() : nullptr;
  with_flag(relu, [&](auto kRelu) {
    constexpr bool R = std::decay_t<decltype(kRelu)>::value;
    const auto run = [&](const auto& norm) {
      const StatsOp<A, T> stats{xp, shift.data()};
      if (training && g.blocked) {
        reduce_then_elementwise_per_channel<A>(stats, finish_channel, norm, g);
        return;
      }
      if (training) {
        const auto sums = reduce<A>(stats, g);
        for (int64_t c = 0; c < g.C; ++c) finish_channel(sums.data(), c);
      }
      elementwise(norm, g);
    };
    if (pixel) {
      run(NormPixelOp<A, T, R>{xp, gp, bp, y.data_ptr<T>(), mp, mean.data(), invstd.data()});
    } else {
      run(NormChannelOp<A, T, R>{xp, y.data_ptr<T>(), mp, mean.data(), scale.data(),
                                 beta_acc.data(), g.Cp});
    }
  });
  std::copy_n(mean.begin(), g.C, mean_out.data_ptr<A>());
  std::copy_n(invstd.begin(), g.C, invstd_out.data_ptr<A>());
}

// Coefficients of dx for channel c from the backward sums: k1 = invstd * mean_c(dx_hat),
// k2 = invstd * mean_c(dx_hat * x_hat).
template <class A, class T>
void dx_coefficients(const Geometry& g, const double* sums, int64_t c, const T* gamma, bool pixel,
                     A invstd, A* k1, A* k2) {
  const double n = static_cast<double>(g.count());
  double s1 = 0, s2 = 0;
  for (int64_t b = 0; b < g.B; ++b) {
    // Per channel, dx_hat = dym * (1 + gamma[b, c]) and the sums hold dym alone.
    const double w = pixel ? 1.0 : 1.0 + static_cast<double>(gamma[b * g.C + c]);
    s1 += w * sums[(b * g.C + c) * 2];
    s2 += w * sums[(b * g.C + c) * 2 + 1];
  }
  k1[c] = static_cast<A>(invstd * s1 / n);
  k2[c] = static_cast<A>(invstd * s2 / n);
}

template <class T, class A>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                   const at::Tensor& mean_in, const at::Tensor& invstd_in, const at::Tensor& mask,
                   bool training, bool relu, bool need_dx, bool need_dmod, at::Tensor& dx,
                   at::Tensor& dgamma, at::Tensor& dbeta) {
  if (!need_dx && !need_dmod) return;
  const Geometry g = make_geometry(x, kL<A>);
  const bool pixel = gamma.dim() == 4;
  const T *dyp = dy.data_ptr<T>(), *xp = x.data_ptr<T>(), *gp = gamma.data_ptr<T>();
  const uint8_t* mp = relu ? mask.data_ptr<uint8_t>() : nullptr;
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  T* dgp = need_dmod ? dgamma.data_ptr<T>() : nullptr;
  T* dbp = need_dmod ? dbeta.data_ptr<T>() : nullptr;
  std::vector<A> mean = padded<A>(g), invstd = padded<A>(g), k1 = padded<A>(g), k2 = padded<A>(g);
  std::vector<A> c1 = padded<A>(g, pixel ? 0 : g.B), c2 = padded<A>(g);
  std::copy_n(mean_in.data_ptr<A>(), g.C, mean.begin());
  std::copy_n(invstd_in.data_ptr<A>(), g.C, invstd.begin());

  // Per channel: dx = dym * c1 - k1 - (x - mean) * c2, c1 = invstd (1 + gamma), c2 = invstd k2.
  const auto fold_dx_channel = [&](int64_t c) {
    if (pixel) return;
    c2[c] = invstd[c] * k2[c];
    for (int64_t b = 0; b < g.B; ++b) {
      c1[b * g.Cp + c] = static_cast<A>(invstd[c] * (1 + static_cast<A>(gp[b * g.C + c])));
    }
  };
  // Channel c's outputs and dx coefficients once the reduction pass has produced its sums.
  const auto finish_channel = [&](const double* sums, int64_t c) {
    if (!pixel && need_dmod) {  // dbeta[b, c] = sum dym, dgamma[b, c] = sum dym * x_hat
      for (int64_t b = 0; b < g.B; ++b) {
        dbp[b * g.C + c] = static_cast<T>(sums[(b * g.C + c) * 2]);
        dgp[b * g.C + c] = static_cast<T>(sums[(b * g.C + c) * 2 + 1]);
      }
    }
    if (training && need_dx) dx_coefficients<A>(g, sums, c, gp, pixel, invstd[c], k1.data(), k2.data());
    fold_dx_channel(c);
  };
  const bool sums_needed = (training && need_dx) || (!pixel && need_dmod);
  const bool elem_needed = need_dx || (pixel && need_dmod);
  const auto run = [&](const auto& sums_op, const auto& elem_op) {
    if (sums_needed && elem_needed && g.blocked) {
      reduce_then_elementwise_per_channel<A>(sums_op, finish_channel, elem_op, g);
      return;
    }
    if (sums_needed) {
      const auto sums = reduce<A>(sums_op, g);
      for (int64_t c = 0; c < g.C; ++c) finish_channel(sums.data(), c);
    } else {
      for (int64_t c = 0; c < g.C; ++c) fold_dx_channel(c);
    }
    if (elem_needed) elementwise(elem_op, g);
  };
  with_flag(relu, [&](auto kRelu) {
    constexpr bool R = std::decay_t<decltype(kRelu)>::value;
    if (!pixel) {
      run(BwdSumsOp<A, T, false, R>{dyp, xp, gp, mp, mean.data(), invstd.data()},
          BwdChannelOp<A, T, R>{dyp, xp, mp, dxp, mean.data(), k1.data(), c2.data(), c1.data(),
                                g.Cp});
      return;
    }
    const BwdSumsOp<A, T, true, R> sums_op{dyp, xp, gp, mp, mean.data(), invstd.data()};
    with_flag(need_dx, [&](auto kDx) {
      with_flag(need_dmod, [&](auto kDmod) {
        constexpr bool D = std::decay_t<decltype(kDx)>::value;
        constexpr bool M = std::decay_t<decltype(kDmod)>::value;
        if constexpr (D || M) {
          run(sums_op, BwdPixelOp<A, T, R, D, M>{dyp, xp, gp, mp, dxp, dgp, dbp, mean.data(),
                                                 invstd.data(), k1.data(), k2.data()});
        }
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------------
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::MemoryFormat layout_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

void check_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), fn, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, fn, ": x must have shape (B, C, H, W), got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, fn,
              ": x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), fn,
              ": x must be contiguous or channels_last (dense), got strides ", x.strides());
}

// gamma / beta / grad_y-like tensors: x's dtype and device; (B, C) contiguous or x's shape in x's
// memory format.
void check_like_x(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                  bool allow_per_channel) {
  TORCH_CHECK(t.defined() && t.device() == x.device(), fn, ": ", name, " must be on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must be ", x.scalar_type(),
              ", got ", t.scalar_type());
  if (allow_per_channel && t.dim() == 2) {
    TORCH_CHECK(t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.is_contiguous(), fn, ": ",
                name, " per channel must be a contiguous (B, C) = (", x.size(0), ", ", x.size(1),
                ") tensor, got ", t.sizes());
    return;
  }
  TORCH_CHECK(t.sizes() == x.sizes(), fn, ": ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(layout_of(x)), fn, ": ", name,
              " must have x's memory format, got strides ", t.strides(), " for x's ",
              x.strides());
}

void check_channel_vector(const char* fn, const char* name, const at::Tensor& t, int64_t C,
                          std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, fn, ": ", name, " must have shape (", C, "), got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be floating point");
  if (dtype) {
    TORCH_CHECK(t.scalar_type() == *dtype && t.is_contiguous(), fn, ": ", name,
                " must be a contiguous ", *dtype, " tensor, got ", t.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_bn_forward_cpu(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool relu) {
  const char* fn = "modulated_bn_forward_cpu";
  check_x(fn, x);
  check_like_x(fn, "gamma", gamma, x, true);
  check_like_x(fn, "beta", beta, x, true);
  TORCH_CHECK(gamma.sizes() == beta.sizes(), fn, ": gamma and beta must have one shape");
  TORCH_CHECK(eps > 0, fn, ": eps must be positive, got ", eps);
  const int64_t C = x.size(1);
  if (training) {
    TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, fn,
                ": training needs more than one value per channel, got x ", x.sizes());
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), fn,
                ": eval mode (training=False) needs running_mean and running_var");
    check_channel_vector(fn, "running_mean", *running_mean, C, std::nullopt);
    check_channel_vector(fn, "running_var", *running_var, C, std::nullopt);
  }
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({C}, acc), invstd = at::empty({C}, acc);
  at::Tensor var = at::empty({training ? C : 0}, acc);
  at::Tensor mask = relu ? at::empty_like(x, x.options().dtype(at::kByte)) : at::empty({0}, x.options().dtype(at::kByte));
  const at::Tensor rm = training ? at::Tensor() : *running_mean;
  const at::Tensor rv = training ? at::Tensor() : *running_var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulated_bn_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t, A>(x, gamma, beta, rm, rv, training, eps, relu, y, mean, invstd, var,
                              mask);
  });
  return {y, mean, invstd, var, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_bn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mask, bool training, bool relu, bool need_dx,
    bool need_dmod) {
  const char* fn = "modulated_bn_backward_cpu";
  check_x(fn, x);
  check_like_x(fn, "grad_y", grad_y, x, false);
  check_like_x(fn, "gamma", gamma, x, true);
  const int64_t C = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  check_channel_vector(fn, "mean", mean, C, acc);
  check_channel_vector(fn, "invstd", invstd, C, acc);
  if (relu) {
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.sizes() == x.sizes() &&
                    mask.strides() == x.strides(), fn,
                ": mask must be a uint8 tensor with x's shape and strides");
  }
  if (training && need_dx) {
    TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, fn,
                ": training needs more than one value per channel, got x ", x.sizes());
  }
  // Outputs that are not needed are distinct empty tensors (outputs must not alias each other).
  const auto output_like = [&](const at::Tensor& t, bool needed) {
    return needed ? at::empty_like(t) : at::empty({0}, x.options());
  };
  at::Tensor dx = output_like(x, need_dx);
  at::Tensor dgamma = output_like(gamma, need_dmod);
  at::Tensor dbeta = output_like(gamma, need_dmod);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulated_bn_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_impl<scalar_t, A>(grad_y, x, gamma, mean, invstd, mask, training, relu, need_dx,
                               need_dmod, dx, dgamma, dbeta);
  });
  return {dx, dgamma, dbeta};
}

}  // namespace fastxmc

TORCH_LIBRARY_FRAGMENT(fastxmc, m) {
  m.def(
      "modulated_bn_forward(Tensor x, Tensor gamma, Tensor beta, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "modulated_bn_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor mean, Tensor invstd, "
      "Tensor mask, bool training, bool relu, bool need_dx, bool need_dmod) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastxmc, CPU, m) {
  m.impl("modulated_bn_forward", &fastxmc::modulated_bn_forward_cpu);
  m.impl("modulated_bn_backward", &fastxmc::modulated_bn_backward_cpu);
}
