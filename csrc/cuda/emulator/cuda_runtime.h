// Emulator stand-in for <cuda_runtime.h>: the keywords, intrinsics and runtime calls that
// csrc/cuda uses, on the CPU (see emu_core.hpp).
#pragma once
#ifndef CF_CUDA_EMULATOR
#error "csrc/cuda/emulator is on the include path without -DCF_CUDA_EMULATOR"
#endif
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "emu_core.hpp"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- device intrinsics
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) {
  T v;
  std::memcpy(&v, static_cast<const void*>(p), sizeof v);
  return v;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return cf_emu::exchange(v, cf_emu::ctx.lane ^ lane_mask, "__shfl_xor_sync");
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src_lane, int = 32) {
  return cf_emu::exchange(v, src_lane, "__shfl_sync");
}
inline int __any_sync(unsigned, int pred) {
  int any = 0;
  for (int i = 0; i < cf_emu::ctx.warp->size; ++i) any |= cf_emu::exchange(pred != 0, i, "__any_sync");
  return any;
}
inline void __syncwarp(unsigned = 0xffffffffu) { cf_emu::ctx.warp->bar.wait("__syncwarp"); }
inline void __syncthreads() { cf_emu::ctx.block->bar.wait("__syncthreads"); }
// One OS thread runs every fiber, so memory is sequential; for the race checker (emu_core.hpp)
// a fence is one global sequentially consistent fence: everything before any fence happens
// before everything after any later one.
inline void __threadfence() {
  static char fence_token;
  cf_emu::tsan::release(&fence_token);
  cf_emu::tsan::acquire(&fence_token);
}
// A polling thread lets the others run; a poll that never ends is a deadlock on a GPU too.
inline void __nanosleep(unsigned) {
  cf_emu::Fiber* f = cf_emu::ctx.fiber;
  if (++f->polls > 50'000'000) cf_emu::misuse("a spin-wait (__nanosleep loop) never ended");
  cf_emu::yield();
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }  // relaxed, as in CUDA

// CUDA's min/max overloads for device code (int64_t, int, float alike).
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// ---- runtime API
typedef void* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrCooperativeLaunch = 95 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace cf_emu {
inline int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && std::atoi(s) > 0 ? std::atoi(s) : fallback;
}
}  // namespace cf_emu

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorLaunchOutOfResources";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaErrorLaunchFailure ? cf_emu::last_failure.c_str() : cudaGetErrorName(e);
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* dev) { *dev = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
// The emulated GPU: CF_EMU_SMS multiprocessors (default 2), CF_EMU_BLOCKS_PER_SM co-resident
// blocks each (default 1): the cooperative decode grid is small, so each warp walks many rows.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? cf_emu::env_int("CF_EMU_SMS", 2) : 1;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  *n = cf_emu::env_int("CF_EMU_BLOCKS_PER_SM", 1);
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  return value <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;  // an H100's opt-in limit
}

namespace cf_emu {
template <typename... KArgs, typename... Args>
cudaError_t launch(bool cooperative, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 ||
      block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535 || smem > 227 * 1024)
    return cudaErrorInvalidValue;
  return run_blocks(cooperative, kernel, grid, block, smem, std::tuple<KArgs...>(args...)) ? cudaSuccess
                                                                                       : cudaErrorLaunchFailure;
}
}  // namespace cf_emu
