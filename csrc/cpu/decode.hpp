// The fused bridge decode step on the CPU (reference.bridge_decode_step).
//
// One OpenMP region, three phases split by its barriers: (1) the GEMVs q = W_q h_b and
// [k|v] = W_kv h_a + b_kv, rows spread over threads, each weight row read once for the
// whole batch and the new K/V row written straight into the caches; (2) attention of each
// (batch, head) over the cache rows; (3) out = h_b + W_o attn. At batch 1 this is bound
// by reading the weights, so the loops are streaming dot products the compiler vectorises.
#pragma once
#include "../params.hpp"
#include "numeric.hpp"

namespace cf {
namespace CF_ISA_NS {

// sum_i w[i] * x[i] with 16 independent partial sums: vectorises on every ISA and breaks
// the FMA latency chain (a single-accumulator loop can stay scalar after inlining).
template <typename T, typename A>
inline A dot(const T* __restrict w, const A* __restrict x, int64_t n) {
  constexpr int L = 16;
  A part[L];
  for (int l = 0; l < L; ++l) part[l] = A(0);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) part[l] += to_acc(w[i + l]) * x[i + l];
  A acc = 0;
  for (; i < n; ++i) acc += to_acc(w[i]) * x[i];
  for (int l = 0; l < L; ++l) acc += part[l];
  return acc;
}

// out[b] = w · x[b * ldx : ...] for b < NB: the weight row is loaded and converted once for
// the whole batch (at batch > 1, re-converting bf16 weights per row costs more than the bytes).
template <int NB, typename T, typename A>
inline void dot_nb(const T* __restrict w, const A* __restrict x, int64_t ldx, int64_t n, A* out) {
  constexpr int L = 16;
  A part[NB][L];
  for (int b = 0; b < NB; ++b)
    for (int l = 0; l < L; ++l) part[b][l] = A(0);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    A wf[L];
    for (int l = 0; l < L; ++l) wf[l] = to_acc(w[i + l]);
    for (int b = 0; b < NB; ++b)
      for (int l = 0; l < L; ++l) part[b][l] += wf[l] * x[b * ldx + i + l];
  }
  for (int b = 0; b < NB; ++b) {
    A acc = 0;
    for (int64_t k = i; k < n; ++k) acc += to_acc(w[k]) * x[b * ldx + k];
    for (int l = 0; l < L; ++l) acc += part[b][l];
    out[b] = acc;
  }
}

template <typename T, typename A>
inline void dot_batch(const T* w, const A* x, int64_t ldx, int nb, int64_t n, A* out) {
  switch (nb) {
    case 1: out[0] = dot(w, x, n); break;
    case 2: dot_nb<2>(w, x, ldx, n, out); break;
    case 3: dot_nb<3>(w, x, ldx, n, out); break;
    default: dot_nb<4>(w, x, ldx, n, out); break;
  }
}

template <typename T>
bool decode_impl(const DecodeParams& p, int nthreads) {
  using A = typename acc_of<T>::type;
  const int64_t B = p.B, DB = p.DB, DA = p.DA, H = p.H, D = p.D, n = p.n;
  const bool append = p.h_a != nullptr;
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
    // Phase 2: softmax(q k^T) v per (batch, head) over cache rows [0, n).
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
      for (int64_t d = 0; d < D; ++d) y[d] = A(0);
      if (!ok) continue;
      const A* qh = &q[b * DB + h * D];
      const T* kb = static_cast<const T*>(p.kc) + b * p.skc[0] + h * p.skc[1];
      const T* vb = static_cast<const T*>(p.vc) + b * p.svc[0] + h * p.svc[1];
      A mx = neg_inf<A>();
      bool bad = false, any = false;
      for (int64_t j = 0; j < n; ++j) {
        const bool keep = p.kpm == nullptr || p.kpm[b * p.skpm[0] + j * p.skpm[1]];
        any |= keep;
        s[j] = keep ? dot(kb + j * p.skc[2], qh, D) : neg_inf<A>();
        bad |= s[j] != s[j];
        mx = mx > s[j] ? mx : s[j];
      }
      if (bad || (any && mx == neg_inf<A>())) {  // NaN score, or every allowed score -inf:
                                                 // softmax gives NaN, as in the reference
        for (int64_t d = 0; d < D; ++d) y[d] = std::numeric_limits<A>::quiet_NaN();
        continue;
      }
      if (mx == neg_inf<A>()) continue;  // nothing visible: output 0
      A sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (s[j] == neg_inf<A>()) continue;  // masked; a visible key counts even if its
        const A pj = exp_neg(s[j] - mx);        // weight underflows (0 * NaN must stay NaN)
        sum += pj;
        const T* vr = vb + j * p.svc[2];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) y[d] += pj * to_acc(vr[d]);
      }
      const A inv = A(1) / sum;
      for (int64_t d = 0; d < D; ++d) y[d] *= inv;
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
