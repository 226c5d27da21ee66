// calm_fast._C_cuda: the CUDA kernels for Python, same conventions as calm_fast._C plus a
// stream handle (an int: torch.cuda.current_stream().cuda_stream). This module alone links
// the CUDA runtime, so `import calm_fast._C` never needs CUDA.
#include <cuda_runtime.h>

#include "py_common.hpp"

namespace py = pybind11;
using cf_py::ptr;
using cf_py::to_desc;

namespace {
void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "calm_fast CUDA kernels over raw device pointers";
  cf_py::add_constants(m);
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  }, "CUDA devices visible to this module's runtime (0 without a driver).");
  m.def("attn_fwd", [](py::object q, py::object k, py::object v, py::object kpm, int mask,
                       py::object out, py::object lse, uintptr_t stream) {
    auto tq = to_desc(q, "q"), tk = to_desc(k, "k"), tv = to_desc(v, "v");
    auto tm = to_desc(kpm, "key_padding_mask"), to = to_desc(out, "out"), tl = to_desc(lse, "lse");
    cf_status s;
    {
      py::gil_scoped_release nogil;
      s = cf_attn_fwd_cuda(ptr(tq), ptr(tk), ptr(tv), ptr(tm), mask, ptr(to), ptr(tl), as_stream(stream));
    }
    cf_py::raise_if_error(s);
  });
  m.def("decode_workspace_bytes", [](int64_t b, int64_t d_b, int64_t h, int64_t s) {
    const int64_t n = cf_decode_workspace_bytes_cuda(b, d_b, h, s);
    if (n < 0) throw py::value_error("invalid decode sizes for the workspace");
    return n;
  });
  m.def("decode_step", [](py::object h_b, py::object h_a, py::object w_q, py::object w_kv,
                          py::object b_kv, py::object w_o, py::object k_cache, py::object v_cache,
                          py::object kpm, int64_t pos, int64_t n_heads, py::object out,
                          uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
    auto t_hb = to_desc(h_b, "h_b"), t_ha = to_desc(h_a, "h_a"), t_wq = to_desc(w_q, "w_q");
    auto t_wkv = to_desc(w_kv, "w_kv"), t_bkv = to_desc(b_kv, "b_kv"), t_wo = to_desc(w_o, "w_o");
    auto t_kc = to_desc(k_cache, "k_cache"), t_vc = to_desc(v_cache, "v_cache");
    auto t_m = to_desc(kpm, "key_padding_mask"), t_out = to_desc(out, "out");
    cf_status s;
    {
      py::gil_scoped_release nogil;
      s = cf_decode_step_cuda(ptr(t_hb), ptr(t_ha), ptr(t_wq), ptr(t_wkv), ptr(t_bkv), ptr(t_wo),
                              ptr(t_kc), ptr(t_vc), ptr(t_m), pos, n_heads, ptr(t_out),
                              reinterpret_cast<void*>(workspace), workspace_bytes, as_stream(stream));
    }
    cf_py::raise_if_error(s);
  });
}
