// Register-blocked micro-kernels of the CPU attention forward, written with GCC/Clang vector
// extensions so each ISA copy gets explicit register tiles of its own width (CF_VEC_BYTES:
// 64 for AVX-512, 32 for AVX2, 16 for SSE2; CF_ROWS query rows per tile). With R rows x 4
// vectors of accumulators held in registers, every key/value vector loaded from the tile
// feeds R FMAs instead of one.
#pragma once
#include <cstring>

#include "numeric.hpp"

#ifndef CF_VEC_BYTES
#define CF_VEC_BYTES 16
#endif
#ifndef CF_ROWS
#define CF_ROWS 2
#endif

namespace cf {
namespace CF_ISA_NS {

template <typename A> struct VecT;
template <> struct VecT<float> { typedef float type __attribute__((vector_size(CF_VEC_BYTES))); };
template <> struct VecT<double> { typedef double type __attribute__((vector_size(CF_VEC_BYTES))); };

template <typename A> constexpr int lanes() { return CF_VEC_BYTES / int(sizeof(A)); }
constexpr int kRows = CF_ROWS;  // query rows per register tile
constexpr int kNV = 4;          // vectors per row in a register tile

template <typename A>
inline typename VecT<A>::type loadv(const A* p) {
  typename VecT<A>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
inline void storev(A* p, typename VecT<A>::type v) { std::memcpy(p, &v, sizeof(v)); }

// s[r][j0 + c] = x_r · key (j0 + c) for r < kRows, c < kNV * lanes, from the transposed tile
// kt (D x ldk). x rows have stride ldx, s rows stride lds.
template <typename A>
inline void dots_block(const A* __restrict x, int64_t ldx, const A* __restrict kt, int64_t ldk,
                       int64_t D, A* __restrict s, int64_t lds) {
  using V = typename VecT<A>::type;
  constexpr int L = lanes<A>();
  V acc[kRows][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) acc[r][v] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V t[kNV];
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) t[v] = loadv(kt + d * ldk + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const A xr = x[r * ldx + d];
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] += t[v] * xr;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) storev(s + r * lds + v * L, acc[r][v]);
}

// y[r][0:D] += sum_{jj < n[r]} p[r][jj] * rows[jj][0:D] for r < kRows (p rows stride ldp,
// y rows stride D). Per-row counts keep a row from touching keys it may not see, so an
// inf there cannot turn into NaN through 0 * inf.
template <typename A>
inline void pv_block(const A* __restrict p, int64_t ldp, const A* __restrict rows, const int* n,
                     int64_t D, A* __restrict y) {
  using V = typename VecT<A>::type;
  constexpr int L = lanes<A>(), CW = kNV * L;
  int nmax = 0;
  for (int r = 0; r < kRows; ++r) nmax = n[r] > nmax ? n[r] : nmax;
  int64_t c0 = 0;
  for (; c0 + CW <= D; c0 += CW) {
    V acc[kRows][kNV];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] = loadv(y + r * D + c0 + v * L);
    for (int jj = 0; jj < nmax; ++jj) {
      V t[kNV];
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) t[v] = loadv(rows + jj * D + c0 + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        if (jj >= n[r]) continue;
        const A pr = p[r * ldp + jj];
#pragma GCC unroll 8
        for (int v = 0; v < kNV; ++v) acc[r][v] += t[v] * pr;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) storev(y + r * D + c0 + v * L, acc[r][v]);
  }
  if (c0 < D) {  // columns left over when D is not a multiple of the register tile
    for (int r = 0; r < kRows; ++r)
      for (int jj = 0; jj < n[r]; ++jj) {
        const A pr = p[r * ldp + jj];
        const A* src = rows + jj * D;
        for (int64_t c = c0; c < D; ++c) y[r * D + c] += pr * src[c];
      }
  }
}

}  // namespace CF_ISA_NS
}  // namespace cf
