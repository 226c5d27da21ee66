// Emulator stand-in for <cuda_fp16.h>: fp16 storage through the compiler's _Float16.
#pragma once
#include <cstdint>
#include <cstring>

struct __half { uint16_t bits; };

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
