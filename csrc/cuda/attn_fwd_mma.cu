// Masked cross-attention forward on tensor cores through mma.sync (sm_80+), FlashAttention-2
// style, for bf16/fp16 with head dim 64 or 128 and 16-byte-aligned rows.
//
// A block is 4 warps and 64 query rows (16 per warp). Its Q tile is read once into registers
// (ldmatrix); K and V tiles of 64 keys stream through shared memory in two stages (cp.async:
// tile j + 1 loads while tile j is used). Per tile each warp computes S = Q K^T (16 x 64) in
// registers, masks it (aligned-causal limit, key padding, keys past Tk), runs the online
// softmax on its own rows (a row lives in the 4 lanes of a quad: two shuffles reduce it) and
// adds P V with P taken straight from the score registers. Padded keys and keys past the end
// load as zeros, so whatever they hold never reaches a sum. Causal blocks stop at their last
// visible key tile and run heaviest first.
//
// Semantics are ops/reference.py's, as in attn_fwd.cu: a row that sees no key outputs 0 with
// lse = -inf; a NaN score makes its row NaN; visible keys all scoring -inf give NaN.
#include <cmath>

#include "launch.hpp"
#include "mma_sync.cuh"

namespace cf {
namespace cuda {
namespace {

constexpr int kBlockQ = 64, kBlockK = 64, kThreads = 128;

template <int D>
struct TileSmem {                        // offsets in elements of T, then bytes for the key flags
  static constexpr int LD = D + 8;       // row pitch: 8 consecutive rows start in 8 different bank groups
  static constexpr int q = 0, k = kBlockQ * LD, v = k + 2 * kBlockK * LD, elems = v + 2 * kBlockK * LD;
  static constexpr size_t keep = size_t(elems) * 2;
  static constexpr size_t bytes = keep + 2 * kBlockK;
};

__device__ __forceinline__ int64_t last_visible_key(const AttnParams& p, int64_t i) {
  return p.aligned ? i + (p.Tk - p.Tq) : p.Tk - 1;
}
__device__ __forceinline__ bool kept(const AttnParams& p, int64_t b, int64_t j) {
  return p.kpm == nullptr || p.kpm[b * p.skpm[0] + j * p.skpm[1]];
}

// Rows [row0, row0 + 64) of one head into a shared tile (pitch LD), as one cp.async group
// per call; rows past `nrows`, and padded keys when `padding`, become zeros.
template <typename T, int D>
__device__ void load_tile_async(T* dst, const T* head, int64_t row_stride, int64_t row0, int64_t nrows,
                                const AttnParams& p, int64_t b, bool padding) {
  constexpr int C = D / 8, LD = TileSmem<D>::LD;
  for (int idx = threadIdx.x; idx < kBlockK * C; idx += kThreads) {
    const int r = idx / C, c = (idx % C) * 8;
    const int64_t row = row0 + r;
    const bool valid = row < nrows && (!padding || kept(p, b, row));
    cp_async_16(dst + r * LD + c, valid ? head + row * row_stride + c : head, valid);
  }
  cp_async_commit();
}

// Issues key tile `tile` into stage `st`: K, then V (one group each), and the tile's flags
// (1 = a real, unpadded key) for the softmax.
template <typename T, int D>
__device__ void issue_kv(const AttnParams& p, int64_t b, const T* kh, const T* vh, T* sk, T* sv, uint8_t* keep,
                         int64_t tile, int st) {
  constexpr int LD = TileSmem<D>::LD;
  const int64_t r0 = tile * kBlockK;
  load_tile_async<T, D>(sk + st * kBlockK * LD, kh, p.sk[2], r0, p.Tk, p, b, true);
  load_tile_async<T, D>(sv + st * kBlockK * LD, vh, p.sv[2], r0, p.Tk, p, b, true);
  if (threadIdx.x < kBlockK) {
    const int64_t j = r0 + threadIdx.x;
    keep[st * kBlockK + threadIdx.x] = j < p.Tk && kept(p, b, j);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_mma(AttnParams p) {
  using S = TileSmem<D>;
  constexpr int LD = S::LD, KD = D / 16, ND = D / 8;
  CF_DYNAMIC_SMEM(smem);
  T* sq = reinterpret_cast<T*>(smem) + S::q;
  T* sk = reinterpret_cast<T*>(smem) + S::k;
  T* sv = reinterpret_cast<T*>(smem) + S::v;
  uint8_t* keep = smem + S::keep;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t qtile = p.aligned ? int64_t(gridDim.x) - 1 - blockIdx.x : int64_t(blockIdx.x);  // heaviest first
  const int64_t q0 = qtile * kBlockQ;
  const T* qh = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* kh = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vh = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  const int64_t q_last = min(p.Tq - 1, q0 + kBlockQ - 1);
  const int64_t kend = min(p.Tk, last_visible_key(p, q_last) + 1);
  const int64_t ntiles = kend > 0 ? (kend + kBlockK - 1) / kBlockK : 0;

  // Prologue: Q, then K0 and V0, three groups; the loop keeps two groups per tile.
  load_tile_async<T, D>(sq, qh, p.sq[2], q0, p.Tq, p, b, false);
  if (ntiles > 0) {
    issue_kv<T, D>(p, b, kh, vh, sk, sv, keep, 0, 0);
  } else {
    cp_async_commit();
    cp_async_commit();
  }
  cp_async_wait<1>();  // Q and K0 have landed (V0 may not have)
  __syncthreads();
  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk)
    ldmatrix_x4<false>(qf[kk], sq + (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + kk * 16 + (lane / 16) * 8);

  float o[ND][4];
#pragma unroll
  for (int dn = 0; dn < ND; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  bool bad[2] = {false, false}, seen[2] = {false, false};
  const float scale_log2 = 1.4426950408889634f / sqrtf(float(D));  // scores in the exp2 domain
  const int64_t row0 = q0 + warp * 16 + g;
  const int64_t lim[2] = {row0 < p.Tq ? last_visible_key(p, row0) : -1,
                          row0 + 8 < p.Tq ? last_visible_key(p, row0 + 8) : -1};

  for (int64_t j = 0; j < ntiles; ++j) {
    const int st = int(j & 1);
    if (j > 0) {
      cp_async_wait<1>();  // K_j has landed (V_j may not have)
      __syncthreads();
    }
    // S (16 x 64 per warp) = Q K^T: s[nb] covers keys nb*8 .. nb*8+7 of the tile.
    const T* kt = sk + st * kBlockK * LD;
    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t kb[4];
        ldmatrix_x4<false>(kb, kt + (np * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(s[2 * np], qf[kk], b0);
        mma_16816<T>(s[2 * np + 1], qf[kk], b1);
      }
    }
    // The next tile streams in while this one is used.
    if (j + 1 < ntiles) {
      issue_kv<T, D>(p, b, kh, vh, sk, sv, keep, j + 1, st ^ 1);
    } else {
      cp_async_commit();
      cp_async_commit();
    }
    cp_async_wait<2>();  // V_j has landed
    __syncthreads();

    // Online softmax, rows g (hr = 0) and g + 8 (hr = 1) of this warp's 16.
    const uint8_t* kp = keep + st * kBlockK;
    const int64_t jbase = j * kBlockK;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
      int any = 0, nan = 0;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = nb * 8 + 2 * t + e;
          const bool ok = jbase + c <= lim[hr] && kp[c];
          float& x = s[nb][2 * hr + e];
          x = ok ? x * scale_log2 : -INFINITY;
          any |= ok;
          nan |= x != x;
          mx = fmaxf(mx, x);
        }
      }
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {  // the quad holds the row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        any |= __shfl_xor_sync(0xffffffffu, any, off);
        nan |= __shfl_xor_sync(0xffffffffu, nan, off);
      }
      seen[hr] |= any != 0;
      bad[hr] |= nan != 0;
      const float m_new = fmaxf(m[hr], mx);
      const bool live = !bad[hr] && m_new != -INFINITY;  // quad-uniform
      const float alpha = live ? exp2f(m[hr] - m_new) : 1.f;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nb][2 * hr + e];
          x = live ? exp2f(x - m_new) : 0.f;
          sum += x;
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (live) m[hr] = m_new;
      l[hr] = l[hr] * alpha + sum;
#pragma unroll
      for (int dn = 0; dn < ND; ++dn) {
        o[dn][2 * hr] *= alpha;
        o[dn][2 * hr + 1] *= alpha;
      }
    }

    // O += P V: P's registers are already the A fragments of 16-key chunks.
    const T* vt = sv + st * kBlockK * LD;
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kc][0], s[2 * kc][1]), pack2<T>(s[2 * kc][2], s[2 * kc][3]),
                              pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4<true>(vb, vt + (kc * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + dp * 16 + (lane / 16) * 8);
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_16816<T>(o[2 * dp], pa, b0);
        mma_16816<T>(o[2 * dp + 1], pa, b1);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t i = row0 + 8 * hr;
    if (i >= p.Tq) continue;
    // NaN score, visible keys all -inf, or l NaN (an inf score): NaN, never "empty" (lse -inf)
    const bool nan_row = bad[hr] || (seen[hr] && l[hr] == 0.f) || l[hr] != l[hr];
    const float inv = nan_row ? NAN : (l[hr] > 0.f ? 1.f / l[hr] : 0.f);
    T* out = static_cast<T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
#pragma unroll
    for (int dn = 0; dn < ND; ++dn) {
      out[dn * 8 + 2 * t] = from_f<T>(o[dn][2 * hr] * inv);
      out[dn * 8 + 2 * t + 1] = from_f<T>(o[dn][2 * hr + 1] * inv);
    }
    if (t == 0)
      static_cast<float*>(p.lse)[b * p.sl[0] + h * p.sl[1] + i * p.sl[2]] =
          nan_row ? NAN : (l[hr] > 0.f ? (m[hr] + log2f(l[hr])) * 0.6931471805599453f : -INFINITY);
  }
}

template <typename T, int D>
cudaError_t launch_typed(const AttnParams& p, cudaStream_t stream) {
  const cudaError_t e = allow_dynamic_smem<attn_fwd_mma<T, D>>(TileSmem<D>::bytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned((p.Tq + kBlockQ - 1) / kBlockQ), unsigned(p.H), unsigned(p.B));
  return launch_kernel(attn_fwd_mma<T, D>, grid, dim3(kThreads), TileSmem<D>::bytes, stream, p);
}

bool rows_16b(const void* base, const int64_t* strides) {
  if ((reinterpret_cast<uintptr_t>(base) & 15u) != 0) return false;
  for (int i = 0; i < 3; ++i)
    if ((strides[i] * 2) % 16 != 0) return false;
  return true;
}

}  // namespace

bool attn_fwd_mma_supported(const AttnParams& p) {
  return (p.dtype == CF_BF16 || p.dtype == CF_F16) && (p.D == 64 || p.D == 128) && rows_16b(p.q, p.sq) &&
         rows_16b(p.k, p.sk) && rows_16b(p.v, p.sv);
}

cudaError_t launch_attn_fwd_mma(const AttnParams& p, cudaStream_t stream) {
  if (p.dtype == CF_BF16)
    return p.D == 64 ? launch_typed<__nv_bfloat16, 64>(p, stream) : launch_typed<__nv_bfloat16, 128>(p, stream);
  return p.D == 64 ? launch_typed<__half, 64>(p, stream) : launch_typed<__half, 128>(p, stream);
}

}  // namespace cuda
}  // namespace cf
