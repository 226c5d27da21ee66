// Compiled once per instruction set: CMake sets CF_ISA_NS (isa_default, isa_avx2,
// isa_avx512) and the matching -m flags, so the kernels below exist in each namespace.
#include "kernels.hpp"

#include "attention.hpp"
#include "decode.hpp"

namespace cf {
namespace CF_ISA_NS {

bool attn_fwd(const AttnParams& p, int nt) {
  switch (p.dtype) {
    case CF_F32: return attn_fwd_impl<float>(p, nt);
    case CF_F64: return attn_fwd_impl<double>(p, nt);
    case CF_BF16: return attn_fwd_impl<bf16>(p, nt);
    default: return false;
  }
}

bool attn_bwd(const AttnParams& p, int nt) {
  switch (p.dtype) {
    case CF_F32: return attn_bwd_impl<float>(p, nt);
    case CF_F64: return attn_bwd_impl<double>(p, nt);
    case CF_BF16: return attn_bwd_impl<bf16>(p, nt);
    default: return false;
  }
}

bool decode_step(const DecodeParams& p, int nt) {
  switch (p.dtype) {
    case CF_F32: return decode_impl<float>(p, nt);
    case CF_F64: return decode_impl<double>(p, nt);
    case CF_BF16: return decode_impl<bf16>(p, nt);
    default: return false;
  }
}

}  // namespace CF_ISA_NS
}  // namespace cf
