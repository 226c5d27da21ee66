// The CPU kernels, one copy per instruction set (see kernels_isa.cpp), and the choice
// among them at run time. Each returns false only when scratch memory ran out.
#pragma once
#include "../params.hpp"

#define CF_DECLARE_CPU_KERNELS(ns)                                  \
  namespace cf {                                                    \
  namespace ns {                                                    \
  bool attn_fwd(const AttnParams& p, int nthreads);                 \
  bool attn_bwd(const AttnParams& p, int nthreads);                 \
  bool decode_step(const DecodeParams& p, int nthreads);            \
  }                                                                 \
  }

CF_DECLARE_CPU_KERNELS(isa_default)
#if defined(CF_HAVE_ISA_AVX2)
CF_DECLARE_CPU_KERNELS(isa_avx2)
#endif
#if defined(CF_HAVE_ISA_AVX512)
CF_DECLARE_CPU_KERNELS(isa_avx512)
#endif

namespace cf {

struct CpuKernels {
  bool (*attn_fwd)(const AttnParams&, int);
  bool (*attn_bwd)(const AttnParams&, int);
  bool (*decode_step)(const DecodeParams&, int);
  const char* isa;
};

// The widest instruction set this CPU runs (CALM_FAST_CPU_ISA=default|avx2|avx512 caps it).
const CpuKernels& cpu_kernels();

// Caps the instruction set ("default", "avx2", "avx512") for tests and benchmarks; returns
// the one now in use (never wider than the CPU runs), or nullptr for an unknown name.
const char* set_cpu_isa_cap(const char* isa);

}  // namespace cf
