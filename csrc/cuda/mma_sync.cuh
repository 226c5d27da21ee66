// Warp-level tensor-core and async-copy primitives (sm_80+): mma.sync m16n8k16 with fp32
// accumulation, ldmatrix .x4 (plain / .trans) and cp.async 16-byte copies with commit/wait
// groups. Register layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16"):
//   groupID g = lane / 4, t = lane % 4;
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16 x 8, "col"):      b[0] = (rows 2t..2t+1, col g), b[1] = (rows 2t+8..2t+9, col g)
//   C/D (16 x 8, fp32):     c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// Under -DCF_CUDA_EMULATOR the same functions run on the CPU (emulator/tensor_core.hpp).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"

#ifdef CF_CUDA_EMULATOR
#include "emulator/tensor_core.hpp"
#endif

namespace cf {
namespace cuda {

// Two floats as one register of two T (bf16 or fp16), the low half first.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_f<T>(lo), b = from_f<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return uint32_t(ua) | (uint32_t(ub) << 16);
}

// d += a * b on the warp's tensor cores (T: __nv_bfloat16 or __half).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef CF_CUDA_EMULATOR
  cf_emu::mma_m16n8k16(d, a, b, d, std::is_same<T, __nv_bfloat16>::value);
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory; this lane gives the address of
// row lane % 8 of matrix lane / 8 (16-byte aligned). kTrans: each matrix transposed.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef CF_CUDA_EMULATOR
  cf_emu::ldmatrix_x4(r, row, kTrans);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

// 16 bytes global -> shared without passing through registers; !valid writes 16 zero bytes
// (src is not read). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef CF_CUDA_EMULATOR
  cf_emu::cp_async_16(smem, gmem, valid);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef CF_CUDA_EMULATOR
  cf_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CF_CUDA_EMULATOR
  cf_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace cuda
}  // namespace cf
