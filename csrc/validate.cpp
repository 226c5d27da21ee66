#include "validate.hpp"

#include <cstdio>
#include <initializer_list>
#include <string>

namespace cf {
namespace {

thread_local std::string g_error;

std::string dims(const cf_tensor* t) {
  std::string s = "(";
  for (int i = 0; i < t->ndim; ++i) s += std::to_string(t->shape[i]) + (i + 1 < t->ndim ? ", " : "");
  return s + (t->ndim == 1 ? ",)" : ")");
}

bool mul_ok(int64_t a, int64_t b, int64_t* r) { return !__builtin_mul_overflow(a, b, r); }
bool add_ok(int64_t a, int64_t b, int64_t* r) { return !__builtin_add_overflow(a, b, r); }

// One tensor on its own: descriptor, rank, dtype, sizes, strides, overflow, data pointer.
cf_status check(const char* name, const cf_tensor* t, int ndim, std::initializer_list<int> dtypes) {
  if (t == nullptr) return set_error(CF_ERR_NULL, std::string(name) + ": tensor descriptor is NULL");
  if (t->ndim != ndim)
    return set_error(CF_ERR_VALUE, std::string(name) + ": expected " + std::to_string(ndim) +
                                       " dims, got ndim=" + std::to_string(t->ndim));
  bool dtype_ok = false;
  for (int d : dtypes) dtype_ok |= (d == t->dtype);
  if (!dtype_ok) {
    std::string allowed;
    for (int d : dtypes) allowed += std::string(allowed.empty() ? "" : ", ") + dtype_name(d);
    return set_error(CF_ERR_DTYPE, std::string(name) + ": dtype " + dtype_name(t->dtype) +
                                       " is not supported here (allowed: " + allowed + ")");
  }
  int64_t numel = 1, last = 0;
  for (int i = 0; i < ndim; ++i) {
    if (t->shape[i] < 0)
      return set_error(CF_ERR_VALUE, std::string(name) + ": negative size shape[" +
                                         std::to_string(i) + "]=" + std::to_string(t->shape[i]));
    if (t->stride[i] < 0)
      return set_error(CF_ERR_VALUE, std::string(name) + ": negative stride stride[" +
                                         std::to_string(i) + "]=" + std::to_string(t->stride[i]));
    if (!mul_ok(numel, t->shape[i], &numel))
      return set_error(CF_ERR_OVERFLOW, std::string(name) + ": element count of shape " + dims(t) +
                                            " overflows int64");
  }
  if (numel == 0) return CF_OK;
  for (int i = 0; i < ndim; ++i) {
    int64_t span;
    if (!mul_ok(t->shape[i] - 1, t->stride[i], &span) || !add_ok(last, span, &last))
      return set_error(CF_ERR_OVERFLOW, std::string(name) + ": largest offset of shape " + dims(t) +
                                            " overflows int64");
  }
  int64_t bytes;
  if (!add_ok(last, 1, &bytes) || !mul_ok(bytes, dtype_size(t->dtype), &bytes))
    return set_error(CF_ERR_OVERFLOW, std::string(name) + ": byte extent overflows int64");
  if (t->shape[ndim - 1] > 1 && t->stride[ndim - 1] != 1)
    return set_error(CF_ERR_VALUE, std::string(name) + ": innermost stride must be 1, got " +
                                       std::to_string(t->stride[ndim - 1]));
  if (t->data == nullptr) return set_error(CF_ERR_NULL, std::string(name) + ": data pointer is NULL");
  return CF_OK;
}

cf_status expect(const char* name, const cf_tensor* t, std::initializer_list<int64_t> shape) {
  int i = 0;
  bool ok = true;
  for (int64_t s : shape) ok &= (t->shape[i++] == s);
  if (ok) return CF_OK;
  std::string want = "(";
  i = 0;
  for (int64_t s : shape) want += (i++ ? ", " : "") + std::to_string(s);
  want += shape.size() == 1 ? ",)" : ")";
  return set_error(CF_ERR_VALUE, std::string(name) + ": expected shape " + want + ", got " + dims(t));
}

std::initializer_list<int> float_dtypes(Backend be) {
  static const std::initializer_list<int> cpu = {CF_F32, CF_F64, CF_BF16};
  static const std::initializer_list<int> cuda = {CF_F32, CF_BF16, CF_F16};
  return be == Backend::kCpu ? cpu : cuda;
}

void copy3(const cf_tensor* t, int64_t* s) { s[0] = t->stride[0]; s[1] = t->stride[1]; s[2] = t->stride[2]; }

#define CF_TRY(expr)                   \
  do {                                 \
    cf_status s_ = (expr);             \
    if (s_ != CF_OK) return s_;        \
  } while (0)

}  // namespace

cf_status set_error(cf_status status, const std::string& message) {
  g_error = message;
  return status;
}
void clear_error() { g_error.clear(); }
const char* g_error_c_str() { return g_error.c_str(); }

const char* dtype_name(int dtype) {
  switch (dtype) {
    case CF_F32: return "float32";
    case CF_F64: return "float64";
    case CF_BF16: return "bfloat16";
    case CF_F16: return "float16";
    case CF_BOOL: return "bool";
    default: return "unknown-dtype";
  }
}

int64_t dtype_size(int dtype) {
  switch (dtype) {
    case CF_F64: return 8;
    case CF_F32: return 4;
    case CF_BF16: case CF_F16: return 2;
    default: return 1;
  }
}

cf_status make_attn_params(Backend be, const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                           const cf_tensor* kpm, int32_t mask, const cf_tensor* out,
                           const cf_tensor* lse, AttnParams* p) {
  if (p == nullptr) return set_error(CF_ERR_INTERNAL, "params pointer is NULL");
  if (mask != CF_MASK_ALIGNED && mask != CF_MASK_CONTEXT)
    return set_error(CF_ERR_VALUE, "mask: expected 0 (aligned) or 1 (context), got " + std::to_string(mask));
  CF_TRY(check("q", q, 4, float_dtypes(be)));
  const int dt = q->dtype;
  CF_TRY(check("k", k, 4, {dt}));
  CF_TRY(check("v", v, 4, {dt}));
  CF_TRY(check("out", out, 4, {dt}));
  const int lse_dt = dt == CF_F64 ? CF_F64 : CF_F32;
  CF_TRY(check("lse", lse, 3, {lse_dt}));
  const int64_t B = q->shape[0], H = q->shape[1], Tq = q->shape[2], D = q->shape[3];
  const int64_t Tk = k->shape[2];
  if (D == 0) return set_error(CF_ERR_VALUE, "q: head dim must be > 0, got shape " + dims(q));
  CF_TRY(expect("k", k, {B, H, Tk, D}));
  CF_TRY(expect("v", v, {B, H, Tk, D}));
  CF_TRY(expect("out", out, {B, H, Tq, D}));
  CF_TRY(expect("lse", lse, {B, H, Tq}));
  if (mask == CF_MASK_ALIGNED && Tq > Tk)
    return set_error(CF_ERR_VALUE, "aligned mask needs Tq <= Tk, got Tq=" + std::to_string(Tq) +
                                       " Tk=" + std::to_string(Tk));
  *p = AttnParams{};
  if (kpm != nullptr) {
    CF_TRY(check("key_padding_mask", kpm, 2, {CF_BOOL}));
    CF_TRY(expect("key_padding_mask", kpm, {B, Tk}));
    p->kpm = static_cast<const uint8_t*>(kpm->data);
    p->skpm[0] = kpm->stride[0];
    p->skpm[1] = kpm->stride[1];
  }
  p->dtype = dt;
  p->B = B; p->H = H; p->Tq = Tq; p->Tk = Tk; p->D = D;
  p->aligned = mask == CF_MASK_ALIGNED;
  p->q = q->data; p->k = k->data; p->v = v->data; p->out = out->data; p->lse = lse->data;
  copy3(q, p->sq); copy3(k, p->sk); copy3(v, p->sv); copy3(out, p->so); copy3(lse, p->sl);
  return CF_OK;
}

cf_status add_attn_backward(const cf_tensor* dout, const cf_tensor* dq, const cf_tensor* dk,
                            const cf_tensor* dv, AttnParams* p) {
  const int dt = p->dtype;
  CF_TRY(check("dout", dout, 4, {dt}));
  CF_TRY(check("dq", dq, 4, {dt}));
  CF_TRY(check("dk", dk, 4, {dt}));
  CF_TRY(check("dv", dv, 4, {dt}));
  CF_TRY(expect("dout", dout, {p->B, p->H, p->Tq, p->D}));
  CF_TRY(expect("dq", dq, {p->B, p->H, p->Tq, p->D}));
  CF_TRY(expect("dk", dk, {p->B, p->H, p->Tk, p->D}));
  CF_TRY(expect("dv", dv, {p->B, p->H, p->Tk, p->D}));
  p->dout = dout->data; p->dq = dq->data; p->dk = dk->data; p->dv = dv->data;
  copy3(dout, p->sdo); copy3(dq, p->sdq); copy3(dk, p->sdk); copy3(dv, p->sdv);
  return CF_OK;
}

cf_status make_decode_params(Backend be, const cf_tensor* h_b, const cf_tensor* h_a,
                             const cf_tensor* w_q, const cf_tensor* w_kv, const cf_tensor* b_kv,
                             const cf_tensor* w_o, const cf_tensor* k_cache,
                             const cf_tensor* v_cache, const cf_tensor* kpm, int64_t pos,
                             int64_t n_heads, const cf_tensor* out, DecodeParams* p) {
  if (p == nullptr) return set_error(CF_ERR_INTERNAL, "params pointer is NULL");
  CF_TRY(check("h_b", h_b, 3, float_dtypes(be)));
  const int dt = h_b->dtype;
  const int64_t B = h_b->shape[0], DB = h_b->shape[2];
  CF_TRY(expect("h_b", h_b, {B, 1, DB}));
  CF_TRY(check("w_q", w_q, 2, {dt}));
  CF_TRY(check("w_o", w_o, 2, {dt}));
  CF_TRY(check("k_cache", k_cache, 4, {dt}));
  CF_TRY(check("v_cache", v_cache, 4, {dt}));
  CF_TRY(check("out", out, 3, {dt}));
  if (n_heads <= 0) return set_error(CF_ERR_VALUE, "n_heads must be > 0, got " + std::to_string(n_heads));
  if (DB == 0 || DB % n_heads != 0)
    return set_error(CF_ERR_VALUE, "h_b: width D_B=" + std::to_string(DB) +
                                       " must be a positive multiple of n_heads=" + std::to_string(n_heads));
  const int64_t H = n_heads, D = DB / n_heads, S = k_cache->shape[2];
  CF_TRY(expect("w_q", w_q, {DB, DB}));
  CF_TRY(expect("w_o", w_o, {DB, DB}));
  CF_TRY(expect("k_cache", k_cache, {B, H, S, D}));
  CF_TRY(expect("v_cache", v_cache, {B, H, S, D}));
  CF_TRY(expect("out", out, {B, 1, DB}));
  *p = DecodeParams{};
  int64_t DA = 0;
  if (h_a != nullptr) {
    CF_TRY(check("h_a", h_a, 3, {dt}));
    DA = h_a->shape[2];
    CF_TRY(expect("h_a", h_a, {B, 1, DA}));
    CF_TRY(check("w_kv", w_kv, 2, {dt}));
    CF_TRY(check("b_kv", b_kv, 1, {dt}));
    CF_TRY(expect("w_kv", w_kv, {2 * DB, DA}));
    CF_TRY(expect("b_kv", b_kv, {2 * DB}));
    if (pos < 0 || pos >= S)
      return set_error(CF_ERR_VALUE, "pos=" + std::to_string(pos) + " is outside the cache of " +
                                         std::to_string(S) + " rows");
    p->h_a = h_a->data; p->sha = h_a->stride[0];
    p->w_kv = w_kv->data; p->swkv = w_kv->stride[0];
    p->b_kv = b_kv->data; p->sbkv = b_kv->stride[0];
    p->n = pos + 1;
  } else {
    if (pos < 0 || pos > S)
      return set_error(CF_ERR_VALUE, "pos=" + std::to_string(pos) + " is outside [0, " +
                                         std::to_string(S) + "] (context mode attends rows [0, pos))");
    p->n = pos;
  }
  if (kpm != nullptr) {
    CF_TRY(check("key_padding_mask", kpm, 2, {CF_BOOL}));
    CF_TRY(expect("key_padding_mask", kpm, {B, S}));
    p->kpm = static_cast<const uint8_t*>(kpm->data);
    p->skpm[0] = kpm->stride[0];
    p->skpm[1] = kpm->stride[1];
  }
  p->dtype = dt;
  p->B = B; p->H = H; p->D = D; p->DB = DB; p->DA = DA; p->S = S; p->pos = pos;
  p->h_b = h_b->data; p->shb = h_b->stride[0];
  p->w_q = w_q->data; p->swq = w_q->stride[0];
  p->w_o = w_o->data; p->swo = w_o->stride[0];
  p->kc = k_cache->data; p->vc = v_cache->data;
  copy3(k_cache, p->skc); copy3(v_cache, p->svc);
  p->out = out->data; p->sout = out->stride[0];
  return CF_OK;
}

}  // namespace cf

extern "C" const char* cf_last_error(void) { return cf::g_error_c_str(); }
