/* calm_fast C API: the bridge kernels over raw pointers, shapes and strides.
 *
 * No framework types: any stack (PyTorch, ONNX Runtime custom ops, plain C) can call these.
 * Every function returns a cf_status; on error cf_last_error() gives a one-line message
 * (thread-local, valid until the next call on the same thread). Nothing here aborts.
 *
 * Tensors are described by cf_tensor: element strides (not bytes), innermost stride 1.
 * Shapes (B batch, H heads, T rows, d head dim, D_A / D_B model widths):
 *   attention: q (B,H,Tq,d), k/v (B,H,Tk,d), key_padding_mask (B,Tk) CF_BOOL (1 = keep),
 *              out (B,H,Tq,d) in q's dtype, lse (B,H,Tq) fp32 (fp64 for fp64 inputs).
 *   decode:    h_b (B,1,D_B), h_a (B,1,D_A) or NULL (context mode), w_q (D_B,D_B),
 *              w_kv (2*D_B,D_A), b_kv (2*D_B), w_o (D_B,D_B), k_cache/v_cache (B,H,S,d),
 *              key_padding_mask (B,S) or NULL, out (B,1,D_B).
 * Masks: CF_MASK_ALIGNED: query i sees key j iff j <= i + (Tk - Tq); CF_MASK_CONTEXT: all
 * keys. A query row that sees no key outputs 0, has lse = -inf and gets zero gradients.
 * Written tensors (out, lse, dq, dk, dv; k_cache/v_cache when the decode step appends) must not
 * overlap themselves (no stride 0 over a dim of size > 1) nor, by byte range, an input or
 * another output (CF_ERR_VALUE); the decode step's out may be h_b itself. Inputs may share
 * memory (e.g. q/k/v slices of one packed tensor).
 *
 * The CPU functions live in the calm_fast._C module (and any library built from csrc/cpu);
 * the CUDA ones in calm_fast._C_cuda, which alone links the CUDA runtime.
 */
#ifndef CALM_FAST_H_
#define CALM_FAST_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define CF_API __declspec(dllexport)
#else
#define CF_API __attribute__((visibility("default")))
#endif

#define CF_MAX_DIMS 4

typedef enum cf_status {
  CF_OK = 0,
  CF_ERR_NULL = 1,        /* a required pointer is NULL */
  CF_ERR_VALUE = 2,       /* a shape, stride or argument value is invalid */
  CF_ERR_DTYPE = 3,       /* unsupported or mismatched dtype */
  CF_ERR_OVERFLOW = 4,    /* a size or offset does not fit in int64 */
  CF_ERR_UNSUPPORTED = 5, /* valid, but not handled by this build / device */
  CF_ERR_CUDA = 6,        /* the CUDA runtime reported an error */
  CF_ERR_INTERNAL = 7
} cf_status;

typedef enum cf_dtype {
  CF_F32 = 0,
  CF_F64 = 1,
  CF_BF16 = 2,
  CF_F16 = 3,
  CF_BOOL = 4 /* one byte per element, 0 = false */
} cf_dtype;

typedef enum cf_mask { CF_MASK_ALIGNED = 0, CF_MASK_CONTEXT = 1 } cf_mask;

typedef struct cf_tensor {
  void* data;
  int32_t dtype; /* cf_dtype */
  int32_t ndim;
  int64_t shape[CF_MAX_DIMS];
  int64_t stride[CF_MAX_DIMS]; /* in elements */
} cf_tensor;

CF_API const char* cf_last_error(void);
CF_API const char* cf_version(void);

/* Threads used by the CPU kernels; 0 (default) = the OpenMP default; at most 4096 (and
 * omp_get_thread_limit()). */
CF_API cf_status cf_set_num_threads(int32_t n);

/* ---- CPU (fp32, fp64, bf16 storage; accumulation in fp32, fp64 for fp64) ---- */
/* out: q's dtype, or fp32 for bf16 inputs (the unrounded output; passed back to the backward,
 * it gives delta = dout·out without bf16 rounding: dq, dk then keep their accuracy when the
 * value rows are alike). */
CF_API cf_status cf_attn_fwd_cpu(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                                 const cf_tensor* key_padding_mask, int32_t mask,
                                 const cf_tensor* out, const cf_tensor* lse);

/* dq, dk, dv from the forward's out and lse (scores recomputed, never stored). */
CF_API cf_status cf_attn_bwd_cpu(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                                 const cf_tensor* key_padding_mask, int32_t mask,
                                 const cf_tensor* out, const cf_tensor* dout,
                                 const cf_tensor* lse, const cf_tensor* dq,
                                 const cf_tensor* dk, const cf_tensor* dv);

/* One bridge decode step. With h_a: writes its K/V into cache row pos, attends over
 * rows [0, pos] (also when D_A = 0: the row is b_kv). Without (h_a NULL, context mode):
 * attends over rows [0, pos). */
CF_API cf_status cf_decode_step_cpu(const cf_tensor* h_b, const cf_tensor* h_a,
                                    const cf_tensor* w_q, const cf_tensor* w_kv,
                                    const cf_tensor* b_kv, const cf_tensor* w_o,
                                    const cf_tensor* k_cache, const cf_tensor* v_cache,
                                    const cf_tensor* key_padding_mask, int64_t pos,
                                    int64_t n_heads, const cf_tensor* out);

/* ---- CUDA (bf16, fp16, fp32 storage; fp32 accumulation); stream is a cudaStream_t ---- */
CF_API cf_status cf_attn_fwd_cuda(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                                  const cf_tensor* key_padding_mask, int32_t mask,
                                  const cf_tensor* out, const cf_tensor* lse, void* stream);

/* Bytes of device scratch cf_decode_step_cuda needs for these sizes (-1 on bad sizes or when
 * the count does not fit in int64; cf_last_error() names them). */
CF_API int64_t cf_decode_workspace_bytes_cuda(int64_t batch, int64_t d_b, int64_t n_heads,
                                              int64_t n_rows);

/* The whole decode step in one kernel launch; workspace: device memory of at least
 * cf_decode_workspace_bytes_cuda(...) bytes, 16-byte aligned. */
CF_API cf_status cf_decode_step_cuda(const cf_tensor* h_b, const cf_tensor* h_a,
                                     const cf_tensor* w_q, const cf_tensor* w_kv,
                                     const cf_tensor* b_kv, const cf_tensor* w_o,
                                     const cf_tensor* k_cache, const cf_tensor* v_cache,
                                     const cf_tensor* key_padding_mask, int64_t pos,
                                     int64_t n_heads, const cf_tensor* out, void* workspace,
                                     int64_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* CALM_FAST_H_ */
