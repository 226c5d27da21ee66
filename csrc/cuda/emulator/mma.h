// Emulator stand-in for <mma.h> (WMMA, 16x16x16 only). A fragment's element layout is opaque
// in CUDA, so here every lane holds the whole tile: loads read all of it, mma_sync multiplies
// in fp32, store_matrix_sync writes it from lane 0. Code that is correct under any layout is
// what the API allows, and what this checks.
#pragma once
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_core.hpp"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  float v[16 * 16];
};

inline float element(float x) { return x; }
inline float element(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float element(__half x) { return __half2float(x); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = element(row ? p[size_t(r) * ld + c] : p[size_t(c) * ld + r]);
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float x) {
  for (float& e : f.v) e = x;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[r * 16 + n];
      for (int k = 0; k < 16; ++k) s = fmaf(a.v[r * 16 + k], b.v[k * 16 + n], s);
      out[r * 16 + n] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld,
                              layout_t layout) {
  if (cf_emu::ctx.lane != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const size_t at = layout == mem_row_major ? size_t(r) * ld + c : size_t(c) * ld + r;
      p[at] = f.v[r * 16 + c];
    }
}

}  // namespace wmma
}  // namespace nvcuda
