// The CUDA entry points of calm_fast.h in a libcalm_fast built without CUDA: every call
// fails with CF_ERR_UNSUPPORTED and says why, so one header serves every build.
#include "calm_fast.h"
#include "validate.hpp"

namespace {
const char* const kNoCuda = ": this libcalm_fast was built without CUDA (nvcc not found or CALM_FAST_CUDA=OFF)";
}

extern "C" {

cf_status cf_attn_fwd_cuda(const cf_tensor*, const cf_tensor*, const cf_tensor*, const cf_tensor*, int32_t,
                           const cf_tensor*, const cf_tensor*, void*) {
  return cf::set_error(CF_ERR_UNSUPPORTED, std::string("cf_attn_fwd_cuda") + kNoCuda);
}

int64_t cf_decode_workspace_bytes_cuda(int64_t, int64_t, int64_t, int64_t) {
  cf::set_error(CF_ERR_UNSUPPORTED, std::string("cf_decode_workspace_bytes_cuda") + kNoCuda);
  return -1;
}

cf_status cf_decode_step_cuda(const cf_tensor*, const cf_tensor*, const cf_tensor*, const cf_tensor*,
                              const cf_tensor*, const cf_tensor*, const cf_tensor*, const cf_tensor*,
                              const cf_tensor*, int64_t, int64_t, const cf_tensor*, void*, int64_t, void*) {
  return cf::set_error(CF_ERR_UNSUPPORTED, std::string("cf_decode_step_cuda") + kNoCuda);
}

}  // extern "C"
