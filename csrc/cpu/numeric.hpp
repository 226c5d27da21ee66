// Scalar helpers the CPU kernels inline into vectorised loops: bf16 <-> fp32, an exp that
// GCC/Clang vectorise (std::exp stays a scalar libm call without -ffast-math), and an
// aligned scratch buffer.
//
// Everything here lives in the per-ISA namespace CF_ISA_NS: this header is compiled once per
// instruction set, and an inline function or template shared across those translation
// units (std::vector<float>, say) could be merged by the linker into its AVX-512 copy and
// crash an older CPU. So the kernels use only these helpers, never std containers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#ifndef CF_ISA_NS
#error "compile the CPU kernels through kernels_isa.cpp, which sets CF_ISA_NS"
#endif

namespace cf {
namespace CF_ISA_NS {

struct bf16 {
  uint16_t bits;
};

// Accumulator type: fp64 for fp64 storage, fp32 for everything else.
template <typename T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };

inline float to_acc(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }

template <typename T> inline T from_acc(float x);
template <> inline float from_acc<float>(float x) { return x; }
template <> inline bf16 from_acc<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return bf16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}
template <typename T> inline T from_acc(double x) { return static_cast<T>(x); }

// exp(x) for x <= 0 (softmax after subtracting the row max), ~2 ulp; x < -87 (and -inf)
// gives 0, NaN gives NaN. Round-by-magic-number instead of nearbyint so SSE2 builds vectorise it too.
inline float exp_neg(float x) {
  const bool nan = x != x;  // NaN must not reach the float->int conversion below (UB)
  const float xc = (x < -87.0f || nan) ? -87.0f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return nan ? x : (x < -87.0f ? 0.0f : p * scale);
}
inline double exp_neg(double x) { return std::exp(x); }

template <typename A> constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// 64-byte aligned scratch of n accumulators. Never throws (it is built inside OpenMP
// regions, which must not throw): check ok() and report failure as a status.
template <typename A>
struct Buf {
  A* p = nullptr;
  explicit Buf(int64_t n) {
    const size_t bytes = ((size_t(n > 0 ? n : 1) * sizeof(A) + 63) / 64) * 64;
    p = static_cast<A*>(std::aligned_alloc(64, bytes));
  }
  bool ok() const { return p != nullptr; }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  A* data() { return p; }
  A& operator[](int64_t i) { return p[i]; }
  void zero(int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = A(0);
  }
};

}  // namespace CF_ISA_NS
}  // namespace cf
