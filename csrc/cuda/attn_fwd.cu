// Masked cross-attention forward on CUDA (prefill), flash-style: the Tq x Tk scores are
// never stored; each block keeps a running max / sum / output for its query rows.
//
// Three kernels; launch_attn_fwd picks:
//  * attn_fwd_mma (attn_fwd_mma.cu): bf16/fp16, head dim 64/128, 16-byte-aligned rows; mma.sync
//    with registers-resident scores and two-stage cp.async tiles. The default where it applies;
//    CALM_FAST_CUDA_ATTN=wmma picks the WMMA kernel below instead (for comparisons).
//  * attn_fwd_wmma<T, D>: bf16/fp16 with head dim 64 or 128, tensor cores through WMMA.
//    A block is 4 warps and 64 query rows (16 per warp); per 64-key tile: S = Q K^T on
//    tensor cores, the online softmax on S in shared memory, then O += P V on tensor cores.
//    Causal (aligned) blocks stop at their last visible key tile.
//  * attn_fwd_generic<T>: every dtype (fp32 included) and head dim <= 256, one warp per
//    query row with fp32 CUDA-core math. For tests and odd shapes, not for speed.
#include <mma.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "launch.hpp"

namespace cf {
namespace cuda {
namespace {

constexpr int kMaxD = 256;
constexpr int kPL = kMaxD / 32;

__device__ __forceinline__ int64_t last_key(const AttnParams& p, int64_t i) {
  return p.aligned ? i + (p.Tk - p.Tq) : p.Tk - 1;
}
__device__ __forceinline__ bool key_kept(const AttnParams& p, int64_t b, int64_t j) {
  return p.kpm == nullptr || p.kpm[b * p.skpm[0] + j * p.skpm[1]];
}

template <typename T>
__global__ void __launch_bounds__(128) attn_fwd_generic(AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  if (i >= p.Tq) return;
  const int64_t D = p.D;
  const float scale = 1.0f / sqrtf(float(D));
  const T* qp = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1] + i * p.sq[2];
  const T* kb = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  float qr[kPL], acc[kPL];
#pragma unroll
  for (int t = 0; t < kPL; ++t) {
    const int64_t d = lane + 32 * t;
    qr[t] = d < D ? to_f(qp[d]) * scale : 0.f;
    acc[t] = 0.f;
  }
  const int64_t jend = min(p.Tk, last_key(p, i) + 1);
  float m = -INFINITY, l = 0.f;
  bool bad = false, seen = false;
  for (int64_t j = 0; j < jend; ++j) {
    if (!key_kept(p, b, j)) continue;  // uniform across the warp
    seen = true;
    const T* kr = kb + j * p.sk[2];
    float part = 0.f;
#pragma unroll
    for (int t = 0; t < kPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) part = fmaf(qr[t], to_f(kr[d]), part);
    }
    const float s = warp_sum(part);
    if (s != s) bad = true;
    if (bad) continue;
    const T* vr = vb + j * p.sv[2];
    if (s == -INFINITY) {  // (rare) weight 0, which still multiplies the value: 0 * inf/NaN = NaN
#pragma unroll
      for (int t = 0; t < kPL; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) acc[t] = fmaf(0.f, to_f(vr[d]), acc[t]);
      }
      continue;
    }
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new), pj = expf(s - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int t = 0; t < kPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) acc[t] = fmaf(pj, to_f(vr[d]), acc[t] * alpha);
    }
    m = m_new;
  }
  bad |= seen && l == 0.f;  // allowed keys, all scores -inf: NaN as softmax (not "empty")
  // l NaN (an inf score: inf - inf in the running sum) is a NaN row, not an empty one (lse
  // -inf would tell the backward the row sees no key and hide the NaN from the gradients).
  bad |= l != l;
  const float inv = bad ? NAN : (l > 0.f ? 1.f / l : 0.f);
  T* op = static_cast<T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
#pragma unroll
  for (int t = 0; t < kPL; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) op[d] = from_f<T>(acc[t] * inv);
  }
  if (lane == 0)
    static_cast<float*>(p.lse)[b * p.sl[0] + h * p.sl[1] + i * p.sl[2]] =
        bad ? NAN : (l > 0.f ? m + logf(l) : -INFINITY);
}

// ----------------------------------------------------------------- tensor-core kernel

constexpr int kBQ = 64, kBK = 64, kWarpsW = 4;

template <int D> struct Smem {
  static constexpr int LDT = D + 8, LDS = kBK + 4, LDP = kBK + 8, LDO = D + 4;
  static constexpr int q_elems = kBQ * LDT, kv_elems = kBK * LDT;
  static constexpr int s_floats = kWarpsW * 16 * LDS, p_elems = kWarpsW * 16 * LDP;
  static constexpr int o_floats = kWarpsW * 16 * LDO;
  static constexpr size_t bytes = size_t(q_elems + kv_elems + p_elems) * 2 +
                                  size_t(s_floats + o_floats + 4 * kBQ) * 4;
};

// Copy rows [row0, row0 + 64) of one head into a padded shared tile (ld = LDT); rows that
// do not exist or are padding become zeros (so inf/NaN there cannot reach the sums).
template <typename T, int D>
__device__ void load_tile(T* dst, const T* head, int64_t row_stride, int64_t row0, int64_t nrows,
                          const AttnParams& p, int64_t b, bool use_kpm, bool vec) {
  constexpr int LDT = Smem<D>::LDT, C8 = D / 8;
  if (vec) {
    for (int idx = threadIdx.x; idx < kBK * C8; idx += blockDim.x) {
      const int r = idx / C8, c = (idx % C8) * 8;
      const int64_t row = row0 + r;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (row < nrows && (!use_kpm || key_kept(p, b, row)))
        val = *reinterpret_cast<const uint4*>(head + row * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * LDT + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kBK * D; idx += blockDim.x) {
      const int r = idx / D, c = idx % D;
      const int64_t row = row0 + r;
      const bool ok = row < nrows && (!use_kpm || key_kept(p, b, row));
      dst[r * LDT + c] = ok ? head[row * row_stride + c] : from_f<T>(0.f);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(128) attn_fwd_wmma(AttnParams p, bool vq, bool vk, bool vv) {
  using namespace nvcuda;
  using S = Smem<D>;
  CF_DYNAMIC_SMEM(smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* KVs = Qs + S::q_elems;
  T* Ps = KVs + S::kv_elems;
  float* Ss = reinterpret_cast<float*>(Ps + S::p_elems);
  float* Os = Ss + S::s_floats;
  float* st_m = Os + S::o_floats;
  float* st_l = st_m + kBQ;
  float* st_a = st_l + kBQ;
  float* st_seen = st_a + kBQ;  // 1 once the mask has let the row see a key

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kBQ;
  const float scale = 1.0f / sqrtf(float(D));
  float* Sw = Ss + warp * 16 * S::LDS;
  T* Pw = Ps + warp * 16 * S::LDP;
  float* Ow = Os + warp * 16 * S::LDO;

  const T* qh = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* kh = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vh = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  load_tile<T, D>(Qs, qh, p.sq[2], q0, p.Tq, p, b, false, vq);
  for (int idx = lane; idx < 16 * D; idx += 32) Ow[(idx / D) * S::LDO + idx % D] = 0.f;
  if (threadIdx.x < kBQ) {
    st_m[threadIdx.x] = -INFINITY;
    st_l[threadIdx.x] = 0.f;
    st_seen[threadIdx.x] = 0.f;
  }
  const int64_t q_last = min(p.Tq - 1, q0 + kBQ - 1);
  const int64_t kend = min(p.Tk, last_key(p, q_last) + 1);
  __syncthreads();

  for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
    load_tile<T, D>(KVs, kh, p.sk[2], j0, p.Tk, p, b, true, vk);
    __syncthreads();
    // S_w (16 x 64) = Q_w K^T
#pragma unroll
    for (int c = 0; c < kBK / 16; ++c) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, Qs + warp * 16 * S::LDT + kk * 16, S::LDT);
        wmma::load_matrix_sync(bf, KVs + c * 16 * S::LDT + kk * 16, S::LDT);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Sw + c * 16, acc, S::LDS, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax over this tile, row by row (two keys per lane).
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const int64_t i = q0 + row;
      const int64_t lim = (i < p.Tq ? last_key(p, i) : -1) - j0;
      float sv[2];
      bool bad = false, any = false;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int c = lane + 32 * u;
        const bool ok = c <= lim && j0 + c < p.Tk && key_kept(p, b, j0 + c);
        sv[u] = ok ? Sw[r * S::LDS + c] * scale : -INFINITY;
        bad |= sv[u] != sv[u];
        any |= ok;
      }
      bad = __any_sync(0xffffffffu, bad);
      if (__any_sync(0xffffffffu, any) && lane == 0) st_seen[row] = 1.f;
      const float m_old = st_m[row];
      __syncwarp();  // every lane has read st_m[row] before lane 0 rewrites it (shuffles order no memory)
      const float mx = warp_max(fmaxf(sv[0], sv[1]));
      float alpha = 1.f, pr[2] = {0.f, 0.f};
      if (bad) {
        if (lane == 0) st_m[row] = st_l[row] = NAN;
      } else if (m_old == m_old && mx != -INFINITY) {  // not poisoned, something visible
        const float m_new = fmaxf(m_old, mx);
        alpha = expf(m_old - m_new);
        pr[0] = expf(sv[0] - m_new);
        pr[1] = expf(sv[1] - m_new);
        const float sum = warp_sum(pr[0] + pr[1]);
        if (lane == 0) {
          st_l[row] = st_l[row] * alpha + sum;
          st_m[row] = m_new;
        }
      }
      Pw[r * S::LDP + lane] = from_f<T>(pr[0]);
      Pw[r * S::LDP + lane + 32] = from_f<T>(pr[1]);
      if (lane == 0) st_a[row] = alpha;
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * D; idx += 32) {
      const int r = idx / D;
      Ow[r * S::LDO + idx % D] *= st_a[warp * 16 + r];
    }
    __syncthreads();  // every warp is done with K
    load_tile<T, D>(KVs, vh, p.sv[2], j0, p.Tk, p, b, true, vv);
    __syncthreads();
    // O_w += P_w V, one 16-column block at a time through the S_w scratch.
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(a, Pw + kk * 16, S::LDP);
        wmma::load_matrix_sync(bf, KVs + kk * 16 * S::LDT + c * 16, S::LDT);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Sw, acc, S::LDS, wmma::mem_row_major);
      __syncwarp();
      for (int idx = lane; idx < 256; idx += 32) {
        const int r = idx / 16, cc = idx % 16;
        Ow[r * S::LDO + c * 16 + cc] += Sw[r * S::LDS + cc];
      }
      __syncwarp();
    }
    __syncthreads();  // before the next K tile overwrites KVs
  }

  for (int r = 0; r < 16; ++r) {
    const int row = warp * 16 + r;
    const int64_t i = q0 + row;
    if (i >= p.Tq) break;
    const float m = st_m[row];
    const float l = (st_l[row] == 0.f && st_seen[row] != 0.f) ? NAN : st_l[row];  // all -inf: NaN
    const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : NAN);
    T* op = static_cast<T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
    for (int d = lane; d < D; d += 32) op[d] = from_f<T>(Ow[r * S::LDO + d] * inv);
    if (lane == 0)
      static_cast<float*>(p.lse)[b * p.sl[0] + h * p.sl[1] + i * p.sl[2]] =
          l > 0.f ? m + logf(l) : (l == 0.f ? -INFINITY : NAN);
  }
}

bool tile_vec_ok(const void* base, int64_t row_stride, int64_t elem) {
  return (reinterpret_cast<uintptr_t>(base) & 15u) == 0 && (row_stride * elem) % 16 == 0;
}

template <typename T, int D>
cudaError_t launch_wmma(const AttnParams& p, cudaStream_t stream) {
  const cudaError_t e = allow_dynamic_smem<attn_fwd_wmma<T, D>>(Smem<D>::bytes);
  if (e != cudaSuccess) return e;
  // Batch and heads ride on grid.y/z (65535 limit), query tiles on grid.x.
  const dim3 grid(unsigned((p.Tq + kBQ - 1) / kBQ), unsigned(p.H), unsigned(p.B));
  const bool vq = tile_vec_ok(p.q, p.sq[2], 2) && tile_vec_ok(static_cast<const char*>(p.q), p.sq[1], 2) &&
                  tile_vec_ok(p.q, p.sq[0], 2);
  const bool vk = tile_vec_ok(p.k, p.sk[2], 2) && tile_vec_ok(p.k, p.sk[1], 2) && tile_vec_ok(p.k, p.sk[0], 2);
  const bool vv = tile_vec_ok(p.v, p.sv[2], 2) && tile_vec_ok(p.v, p.sv[1], 2) && tile_vec_ok(p.v, p.sv[0], 2);
  return launch_kernel(attn_fwd_wmma<T, D>, grid, dim3(128), Smem<D>::bytes, stream, p, vq, vk, vv);
}

template <typename T>
cudaError_t launch_generic(const AttnParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned((p.Tq + 3) / 4), unsigned(p.H), unsigned(p.B));
  return launch_kernel(attn_fwd_generic<T>, grid, dim3(128), 0, stream, p);
}

}  // namespace

cudaError_t launch_attn_fwd(const AttnParams& p, cudaStream_t stream, std::string* why) {
  if (p.D > kMaxD) {
    *why = "head dim " + std::to_string(p.D) + " exceeds the CUDA attention kernel's limit of 256";
    return cudaErrorInvalidValue;
  }
  // Heads ride on grid.y and batch on grid.z (65535 each), blocks of 4 query rows on grid.x
  // (2^31 - 1; the tensor-core kernels' 64-row blocks need fewer).
  const int64_t kMaxYZ = 65535, kMaxRows = int64_t(0x7fffffff) * 4;
  if (p.B > kMaxYZ || p.H > kMaxYZ || p.Tq > kMaxRows) {
    const std::string sizes = "B=" + std::to_string(p.B) + ", H=" + std::to_string(p.H) + ", Tq=" + std::to_string(p.Tq);
    *why = sizes + ": " + (p.B > kMaxYZ ? "B exceeds the CUDA attention grid's limit of 65535 (grid.z)"
                           : p.H > kMaxYZ ? "H exceeds the CUDA attention grid's limit of 65535 (grid.y)"
                                          : "Tq exceeds the CUDA attention grid's limit of " + std::to_string(kMaxRows) +
                                                " query rows (grid.x)");
    return cudaErrorInvalidValue;
  }
  const char* pick = std::getenv("CALM_FAST_CUDA_ATTN");  // unset / "" / "mma": the default; "wmma"
  const bool wmma = pick != nullptr && std::strcmp(pick, "wmma") == 0;
  if (pick != nullptr && *pick != '\0' && !wmma && std::strcmp(pick, "mma") != 0) {
    *why = std::string("CALM_FAST_CUDA_ATTN must be mma or wmma, got '") + pick + "'";
    return cudaErrorInvalidValue;
  }
  if (attn_fwd_mma_supported(p) && !wmma) return launch_attn_fwd_mma(p, stream);
  const bool tc = p.D == 64 || p.D == 128;
  switch (p.dtype) {
    case CF_BF16:
      if (tc) return p.D == 64 ? launch_wmma<__nv_bfloat16, 64>(p, stream) : launch_wmma<__nv_bfloat16, 128>(p, stream);
      return launch_generic<__nv_bfloat16>(p, stream);
    case CF_F16:
      if (tc) return p.D == 64 ? launch_wmma<__half, 64>(p, stream) : launch_wmma<__half, 128>(p, stream);
      return launch_generic<__half>(p, stream);
    case CF_F32: return launch_generic<float>(p, stream);
    default: *why = "unsupported dtype"; return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace cf
