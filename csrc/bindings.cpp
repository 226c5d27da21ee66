// calm_fast._C: the CPU kernels for Python. Takes tensors as (data_ptr, dtype, shape,
// strides) tuples, so it needs no torch headers; the GIL is released while kernels run.
#include "cpu/kernels.hpp"
#include "py_common.hpp"

namespace py = pybind11;
using cf_py::ptr;
using cf_py::to_desc;

PYBIND11_MODULE(_C, m) {
  m.doc() = "calm_fast CPU kernels (C++/OpenMP) over raw pointers";
  cf_py::add_constants(m);
  m.def("version", [] { return std::string(cf_version()); });
  m.def("cpu_isa", [] { return std::string(cf::cpu_kernels().isa); },
        "Instruction set of the CPU kernels picked for this machine.");
  m.def("set_cpu_isa", [](const std::string& isa) {
    const char* got = cf::set_cpu_isa_cap(isa.c_str());
    if (got == nullptr) throw py::value_error("isa must be 'default', 'avx2' or 'avx512', got '" + isa + "'");
    return std::string(got);
  }, "Cap the CPU kernels' instruction set (testing/benchmarks); returns the one in use.");
  m.def("set_num_threads", [](int n) { cf_py::raise_if_error(cf_set_num_threads(n)); });
  m.def("attn_fwd", [](py::object q, py::object k, py::object v, py::object kpm, int mask,
                       py::object out, py::object lse) {
    auto dq = to_desc(q, "q"), dk = to_desc(k, "k"), dv = to_desc(v, "v");
    auto dm = to_desc(kpm, "key_padding_mask"), dout = to_desc(out, "out"), dl = to_desc(lse, "lse");
    cf_status s;
    {
      py::gil_scoped_release nogil;
      s = cf_attn_fwd_cpu(ptr(dq), ptr(dk), ptr(dv), ptr(dm), mask, ptr(dout), ptr(dl));
    }
    cf_py::raise_if_error(s);
  });
  m.def("attn_bwd", [](py::object q, py::object k, py::object v, py::object kpm, int mask,
                       py::object out, py::object dout, py::object lse, py::object dq,
                       py::object dk, py::object dv) {
    auto tq = to_desc(q, "q"), tk = to_desc(k, "k"), tv = to_desc(v, "v");
    auto tm = to_desc(kpm, "key_padding_mask"), to = to_desc(out, "out");
    auto tdo = to_desc(dout, "dout"), tl = to_desc(lse, "lse");
    auto tdq = to_desc(dq, "dq"), tdk = to_desc(dk, "dk"), tdv = to_desc(dv, "dv");
    cf_status s;
    {
      py::gil_scoped_release nogil;
      s = cf_attn_bwd_cpu(ptr(tq), ptr(tk), ptr(tv), ptr(tm), mask, ptr(to), ptr(tdo), ptr(tl),
                          ptr(tdq), ptr(tdk), ptr(tdv));
    }
    cf_py::raise_if_error(s);
  });
  m.def("decode_step", [](py::object h_b, py::object h_a, py::object w_q, py::object w_kv,
                          py::object b_kv, py::object w_o, py::object k_cache,
                          py::object v_cache, py::object kpm, int64_t pos, int64_t n_heads,
                          py::object out) {
    auto t_hb = to_desc(h_b, "h_b"), t_ha = to_desc(h_a, "h_a"), t_wq = to_desc(w_q, "w_q");
    auto t_wkv = to_desc(w_kv, "w_kv"), t_bkv = to_desc(b_kv, "b_kv"), t_wo = to_desc(w_o, "w_o");
    auto t_kc = to_desc(k_cache, "k_cache"), t_vc = to_desc(v_cache, "v_cache");
    auto t_m = to_desc(kpm, "key_padding_mask"), t_out = to_desc(out, "out");
    cf_status s;
    {
      py::gil_scoped_release nogil;
      s = cf_decode_step_cpu(ptr(t_hb), ptr(t_ha), ptr(t_wq), ptr(t_wkv), ptr(t_bkv), ptr(t_wo),
                             ptr(t_kc), ptr(t_vc), ptr(t_m), pos, n_heads, ptr(t_out));
    }
    cf_py::raise_if_error(s);
  });
}
