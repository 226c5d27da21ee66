/* A plain C11 program against calm_fast.h and libcalm_fast: how another stack describes
 * tensors and calls the kernels, and what tests/test_capi.py runs to check the library.
 *
 *   cc -std=c11 capi_check.c $(python -m calm_fast.capi --cflags --libs) -o capi_check
 *
 *   capi_check attn DIR DTYPE B H TQ TK D MASK KPM
 *       reads DIR/{q,k,v,dout}.bin (and kpm.bin when KPM is 1), runs the forward and the
 *       backward, writes DIR/{out,lse,dq,dk,dv}.bin. DTYPE: f32, f64 or bf16; MASK: aligned
 *       or context. Arrays are raw, contiguous, native byte order.
 *   capi_check decode DIR DTYPE B D_B D_A H S POS KPM
 *       reads DIR/{h_b,h_a,w_q,w_kv,b_kv,w_o,k_cache,v_cache}.bin (D_A = 0: context mode, no
 *       h_a/w_kv/b_kv), runs one decode step, writes DIR/{out,k_cache,v_cache}.bin.
 *   capi_check errors
 *       bad calls: each must fail with its status and a message naming the bad value.
 * Exit status 0 on success; otherwise a message on stderr.
 */
#include <calm_fast.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char* what) {
  fprintf(stderr, "capi_check: %s\n", what);
  return 1;
}

static cf_tensor tensor(void* data, int32_t dtype, int32_t ndim, const int64_t* shape) {
  cf_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dtype;
  t.ndim = ndim;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride;
    stride *= shape[i];
  }
  return t;
}

static int64_t numel(int32_t ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

/* Reads exactly `bytes` from DIR/name into a new buffer; NULL (with a message) otherwise. */
static void* read_array(const char* dir, const char* name, size_t bytes) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.bin", dir, name);
  FILE* f = fopen(path, "rb");
  if (f == NULL) {
    fprintf(stderr, "capi_check: cannot open %s\n", path);
    return NULL;
  }
  void* data = malloc(bytes > 0 ? bytes : 1);
  size_t got = data == NULL ? 0 : fread(data, 1, bytes, f);
  int extra = fgetc(f) != EOF;
  fclose(f);
  if (data == NULL || got != bytes || extra) {
    fprintf(stderr, "capi_check: %s does not hold %zu bytes\n", path, bytes);
    free(data);
    return NULL;
  }
  return data;
}

static int write_array(const char* dir, const char* name, const void* data, size_t bytes) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.bin", dir, name);
  FILE* f = fopen(path, "wb");
  if (f == NULL) return fail("cannot write an output file");
  size_t put = fwrite(data, 1, bytes, f);
  return (fclose(f) != 0 || put != bytes) ? fail("short write") : 0;
}

static int dtype_of(const char* s, int32_t* dtype, size_t* size) {
  if (strcmp(s, "f32") == 0) { *dtype = CF_F32; *size = 4; return 0; }
  if (strcmp(s, "f64") == 0) { *dtype = CF_F64; *size = 8; return 0; }
  if (strcmp(s, "bf16") == 0) { *dtype = CF_BF16; *size = 2; return 0; }
  return fail("DTYPE must be f32, f64 or bf16");
}

static int parse_sizes(char** argv, int n, int64_t* out) {
  for (int i = 0; i < n; ++i) {
    char* end = NULL;
    out[i] = strtoll(argv[i], &end, 10);
    if (end == argv[i] || *end != '\0' || out[i] < 0) return fail("sizes must be integers >= 0");
  }
  return 0;
}

static int report(cf_status s, const char* call) {
  if (s == CF_OK) return 0;
  fprintf(stderr, "capi_check: %s failed with status %d: %s\n", call, (int)s, cf_last_error());
  return 1;
}

static int run_attn(int argc, char** argv) {
  if (argc != 11) return fail("usage: attn DIR DTYPE B H TQ TK D MASK KPM");
  const char* dir = argv[2];
  int32_t dt;
  size_t es;
  int64_t n[5];
  if (dtype_of(argv[3], &dt, &es) || parse_sizes(argv + 4, 5, n)) return 1;
  const int64_t B = n[0], H = n[1], Tq = n[2], Tk = n[3], D = n[4];
  int32_t mask;
  if (strcmp(argv[9], "aligned") == 0) mask = CF_MASK_ALIGNED;
  else if (strcmp(argv[9], "context") == 0) mask = CF_MASK_CONTEXT;
  else return fail("MASK must be aligned or context");
  const int use_kpm = strcmp(argv[10], "1") == 0;
  const int64_t sq[4] = {B, H, Tq, D}, sk[4] = {B, H, Tk, D}, sl[3] = {B, H, Tq}, sm[2] = {B, Tk};
  const size_t nq = (size_t)numel(4, sq) * es, nk = (size_t)numel(4, sk) * es;
  const int32_t lse_dt = dt == CF_F64 ? CF_F64 : CF_F32;
  const size_t nl = (size_t)numel(3, sl) * (dt == CF_F64 ? 8 : 4);
  void *q = read_array(dir, "q", nq), *k = read_array(dir, "k", nk), *v = read_array(dir, "v", nk);
  void* dout = read_array(dir, "dout", nq);
  void* kpm = use_kpm ? read_array(dir, "kpm", (size_t)numel(2, sm)) : NULL;
  void *out = malloc(nq + 1), *lse = malloc(nl + 1), *dq = malloc(nq + 1), *dk = malloc(nk + 1),
       *dv = malloc(nk + 1);
  int rc = 1;
  if (q && k && v && dout && (kpm || !use_kpm) && out && lse && dq && dk && dv) {
    cf_tensor tq = tensor(q, dt, 4, sq), tk = tensor(k, dt, 4, sk), tv = tensor(v, dt, 4, sk);
    cf_tensor tm = tensor(kpm, CF_BOOL, 2, sm), to = tensor(out, dt, 4, sq), tl = tensor(lse, lse_dt, 3, sl);
    cf_tensor tdo = tensor(dout, dt, 4, sq), tdq = tensor(dq, dt, 4, sq), tdk = tensor(dk, dt, 4, sk),
              tdv = tensor(dv, dt, 4, sk);
    const cf_tensor* m = use_kpm ? &tm : NULL;
    rc = report(cf_attn_fwd_cpu(&tq, &tk, &tv, m, mask, &to, &tl), "cf_attn_fwd_cpu");
    if (rc == 0)
      rc = report(cf_attn_bwd_cpu(&tq, &tk, &tv, m, mask, &to, &tdo, &tl, &tdq, &tdk, &tdv), "cf_attn_bwd_cpu");
    if (rc == 0)
      rc = write_array(dir, "out", out, nq) || write_array(dir, "lse", lse, nl) || write_array(dir, "dq", dq, nq) ||
           write_array(dir, "dk", dk, nk) || write_array(dir, "dv", dv, nk);
  }
  free(q); free(k); free(v); free(dout); free(kpm); free(out); free(lse); free(dq); free(dk); free(dv);
  return rc;
}

static int run_decode(int argc, char** argv) {
  if (argc != 11) return fail("usage: decode DIR DTYPE B D_B D_A H S POS KPM");
  const char* dir = argv[2];
  int32_t dt;
  size_t es;
  int64_t n[6];
  if (dtype_of(argv[3], &dt, &es) || parse_sizes(argv + 4, 6, n)) return 1;
  const int64_t B = n[0], DB = n[1], DA = n[2], H = n[3], S = n[4], pos = n[5];
  const int use_kpm = strcmp(argv[10], "1") == 0, aligned = DA > 0;
  if (H == 0 || DB % H != 0) return fail("D_B must be a multiple of H > 0");
  const int64_t shb[3] = {B, 1, DB}, sha[3] = {B, 1, DA}, swq[2] = {DB, DB}, swkv[2] = {2 * DB, DA},
                sbkv[1] = {2 * DB}, sc[4] = {B, H, S, DB / H}, sm[2] = {B, S};
  const size_t nb = (size_t)numel(3, shb) * es, nw = (size_t)numel(2, swq) * es, nc = (size_t)numel(4, sc) * es;
  void* h_b = read_array(dir, "h_b", nb);
  void* w_q = read_array(dir, "w_q", nw);
  void* w_o = read_array(dir, "w_o", nw);
  void* kc = read_array(dir, "k_cache", nc);
  void* vc = read_array(dir, "v_cache", nc);
  void* h_a = aligned ? read_array(dir, "h_a", (size_t)numel(3, sha) * es) : NULL;
  void* w_kv = aligned ? read_array(dir, "w_kv", (size_t)numel(2, swkv) * es) : NULL;
  void* b_kv = aligned ? read_array(dir, "b_kv", (size_t)numel(1, sbkv) * es) : NULL;
  void* kpm = use_kpm ? read_array(dir, "kpm", (size_t)numel(2, sm)) : NULL;
  void* out = malloc(nb + 1);
  int rc = 1;
  if (h_b && w_q && w_o && kc && vc && (!aligned || (h_a && w_kv && b_kv)) && (kpm || !use_kpm) && out) {
    cf_tensor tb = tensor(h_b, dt, 3, shb), ta = tensor(h_a, dt, 3, sha), tq = tensor(w_q, dt, 2, swq),
              tkv = tensor(w_kv, dt, 2, swkv), tbkv = tensor(b_kv, dt, 1, sbkv), to_w = tensor(w_o, dt, 2, swq),
              tk = tensor(kc, dt, 4, sc), tv = tensor(vc, dt, 4, sc), tm = tensor(kpm, CF_BOOL, 2, sm),
              tout = tensor(out, dt, 3, shb);
    rc = report(cf_decode_step_cpu(&tb, aligned ? &ta : NULL, &tq, aligned ? &tkv : NULL, aligned ? &tbkv : NULL,
                                   &to_w, &tk, &tv, use_kpm ? &tm : NULL, pos, H, &tout),
                "cf_decode_step_cpu");
    if (rc == 0)
      rc = write_array(dir, "out", out, nb) || write_array(dir, "k_cache", kc, nc) ||
           write_array(dir, "v_cache", vc, nc);
  }
  free(h_b); free(h_a); free(w_q); free(w_kv); free(b_kv); free(w_o); free(kc); free(vc); free(kpm); free(out);
  return rc;
}

/* One bad call: it must return `want` and leave a message that contains `needle`. */
static int expect_error(cf_status got, cf_status want, const char* needle, const char* call) {
  const char* msg = cf_last_error();
  printf("%s -> %d: %s\n", call, (int)got, msg ? msg : "(null)");
  if (got != want || msg == NULL || strstr(msg, needle) == NULL) {
    fprintf(stderr, "capi_check: %s: expected status %d and a message containing \"%s\"\n", call, (int)want,
            needle);
    return 1;
  }
  return 0;
}

static int run_errors(void) {
  float q[2 * 3 * 4] = {0}, k[2 * 5 * 4] = {0}, v[2 * 5 * 4] = {0}, out[2 * 3 * 4], lse[2 * 3];
  const int64_t sq[4] = {1, 2, 3, 4}, sk[4] = {1, 2, 5, 4}, sl[3] = {1, 2, 3}, sbad[4] = {1, 2, 5, 3};
  cf_tensor tq = tensor(q, CF_F32, 4, sq), tk = tensor(k, CF_F32, 4, sk), tv = tensor(v, CF_F32, 4, sk),
            to = tensor(out, CF_F32, 4, sq), tl = tensor(lse, CF_F32, 3, sl);
  int bad = 0;
  /* A good call first: the library works at all. */
  bad |= report(cf_attn_fwd_cpu(&tq, &tk, &tv, NULL, CF_MASK_ALIGNED, &to, &tl), "cf_attn_fwd_cpu (good call)");
  bad |= expect_error(cf_attn_fwd_cpu(&tq, NULL, &tv, NULL, CF_MASK_ALIGNED, &to, &tl), CF_ERR_NULL, "k",
                      "cf_attn_fwd_cpu(k = NULL)");
  cf_tensor tv_bad = tensor(v, CF_F32, 4, sbad);
  bad |= expect_error(cf_attn_fwd_cpu(&tq, &tk, &tv_bad, NULL, CF_MASK_ALIGNED, &to, &tl), CF_ERR_VALUE, "v",
                      "cf_attn_fwd_cpu(v of head dim 3)");
  bad |= expect_error(cf_attn_fwd_cpu(&tq, &tk, &tv, NULL, 7, &to, &tl), CF_ERR_VALUE, "7",
                      "cf_attn_fwd_cpu(mask = 7)");
  cf_tensor tk_f64 = tk;
  tk_f64.dtype = CF_F64;
  bad |= expect_error(cf_attn_fwd_cpu(&tq, &tk_f64, &tv, NULL, CF_MASK_ALIGNED, &to, &tl), CF_ERR_DTYPE, "k",
                      "cf_attn_fwd_cpu(k in fp64, q in fp32)");
  bad |= expect_error(cf_set_num_threads(-3), CF_ERR_VALUE, "-3", "cf_set_num_threads(-3)");
  /* The CUDA entry points report through the same cf_last_error(), whatever this build has. */
  const int64_t ws = cf_decode_workspace_bytes_cuda(1, 4096, 32, 2048);
  printf("cf_decode_workspace_bytes_cuda(1, 4096, 32, 2048) = %lld\n", (long long)ws);
  if (ws == -1) {  /* a build without CUDA says so */
    bad |= expect_error(CF_ERR_UNSUPPORTED, CF_ERR_UNSUPPORTED, "without CUDA", "cf_decode_workspace_bytes_cuda");
  } else if (ws <= 0 || cf_decode_workspace_bytes_cuda(1, 4096, 3, 2048) != -1) {
    bad |= fail("cf_decode_workspace_bytes_cuda: expected > 0 for good sizes and -1 for D_B % H != 0");
  }
  bad |= expect_error(cf_attn_fwd_cuda(&tq, NULL, &tv, NULL, CF_MASK_ALIGNED, &to, &tl, NULL),
                      ws == -1 ? CF_ERR_UNSUPPORTED : CF_ERR_NULL, ws == -1 ? "without CUDA" : "k",
                      "cf_attn_fwd_cuda(k = NULL)");
  /* A well-formed decode step without its workspace fails before any CUDA call. */
  float hb[4] = {0}, ha[2] = {0}, wq[16] = {0}, wkv[16] = {0}, bkv[8] = {0}, wo[16] = {0}, kc[12] = {0},
        vc[12] = {0}, o[4];
  const int64_t shb[3] = {1, 1, 4}, sha[3] = {1, 1, 2}, sw[2] = {4, 4}, skv[2] = {8, 2}, sb[1] = {8},
                sc[4] = {1, 2, 3, 2};
  cf_tensor thb = tensor(hb, CF_F32, 3, shb), tha = tensor(ha, CF_F32, 3, sha), twq = tensor(wq, CF_F32, 2, sw),
            twkv = tensor(wkv, CF_F32, 2, skv), tbkv = tensor(bkv, CF_F32, 1, sb), two = tensor(wo, CF_F32, 2, sw),
            tkc = tensor(kc, CF_F32, 4, sc), tvc = tensor(vc, CF_F32, 4, sc), tout = tensor(o, CF_F32, 3, shb);
  bad |= report(cf_decode_step_cpu(&thb, &tha, &twq, &twkv, &tbkv, &two, &tkc, &tvc, NULL, 0, 2, &tout),
                "cf_decode_step_cpu (good call)");
  bad |= expect_error(cf_decode_step_cuda(&thb, &tha, &twq, &twkv, &tbkv, &two, &tkc, &tvc, NULL, 0, 2, &tout,
                                          NULL, 0, NULL),
                      ws == -1 ? CF_ERR_UNSUPPORTED : CF_ERR_NULL, ws == -1 ? "without CUDA" : "workspace",
                      "cf_decode_step_cuda(workspace = NULL)");
  printf("version: %s\n", cf_version());
  return bad;
}

int main(int argc, char** argv) {
  if (argc >= 2 && strcmp(argv[1], "attn") == 0) return run_attn(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "decode") == 0) return run_decode(argc, argv);
  if (argc == 2 && strcmp(argv[1], "errors") == 0) return run_errors();
  return fail("usage: capi_check attn ... | decode ... | errors");
}
