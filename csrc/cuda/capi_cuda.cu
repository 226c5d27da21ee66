// C API entry points of the CUDA kernels: validate (same rules as the CPU ones, plus the
// workspace), launch on the caller's stream, and report CUDA errors as CF_ERR_CUDA.
// Pointers must be device memory of the current device; this is not (cheaply) checkable.
#include <string>

#include "../calm_fast.h"
#include "../validate.hpp"
#include "launch.hpp"

using namespace cf;

namespace {

cf_status report(cudaError_t e, const std::string& why, const char* what) {
  if (e == cudaSuccess) return CF_OK;
  if (!why.empty()) {
    const cf_status s = e == cudaErrorNotSupported ? CF_ERR_UNSUPPORTED : CF_ERR_VALUE;
    return set_error(s, std::string(what) + ": " + why);
  }
  return set_error(CF_ERR_CUDA, std::string(what) + ": CUDA error " + cudaGetErrorName(e) + ": " +
                                    cudaGetErrorString(e));
}

// cuda::decode_workspace_bytes, with cf_last_error naming the sizes when it refuses them.
int64_t checked_workspace_bytes(const char* what, int64_t B, int64_t DB, int64_t H, int64_t S) {
  const int64_t n = cuda::decode_workspace_bytes(B, DB, H, S);
  if (n >= 0) return n;
  const std::string sizes = "batch=" + std::to_string(B) + ", d_b=" + std::to_string(DB) + ", n_heads=" +
                            std::to_string(H) + ", n_rows=" + std::to_string(S);
  set_error(CF_ERR_VALUE, std::string(what) + ": " + sizes +
                              (n == -1 ? ": need batch >= 0, n_rows >= 0 and d_b > 0 a multiple of n_heads > 0"
                                       : ": too large for the CUDA decode kernel (batch and d_b <= 2^20, "
                                         "n_rows <= 2^30, and the workspace bytes must fit in int64)"));
  return -1;
}

}  // namespace

extern "C" {

cf_status cf_attn_fwd_cuda(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                           const cf_tensor* kpm, int32_t mask, const cf_tensor* out,
                           const cf_tensor* lse, void* stream) {
  AttnParams p;
  cf_status s = make_attn_params(Backend::kCuda, q, k, v, kpm, mask, out, lse, &p);
  if (s != CF_OK) return s;
  if (p.B * p.H * p.Tq == 0) return CF_OK;
  std::string why;
  return report(cuda::launch_attn_fwd(p, static_cast<cudaStream_t>(stream), &why), why, "cf_attn_fwd_cuda");
}

int64_t cf_decode_workspace_bytes_cuda(int64_t batch, int64_t d_b, int64_t n_heads, int64_t n_rows) {
  return checked_workspace_bytes("cf_decode_workspace_bytes_cuda", batch, d_b, n_heads, n_rows);
}

cf_status cf_decode_step_cuda(const cf_tensor* h_b, const cf_tensor* h_a, const cf_tensor* w_q,
                              const cf_tensor* w_kv, const cf_tensor* b_kv, const cf_tensor* w_o,
                              const cf_tensor* k_cache, const cf_tensor* v_cache,
                              const cf_tensor* kpm, int64_t pos, int64_t n_heads,
                              const cf_tensor* out, void* workspace, int64_t workspace_bytes,
                              void* stream) {
  DecodeParams p;
  cf_status s = make_decode_params(Backend::kCuda, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache,
                                   kpm, pos, n_heads, out, &p);
  if (s != CF_OK) return s;
  const int64_t need = checked_workspace_bytes("cf_decode_step_cuda", p.B, p.DB, p.H, p.S);
  if (need < 0) return CF_ERR_VALUE;
  if (workspace == nullptr) return set_error(CF_ERR_NULL, "workspace: pointer is NULL");
  if ((reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)
    return set_error(CF_ERR_VALUE, "workspace: must be 16-byte aligned");
  if (workspace_bytes < need)
    return set_error(CF_ERR_VALUE, "workspace: " + std::to_string(workspace_bytes) + " bytes given, " +
                                       std::to_string(need) + " needed");
  if (p.B == 0) return CF_OK;
  std::string why;
  return report(cuda::launch_decode_step(p, workspace, static_cast<cudaStream_t>(stream), &why), why,
                "cf_decode_step_cuda");
}

}  // extern "C"
