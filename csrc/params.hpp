// Validated kernel arguments: what the C API hands to a backend after every check passed.
// Strides are in elements; the innermost (head-dim / feature) stride is always 1.
#pragma once
#include <cstdint>

#include "calm_fast.h"

namespace cf {

struct AttnParams {
  int dtype = CF_F32;  // q/k/v/out/dout/dq/dk/dv; lse is fp32 (fp64 when dtype is fp64)
  int64_t B = 0, H = 0, Tq = 0, Tk = 0, D = 0;
  bool aligned = true;
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t sq[3]{}, sk[3]{}, sv[3]{};  // (batch, head, row)
  const uint8_t* kpm = nullptr;        // optional (B, Tk)
  int64_t skpm[2]{};
  void* out = nullptr;
  int64_t so[3]{};
  bool out_f32 = false;  // out is fp32 although q/k/v are bf16: the unrounded output a training
                         // backward forms delta = dout·out from (CPU only)
  void* lse = nullptr;
  int64_t sl[3]{};
  // backward only
  const void* dout = nullptr;
  int64_t sdo[3]{};
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  int64_t sdq[3]{}, sdk[3]{}, sdv[3]{};
};

struct DecodeParams {
  int dtype = CF_F32;  // every tensor but the mask
  int64_t B = 0, H = 0, D = 0, DB = 0, DA = 0, S = 0, pos = 0;
  int64_t n = 0;  // cache rows attended: pos + 1 with h_a, pos without
  bool append = false;  // aligned mode: h_a given, its K/V row written at pos (h_a may be NULL when D_A = 0)
  const void* h_b = nullptr;
  int64_t shb = 0;  // batch stride of h_b (the row itself is contiguous)
  const void* h_a = nullptr;  // read only when append and DA > 0
  int64_t sha = 0;
  const void *w_q = nullptr, *w_kv = nullptr, *b_kv = nullptr, *w_o = nullptr;
  int64_t swq = 0, swkv = 0, sbkv = 0, swo = 0;  // row strides (bias: element stride)
  void *kc = nullptr, *vc = nullptr;
  int64_t skc[3]{}, svc[3]{};
  const uint8_t* kpm = nullptr;
  int64_t skpm[2]{};
  void* out = nullptr;
  int64_t sout = 0;
};

}  // namespace cf
