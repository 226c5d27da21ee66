// Host-side launchers of the CUDA kernels (called by capi_cuda.cu after validation).
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "../params.hpp"

namespace cf {
namespace cuda {

// Bytes of scratch the decode step needs; -1 when the sizes are invalid, -2 when they are
// too large (beyond the size caps, or the byte count overflows int64).
int64_t decode_workspace_bytes(int64_t B, int64_t DB, int64_t H, int64_t S);

// Each returns cudaSuccess or the launch error; `why` explains a non-CUDA refusal
// (returned as cudaErrorInvalidValue with a message).
cudaError_t launch_decode_step(const DecodeParams& p, void* workspace, cudaStream_t stream, std::string* why);
cudaError_t launch_attn_fwd(const AttnParams& p, cudaStream_t stream, std::string* why);

// The mma.sync forward (attn_fwd_mma.cu): bf16/fp16, head dim 64/128, 16-byte-aligned rows.
bool attn_fwd_mma_supported(const AttnParams& p);
cudaError_t launch_attn_fwd_mma(const AttnParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace cf
