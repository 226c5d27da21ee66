// Dot products of one row against many, and one query row's attention built on them: the
// decode step's attention and the forward for a few query rows.
//
// The prefill kernel reuses each key tile for 64 query rows; a decode step has one query row
// per head, so its work is plain dot products whose cost is the horizontal sum at the end of
// each (a 64-element key row takes 4 vector FMAs, then ~16 dependent scalar adds). Here a
// block of L keys (L = vector lanes) is scored as L vectors of partial sums, and a fold tree
// (log2 L levels of two-source shuffles) turns those into one vector of L scores. GEMV rows
// keep several independent vector accumulators so the FMA latency is hidden.
#pragma once
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "microkernels.hpp"

#if defined(__has_builtin) && !defined(CF_NO_SHUFFLE)  // CF_NO_SHUFFLE: test the fallback
#if __has_builtin(__builtin_shufflevector) && __has_builtin(__builtin_convertvector)
#define CF_HAVE_SHUFFLE 1  // GCC >= 12, Clang: else the same sums lane by lane
#endif
#endif

namespace cf {
namespace CF_ISA_NS {

template <typename A> using Vec = typename VecT<A>::type;

// lanes<A>() elements at p, converted to accumulators.
template <typename A>
inline Vec<A> load_acc(const A* p) { return loadv(p); }
inline Vec<float> load_acc(const bf16* p) {
#if (defined(__AVX512F__) && CF_VEC_BYTES == 64) || (defined(__AVX2__) && CF_VEC_BYTES == 32)
  // Widen in one instruction (GCC splits the generic convert below into four), then shift.
  // The maskz form: the plain intrinsic trips GCC 12's -Wmaybe-uninitialized in its header.
  typedef uint32_t U32 __attribute__((vector_size(CF_VEC_BYTES)));
#if CF_VEC_BYTES == 64
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  U32 w;
  std::memcpy(&w, &wide, sizeof(w));
  w <<= 16;
  Vec<float> f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#elif defined(CF_HAVE_SHUFFLE)
  typedef uint16_t U16 __attribute__((vector_size(CF_VEC_BYTES / 2)));
  typedef uint32_t U32 __attribute__((vector_size(CF_VEC_BYTES)));
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 w = __builtin_convertvector(h, U32) << 16;
  Vec<float> f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#else
  Vec<float> f;
  for (int l = 0; l < lanes<float>(); ++l) f[l] = to_acc(p[l]);
  return f;
#endif
}

#ifdef CF_HAVE_SHUFFLE
// x and y each hold L/G keys' partial sums in groups of G lanes. fold<G>(x, y) adds the two
// halves of every group: 2L/G keys in groups of G/2, x's keys first, order kept.
template <int L, int G>
constexpr int fold_index(int r, int upper) {
  const int from_y = r >= L / 2, rr = r % (L / 2), group = rr / (G / 2), i = rr % (G / 2);
  return from_y * L + group * G + upper * (G / 2) + i;
}
template <typename A, int G, int... R>
inline Vec<A> fold(Vec<A> x, Vec<A> y, std::integer_sequence<int, R...>) {
  constexpr int L = lanes<A>();
  return __builtin_shufflevector(x, y, fold_index<L, G>(R, 0)...) +
         __builtin_shufflevector(x, y, fold_index<L, G>(R, 1)...);
}
template <typename A, int G>
inline Vec<A> fold(Vec<A> x, Vec<A> y) {
  return fold<A, G>(x, y, std::make_integer_sequence<int, lanes<A>()>{});
}
// v[0..G) hold L/G keys each in groups of G lanes; returns their L sums, key k in lane k.
template <typename A, int G>
inline Vec<A> fold_tree(Vec<A>* v) {
  if constexpr (G == 1) {
    return v[0];
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < G / 2; ++i) v[i] = fold<A, G>(v[2 * i], v[2 * i + 1]);
    return fold_tree<A, G / 2>(v);
  }
}
#endif

// Lane k of the result = the sum of v[k]'s lanes, for k < L (v is clobbered).
template <typename A>
inline Vec<A> transpose_sum(Vec<A>* v) {
  constexpr int L = lanes<A>();
#ifdef CF_HAVE_SHUFFLE
  return fold_tree<A, L>(v);
#else
  Vec<A> out;
  for (int k = 0; k < L; ++k) {
    A s = 0;
    for (int l = 0; l < L; ++l) s += v[k][l];
    out[k] = s;
  }
  return out;
#endif
}

// The sum of v's lanes.
template <typename A>
inline A hsum(Vec<A> v) {
  constexpr int L = lanes<A>();
  A part[L];
  storev(part, v);
  for (int w = L / 2; w >= 1; w /= 2)  // a tree of halves: no chain of L dependent adds
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

// out[b] = w · x[b * ldx : b * ldx + n] for b < NB: the weight row is loaded and converted
// once for the whole batch; U vectors per batch row in flight (U * NB >= 4 chains).
template <int NB, typename T, typename A>
inline void dot_nb(const T* __restrict w, const A* __restrict x, int64_t ldx, int64_t n, A* out) {
  constexpr int L = lanes<A>(), U = NB >= 4 ? 1 : 4 / NB;
  Vec<A> acc[U][NB];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) acc[u][b] = Vec<A>{};
  int64_t i = 0;
  for (; i + U * L <= n; i += U * L) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const Vec<A> wv = load_acc(w + i + u * L);
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) acc[u][b] += wv * loadv(x + b * ldx + i + u * L);
    }
  }
  for (; i + L <= n; i += L) {
    const Vec<A> wv = load_acc(w + i);
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) acc[0][b] += wv * loadv(x + b * ldx + i);
  }
  for (int b = 0; b < NB; ++b) {
    Vec<A> t = acc[0][b];
    for (int u = 1; u < U; ++u) t += acc[u][b];
    A s = hsum<A>(t);
    for (int64_t k = i; k < n; ++k) s += to_acc(w[k]) * x[b * ldx + k];
    out[b] = s;
  }
}

template <typename T, typename A>
inline A dot(const T* w, const A* x, int64_t n) {
  A out;
  dot_nb<1>(w, x, 0, n, &out);
  return out;
}

// out[b] = w · x[b * ldx : ...] for b < nb (any nb >= 1, four rows at a time).
template <typename T, typename A>
inline void dot_batch(const T* w, const A* x, int64_t ldx, int nb, int64_t n, A* out) {
  switch (nb) {
    case 1: dot_nb<1>(w, x, ldx, n, out); break;
    case 2: dot_nb<2>(w, x, ldx, n, out); break;
    case 3: dot_nb<3>(w, x, ldx, n, out); break;
    default: dot_nb<4>(w, x, ldx, n, out); break;
  }
}

// s[j] = q · row j for j < n, row j at k + j * ldk (D elements of T; q: D accumulators).
template <typename T, typename A>
inline void row_scores(const A* __restrict q, const T* __restrict k, int64_t ldk, int64_t n,
                       int64_t D, A* __restrict s) {
  constexpr int L = lanes<A>();
  const int64_t DV = D - D % L;  // columns done in vectors; the rest element by element
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    Vec<A> acc[L];
#pragma GCC unroll 16
    for (int jj = 0; jj < L; ++jj) acc[jj] = Vec<A>{};
    const T* kb = k + j * ldk;
    for (int64_t d = 0; d < DV; d += L) {
      const Vec<A> qv = loadv(q + d);
#pragma GCC unroll 16
      for (int jj = 0; jj < L; ++jj) acc[jj] += load_acc(kb + jj * ldk + d) * qv;
    }
    Vec<A> sv = transpose_sum<A>(acc);
    for (int64_t d = DV; d < D; ++d)
      for (int jj = 0; jj < L; ++jj) sv[jj] += to_acc(kb[jj * ldk + d]) * q[d];
    storev(s + j, sv);
  }
  for (; j < n; ++j) s[j] = dot(k + j * ldk, q, D);
}

// y[0:D] = sum of p[j] * row j over the keys j < n the mask keeps (keep: nullable, byte j *
// ks); masked keys are skipped, not weighted by 0, so an inf or NaN in their values cannot
// reach y, while a kept key counts even at weight 0 (0 * inf is NaN, as in the reference).
template <typename T, typename A>
inline void row_weighted_sum(const A* __restrict p, const uint8_t* keep, int64_t ks,
                             const T* __restrict v, int64_t ldv, int64_t n, int64_t D, A* __restrict y) {
  constexpr int L = lanes<A>(), CW = kNV * L;
  int64_t c0 = 0;
  for (; c0 + CW <= D; c0 += CW) {  // kNV vectors of y held in registers over all keys
    Vec<A> acc[kNV];
#pragma GCC unroll 8
    for (int c = 0; c < kNV; ++c) acc[c] = Vec<A>{};
    for (int64_t j = 0; j < n; ++j) {
      if (keep != nullptr && !keep[j * ks]) continue;
      const A pj = p[j];
      const T* row = v + j * ldv + c0;
#pragma GCC unroll 8
      for (int c = 0; c < kNV; ++c) acc[c] += load_acc(row + c * L) * pj;
    }
#pragma GCC unroll 8
    for (int c = 0; c < kNV; ++c) storev(y + c0 + c * L, acc[c]);
  }
  for (; c0 + L <= D; c0 += L) {
    Vec<A> acc = Vec<A>{};
    for (int64_t j = 0; j < n; ++j)
      if (keep == nullptr || keep[j * ks]) acc += load_acc(v + j * ldv + c0) * p[j];
    storev(y + c0, acc);
  }
  for (int64_t d = c0; d < D; ++d) {
    A acc = 0;
    for (int64_t j = 0; j < n; ++j)
      if (keep == nullptr || keep[j * ks]) acc += p[j] * to_acc(v[j * ldv + d]);
    y[d] = acc;
  }
}

// One query row's attention over keys [0, n): y = softmax(q k^T) v with the keys `keep`
// masks out (nullable; byte j * ks) removed, q already scaled. s: n scratch accumulators
// (scores, then weights). Returns the log-sum-exp of the kept scores: -inf when no key is kept (y = 0),
// NaN when a kept score is NaN or every kept score is -inf (y = NaN, as softmax gives).
template <typename T, typename A>
inline A attend_row(const A* q, const T* k, int64_t ldk, const T* v, int64_t ldv, int64_t n,
                    int64_t D, const uint8_t* keep, int64_t ks, A* __restrict s, A* __restrict y) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  row_scores(q, k, ldk, n, D, s);
  int any = n > 0, bad = 0;
  if (keep != nullptr) {
    any = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int kj = keep[j * ks] != 0;
      any |= kj;
      s[j] = kj ? s[j] : neg_inf<A>();  // a masked key's own score may be NaN: drop it
    }
  }
  A mx = neg_inf<A>();
#pragma omp simd reduction(| : bad) reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    bad |= s[j] != s[j];
    mx = mx > s[j] ? mx : s[j];
  }
  if (!any) {
    for (int64_t d = 0; d < D; ++d) y[d] = A(0);
    return neg_inf<A>();
  }
  if (bad || mx == neg_inf<A>()) {
    for (int64_t d = 0; d < D; ++d) y[d] = nan;
    return nan;
  }
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {  // masked keys: exp(-inf) = 0 (and skipped below)
    s[j] = exp_neg(s[j] - mx);
    sum += s[j];
  }
  row_weighted_sum(s, keep, ks, v, ldv, n, D, y);
  const A inv = A(1) / sum;
  for (int64_t d = 0; d < D; ++d) y[d] *= inv;
  return mx + std::log(sum);
}

}  // namespace CF_ISA_NS
}  // namespace cf
