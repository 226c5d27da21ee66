// The fused bridge decode step in ONE cooperative kernel launch.
//
// At batch 1 the step is bound by bytes: W_q, W_kv, W_o and the K/V cache are each read
// once. A single launch has to use the whole GPU for all of it, so the kernel is persistent
// (one wave of co-resident blocks, launched cooperatively) and walks three phases:
//   1. GEMV rows, one warp per weight row and up to kMaxB batch rows per pass over it:
//      q = W_q h_b (pre-scaled by 1/sqrt(d)) into scratch, and [k|v] = W_kv h_a + b_kv
//      written straight into cache row `pos`.
//   -- grid.sync()
//   2. Split-K attention (flash-decoding): the cache rows of each (batch, head) are cut into
//      chunks sized so that every warp of the grid gets about one; a warp reads its chunk
//      with 16-byte loads (a row is D/8 lanes in bf16, so one load instruction covers
//      several rows) and keeps an online softmax per row group, merged across the warp by
//      shuffles into a partial (max, sum, acc[d]). The last warp to finish a (batch, head)
//      (atomic counter) merges the chunks into attn[b, h*d:(h+1)*d]. No extra sync for that.
//   -- grid.sync()
//   3. out = h_b + W_o attn, one warp per row, as in phase 1.
// Every phase keeps several 16-byte loads in flight per lane: at batch 1 the step is a
// latency-bound stream unless about 40 KB per SM are outstanding.
#include <cooperative_groups.h>

#include <mutex>
#include <type_traits>

#include "common.cuh"
#include "launch.hpp"

namespace cg = cooperative_groups;

namespace cf {
namespace cuda {
namespace {

// Tuning knobs: -DCF_DECODE_<NAME>=... overrides a default (bench/gpu_decode_sweep.sh builds
// and times variants in one device call); the defaults are the measured best so far.
#ifndef CF_DECODE_WEIGHT_LOADS
#define CF_DECODE_WEIGHT_LOADS 8
#endif
#ifndef CF_DECODE_MIN_BLOCKS
#define CF_DECODE_MIN_BLOCKS 2
#endif
#ifndef CF_DECODE_CACHE_ROWS
#define CF_DECODE_CACHE_ROWS 4
#endif
#ifndef CF_DECODE_MIN_CHUNK
#define CF_DECODE_MIN_CHUNK 16
#endif
// 1: a weight pass that lies wholly inside the row runs without per-load bounds checks (as
// before the checked passes; unmeasured: on the H100 the checked kernel was 122 us where the
// unchecked one had been 115 us a lease earlier, the cause not isolated).
#ifndef CF_DECODE_UNCHECKED_FULL_PASSES
#define CF_DECODE_UNCHECKED_FULL_PASSES 0
#endif
// 1: when B <= kMaxB, each block copies the GEMV input vectors (h_b and h_a for phase 1, attn
// for phase 3) into shared memory as fp32 once, so the weight stream no longer shares the
// L1/L2 request path with them (the weights evict them from L1 otherwise). Unmeasured.
#ifndef CF_DECODE_X_SMEM
#define CF_DECODE_X_SMEM 0
#endif
// 1: weight rows are read with ld.global.nc.L1::no_allocate (streamed past L1). Unmeasured.
#ifndef CF_DECODE_STREAM_WEIGHTS
#define CF_DECODE_STREAM_WEIGHTS 0
#endif
// 1: no grid-wide barrier between the phases (when there are cache rows to attend): a split-K
// item waits only for its head's q rows (and K/V rows when it holds the new row), a W_o row for
// the merged attention, through counters in the workspace (zeroed by a memset before the launch).
// A warp that finishes its phase early goes on instead of waiting for the slowest one (the
// lease-3 profile: 35% of warp stalls at the grid barriers). Deadlock-free because every warp
// takes its items in order (all phase-1 rows before any split-K item, those before any W_o row)
// and phase-1 rows wait for nothing. Unmeasured.
#ifndef CF_DECODE_DATAFLOW
#define CF_DECODE_DATAFLOW 0
#endif

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinChunk = CF_DECODE_MIN_CHUNK;  // fewest cache rows per split-K item (sizes the workspace)
constexpr int kMaxD = 256;     // head dim limit
constexpr int kMaxB = 4;       // batch rows that share one pass over a weight row
constexpr int kWeightLoads = CF_DECODE_WEIGHT_LOADS;  // 16-byte weight loads in flight per lane
constexpr int kMinBlocks = CF_DECODE_MIN_BLOCKS;       // __launch_bounds__: blocks per SM
constexpr int kCacheRows = CF_DECODE_CACHE_ROWS;       // cache rows per lane group in flight
constexpr bool kStageBuild = CF_DECODE_X_SMEM != 0;
constexpr bool kDataflow = CF_DECODE_DATAFLOW != 0;
constexpr size_t kMaxStageBytes = 96 * 1024;           // CF_DECODE_X_SMEM: at most this much (2 blocks per SM)

struct Layout {  // offsets into the fp32 workspace, in floats (each 16-byte aligned)
  int64_t q, attn, part, counters, deps, total;  // deps: CF_DECODE_DATAFLOW's q_done[H], kv_done[H], merged
};

// A split-K partial: max, sum, two floats of padding, then the D-float output, which is
// 16-byte aligned whenever D % 4 == 0 (the merge then reads it with 16-byte loads).
constexpr int kPartHead = 4;
__host__ __device__ inline int64_t part_stride(int64_t D) { return D + kPartHead; }

__host__ __device__ inline int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

__host__ __device__ inline Layout layout(int64_t B, int64_t DB, int64_t H, int64_t S) {
  const int64_t D = DB / H, nch = (S + kMinChunk - 1) / kMinChunk;
  Layout l;
  l.q = 0;
  l.attn = round4(B * DB);
  l.part = l.attn + round4(B * DB);
  l.counters = l.part + round4(B * H * nch * part_stride(D));
  l.deps = l.counters + round4(B * H);
  l.total = l.deps + round4(2 * H + 1);
  return l;
}

struct VecFlags {
  bool q, kv, o;  // 16-byte loads allowed for W_q/h_b, W_kv/h_a, W_o/attn
  bool cache;     // 16-byte loads of K/V cache rows (VecRows below)
  bool stage;     // CF_DECODE_X_SMEM: input vectors staged in shared memory (StageLayout)
};

// CF_DECODE_X_SMEM: fp32 copies of h_b (B x D_B), then h_a (B x D_A) from a 16-byte boundary;
// phase 3 reuses the start for attn (B x D_B).
struct StageLayout {
  int64_t a_offset, floats;
  __host__ __device__ StageLayout(int64_t B, int64_t DB, int64_t DA) : a_offset(round4(B * DB)), floats(a_offset + B * DA) {}
};

__device__ __forceinline__ uint4 load_weight16(const uint4* p) {
#if CF_DECODE_STREAM_WEIGHTS && !defined(CF_CUDA_EMULATOR)
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
#else
  return __ldg(p);
#endif
}

// x as N floats: fp32 in shared memory (kShared), fp32 scratch (written by other blocks this
// launch: .cg) or T inputs.
template <typename T, typename X, bool kShared = false>
__device__ __forceinline__ void load_x(const X* x, float (&out)[Vec<T>::N]) {
  constexpr int N = Vec<T>::N;
  if constexpr (kShared) {
    static_assert(sizeof(X) == 4, "staged inputs are fp32");
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(x)[i];
      out[4 * i] = f.x; out[4 * i + 1] = f.y; out[4 * i + 2] = f.z; out[4 * i + 3] = f.w;
    }
  } else if constexpr (sizeof(X) == 4 && sizeof(T) == 4) {
    load16<float, true>(reinterpret_cast<const float*>(x), out);
  } else if constexpr (sizeof(X) == 4) {  // T is 16-bit: N = 8 floats = two float4
    const float4* p = reinterpret_cast<const float4*>(x);
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 f = __ldcg(p + i);
      out[4 * i] = f.x; out[4 * i + 1] = f.y; out[4 * i + 2] = f.z; out[4 * i + 3] = f.w;
    }
  } else {
    load16<T>(x, out);
  }
}

template <typename X, bool kShared = false> __device__ __forceinline__ float scalar_x(const X* x, int64_t i) {
  if constexpr (kShared) return x[i];
  else if constexpr (sizeof(X) == 4) return __ldcg(reinterpret_cast<const float*>(x) + i);
  else return to_f(x[i]);
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[Vec<T>::N]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_f(e[i]);
}

// A lane's share of one pass over a weight row: U 16-byte loads, chunks c0 + 32 u. Past the
// row's end a load is skipped (zero), so a row of any length keeps U loads in flight per
// lane (a row shorter than 32 U chunks used to fall back to one load at a time).
// kCheck = false: the caller knows every chunk of the pass lies inside the row.
template <typename T>
struct WeightPass {
  static constexpr int U = kWeightLoads;
  uint4 raw[U];
  template <bool kCheck>
  __device__ void issue(const uint4* w4, int64_t c0, int64_t chunks) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      raw[u] = !kCheck || c0 + 32 * u < chunks ? load_weight16(w4 + c0 + 32 * u) : make_uint4(0, 0, 0, 0);
  }
};

// Adds one pass (chunks c0 + 32 u of the row) times x + bb * sx to acc[bb], bb < nb.
template <bool kCheck, bool kShared, typename T, typename X>
__device__ __forceinline__ void dot_pass(const WeightPass<T>& pass, int64_t c0, int64_t chunks,
                                         const X* __restrict__ x, int64_t sx, int nb, float (&acc)[kMaxB]) {
  constexpr int N = Vec<T>::N;
#pragma unroll
  for (int u = 0; u < WeightPass<T>::U; ++u) {
    const int64_t c = c0 + 32 * u;
    if (!kCheck || c < chunks) {
      float wv[N];
      unpack<T>(pass.raw[u], wv);
#pragma unroll
      for (int bb = 0; bb < kMaxB; ++bb) {
        if (bb < nb) {
          float xv[N];
          load_x<T, X, kShared>(x + bb * sx + c * N, xv);
#pragma unroll
          for (int e = 0; e < N; ++e) acc[bb] = fmaf(wv[e], xv[e], acc[bb]);
        }
      }
    }
  }
}

// Warp-wide dot products of one weight row w (length L) with nb <= kMaxB vectors
// x + bb * sx: the row is read once for all of them. Every lane gets acc[bb].
template <typename T, typename X, bool kShared = false>
__device__ void rows_dot(const T* __restrict__ w, const X* __restrict__ x, int64_t sx, int nb, int64_t L,
                         int lane, bool vec, float (&acc)[kMaxB]) {
#pragma unroll
  for (int bb = 0; bb < kMaxB; ++bb) acc[bb] = 0.f;
  if (vec) {
    constexpr int step = 32 * WeightPass<T>::U;
    const int64_t chunks = L / Vec<T>::N;
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    for (int64_t c0 = lane; c0 < chunks; c0 += step) {
      WeightPass<T> pass;
      if (CF_DECODE_UNCHECKED_FULL_PASSES && c0 + step - 32 < chunks) {
        pass.template issue<false>(w4, c0, chunks);
        dot_pass<false, kShared>(pass, c0, chunks, x, sx, nb, acc);
      } else {
        pass.template issue<true>(w4, c0, chunks);
        dot_pass<true, kShared>(pass, c0, chunks, x, sx, nb, acc);
      }
    }
  } else {
    for (int64_t i = lane; i < L; i += 32) {
      const float wi = to_f(w[i]);
#pragma unroll
      for (int bb = 0; bb < kMaxB; ++bb)
        if (bb < nb) acc[bb] = fmaf(wi, scalar_x<X, kShared>(x + bb * sx, i), acc[bb]);
    }
  }
#pragma unroll
  for (int bb = 0; bb < kMaxB; ++bb) acc[bb] = warp_sum(acc[bb]);
}

// How a warp lays cache rows over its lanes in phase 2. Each lane holds E elements of a row
// (dims dim(li, t), t < E); a row spans `lanes` lanes, so one warp covers 32 / lanes rows.
template <typename T>
struct VecRows {  // 16-byte loads: E = 8 (16-bit) or 4 (fp32) consecutive dims per lane
  static constexpr int E = Vec<T>::N;
  static constexpr int U = kCacheRows;  // rows per lane group in flight
  using Raw = uint4;
  int lanes;
  __device__ explicit VecRows(int64_t D) : lanes(int(D / E)) {}
  __device__ int64_t dim(int li, int t) const { return int64_t(li) * E + t; }
  __device__ bool valid(int li, int t) const { return true; }
  __device__ Raw load(const T* row, int li) const { return __ldcg(reinterpret_cast<const uint4*>(row) + li); }
  __device__ void unpack_to(const Raw& r, float (&out)[E]) const { unpack<T>(r, out); }
};

template <typename T>
struct ScalarRows {  // any head dim <= kMaxD: one row per warp, dims lane + 32 t
  static constexpr int E = kMaxD / 32;
  static constexpr int U = 2;
  struct Raw { T v[E]; };
  int64_t D;
  int lanes = 32;
  __device__ explicit ScalarRows(int64_t d) : D(d) {}
  __device__ int64_t dim(int li, int t) const { return li + 32 * t; }
  __device__ bool valid(int li, int t) const { return li + 32 * t < D; }
  __device__ Raw load(const T* row, int li) const {
    Raw r;
#pragma unroll
    for (int t = 0; t < E; ++t) r.v[t] = valid(li, t) ? __ldcg(row + li + 32 * t) : from_f<T>(0.f);
    return r;
  }
  __device__ void unpack_to(const Raw& r, float (&out)[E]) const {
#pragma unroll
    for (int t = 0; t < E; ++t) out[t] = to_f(r.v[t]);
  }
};

// Online-softmax state of one row group: running max m, sum l, acc[E]; `bad`: a kept score
// was NaN; `any`: the mask kept some key.
template <int E>
struct Softmax {
  float m = -INFINITY, l = 0.f, acc[E];
  bool bad = false, any = false;
  __device__ Softmax() {
#pragma unroll
    for (int t = 0; t < E; ++t) acc[t] = 0.f;
  }
  // Adds key score s with value row v. A visible key whose weight underflows still
  // multiplies its row, so 0 * NaN stays NaN, as in the reference.
  __device__ void add(float s, const float (&v)[E]) {
    any = true;
    if (s != s) { bad = true; return; }
    const float mn = fmaxf(m, s);
    if (mn == -INFINITY) {  // every score so far -inf (rare): nothing to weigh yet, but this
      // key's weight ends 0, and 0 * inf/NaN = NaN as in the reference: acc keeps 0 * v.
#pragma unroll
      for (int t = 0; t < E; ++t) acc[t] = fmaf(0.f, v[t], acc[t]);
      return;
    }
    const float alpha = expf(m - mn), pj = expf(s - mn);
    l = l * alpha + pj;
#pragma unroll
    for (int t = 0; t < E; ++t) acc[t] = fmaf(pj, v[t], acc[t] * alpha);
    m = mn;
  }
  // Merges the state held by lane ^ offset (all 32 lanes must call this together).
  __device__ void merge_xor(int offset) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), l2 = __shfl_xor_sync(0xffffffffu, l, offset);
    bad |= __shfl_xor_sync(0xffffffffu, int(bad), offset) != 0;
    any |= __shfl_xor_sync(0xffffffffu, int(any), offset) != 0;
    const float mn = fmaxf(m, m2);
    const float f1 = mn == -INFINITY ? 0.f : expf(m - mn), f2 = mn == -INFINITY ? 0.f : expf(m2 - mn);
#pragma unroll
    for (int t = 0; t < E; ++t) {
      const float a2 = __shfl_xor_sync(0xffffffffu, acc[t], offset);
      acc[t] = mn == -INFINITY ? acc[t] + a2 : f1 * acc[t] + f2 * a2;
    }
    l = mn == -INFINITY ? 0.f : f1 * l + f2 * l2;
    m = mn;
  }
};

// One pass of a lane group over cache rows j + u * groups (u < U) of K and V: every load of
// the pass is issued before any is used.
template <typename T, class Rows>
struct CachePass {
  static constexpr int U = Rows::U;
  typename Rows::Raw kr[U], vr[U];
  // Loads the rows below j1.
  __device__ void issue(const Rows& rows, const T* kb, int64_t skn, const T* vb, int64_t svn, int64_t j,
                        int groups, int64_t j1, int li) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + int64_t(u) * groups;
      if (jj < j1) {
        kr[u] = rows.load(kb + jj * skn, li);
        vr[u] = rows.load(vb + jj * svn, li);
      }
    }
  }
};

// Phase 2's work item `it`: cache rows [j0, j1) of (b, h).
struct Item {
  int64_t b, h, j0, j1;
  __device__ Item(int64_t it, int64_t H, int64_t nch, int64_t chunk, int64_t n)
      : b(it / (H * nch)), h((it / nch) % H), j0((it % nch) * chunk), j1(min(n, j0 + chunk)) {}
};

// Scores the pass's rows j + u * groups (< j1) against q and adds the kept ones to sm.
template <typename T, class Rows, int E>
__device__ __forceinline__ void attend_pass(const DecodeParams& p, const Rows& rows, const CachePass<T, Rows>& pass,
                                            const float (&qr)[E], int64_t b, int64_t j, int groups, int64_t j1,
                                            Softmax<E>& sm) {
#pragma unroll
  for (int u = 0; u < Rows::U; ++u) {
    const int64_t jj = j + int64_t(u) * groups;
    const bool in = jj < j1;
    float kf[E], s = 0.f;
    if (in) {
      rows.unpack_to(pass.kr[u], kf);
#pragma unroll
      for (int t = 0; t < E; ++t) s = fmaf(qr[t], kf[t], s);
    }
    for (int o = rows.lanes / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (in && (p.kpm == nullptr || p.kpm[b * p.skpm[0] + jj * p.skpm[1]])) {
      float vf[E];
      rows.unpack_to(pass.vr[u], vf);
      sm.add(s, vf);
    }
  }
}

// Phase 2 for one item: cache rows [j0, j1) of (b, h) into the partial `mine` (part_stride(D) floats).
template <typename T, class Rows>
__device__ void attend_chunk(const DecodeParams& p, const Rows& rows, const float* qh, const Item& w, float* mine,
                             int lane) {
  constexpr int E = Rows::E;
  const int li = lane % rows.lanes, g = lane / rows.lanes, groups = 32 / rows.lanes;
  const int64_t step = int64_t(groups) * Rows::U;
  float qr[E];
#pragma unroll
  for (int t = 0; t < E; ++t) qr[t] = rows.valid(li, t) ? __ldcg(qh + rows.dim(li, t)) : 0.f;
  const T* kb = static_cast<const T*>(p.kc) + w.b * p.skc[0] + w.h * p.skc[1];
  const T* vb = static_cast<const T*>(p.vc) + w.b * p.svc[0] + w.h * p.svc[1];
  Softmax<E> sm;
  for (int64_t j = w.j0 + g; j - g < w.j1; j += step) {  // uniform trip count
    CachePass<T, Rows> pass;
    pass.issue(rows, kb, p.skc[2], vb, p.svc[2], j, groups, w.j1, li);
    attend_pass<T>(p, rows, pass, qr, w.b, j, groups, w.j1, sm);
  }
  for (int o = rows.lanes; o < 32; o <<= 1) sm.merge_xor(o);
  if (g == 0) {
    if (li == 0) {
      mine[0] = sm.bad ? NAN : sm.m;
      // l = -1 marks "the mask allowed keys here, all scored -inf" for the merge.
      mine[1] = sm.bad ? NAN : ((sm.any && sm.m == -INFINITY) ? -1.f : sm.l);
    }
#pragma unroll
    for (int t = 0; t < E; ++t)
      if (rows.valid(li, t)) mine[kPartHead + rows.dim(li, t)] = sm.acc[t];
  }
}

// Merges the nch partials of (b, h) into attn[b, h*D : (h+1)*D] (one warp). Lane c owns
// chunks c, c + 32, ... for the max and the sum; the weighted sum of the partial outputs then
// walks the chunks with several independent loads in flight, each lane over its own dims
// (D % 4 == 0: its own 16-byte columns, 8 chunks in flight). A chunk loop with one dependent
// L2 round trip per step was the kernel's serial tail; the 16-byte loads took B = 1, D_B 4096
// from 122 to 107 us on an H100 (bench/RESULTS.md).
__device__ void merge_chunks(const float* first, int64_t nch, int64_t D, float* out, int lane) {
  constexpr int kPL = kMaxD / 32;
  const int64_t stride = part_stride(D);
  const bool vec4 = D % 4 == 0 && aligned16(first + kPartHead);  // warp-uniform
  float mx = -INFINITY;
  bool poisoned = false, seen = false;
  for (int64_t c = lane; c < nch; c += 32) {
    const float m = __ldcg(first + c * stride), l = __ldcg(first + c * stride + 1);
    poisoned |= m != m;
    seen |= m != -INFINITY || l < 0.f;
    mx = fmaxf(mx, m);
  }
  const float M = warp_max(mx);
  poisoned = __any_sync(0xffffffffu, poisoned);
  seen = __any_sync(0xffffffffu, seen);
  poisoned |= seen && M == -INFINITY;  // allowed keys, every score -inf: NaN as softmax
  // acc[t]: dim lane + 32 t; with vec4, acc[4 t + e]: dim 4 (lane + 32 t) + e.
  float acc[kPL], lsum = 0.f;
#pragma unroll
  for (int t = 0; t < kPL; ++t) acc[t] = 0.f;
  if (!poisoned && M != -INFINITY) {  // warp-uniform
    for (int64_t c0 = 0; c0 < nch; c0 += 32) {
      float f = 0.f;  // this lane's chunk weight exp(m_c - M)
      if (c0 + lane < nch) {
        const float m = __ldcg(first + (c0 + lane) * stride);
        if (m != -INFINITY) {
          f = expf(m - M);
          lsum = fmaf(f, __ldcg(first + (c0 + lane) * stride + 1), lsum);
        }
      }
      const int cnt = int(min(int64_t(32), nch - c0));
      if (vec4) {
#pragma unroll 8
        for (int j = 0; j < cnt; ++j) {
          const float fj = __shfl_sync(0xffffffffu, f, j);
          const float4* pc = reinterpret_cast<const float4*>(first + (c0 + j) * stride + kPartHead);
#pragma unroll
          for (int t = 0; t < kPL / 4; ++t) {
            const int64_t d4 = lane + 32 * t;
            if (4 * d4 < D) {
              const float4 v = __ldcg(pc + d4);
              acc[4 * t] = fmaf(fj, v.x, acc[4 * t]);
              acc[4 * t + 1] = fmaf(fj, v.y, acc[4 * t + 1]);
              acc[4 * t + 2] = fmaf(fj, v.z, acc[4 * t + 2]);
              acc[4 * t + 3] = fmaf(fj, v.w, acc[4 * t + 3]);
            }
          }
        }
      } else {
#pragma unroll 4
        for (int j = 0; j < cnt; ++j) {
          const float fj = __shfl_sync(0xffffffffu, f, j);
          const float* pc = first + (c0 + j) * stride + kPartHead;
#pragma unroll
          for (int t = 0; t < kPL; ++t) {
            const int64_t d = lane + 32 * t;
            if (d < D) acc[t] = fmaf(fj, __ldcg(pc + d), acc[t]);
          }
        }
      }
    }
  }
  const float L = warp_sum(lsum);
  const float inv = poisoned ? NAN : (L > 0.f ? 1.f / L : 0.f);
#pragma unroll
  for (int t = 0; t < kPL; ++t) {
    const int64_t d = vec4 ? 4 * (lane + 32 * (t / 4)) + t % 4 : lane + 32 * t;
    if (d < D) out[d] = acc[t] * inv;
  }
}

// CF_DECODE_DATAFLOW: the warp waits until *count >= target (lane 0 polls), then may read what
// the counted writers wrote (they fenced before counting).
__device__ __forceinline__ void wait_for_count(const int* count, int target, int lane) {
  if (lane == 0)
    while (load_volatile(count) < target) __nanosleep(64);
  __syncwarp();
  __threadfence();
}

// Every lane's writes are visible before lane 0 adds one to *count.
__device__ __forceinline__ void signal_count(int* count, int lane) {
  __threadfence();
  __syncwarp();
  if (lane == 0) atomicAdd(count, 1);
}

// kVecCache picks the phase-2 row layout at compile time: inlining both spills registers.
template <typename T, bool kVecCache>
__global__ void __launch_bounds__(kThreads, kMinBlocks) decode_step_kernel(DecodeParams p, float* ws, VecFlags vec) {
  using Rows = std::conditional_t<kVecCache, VecRows<T>, ScalarRows<T>>;
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + wib, nwarps = int64_t(gridDim.x) * kWarps;
  const int64_t B = p.B, DB = p.DB, DA = p.DA, H = p.H, D = p.D, n = p.n;
  const Layout lay = layout(B, DB, H, p.S);
  float* q = ws + lay.q;
  float* attn = ws + lay.attn;
  float* part = ws + lay.part;
  int* counters = reinterpret_cast<int*>(ws + lay.counters);
  int* q_done = reinterpret_cast<int*>(ws + lay.deps);  // CF_DECODE_DATAFLOW: rows done per head
  int* kv_done = q_done + H;
  int* merged = kv_done + H;
  const bool dataflow = kDataflow && n > 0;  // n == 0: nothing to attend, the plain barriers
  const bool append = p.append;
  const T* h_b = static_cast<const T*>(p.h_b);

  // Phase 2's split: cache rows per item sized so that every warp of the grid gets about one.
  const int64_t per_head = max(int64_t(1), nwarps / max(int64_t(1), B * H));
  int64_t chunk = (n + per_head - 1) / per_head;
  chunk = (max(chunk, int64_t(kMinChunk)) + kMinChunk - 1) / kMinChunk * kMinChunk;
  const int64_t nch = (n + chunk - 1) / chunk, items = B * H * nch;

  // ---- phase 1: q and the new K/V row
  if (blockIdx.x == 0 && !dataflow)  // (dataflow: the launcher's memset zeroed every counter)
    for (int64_t i = threadIdx.x; i < B * H; i += kThreads) counters[i] = 0;
  if (n == 0)  // context mode at pos 0: nothing to attend, the update is zero
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < B * DB; i += int64_t(gridDim.x) * kThreads)
      attn[i] = 0.f;
  float* xs = nullptr;  // staged inputs (CF_DECODE_X_SMEM)
  const StageLayout sl(B, DB, DA);
  if constexpr (kStageBuild) {
    CF_DYNAMIC_SMEM(stage_raw);
    xs = reinterpret_cast<float*>(stage_raw);
    if (vec.stage) {  // block-uniform
      for (int64_t i = threadIdx.x; i < B * DB; i += kThreads) xs[i] = to_f(h_b[(i / DB) * p.shb + i % DB]);
      if (append) {
        const T* h_a = static_cast<const T*>(p.h_a);
        for (int64_t i = threadIdx.x; i < B * DA; i += kThreads) xs[sl.a_offset + i] = to_f(h_a[(i / DA) * p.sha + i % DA]);
      }
      __syncthreads();
    }
  }
  const float scale = 1.0f / sqrtf(float(D));
  const int64_t rows1 = DB + (append ? 2 * DB : 0);
  for (int64_t r = warp; r < rows1; r += nwarps) {
    for (int64_t b0 = 0; b0 < B; b0 += kMaxB) {
      const int nb = int(min(int64_t(kMaxB), B - b0));
      float acc[kMaxB];
      if (r < DB) {
        const T* w = static_cast<const T*>(p.w_q) + r * p.swq;
        if constexpr (kStageBuild)
          if (vec.stage) rows_dot<T, float, true>(w, xs + b0 * DB, DB, nb, DB, lane, vec.q, acc);
        if (!(kStageBuild && vec.stage)) rows_dot<T, T>(w, h_b + b0 * p.shb, p.shb, nb, DB, lane, vec.q, acc);
#pragma unroll
        for (int bb = 0; bb < kMaxB; ++bb)
          if (bb < nb && lane == bb) q[(b0 + bb) * DB + r] = acc[bb] * scale;
      } else {
        const int64_t rr = r - DB, c = rr % DB, head = c / D, d = c % D;
        const float bias = to_f(static_cast<const T*>(p.b_kv)[rr * p.sbkv]);
        T* cache = static_cast<T*>(rr < DB ? p.kc : p.vc);
        const int64_t* cs = rr < DB ? p.skc : p.svc;
        const T* w = static_cast<const T*>(p.w_kv) + rr * p.swkv;
        if constexpr (kStageBuild)
          if (vec.stage) rows_dot<T, float, true>(w, xs + sl.a_offset + b0 * DA, DA, nb, DA, lane, vec.kv, acc);
        if (!(kStageBuild && vec.stage))
          rows_dot<T, T>(w, static_cast<const T*>(p.h_a) + b0 * p.sha, p.sha, nb, DA, lane, vec.kv, acc);
#pragma unroll
        for (int bb = 0; bb < kMaxB; ++bb)
          if (bb < nb && lane == bb)
            cache[(b0 + bb) * cs[0] + head * cs[1] + p.pos * cs[2] + d] = from_f<T>(acc[bb] + bias);
      }
    }
    if (dataflow) signal_count(r < DB ? &q_done[r / D] : &kv_done[((r - DB) % DB) / D], lane);
  }
  if (!dataflow) grid.sync();

  // ---- phase 2: split-K attention over cache rows [0, n), merged by the last warp
  const Rows rows(D);
  for (int64_t it = warp; it < items; it += nwarps) {
    const Item w(it, H, nch, chunk, n);
    const int64_t b = w.b, h = w.h;
    if (dataflow) {
      wait_for_count(&q_done[h], int(D), lane);
      if (append && w.j0 <= p.pos && p.pos < w.j1) wait_for_count(&kv_done[h], int(2 * D), lane);  // the new row
    }
    attend_chunk<T>(p, rows, q + b * DB + h * D, w, part + it * part_stride(D), lane);
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0) last = atomicAdd(&counters[b * H + h], 1) == int(nch - 1);
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {  // every chunk of (b, h) is written: merge them
      __threadfence();
      merge_chunks(part + (b * H + h) * nch * part_stride(D), nch, D, attn + b * DB + h * D, lane);
      if (dataflow) signal_count(merged, lane);
    }
  }
  // Dataflow: a warp with W_o rows waits for every merge; with staging, every warp does (each
  // copies a share of attn into the block's stage, which must be merged by then).
  bool staging = false;
  if constexpr (kStageBuild) staging = vec.stage;
  if (!dataflow) grid.sync();
  else if (warp < DB || staging) wait_for_count(merged, int(B * H), lane);

  // ---- phase 3: out = h_b + W_o attn
  if constexpr (kStageBuild) {
    if (vec.stage) {
      __syncthreads();  // no warp still reads phase 1's staged h_b from xs
      for (int64_t i = threadIdx.x; i < B * DB; i += kThreads) xs[i] = __ldcg(attn + i);
      __syncthreads();
    }
  }
  for (int64_t r = warp; r < DB; r += nwarps) {
    for (int64_t b0 = 0; b0 < B; b0 += kMaxB) {
      const int nb = int(min(int64_t(kMaxB), B - b0));
      float acc[kMaxB];
      const T* w = static_cast<const T*>(p.w_o) + r * p.swo;
      if constexpr (kStageBuild)
        if (vec.stage) rows_dot<T, float, true>(w, xs + b0 * DB, DB, nb, DB, lane, vec.o, acc);
      if (!(kStageBuild && vec.stage)) rows_dot<T, float>(w, attn + b0 * DB, DB, nb, DB, lane, vec.o, acc);
#pragma unroll
      for (int bb = 0; bb < kMaxB; ++bb)
        if (bb < nb && lane == bb) {
          const int64_t b = b0 + bb;
          static_cast<T*>(p.out)[b * p.sout + r] = from_f<T>(to_f(h_b[b * p.shb + r]) + acc[bb]);
        }
    }
  }
}

bool aligned16_host(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool rows_aligned(const void* base, int64_t row_stride, int64_t len, int64_t elem) {
  return aligned16_host(base) && (row_stride * elem) % 16 == 0 &&
         (len * elem) % 16 == 0;
}

// VecRows needs whole 16-byte pieces per row, a power-of-two number of them (<= 32 lanes),
// and every row of both caches 16-byte aligned.
bool cache_rows_vectorizable(const DecodeParams& p, int64_t es) {
  const int64_t per = 16 / es, lanes = p.D / per;
  if (p.D % per != 0 || lanes < 1 || lanes > 32 || (lanes & (lanes - 1)) != 0) return false;
  for (const void* base : {static_cast<const void*>(p.kc), static_cast<const void*>(p.vc)})
    if (!aligned16_host(base)) return false;
  for (const int64_t* st : {p.skc, p.svc})
    for (int i = 0; i < 3; ++i)
      if ((st[i] * es) % 16 != 0) return false;
  return true;
}

struct GridInfo {
  int blocks = 0;  // co-resident blocks of the whole GPU
  bool coop = false;
};

template <typename T, bool kVecCache>
cudaError_t grid_info(GridInfo* out) {  // per kernel instantiation (its own statics)
  static std::mutex mu;
  static GridInfo cache[64];
  static bool have[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
#ifdef CF_CUDA_EMULATOR
  constexpr bool kCached = false;  // the emulated GPU comes from the environment: tests vary it
#else
  constexpr bool kCached = true;
#endif
  if (kCached && dev < 64 && have[dev]) {
    *out = cache[dev];
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0, coop = 0;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess) return e;
  // Staged builds size the grid for the most shared memory a launch may ask for.
  const size_t smem = kStageBuild ? kMaxStageBytes : 0;
  if (kStageBuild && (e = allow_dynamic_smem<decode_step_kernel<T, kVecCache>>(smem)) != cudaSuccess) return e;
  if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_step_kernel<T, kVecCache>, kThreads, smem)) !=
      cudaSuccess)
    return e;
  GridInfo g;
  g.blocks = sms * per_sm;
  g.coop = coop != 0;
  if (dev < 64) {
    cache[dev] = g;
    have[dev] = true;
  }
  *out = g;
  return cudaSuccess;
}

template <typename T, bool kVecCache>
cudaError_t launch_variant(const DecodeParams& p, float* ws, VecFlags vec, cudaStream_t stream, std::string* why) {
  GridInfo g;
  cudaError_t e = grid_info<T, kVecCache>(&g);
  if (e != cudaSuccess) return e;
  if (!g.coop || g.blocks <= 0) {
    *why = "this GPU cannot launch cooperative kernels";
    return cudaErrorNotSupported;
  }
  const size_t smem = vec.stage ? size_t(StageLayout(p.B, p.DB, p.DA).floats) * 4 : 0;
  if (kDataflow) {  // every counter starts at 0 (the kernel has no barrier to order a reset)
    const Layout lay = layout(p.B, p.DB, p.H, p.S);
    e = cudaMemsetAsync(ws + lay.counters, 0, size_t(lay.total - lay.counters) * 4, stream);
    if (e != cudaSuccess) return e;
  }
  return launch_cooperative(decode_step_kernel<T, kVecCache>, dim3(g.blocks), dim3(kThreads), smem, stream, p, ws, vec);
}

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, void* workspace, cudaStream_t stream, std::string* why) {
  const int64_t es = sizeof(T);
  VecFlags vec;
  vec.q = rows_aligned(p.w_q, p.swq, p.DB, es) && rows_aligned(p.h_b, p.shb, p.DB, es);
  vec.kv = p.append && rows_aligned(p.w_kv, p.swkv, p.DA, es) && rows_aligned(p.h_a, p.sha, p.DA, es);
  vec.o = rows_aligned(p.w_o, p.swo, p.DB, es) && p.DB % 4 == 0;
  vec.cache = cache_rows_vectorizable(p, es);
  vec.stage = kStageBuild && p.B <= kMaxB && size_t(StageLayout(p.B, p.DB, p.DA).floats) * 4 <= kMaxStageBytes;
  float* ws = static_cast<float*>(workspace);
  return vec.cache ? launch_variant<T, true>(p, ws, vec, stream, why)
                   : launch_variant<T, false>(p, ws, vec, stream, why);
}

}  // namespace

int64_t decode_workspace_bytes(int64_t B, int64_t DB, int64_t H, int64_t S) {
  if (B < 0 || DB <= 0 || H <= 0 || S < 0 || DB % H != 0) return -1;
  if (B > (int64_t(1) << 20) || DB > (int64_t(1) << 20) || S > (int64_t(1) << 30)) return -2;
  // layout()'s arithmetic, checked: sizes inside the caps above can still overflow int64
  // (B * H * chunks * (D + 4)); every intermediate of layout() is at most its total.
  const int64_t D = DB / H, nch = (S + kMinChunk - 1) / kMinChunk;
  auto mul = [](int64_t a, int64_t b, int64_t* r) { return !__builtin_mul_overflow(a, b, r); };
  auto add = [](int64_t a, int64_t b, int64_t* r) { return !__builtin_add_overflow(a, b, r); };
  auto up4 = [&](int64_t* x) { return add(*x, 3, x) && ((*x = *x / 4 * 4), true); };  // round4, checked
  int64_t bdb, bh, parts, total;
  const bool ok = mul(B, DB, &bdb) && up4(&bdb) && mul(B, H, &bh) && mul(bh, nch, &parts) &&
                  mul(parts, part_stride(D), &parts) && up4(&parts) && up4(&bh) && mul(bdb, 2, &total) &&
                  add(total, parts, &total) && add(total, bh, &total) && add(total, round4(2 * H + 1), &total) &&
                  mul(total, 4, &total);
  if (!ok) return -2;
  const Layout l = layout(B, DB, H, S);
  return l.total * 4;
}

cudaError_t launch_decode_step(const DecodeParams& p, void* workspace, cudaStream_t stream, std::string* why) {
  if (p.D > kMaxD) {
    *why = "head dim " + std::to_string(p.D) + " exceeds the CUDA decode kernel's limit of 256";
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case CF_F32: return launch_typed<float>(p, workspace, stream, why);
    case CF_BF16: return launch_typed<__nv_bfloat16>(p, workspace, stream, why);
    case CF_F16: return launch_typed<__half>(p, workspace, stream, why);
    default: *why = "unsupported dtype"; return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace cf
