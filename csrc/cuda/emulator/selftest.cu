// Checks of the emulator itself (tests/test_cuda_emulated.py): its collectives move the right
// values, and a collective that some threads never reach fails the launch by name. Built
// only with -DCF_CUDA_EMULATOR.
#include <cooperative_groups.h>

#include <string>

#include "../common.cuh"
#include "../mma_sync.cuh"

namespace {

using cf::cuda::launch_cooperative;
using cf::cuda::launch_kernel;

std::string g_selftest_error;

// 64 threads: out[t] gets several collective results per thread (8 ints each).
__global__ void primitives_kernel(int* out, int* counter) {
  CF_DYNAMIC_SMEM(smem);
  int* shared = reinterpret_cast<int*>(smem);
  const int t = threadIdx.x, lane = t & 31;
  int* o = out + 8 * t;
  o[0] = __shfl_xor_sync(0xffffffffu, t, 1);
  o[1] = __shfl_sync(0xffffffffu, t, 3);
  o[2] = __any_sync(0xffffffffu, lane == 17);
  o[3] = __any_sync(0xffffffffu, 0);
  o[4] = int(__shfl_xor_sync(0xffffffffu, float(t) * 0.5f, 16) * 2.f);
  shared[t] = 100 + t;
  __syncthreads();
  o[5] = shared[63 - t];
  o[6] = atomicAdd(counter, 1) >= 0;
  o[7] = int(blockDim.x);
}

// 3 blocks x 32 threads: each writes its slot, then after grid.sync() reads another block's.
__global__ void grid_kernel(int* slots, int* out) {
  const int g = int(blockIdx.x) * 32 + int(threadIdx.x);
  slots[g] = 1000 + g;
  cooperative_groups::this_grid().sync();
  out[g] = slots[(g + 32) % 96];
}

__global__ void divergent_kernel(int which) {
  const int t = threadIdx.x, lane = t & 31;
  if (which == 0) {
    if (t >= 32 && lane < 16) __syncwarp();  // half of warp 1 waits for the other half
    else __syncthreads();                    // ... which waits here with warp 0
  } else {
    if (lane < 16) (void)__shfl_xor_sync(0xffffffffu, t, 1);
    else __syncthreads();
  }
}

// One warp: ldmatrix from a row address 8 bytes off a 16-byte boundary (a fault on a GPU).
__global__ void misaligned_kernel() {
  CF_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  cf::cuda::ldmatrix_x4<false>(r, smem + 8 + 16 * (threadIdx.x % 8));
}

int fail(const std::string& why) {
  g_selftest_error = why;
  return 1;
}

}  // namespace

extern "C" {

const char* cf_emu_selftest_last_error(void) { return g_selftest_error.c_str(); }

int cf_emu_selftest_primitives(void) {
  int out[64 * 8] = {}, counter = 0;
  if (launch_kernel(primitives_kernel, dim3(1), dim3(64), 64 * sizeof(int), nullptr, out, &counter) != cudaSuccess)
    return fail("primitives launch failed: " + cf_emu::last_failure);
  for (int t = 0; t < 64; ++t) {
    const int* o = out + 8 * t;
    const int want[8] = {t ^ 1, (t & ~31) + 3, 1, 0, t ^ 16, 100 + 63 - t, 1, 64};
    for (int i = 0; i < 8; ++i)
      if (o[i] != want[i])
        return fail("thread " + std::to_string(t) + " check " + std::to_string(i) + ": got " + std::to_string(o[i]) +
                    ", want " + std::to_string(want[i]));
  }
  if (counter != 64) return fail("atomicAdd counted " + std::to_string(counter) + " of 64");
  int slots[96] = {}, got[96] = {};
  if (launch_cooperative(grid_kernel, dim3(3), dim3(32), 0, nullptr, slots, got) != cudaSuccess)
    return fail("grid launch failed: " + cf_emu::last_failure);
  for (int g = 0; g < 96; ++g)
    if (got[g] != 1000 + (g + 32) % 96) return fail("grid.sync: thread " + std::to_string(g) + " read a stale slot");
  return 0;
}

int cf_emu_selftest_divergent(int which) {
  const cudaError_t e = which == 2 ? launch_kernel(misaligned_kernel, dim3(1), dim3(32), 256, nullptr)
                                   : launch_kernel(divergent_kernel, dim3(1), dim3(which == 0 ? 64 : 32), 0, nullptr, which);
  g_selftest_error = cf_emu::last_failure;
  return e == cudaSuccess ? 0 : 1;
}

}  // extern "C"
