// Argument checking shared by every C API entry point (CPU and CUDA): null pointers,
// ranks, dtypes, negative sizes, int64 overflow of sizes and offsets, strides, and the
// shape relations of each operation. Failures set the thread's last error message.
#pragma once
#include <string>

#include "calm_fast.h"
#include "params.hpp"

namespace cf {

cf_status set_error(cf_status status, const std::string& message);
void clear_error();
const char* g_error_c_str();
const char* dtype_name(int dtype);
int64_t dtype_size(int dtype);

// Allowed dtypes for the floating-point tensors of each backend.
enum class Backend { kCpu, kCuda };

// outputs_written: out and lse are the forward's outputs (checked not to overlap themselves
// or an input); false in the backward, which only reads them.
cf_status make_attn_params(Backend be, const cf_tensor* q, const cf_tensor* k,
                           const cf_tensor* v, const cf_tensor* kpm, int32_t mask,
                           const cf_tensor* out, const cf_tensor* lse, AttnParams* p,
                           bool outputs_written = true);

// The backward's tensors; q..lse are the ones make_attn_params checked (dq, dk, dv must not
// overlap them, each other or themselves).
cf_status add_attn_backward(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                            const cf_tensor* kpm, const cf_tensor* out, const cf_tensor* lse,
                            const cf_tensor* dout, const cf_tensor* dq, const cf_tensor* dk,
                            const cf_tensor* dv, AttnParams* p);

cf_status make_decode_params(Backend be, const cf_tensor* h_b, const cf_tensor* h_a,
                             const cf_tensor* w_q, const cf_tensor* w_kv,
                             const cf_tensor* b_kv, const cf_tensor* w_o,
                             const cf_tensor* k_cache, const cf_tensor* v_cache,
                             const cf_tensor* kpm, int64_t pos, int64_t n_heads,
                             const cf_tensor* out, DecodeParams* p);

}  // namespace cf
