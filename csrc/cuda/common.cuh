// Device helpers shared by the CUDA kernels: storage types <-> fp32, vector loads, warp
// reductions. Storage is fp32, bf16 or fp16; every sum is accumulated in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <tuple>

namespace cf {
namespace cuda {

// Kernel launches and dynamic shared memory have one spelling each, so that the CPU emulator
// (csrc/cuda/emulator, -DCF_CUDA_EMULATOR) runs these same sources in CI.
#ifdef CF_CUDA_EMULATOR
#define CF_DYNAMIC_SMEM(name) unsigned char* name = ::cf_emu::dynamic_smem()
#else
#define CF_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args... args) {
#ifdef CF_CUDA_EMULATOR
  (void)stream;
  return ::cf_emu::launch(false, kernel, grid, block, smem, KArgs(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// Lets kKernel use `bytes` of dynamic shared memory (past the 48 KB default); once per device.
template <auto kKernel>
cudaError_t allow_dynamic_smem(size_t bytes) {
  static std::mutex mu;
  static bool done[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 64 && done[dev]) return cudaSuccess;
  e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e == cudaSuccess && dev < 64) done[dev] = true;
  return e;
}

// Every block of the grid co-resident (the caller sizes the grid by occupancy): grid.sync() works.
template <typename... KArgs, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               Args... args) {
#ifdef CF_CUDA_EMULATOR
  (void)stream;
  return ::cf_emu::launch(true, kernel, grid, block, smem, KArgs(args)...);
#else
  std::tuple<KArgs...> typed{static_cast<KArgs>(args)...};
  return std::apply(
      [&](auto&... a) {
        void* ptrs[] = {static_cast<void*>(&a)...};
        return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid, block, ptrs, smem, stream);
      },
      typed);
#endif
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Elements of T in one 16-byte load.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// 16 bytes at p (16-byte aligned) as N floats; ld.global.cg when `cg` (data written by other
// blocks earlier in the same launch must not come from a stale L1 line).
template <typename T, bool cg = false>
__device__ __forceinline__ void load16(const T* p, float (&out)[Vec<T>::N]) {
  uint4 raw = cg ? __ldcg(reinterpret_cast<const uint4*>(p)) : __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_f(e[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// A polling read of a counter that other blocks raise with atomics (no fence: the poller
// fences after it has seen the count).
__device__ __forceinline__ int load_volatile(const int* p) {
#ifdef CF_CUDA_EMULATOR
  return __atomic_load_n(p, __ATOMIC_RELAXED);  // what the race checker reads as a poll, not a race
#else
  return *reinterpret_cast<const volatile int*>(p);
#endif
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace cf
