// The fused bridge decode step in ONE cooperative kernel launch.
//
// At batch 1 the step is bound by bytes: W_q, W_kv, W_o and the K/V cache are each read
// once. A single launch has to use the whole GPU for all of it, so the kernel is persistent
// (one wave of co-resident blocks, launched cooperatively) and walks three phases:
//   1. GEMV rows, one warp per weight row: q = W_q h_b (pre-scaled by 1/sqrt(d)) into
//      scratch, and [k|v] = W_kv h_a + b_kv written straight into cache row `pos`.
//   -- grid.sync()
//   2. Split-K attention: one warp per (batch, head, 64-row chunk) of the cache writes a
//      partial (max, sum, acc[d]); the last warp to finish a (batch, head) (atomic counter)
//      merges its chunks into attn[b, h*d:(h+1)*d]. No extra sync for the merge.
//   -- grid.sync()
//   3. out = h_b + W_o attn, one warp per row.
// Weight rows are read with 16-byte loads, four in flight per lane, when aligned.
#include <cooperative_groups.h>

#include <mutex>

#include "common.cuh"
#include "launch.hpp"

namespace cg = cooperative_groups;

namespace cf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 64;   // cache rows per split-K item
constexpr int kMaxD = 256;   // head dim limit: 8 elements per lane
constexpr int kPL = kMaxD / 32;

struct Layout {  // offsets into the fp32 workspace, in floats (each 16-byte aligned)
  int64_t q, attn, part, counters, total;
};

__host__ __device__ inline int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

__host__ __device__ inline Layout layout(int64_t B, int64_t DB, int64_t H, int64_t S) {
  const int64_t D = DB / H, nch = (S + kChunk - 1) / kChunk;
  Layout l;
  l.q = 0;
  l.attn = round4(B * DB);
  l.part = l.attn + round4(B * DB);
  l.counters = l.part + round4(B * H * nch * (D + 2));
  l.total = l.counters + round4(B * H);
  return l;
}

struct VecFlags {
  bool q, kv, o;  // 16-byte loads allowed for W_q/h_b, W_kv/h_a, W_o/attn
};

// x as N floats: fp32 scratch (written by other blocks this launch: .cg) or T inputs.
template <typename T, typename X>
__device__ __forceinline__ void load_x(const X* x, float (&out)[Vec<T>::N]) {
  constexpr int N = Vec<T>::N;
  if constexpr (sizeof(X) == 4 && sizeof(T) == 4) {
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

template <typename X> __device__ __forceinline__ float scalar_x(const X* x, int64_t i) {
  if constexpr (sizeof(X) == 4) return __ldcg(reinterpret_cast<const float*>(x) + i);
  else return to_f(x[i]);
}

// Warp-wide dot product of a weight row with x (length L); every lane gets the result.
template <typename T, typename X>
__device__ float row_dot(const T* __restrict__ w, const X* __restrict__ x, int64_t L, int lane, bool vec) {
  float acc = 0.f;
  if (vec) {
    constexpr int N = Vec<T>::N;
    const int64_t chunks = L / N;
    int64_t c = lane;
    for (; c + 96 < chunks; c += 128) {  // four 16-byte weight loads in flight per lane
      float wv[4][N], xv[N];
#pragma unroll
      for (int u = 0; u < 4; ++u) load16<T>(w + (c + 32 * u) * N, wv[u]);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        load_x<T, X>(x + (c + 32 * u) * N, xv);
#pragma unroll
        for (int e = 0; e < N; ++e) acc = fmaf(wv[u][e], xv[e], acc);
      }
    }
    for (; c < chunks; c += 32) {
      float wv[N], xv[N];
      load16<T>(w + c * N, wv);
      load_x<T, X>(x + c * N, xv);
#pragma unroll
      for (int e = 0; e < N; ++e) acc = fmaf(wv[e], xv[e], acc);
    }
  } else {
    for (int64_t i = lane; i < L; i += 32) acc = fmaf(to_f(w[i]), scalar_x(x, i), acc);
  }
  return warp_sum(acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) decode_step_kernel(DecodeParams p, float* ws, VecFlags vec) {
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + wib, nwarps = int64_t(gridDim.x) * kWarps;
  const int64_t B = p.B, DB = p.DB, DA = p.DA, H = p.H, D = p.D, n = p.n;
  const Layout lay = layout(B, DB, H, p.S);
  float* q = ws + lay.q;
  float* attn = ws + lay.attn;
  float* part = ws + lay.part;
  int* counters = reinterpret_cast<int*>(ws + lay.counters);
  const bool append = p.h_a != nullptr;
  const T* h_b = static_cast<const T*>(p.h_b);

  // ---- phase 1: q and the new K/V row
  if (blockIdx.x == 0)
    for (int64_t i = threadIdx.x; i < B * H; i += kThreads) counters[i] = 0;
  if (n == 0)  // context mode at pos 0: nothing to attend, the update is zero
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < B * DB; i += int64_t(gridDim.x) * kThreads)
      attn[i] = 0.f;
  const float scale = 1.0f / sqrtf(float(D));
  const int64_t rows1 = DB + (append ? 2 * DB : 0);
  for (int64_t r = warp; r < rows1; r += nwarps) {
    if (r < DB) {
      const T* w = static_cast<const T*>(p.w_q) + r * p.swq;
      for (int64_t b = 0; b < B; ++b) {
        const float acc = row_dot<T, T>(w, h_b + b * p.shb, DB, lane, vec.q);
        if (lane == 0) q[b * DB + r] = acc * scale;
      }
    } else {
      const int64_t rr = r - DB, c = rr % DB, head = c / D, d = c % D;
      const T* w = static_cast<const T*>(p.w_kv) + rr * p.swkv;
      const float bias = to_f(static_cast<const T*>(p.b_kv)[rr * p.sbkv]);
      T* cache = static_cast<T*>(rr < DB ? p.kc : p.vc);
      const int64_t* cs = rr < DB ? p.skc : p.svc;
      for (int64_t b = 0; b < B; ++b) {
        const float acc = row_dot<T, T>(w, static_cast<const T*>(p.h_a) + b * p.sha, DA, lane, vec.kv);
        if (lane == 0) cache[b * cs[0] + head * cs[1] + p.pos * cs[2] + d] = from_f<T>(acc + bias);
      }
    }
  }
  grid.sync();

  // ---- phase 2: split-K attention over cache rows [0, n), merged by the last warp
  __shared__ float s_sh[kWarps][kChunk];
  const int64_t nch = (n + kChunk - 1) / kChunk, items = B * H * nch;
  const float ninf = -INFINITY;
  for (int64_t it = warp; it < items; it += nwarps) {
    const int64_t b = it / (H * nch), h = (it / nch) % H, c = it % nch;
    const int64_t j0 = c * kChunk, j1 = min(n, j0 + kChunk);
    float qr[kPL];
#pragma unroll
    for (int t = 0; t < kPL; ++t) {
      const int64_t d = lane + 32 * t;
      qr[t] = d < D ? __ldcg(q + b * DB + h * D + d) : 0.f;
    }
    const T* kb = static_cast<const T*>(p.kc) + b * p.skc[0] + h * p.skc[1];
    const T* vb = static_cast<const T*>(p.vc) + b * p.svc[0] + h * p.svc[1];
    float mx = ninf;
    bool bad = false, any = false;
    for (int64_t j = j0; j < j1; j += 4) {  // four rows' loads in flight
      float sc[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float acc = 0.f;
        if (j + u < j1) {
          const T* kr = kb + (j + u) * p.skc[2];
#pragma unroll
          for (int t = 0; t < kPL; ++t) {
            const int64_t d = lane + 32 * t;
            if (d < D) acc = fmaf(qr[t], to_f(__ldcg(kr + d)), acc);
          }
        }
        sc[u] = acc;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (j + u >= j1) break;
        float s = warp_sum(sc[u]);
        const bool keep = p.kpm == nullptr || p.kpm[b * p.skpm[0] + (j + u) * p.skpm[1]];
        s = keep ? s : ninf;
        any |= keep;
        bad |= s != s;
        mx = fmaxf(mx, s);
        if (lane == 0) s_sh[wib][j + u - j0] = s;
      }
    }
    __syncwarp();
    float l = 0.f, acc[kPL];
#pragma unroll
    for (int t = 0; t < kPL; ++t) acc[t] = 0.f;
    if (!bad && mx != ninf) {
      for (int64_t j = j0; j < j1; ++j) {
        const float sj = s_sh[wib][j - j0];
        if (sj == ninf) continue;  // masked (uniform across the warp); an underflowed visible
        const float pj = expf(sj - mx);  // key still counts, so 0 * NaN stays NaN
        l += pj;
        const T* vr = vb + j * p.svc[2];
#pragma unroll
        for (int t = 0; t < kPL; ++t) {
          const int64_t d = lane + 32 * t;
          if (d < D) acc[t] = fmaf(pj, to_f(__ldcg(vr + d)), acc[t]);
        }
      }
    }
    float* mine = part + it * (D + 2);
    if (lane == 0) {
      mine[0] = bad ? NAN : mx;
      // l = -1 marks "the mask allowed keys here, all scored -inf" for the merge.
      mine[1] = bad ? NAN : ((any && mx == ninf) ? -1.f : l);
    }
#pragma unroll
    for (int t = 0; t < kPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) mine[2 + d] = acc[t];
    }
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0) last = atomicAdd(&counters[b * H + h], 1) == int(nch - 1);
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {  // every chunk of (b, h) is written: merge them
      __threadfence();
      const float* first = part + (b * H + h) * nch * (D + 2);
      float M = ninf;
      bool poisoned = false, seen = false;
      for (int64_t cc = 0; cc < nch; ++cc) {
        const float m = __ldcg(first + cc * (D + 2));
        poisoned |= m != m;
        seen |= m != ninf || __ldcg(first + cc * (D + 2) + 1) < 0.f;
        M = fmaxf(M, m);
      }
      poisoned |= seen && M == ninf;  // allowed keys, every score -inf: NaN as softmax
      float L = 0.f, o[kPL];
#pragma unroll
      for (int t = 0; t < kPL; ++t) o[t] = 0.f;
      if (!poisoned && M != ninf) {
        for (int64_t cc = 0; cc < nch; ++cc) {
          const float* pc = first + cc * (D + 2);
          const float m = __ldcg(pc);
          if (m == ninf) continue;
          const float f = expf(m - M);
          L += f * __ldcg(pc + 1);
#pragma unroll
          for (int t = 0; t < kPL; ++t) {
            const int64_t d = lane + 32 * t;
            if (d < D) o[t] = fmaf(f, __ldcg(pc + 2 + d), o[t]);
          }
        }
      }
      const float inv = poisoned ? NAN : (L > 0.f ? 1.f / L : 0.f);
#pragma unroll
      for (int t = 0; t < kPL; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) attn[b * DB + h * D + d] = o[t] * inv;
      }
    }
  }
  grid.sync();

  // ---- phase 3: out = h_b + W_o attn
  for (int64_t r = warp; r < DB; r += nwarps) {
    const T* w = static_cast<const T*>(p.w_o) + r * p.swo;
    for (int64_t b = 0; b < B; ++b) {
      const float acc = row_dot<T, float>(w, attn + b * DB, DB, lane, vec.o);
      if (lane == 0)
        static_cast<T*>(p.out)[b * p.sout + r] = from_f<T>(to_f(h_b[b * p.shb + r]) + acc);
    }
  }
}

bool rows_aligned(const void* base, int64_t row_stride, int64_t len, int64_t elem) {
  return (reinterpret_cast<uintptr_t>(base) & 15u) == 0 && (row_stride * elem) % 16 == 0 &&
         (len * elem) % 16 == 0;
}

struct GridInfo {
  int blocks = 0;  // co-resident blocks of the whole GPU
  bool coop = false;
};

template <typename T>
cudaError_t grid_info(GridInfo* out) {
  static std::mutex mu;
  static GridInfo cache[64];
  static bool have[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 64 && have[dev]) {
    *out = cache[dev];
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0, coop = 0;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess) return e;
  if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_step_kernel<T>, kThreads, 0)) != cudaSuccess)
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

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, void* workspace, cudaStream_t stream, std::string* why) {
  GridInfo g;
  cudaError_t e = grid_info<T>(&g);
  if (e != cudaSuccess) return e;
  if (!g.coop || g.blocks <= 0) {
    *why = "this GPU cannot launch cooperative kernels";
    return cudaErrorNotSupported;
  }
  const int64_t es = sizeof(T);
  VecFlags vec;
  vec.q = rows_aligned(p.w_q, p.swq, p.DB, es) && rows_aligned(p.h_b, p.shb, p.DB, es);
  vec.kv = p.h_a != nullptr && rows_aligned(p.w_kv, p.swkv, p.DA, es) && rows_aligned(p.h_a, p.sha, p.DA, es);
  vec.o = rows_aligned(p.w_o, p.swo, p.DB, es) && p.DB % 4 == 0;
  DecodeParams pc = p;
  float* ws = static_cast<float*>(workspace);
  void* args[] = {&pc, &ws, &vec};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(decode_step_kernel<T>), dim3(g.blocks),
                                     dim3(kThreads), args, 0, stream);
}

}  // namespace

int64_t decode_workspace_bytes(int64_t B, int64_t DB, int64_t H, int64_t S) {
  if (B < 0 || DB <= 0 || H <= 0 || S < 0 || DB % H != 0) return -1;
  // Keep every product far from int64 overflow: refuse absurd sizes outright.
  if (B > (int64_t(1) << 20) || DB > (int64_t(1) << 20) || S > (int64_t(1) << 30)) return -1;
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
