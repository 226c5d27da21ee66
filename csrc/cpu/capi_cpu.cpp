// C API entry points of the CPU kernels: check everything, then run the ISA-specific copy.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../calm_fast.h"
#include "../validate.hpp"
#include "kernels.hpp"

namespace cf {
namespace {

std::atomic<int> g_threads{0};
constexpr int kMaxThreads = 4096;  // cf_set_num_threads refuses more

// Threads for a call doing about `work` multiply-adds: small calls run on one thread,
// since waking a team costs more than they do (and far more on an oversubscribed machine).
int threads(double work) {
  if (work < 2e5) return 1;
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

std::atomic<int> g_isa_cap{-1};  // -1: from CALM_FAST_CPU_ISA (else no cap)

int isa_rank(const std::string& s) { return s == "default" ? 0 : s == "avx2" ? 1 : 2; }

[[maybe_unused]] bool isa_allowed(const char* isa) {  // unused without ISA dispatch
  const int forced = g_isa_cap.load();
  if (forced >= 0) return isa_rank(isa) <= forced;
  const char* cap = std::getenv("CALM_FAST_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return true;
  const std::string c = cap, want = isa;
  const int rank_cap = c == "default" ? 0 : c == "avx2" ? 1 : 2;
  const int rank = want == "default" ? 0 : want == "avx2" ? 1 : 2;
  return rank <= rank_cap;
}

CpuKernels pick() {
#if defined(CF_HAVE_ISA_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && isa_allowed("avx512"))
    return {isa_avx512::attn_fwd, isa_avx512::attn_bwd, isa_avx512::decode_step, "avx512"};
#endif
#if defined(CF_HAVE_ISA_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && isa_allowed("avx2"))
    return {isa_avx2::attn_fwd, isa_avx2::attn_bwd, isa_avx2::decode_step, "avx2"};
#endif
  return {isa_default::attn_fwd, isa_default::attn_bwd, isa_default::decode_step, "default"};
}

cf_status oom() { return set_error(CF_ERR_INTERNAL, "out of memory for kernel scratch buffers"); }

}  // namespace

namespace {
std::atomic<const CpuKernels*> g_kernels{nullptr};
}

const CpuKernels& cpu_kernels() {
  const CpuKernels* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    static const CpuKernels picked = pick();
    k = &picked;
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

const char* set_cpu_isa_cap(const char* isa) {
  static CpuKernels choices[3];
  const std::string s = isa;
  if (s != "default" && s != "avx2" && s != "avx512") return nullptr;
  const int rank = isa_rank(s);
  g_isa_cap.store(rank);
  choices[rank] = pick();
  g_kernels.store(&choices[rank], std::memory_order_release);
  return choices[rank].isa;
}

}  // namespace cf

using namespace cf;

extern "C" {

const char* cf_version(void) { return "calm_fast 0.1"; }

cf_status cf_set_num_threads(int32_t n) {
  if (n < 0) return set_error(CF_ERR_VALUE, "num_threads must be >= 0, got " + std::to_string(n));
  // OpenMP ends the process (libgomp: "Thread creation failed") when it cannot create the
  // team a later call asks for: refuse absurd counts here, with a status.
  const int limit = std::min(kMaxThreads, omp_get_thread_limit());
  if (n > limit)
    return set_error(CF_ERR_VALUE, "num_threads=" + std::to_string(n) + " exceeds the limit of " +
                                       std::to_string(limit) + " (min of " + std::to_string(kMaxThreads) +
                                       " and omp_get_thread_limit())");
  g_threads.store(n, std::memory_order_relaxed);
  return CF_OK;
}

cf_status cf_attn_fwd_cpu(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                          const cf_tensor* kpm, int32_t mask, const cf_tensor* out,
                          const cf_tensor* lse) {
  AttnParams p;
  cf_status s = make_attn_params(Backend::kCpu, q, k, v, kpm, mask, out, lse, &p);
  if (s != CF_OK) return s;
  if (p.B * p.H * p.Tq == 0) return CF_OK;
  return cpu_kernels().attn_fwd(p, threads(double(p.B * p.H) * p.Tq * p.Tk * p.D)) ? CF_OK : oom();
}

cf_status cf_attn_bwd_cpu(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                          const cf_tensor* kpm, int32_t mask, const cf_tensor* out,
                          const cf_tensor* dout, const cf_tensor* lse, const cf_tensor* dq,
                          const cf_tensor* dk, const cf_tensor* dv) {
  AttnParams p;
  cf_status s = make_attn_params(Backend::kCpu, q, k, v, kpm, mask, out, lse, &p, /*outputs_written=*/false);
  if (s == CF_OK) s = add_attn_backward(q, k, v, kpm, out, lse, dout, dq, dk, dv, &p);
  if (s != CF_OK) return s;
  if (p.B * p.H == 0) return CF_OK;
  return cpu_kernels().attn_bwd(p, threads(2.0 * p.B * p.H * p.Tq * p.Tk * p.D)) ? CF_OK : oom();
}

cf_status cf_decode_step_cpu(const cf_tensor* h_b, const cf_tensor* h_a, const cf_tensor* w_q,
                             const cf_tensor* w_kv, const cf_tensor* b_kv, const cf_tensor* w_o,
                             const cf_tensor* k_cache, const cf_tensor* v_cache,
                             const cf_tensor* kpm, int64_t pos, int64_t n_heads,
                             const cf_tensor* out) {
  DecodeParams p;
  cf_status s = make_decode_params(Backend::kCpu, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache,
                                   v_cache, kpm, pos, n_heads, out, &p);
  if (s != CF_OK) return s;
  if (p.B == 0) return CF_OK;
  const double work = double(p.B) * (p.DB * (2.0 * p.DB + 2.0 * p.DA) + 2.0 * p.n * p.DB);
  return cpu_kernels().decode_step(p, threads(work)) ? CF_OK : oom();
}

}  // extern "C"
