// Flash-style masked cross-attention on the CPU, forward and backward.
//
// Included once per instruction set by kernels_isa.cpp (inside namespace CF_ISA_NS), so the
// same loops are compiled for SSE2, AVX2 and AVX-512 and picked at run time. Work is split
// over (batch, head, row block) with OpenMP; inside a block the loops are written so the
// compiler vectorises them: scores as broadcast-FMA over a transposed key tile, P·V as
// four-row AXPYs. Nothing of size Tq x Tk is ever stored.
#pragma once
#include "../params.hpp"
#include "microkernels.hpp"
#include "numeric.hpp"
#include "rowdot.hpp"

namespace cf {
namespace CF_ISA_NS {

constexpr int kBQ = 64;  // query rows per work item
constexpr int kBK = 64;  // key rows per tile

template <typename T>
inline const T* row_ptr(const void* base, const int64_t* s, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(base) + b * s[0] + h * s[1] + i * s[2];
}
template <typename T>
inline T* row_ptr_mut(void* base, const int64_t* s, int64_t b, int64_t h, int64_t i) {
  return static_cast<T*>(base) + b * s[0] + h * s[1] + i * s[2];
}

// A key tile converted to the accumulator type, in both layouts the kernels need:
// kt (D x kBK, for scores by broadcast-FMA) and kr (kBK x D, for AXPYs).
template <typename T, typename A>
struct KeyTile {
  Buf<A> kt, kr, vt, vr;
  A valid[kBK];  // 1 where the key exists and is not padding
  int n = 0;
  explicit KeyTile(int64_t D) : kt(D * kBK), kr(kBK * D), vt(D * kBK), vr(kBK * D) {}
  bool ok() const { return kt.ok() && kr.ok() && vt.ok() && vr.ok(); }

  // need_bwd: also the transposed V tile (vt) the backward's dO·v dot products read.
  void load(const AttnParams& p, int64_t b, int64_t h, int64_t j0, bool need_bwd) {
    const int64_t D = p.D;
    n = int(imin(kBK, p.Tk - j0));
    for (int jj = 0; jj < kBK; ++jj) {
      valid[jj] = (jj < n && (p.kpm == nullptr || p.kpm[b * p.skpm[0] + (j0 + jj) * p.skpm[1]])) ? A(1) : A(0);
      A* krow = &kr[jj * D];
      A* vrow = &vr[jj * D];
      if (valid[jj] != A(0)) {
        const T* kp = row_ptr<T>(p.k, p.sk, b, h, j0 + jj);
        const T* vp = row_ptr<T>(p.v, p.sv, b, h, j0 + jj);
        for (int64_t d = 0; d < D; ++d) krow[d] = to_acc(kp[d]);
        for (int64_t d = 0; d < D; ++d) vrow[d] = to_acc(vp[d]);
      } else {  // padding (or past Tk): zeros, so inf/NaN there cannot leak through 0 * inf
        for (int64_t d = 0; d < D; ++d) krow[d] = A(0);
        for (int64_t d = 0; d < D; ++d) vrow[d] = A(0);
      }
    }
    transpose(kr.data(), D, kt.data());
    if (need_bwd) transpose(vr.data(), D, vt.data());
  }

  // t (D x kBK) = r (kBK x D)^T, in 16 x 16 blocks so both sides stay in L1 lines.
  static void transpose(const A* __restrict r, int64_t D, A* __restrict t) {
    for (int64_t d0 = 0; d0 < D; d0 += 16)
      for (int j0 = 0; j0 < kBK; j0 += 16)
        for (int64_t d = d0; d < imin(D, d0 + 16); ++d)
#pragma omp simd
          for (int jj = j0; jj < j0 + 16; ++jj) t[d * kBK + jj] = r[jj * D + d];
  }
};

// s[0:kBK] = x · rows of the tile whose transpose is `t` (D x kBK).
template <typename A>
inline void tile_dots(const A* __restrict x, const A* __restrict t, int64_t D, A* __restrict s) {
  for (int jj = 0; jj < kBK; ++jj) s[jj] = A(0);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const A x0 = x[d], x1 = x[d + 1], x2 = x[d + 2], x3 = x[d + 3];
    const A* t0 = t + d * kBK;
#pragma omp simd
    for (int jj = 0; jj < kBK; ++jj)
      s[jj] += x0 * t0[jj] + x1 * t0[kBK + jj] + x2 * t0[2 * kBK + jj] + x3 * t0[3 * kBK + jj];
  }
  for (; d < D; ++d) {
    const A x0 = x[d];
    const A* t0 = t + d * kBK;
#pragma omp simd
    for (int jj = 0; jj < kBK; ++jj) s[jj] += x0 * t0[jj];
  }
}

// y[0:D] += sum_jj w[jj] * rows[jj][0:D] over the first n rows.
template <typename A>
inline void tile_axpy(const A* __restrict w, const A* __restrict rows, int n, int64_t D,
                      A* __restrict y) {
  int jj = 0;
  for (; jj + 4 <= n; jj += 4) {
    const A w0 = w[jj], w1 = w[jj + 1], w2 = w[jj + 2], w3 = w[jj + 3];
    if (w0 == A(0) && w1 == A(0) && w2 == A(0) && w3 == A(0)) continue;
    const A *r0 = rows + jj * D, *r1 = r0 + D, *r2 = r1 + D, *r3 = r2 + D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += w0 * r0[d] + w1 * r1[d] + w2 * r2[d] + w3 * r3[d];
  }
  for (; jj < n; ++jj) {
    const A w0 = w[jj];
    const A* r0 = rows + jj * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += w0 * r0[d];
  }
}

// Writes output row i as y * mul: in T, or unrounded in fp32 when the caller asked for it.
template <typename T, typename A>
inline void store_out_row(const AttnParams& p, int64_t b, int64_t h, int64_t i, const A* y, A mul) {
  if (p.out_f32) {
    float* op = row_ptr_mut<float>(p.out, p.so, b, h, i);
    for (int64_t d = 0; d < p.D; ++d) op[d] = static_cast<float>(y[d] * mul);
  } else {
    T* op = row_ptr_mut<T>(p.out, p.so, b, h, i);
    for (int64_t d = 0; d < p.D; ++d) op[d] = from_acc<T>(y[d] * mul);
  }
}

// Last key index query row i may see (may be < 0: sees nothing).
inline int64_t last_key(const AttnParams& p, int64_t i) {
  return p.aligned ? i + (p.Tk - p.Tq) : p.Tk - 1;
}

// The forward for a few query rows (a decode step through cross_attention): no key tile
// would be reused enough to pay for converting and transposing it, so each row attends on
// its own with rowdot.hpp's blocked dot products. Same outputs and lse as the tiled path.
constexpr int64_t kRowPathMaxTq = 3;  // measured crossover: 3-4 rows (bf16), ~6 (fp32)

template <typename T>
bool attn_fwd_rows_impl(const AttnParams& p, int nthreads) {
  using A = typename acc_of<T>::type;
  const int64_t D = p.D, rows = p.B * p.H * p.Tq;
  const A scale = A(1) / std::sqrt(A(D));
  bool failed = false;
#pragma omp parallel num_threads(nthreads)
  {
    Buf<A> qf(D), y(D), s(p.Tk);
    const bool ok = qf.ok() && y.ok() && s.ok();
    if (!ok) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      if (!ok) continue;
      const int64_t b = r / (p.H * p.Tq), h = (r / p.Tq) % p.H, i = r % p.Tq;
      const T* qp = row_ptr<T>(p.q, p.sq, b, h, i);
      for (int64_t d = 0; d < D; ++d) qf[d] = to_acc(qp[d]) * scale;
      const int64_t n = imax(0, imin(p.Tk, last_key(p, i) + 1));  // keys the row may see
      const uint8_t* keep = p.kpm == nullptr ? nullptr : p.kpm + b * p.skpm[0];
      const A lse = attend_row(qf.data(), row_ptr<T>(p.k, p.sk, b, h, 0), p.sk[2],
                               row_ptr<T>(p.v, p.sv, b, h, 0), p.sv[2], n, D, keep, p.skpm[1],
                               s.data(), y.data());
      store_out_row<T>(p, b, h, i, y.data(), A(1));
      *row_ptr_mut<A>(p.lse, p.sl, b, h, i) = lse;
    }
  }
  return !failed;
}

// Returns false only when scratch memory could not be allocated.
template <typename T>
bool attn_fwd_impl(const AttnParams& p, int nthreads) {
  if (p.Tq <= kRowPathMaxTq) return attn_fwd_rows_impl<T>(p, nthreads);
  using A = typename acc_of<T>::type;
  static_assert(kBQ % kRows == 0 && kBK % (kNV * lanes<A>()) == 0, "tile sizes");
  constexpr int KW = kNV * lanes<A>();  // keys per register tile
  const int64_t D = p.D, nqb = (p.Tq + kBQ - 1) / kBQ, items = p.B * p.H * nqb;
  const A scale = A(1) / std::sqrt(A(D));
  bool failed = false;
#pragma omp parallel num_threads(nthreads)
  {
    KeyTile<T, A> tile(D);
    Buf<A> qf(kBQ * D), acc(kBQ * D), sb(kRows * kBK);
    A m[kBQ], l[kBQ];
    bool seen[kBQ];  // the mask lets the row see at least one key (else it is "empty": 0)
    const bool ok = tile.ok() && qf.ok() && acc.ok() && sb.ok();
    if (!ok) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      if (!ok) continue;
      const int64_t b = it / (p.H * nqb), h = (it / nqb) % p.H, i0 = (it % nqb) * kBQ;
      const int nq = int(imin(kBQ, p.Tq - i0));
      qf.zero(kBQ * D);
      for (int r = 0; r < kBQ; ++r) {
        m[r] = neg_inf<A>();
        l[r] = A(0);
        seen[r] = false;
      }
      for (int r = 0; r < nq; ++r) {
        const T* qp = row_ptr<T>(p.q, p.sq, b, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_acc(qp[d]) * scale;
      }
      acc.zero(kBQ * D);
      const int64_t kend = imin(p.Tk, last_key(p, i0 + nq - 1) + 1);
      for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
        tile.load(p, b, h, j0, false);
        for (int r0 = 0; r0 < nq; r0 += kRows) {
          // Keys this group of rows may see in the tile; past the last one nothing is read.
          const int64_t glim = imin(last_key(p, i0 + imin(r0 + kRows, nq) - 1) - j0 + 1, tile.n);
          if (glim <= 0) continue;
          for (int c0 = 0; c0 < glim; c0 += KW)
            dots_block(&qf[r0 * D], D, tile.kt.data() + c0, kBK, D, sb.data() + c0, kBK);
          int cnt[kRows];
          for (int rr = 0; rr < kRows; ++rr) {
            const int r = r0 + rr;
            A* s = sb.data() + rr * kBK;
            cnt[rr] = 0;
            const int64_t lim = r < nq ? last_key(p, i0 + r) - j0 : -1;  // last visible jj
            if (lim < 0 || m[r] != m[r]) continue;  // sees nothing here, or already NaN
            // Branch-free selects so the loops vectorise. A NaN score poisons the row (as
            // in the reference: softmax over a NaN is NaN); masked keys never reach sums.
            int bad = 0, any = 0;
#pragma omp simd reduction(| : bad, any)
            for (int jj = 0; jj < kBK; ++jj) {
              const int allowed = (tile.valid[jj] != A(0)) & (jj <= lim) & (jj < glim);
              s[jj] = allowed ? s[jj] : neg_inf<A>();
              bad |= s[jj] != s[jj];
              any |= allowed;
            }
            seen[r] = seen[r] || any;
            if (bad) {
              m[r] = l[r] = std::numeric_limits<A>::quiet_NaN();
              continue;
            }
            A mx = m[r];
#pragma omp simd reduction(max : mx)
            for (int jj = 0; jj < kBK; ++jj) mx = mx > s[jj] ? mx : s[jj];
            if (mx == neg_inf<A>()) {
              // Every allowed score so far is -inf (rare). These keys still end with softmax
              // weight 0, and 0 * inf/NaN = NaN in the reference: add 0 * v for each visible
              // key (padding rows of vr are zeros) so a non-finite value reaches its column.
              if (any) {
                for (int jj = 0; jj < kBK; ++jj) s[jj] = A(0);
                cnt[rr] = int(imin(tile.n, lim + 1));
              }
              continue;
            }
            const A alpha = exp_neg(m[r] - mx);
            A sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int jj = 0; jj < kBK; ++jj) {
              s[jj] = exp_neg(s[jj] - mx);
              sum += s[jj];
            }
            l[r] = l[r] * alpha + sum;
            m[r] = mx;
            A* y = &acc[r * D];
            if (alpha != A(1))
              for (int64_t d = 0; d < D; ++d) y[d] *= alpha;
            cnt[rr] = int(imin(tile.n, lim + 1));
          }
          pv_block(sb.data(), kBK, tile.vr.data(), cnt, D, &acc[r0 * D]);
        }
      }
      for (int r = 0; r < nq; ++r) {
        // l > 0: normal row; l == 0: the mask left it no key (0, lse -inf), or its allowed
        // scores were all -inf from infinite inputs (NaN, as softmax); l NaN: poisoned (NaN).
        const A nan = std::numeric_limits<A>::quiet_NaN();
        if (l[r] == A(0) && seen[r]) l[r] = nan;
        const A inv = l[r] > A(0) ? A(1) / l[r] : (l[r] == A(0) ? A(0) : nan);
        store_out_row<T>(p, b, h, i0 + r, &acc[r * D], inv);
        A* lp = row_ptr_mut<A>(p.lse, p.sl, b, h, i0 + r);
        *lp = l[r] > A(0) ? m[r] + std::log(l[r]) : (l[r] == A(0) ? neg_inf<A>() : nan);
      }
    }
  }
  return !failed;
}

// Backward in two passes with no atomics (deterministic): dk, dv per key tile over the
// query rows that see it, then dq per query block over its key tiles. P is recomputed
// from the saved logsumexp: p = exp(q·k * scale - lse).
template <typename T>
bool attn_bwd_impl(const AttnParams& p, int nthreads) {
  using A = typename acc_of<T>::type;
  const int64_t D = p.D, BH = p.B * p.H;
  const A scale = A(1) / std::sqrt(A(D));
  // delta_i = dout_i · out_i, the softmax-backward row term. From a bf16-rounded out it is off
  // by ~2^-9 |dout||out|, which dominates dq and dk when the value rows are alike (dout·v_j -
  // delta is then a small difference): training passes the unrounded fp32 out (p.out_f32).
  Buf<A> delta(BH * p.Tq);
  if (!delta.ok()) return false;
  bool failed = false;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < BH * p.Tq; ++r) {
    const int64_t b = r / (p.H * p.Tq), h = (r / p.Tq) % p.H, i = r % p.Tq;
    const T* g = row_ptr<T>(p.dout, p.sdo, b, h, i);
    A acc = 0;
    if (p.out_f32) {
      const float* o = row_ptr<float>(p.out, p.so, b, h, i);
      for (int64_t d = 0; d < D; ++d) acc += A(o[d]) * to_acc(g[d]);
    } else {
      const T* o = row_ptr<T>(p.out, p.so, b, h, i);
      for (int64_t d = 0; d < D; ++d) acc += to_acc(o[d]) * to_acc(g[d]);
    }
    delta[r] = acc;
  }
  const int64_t nkb = (p.Tk + kBK - 1) / kBK;
#pragma omp parallel num_threads(nthreads)
  {
    KeyTile<T, A> tile(D);
    Buf<A> qrow(D), grow(D), dk(kBK * D), dv(kBK * D);
    A s[kBK], dp[kBK];
    const bool ok = tile.ok() && qrow.ok() && grow.ok() && dk.ok() && dv.ok();
    if (!ok) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < BH * nkb; ++it) {
      if (!ok) continue;
      const int64_t b = it / (p.H * nkb), h = (it / nkb) % p.H, j0 = (it % nkb) * kBK;
      tile.load(p, b, h, j0, true);
      dk.zero(kBK * D);
      dv.zero(kBK * D);
      const int64_t i_first = p.aligned ? imax(0, j0 - (p.Tk - p.Tq)) : 0;
      for (int64_t i = i_first; i < p.Tq; ++i) {
        const A lse = *row_ptr<A>(p.lse, p.sl, b, h, i);
        if (lse == neg_inf<A>()) continue;
        const int64_t lim = last_key(p, i) - j0;
        const T* qp = row_ptr<T>(p.q, p.sq, b, h, i);
        const T* gp = row_ptr<T>(p.dout, p.sdo, b, h, i);
        for (int64_t d = 0; d < D; ++d) qrow[d] = to_acc(qp[d]) * scale;
        for (int64_t d = 0; d < D; ++d) grow[d] = to_acc(gp[d]);
        tile_dots(qrow.data(), tile.kt.data(), D, s);
        tile_dots(grow.data(), tile.vt.data(), D, dp);
        const A di = delta[(b * p.H + h) * p.Tq + i];
        for (int jj = 0; jj < kBK; ++jj) {
          const bool ok = tile.valid[jj] != A(0) && jj <= lim;
          s[jj] = ok ? exp_neg(s[jj] - lse) : A(0);  // p_ij
          dp[jj] = s[jj] * (dp[jj] - di);            // ds_ij
        }
        for (int jj = 0; jj < tile.n; ++jj) {
          if (s[jj] == A(0)) continue;
          A* dvr = &dv[jj * D];
          A* dkr = &dk[jj * D];
          const A pj = s[jj], dsj = dp[jj];  // dk_j += ds_ij * (scale * q_i)
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dvr[d] += pj * grow[d];
            dkr[d] += dsj * qrow[d];
          }
        }
      }
      for (int jj = 0; jj < tile.n; ++jj) {
        T* dkp = row_ptr_mut<T>(p.dk, p.sdk, b, h, j0 + jj);
        T* dvp = row_ptr_mut<T>(p.dv, p.sdv, b, h, j0 + jj);
        for (int64_t d = 0; d < D; ++d) dkp[d] = from_acc<T>(dk[jj * D + d]);
        for (int64_t d = 0; d < D; ++d) dvp[d] = from_acc<T>(dv[jj * D + d]);
      }
    }
  }
  const int64_t nqb = (p.Tq + kBQ - 1) / kBQ;
#pragma omp parallel num_threads(nthreads)
  {
    KeyTile<T, A> tile(D);
    Buf<A> qf(kBQ * D), gf(kBQ * D), dq(kBQ * D);
    A s[kBK], dp[kBK], lse[kBQ];
    const bool ok = tile.ok() && qf.ok() && gf.ok() && dq.ok();
    if (!ok) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < BH * nqb; ++it) {
      if (!ok) continue;
      const int64_t b = it / (p.H * nqb), h = (it / nqb) % p.H, i0 = (it % nqb) * kBQ;
      const int nq = int(imin(kBQ, p.Tq - i0));
      for (int r = 0; r < nq; ++r) {
        const T* qp = row_ptr<T>(p.q, p.sq, b, h, i0 + r);
        const T* gp = row_ptr<T>(p.dout, p.sdo, b, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_acc(qp[d]) * scale;
        for (int64_t d = 0; d < D; ++d) gf[r * D + d] = to_acc(gp[d]);
        lse[r] = *row_ptr<A>(p.lse, p.sl, b, h, i0 + r);
      }
      dq.zero(kBQ * D);
      const int64_t kend = imin(p.Tk, last_key(p, i0 + nq - 1) + 1);
      for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
        tile.load(p, b, h, j0, true);
        for (int r = 0; r < nq; ++r) {
          const int64_t lim = last_key(p, i0 + r) - j0;
          if (lim < 0 || lse[r] == neg_inf<A>()) continue;
          tile_dots(&qf[r * D], tile.kt.data(), D, s);
          tile_dots(&gf[r * D], tile.vt.data(), D, dp);
          const A di = delta[(b * p.H + h) * p.Tq + i0 + r];
          for (int jj = 0; jj < kBK; ++jj) {
            const bool ok = tile.valid[jj] != A(0) && jj <= lim;
            const A pj = ok ? exp_neg(s[jj] - lse[r]) : A(0);
            dp[jj] = pj * (dp[jj] - di);
          }
          tile_axpy(dp, tile.kr.data(), int(imin(tile.n, lim + 1)), D, &dq[r * D]);
        }
      }
      for (int r = 0; r < nq; ++r) {
        T* dqp = row_ptr_mut<T>(p.dq, p.sdq, b, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) dqp[d] = from_acc<T>(dq[r * D + d] * scale);
      }
    }
  }
  return !failed;
}

}  // namespace CF_ISA_NS
}  // namespace cf
