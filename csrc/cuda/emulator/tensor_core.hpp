// Emulated tensor-core and async-copy instructions for csrc/cuda/mma_sync.cuh: mma.sync
// m16n8k16 (bf16/fp16 in, fp32 accumulate), ldmatrix .x4 (plain and .trans), cp.async with its
// commit/wait groups. Fragments follow the PTX ISA layouts ("Matrix Fragments for
// mma.m16n8k16", "ldmatrix"): the emulator gathers every lane's registers, rebuilds the
// matrices by those layouts, multiplies, and hands each lane its part. cp.async copies happen
// when a wait retires their group, so a read before the wait sees the old bytes, as it may on
// a GPU. Misaligned addresses abort with a message (they fault on a GPU).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_core.hpp"

namespace cf_emu {

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) return __bfloat162float(__nv_bfloat16{bits});
  return __half2float(__half{bits});
}

// d = a * b + c for one warp; a: 4 x b32 (8 halves), b: 2 x b32, c/d: 4 floats per lane.
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         bool bf16) {
  struct Frag { uint32_t a[4], b[2]; float c[4]; };
  Frag mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  Frag all[32];
  gather_all(mine, all, "mma.sync");
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {  // a_i: register i / 2, half i % 2
      const uint16_t bits = uint16_t(all[lane].a[i / 2] >> (16 * (i % 2)));
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_bits_to_float(bits, bf16);
    }
    for (int i = 0; i < 4; ++i) {  // b_i: row = t * 2 + (i & 1) (+ 8 for i >= 2), col = g
      const uint16_t bits = uint16_t(all[lane].b[i / 2] >> (16 * (i % 2)));
      B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = half_bits_to_float(bits, bf16);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][t * 2 + (i & 1)] = all[lane].c[i];
  }
  const int g = ctx.lane >> 2, t = ctx.lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = t * 2 + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc = fmaf(A[row][k], B[k][col], acc);
    d[i] = acc;
  }
}

// ldmatrix .x4 .b16: lanes 8i..8i+7 give the row addresses of matrix i (16-byte rows).
// Plain: lane l gets M_i[l / 4][2 (l % 4) + {0, 1}] in register i; .trans: M_i[2 (l % 4) + {0, 1}][l / 4].
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) misuse("ldmatrix: a row address is not 16-byte aligned");
  const void* rows[32];
  gather_all(row, rows, "ldmatrix");
  const int l = ctx.lane, g = l >> 2, t = l & 3;
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      const uint16_t* p = trans ? static_cast<const uint16_t*>(rows[8 * i + 2 * t + j]) + g
                                : static_cast<const uint16_t*>(rows[8 * i + g]) + 2 * t + j;
      e[j] = *p;
    }
    r[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    misuse("cp.async: a 16-byte copy with an address that is not 16-byte aligned");
  ctx.fiber->cp_open.push_back({dst, src, valid});
}

inline void cp_async_commit() {
  Fiber& f = *ctx.fiber;
  f.cp_groups.push_back(std::move(f.cp_open));
  f.cp_open.clear();
}

// Retires every committed group but the `pending` most recent: their copies land now.
inline void cp_async_wait(int pending) {
  Fiber& f = *ctx.fiber;
  while (int(f.cp_groups.size()) > pending) {
    for (const Fiber::Copy& c : f.cp_groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    f.cp_groups.erase(f.cp_groups.begin());
  }
}

}  // namespace cf_emu
