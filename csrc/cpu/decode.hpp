// The fused bridge decode step on the CPU (reference.bridge_decode_step).
//
// One OpenMP region, three phases split by its barriers: (1) the GEMVs q = W_q h_b and
// [k|v] = W_kv h_a + b_kv, rows spread over threads, each weight row read once for the
// whole batch and the new K/V row written straight into the caches; (2) attention of each
// (batch, head) over the cache rows; (3) out = h_b + W_o attn. At batch 1 this is bound
// by reading the weights and the cache, so every phase is streaming dot products with
// explicit vector accumulators (rowdot.hpp).
#pragma once
#include "../params.hpp"
#include "numeric.hpp"
#include "rowdot.hpp"

namespace cf {
namespace CF_ISA_NS {

template <typename T>
bool decode_impl(const DecodeParams& p, int nthreads) {
  using A = typename acc_of<T>::type;
  const int64_t B = p.B, DB = p.DB, DA = p.DA, H = p.H, D = p.D, n = p.n;
  const bool append = p.append;
  Buf<A> hb(B * DB), ha(B * (DA > 0 ? DA : 1)), q(B * DB), attn(B * DB);
  if (!hb.ok() || !ha.ok() || !q.ok() || !attn.ok()) return false;
  for (int64_t b = 0; b < B; ++b) {
    const T* src = static_cast<const T*>(p.h_b) + b * p.shb;
    for (int64_t i = 0; i < DB; ++i) hb[b * DB + i] = to_acc(src[i]);
    if (append) {
      const T* sa = static_cast<const T*>(p.h_a) + b * p.sha;
      for (int64_t i = 0; i < DA; ++i) ha[b * DA + i] = to_acc(sa[i]);
    }
  }
  const A scale = A(1) / std::sqrt(A(D));
  bool failed = false;
#pragma omp parallel num_threads(nthreads)
  {
    // Phase 1: rows [0, DB) of W_q, then (append only) rows [0, 2 DB) of W_kv.
    const int64_t rows1 = DB + (append ? 2 * DB : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows1; ++r) {
      if (r < DB) {
        const T* w = static_cast<const T*>(p.w_q) + r * p.swq;
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
          A res[4];
          const int nb = int(imin(4, B - b0));
          dot_batch(w, &hb[b0 * DB], DB, nb, DB, res);
          for (int bb = 0; bb < nb; ++bb) q[(b0 + bb) * DB + r] = res[bb] * scale;
        }
      } else {
        const int64_t rr = r - DB, c = rr % DB, head = c / D, d = c % D;
        const T* w = static_cast<const T*>(p.w_kv) + rr * p.swkv;
        const A bias = to_acc(static_cast<const T*>(p.b_kv)[rr * p.sbkv]);
        void* cache = rr < DB ? p.kc : p.vc;
        const int64_t* cs = rr < DB ? p.skc : p.svc;
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
          A res[4];
          const int nb = int(imin(4, B - b0));
          dot_batch(w, &ha[b0 * DA], DA, nb, DA, res);
          for (int bb = 0; bb < nb; ++bb) {
            T* dst = static_cast<T*>(cache) + (b0 + bb) * cs[0] + head * cs[1] + p.pos * cs[2] + d;
            *dst = from_acc<T>(res[bb] + bias);
          }
        }
      }
    }
    // Phase 2: softmax(q k^T) v per (batch, head) over cache rows [0, n): all scores first
    // (rowdot.hpp's blocked dot products), then the weights, then one pass over V.
    Buf<A> s(n);
    const bool ok = s.ok();
    if (!ok) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      A* y = &attn[b * DB + h * D];
      if (!ok) continue;
      const T* kb = static_cast<const T*>(p.kc) + b * p.skc[0] + h * p.skc[1];
      const T* vb = static_cast<const T*>(p.vc) + b * p.svc[0] + h * p.svc[1];
      const uint8_t* keep = p.kpm == nullptr ? nullptr : p.kpm + b * p.skpm[0];
      attend_row(&q[b * DB + h * D], kb, p.skc[2], vb, p.svc[2], n, D, keep, p.skpm[1], s.data(), y);
    }
    // Phase 3: out = h_b + W_o attn.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < DB; ++r) {
      const T* w = static_cast<const T*>(p.w_o) + r * p.swo;
      for (int64_t b0 = 0; b0 < B; b0 += 4) {
        A res[4];
        const int nb = int(imin(4, B - b0));
        dot_batch(w, &attn[b0 * DB], DB, nb, DB, res);
        for (int bb = 0; bb < nb; ++bb) {
          const int64_t b = b0 + bb;
          static_cast<T*>(p.out)[b * p.sout + r] = from_acc<T>(hb[b * DB + r] + res[bb]);
        }
      }
    }
  }
  return !failed;
}

}  // namespace CF_ISA_NS
}  // namespace cf
