// Shared by the pybind11 modules: Python tensor descriptors -> cf_tensor, and C API status
// -> Python exception. Python passes each tensor as (data_ptr, dtype_code, shape, strides)
// or None; no torch types cross this boundary.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "calm_fast.h"

namespace cf_py {
namespace py = pybind11;

inline int64_t to_i64(py::handle h, const char* what) {
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow != 0) throw py::value_error(std::string(what) + " does not fit in int64");
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(std::string(what) + " must be an int");
  }
  return v;
}

// None -> nullopt; else a 4-tuple (ptr, dtype, shape, strides).
inline std::optional<cf_tensor> to_desc(py::handle obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 4)
    throw py::type_error(std::string(name) + ": expected (data_ptr, dtype, shape, strides) or None");
  py::tuple t = py::reinterpret_borrow<py::tuple>(obj);
  cf_tensor d{};
  const unsigned long long ptr = PyLong_AsUnsignedLongLong(t[0].ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": data_ptr must be a non-negative int");
  }
  d.data = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
  const int64_t code = to_i64(t[1], "dtype");
  if (code < INT32_MIN || code > INT32_MAX)  // not truncated into a valid code: 2**32 is not float32
    throw py::type_error(std::string(name) + ": unknown dtype code " + std::to_string(code));
  d.dtype = static_cast<int32_t>(code);
  py::sequence shape = t[2].cast<py::sequence>(), strides = t[3].cast<py::sequence>();
  if (py::len(shape) > CF_MAX_DIMS || py::len(shape) != py::len(strides))
    throw py::value_error(std::string(name) + ": shape and strides must have the same length <= 4");
  d.ndim = static_cast<int32_t>(py::len(shape));
  for (int i = 0; i < d.ndim; ++i) {
    d.shape[i] = to_i64(shape[i], "shape entry");
    d.stride[i] = to_i64(strides[i], "stride entry");
  }
  return d;
}

inline const cf_tensor* ptr(const std::optional<cf_tensor>& d) { return d ? &*d : nullptr; }

inline void raise_if_error(cf_status s) {
  if (s == CF_OK) return;
  const std::string msg = cf_last_error();
  switch (s) {
    case CF_ERR_DTYPE: throw py::type_error(msg);
    case CF_ERR_NULL:
    case CF_ERR_VALUE:
    case CF_ERR_OVERFLOW: throw py::value_error(msg);
    default: throw std::runtime_error(msg);
  }
}

inline void add_constants(py::module_& m) {
  m.attr("F32") = int(CF_F32);
  m.attr("F64") = int(CF_F64);
  m.attr("BF16") = int(CF_BF16);
  m.attr("F16") = int(CF_F16);
  m.attr("BOOL") = int(CF_BOOL);
  m.attr("MASK_ALIGNED") = int(CF_MASK_ALIGNED);
  m.attr("MASK_CONTEXT") = int(CF_MASK_CONTEXT);
}

}  // namespace cf_py
