#include "validate.hpp"

#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>

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
    const std::string got = dtype_size(t->dtype) > 0 ? std::string("dtype ") + dtype_name(t->dtype)
                                                     : "unknown dtype code " + std::to_string(t->dtype);
    return set_error(CF_ERR_DTYPE, std::string(name) + ": " + got + " is not supported here (allowed: " +
                                       allowed + ")");
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

std::string strides(const cf_tensor* t) {
  std::string s = "(";
  for (int i = 0; i < t->ndim; ++i) s += std::to_string(t->stride[i]) + (i + 1 < t->ndim ? ", " : "");
  return s + (t->ndim == 1 ? ",)" : ")");
}

// Memory a checked tensor may touch, as a byte range [lo, hi) (empty when it has no element).
struct Span {
  const char* name;
  unsigned __int128 lo = 0, hi = 0;
};

Span span_of(const char* name, const cf_tensor* t) {
  Span s{name};
  int64_t last = 0;
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] == 0) return s;
    last += (t->shape[i] - 1) * t->stride[i];  // check() ruled out overflow
  }
  s.lo = reinterpret_cast<uintptr_t>(t->data);
  s.hi = s.lo + (unsigned __int128)(last + 1) * dtype_size(t->dtype);
  return s;
}

bool intersect(const Span& a, const Span& b) { return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi; }

// A tensor that is written must not have two elements at one address: no stride 0 over a
// dimension of size > 1, and (dimensions sorted by stride) each stride beyond the farthest
// offset the smaller ones reach. Conservative: refuses a few exotic non-overlapping layouts.
cf_status check_no_self_overlap(const char* name, const cf_tensor* t) {
  int order[CF_MAX_DIMS], n = 0;
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] == 0) return CF_OK;
    if (t->shape[i] > 1) order[n++] = i;
  }
  for (int a = 0; a < n; ++a)
    if (t->stride[order[a]] == 0)
      return set_error(CF_ERR_VALUE, std::string(name) + ": stride 0 over dim " + std::to_string(order[a]) +
                                         " of size " + std::to_string(t->shape[order[a]]) +
                                         " (shape " + dims(t) + ", strides " + strides(t) +
                                         "): a written tensor must not have elements sharing memory");
  for (int a = 1; a < n; ++a)  // insertion sort by stride
    for (int b = a; b > 0 && t->stride[order[b]] < t->stride[order[b - 1]]; --b) std::swap(order[b], order[b - 1]);
  int64_t reach = 0;
  for (int a = 0; a < n; ++a) {
    const int i = order[a];
    if (t->stride[i] <= reach)
      return set_error(CF_ERR_VALUE, std::string(name) + ": strides " + strides(t) + " for shape " + dims(t) +
                                         " make elements overlap: a written tensor must not have elements sharing memory");
    reach += (t->shape[i] - 1) * t->stride[i];
  }
  return CF_OK;
}

// Every written tensor against every other written one and every read one (byte ranges).
cf_status check_disjoint(std::initializer_list<Span> written, std::initializer_list<Span> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = w + 1; o != written.end(); ++o)
      if (intersect(*w, *o))
        return set_error(CF_ERR_VALUE, std::string(w->name) + ": overlaps " + o->name +
                                           " in memory (the outputs must not share memory)");
    for (const Span& r : read)
      if (intersect(*w, r))
        return set_error(CF_ERR_VALUE, std::string(w->name) + ": overlaps the input " + r.name +
                                           " in memory (an output must not share memory with an input)");
  }
  return CF_OK;
}

Span span_or_empty(const char* name, const cf_tensor* t) { return t == nullptr ? Span{name} : span_of(name, t); }

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
    case CF_BOOL: return 1;
    default: return 0;  // unknown code (check() refuses it before any size is needed)
  }
}

cf_status make_attn_params(Backend be, const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                           const cf_tensor* kpm, int32_t mask, const cf_tensor* out,
                           const cf_tensor* lse, AttnParams* p, bool outputs_written) {
  if (p == nullptr) return set_error(CF_ERR_INTERNAL, "params pointer is NULL");
  if (mask != CF_MASK_ALIGNED && mask != CF_MASK_CONTEXT)
    return set_error(CF_ERR_VALUE, "mask: expected 0 (aligned) or 1 (context), got " + std::to_string(mask));
  CF_TRY(check("q", q, 4, float_dtypes(be)));
  const int dt = q->dtype;
  CF_TRY(check("k", k, 4, {dt}));
  CF_TRY(check("v", v, 4, {dt}));
  // out may be fp32 for bf16 inputs on the CPU: the unrounded output (see AttnParams::out_f32).
  const bool out_f32 = be == Backend::kCpu && dt == CF_BF16 && out != nullptr && out->dtype == CF_F32;
  CF_TRY(check("out", out, 4, {out_f32 ? CF_F32 : dt}));
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
  if (outputs_written) {
    CF_TRY(check_no_self_overlap("out", out));
    CF_TRY(check_no_self_overlap("lse", lse));
    CF_TRY(check_disjoint({span_of("out", out), span_of("lse", lse)},
                          {span_of("q", q), span_of("k", k), span_of("v", v), span_or_empty("key_padding_mask", kpm)}));
  }
  p->dtype = dt;
  p->B = B; p->H = H; p->Tq = Tq; p->Tk = Tk; p->D = D;
  p->aligned = mask == CF_MASK_ALIGNED;
  p->out_f32 = out_f32;
  p->q = q->data; p->k = k->data; p->v = v->data; p->out = out->data; p->lse = lse->data;
  copy3(q, p->sq); copy3(k, p->sk); copy3(v, p->sv); copy3(out, p->so); copy3(lse, p->sl);
  return CF_OK;
}

cf_status add_attn_backward(const cf_tensor* q, const cf_tensor* k, const cf_tensor* v,
                            const cf_tensor* kpm, const cf_tensor* out, const cf_tensor* lse,
                            const cf_tensor* dout, const cf_tensor* dq, const cf_tensor* dk,
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
  CF_TRY(check_no_self_overlap("dq", dq));
  CF_TRY(check_no_self_overlap("dk", dk));
  CF_TRY(check_no_self_overlap("dv", dv));
  CF_TRY(check_disjoint({span_of("dq", dq), span_of("dk", dk), span_of("dv", dv)},
                        {span_of("q", q), span_of("k", k), span_of("v", v), span_or_empty("key_padding_mask", kpm),
                         span_of("out", out), span_of("dout", dout), span_of("lse", lse)}));
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
    // Aligned mode is the descriptor's (h_a given), not its data pointer's: with D_A = 0
    // the empty h_a and w_kv may have NULL data, and the new row is then b_kv.
    p->append = true;
    p->h_a = h_a->data; p->sha = DA > 0 ? h_a->stride[0] : 0;  // D_A = 0: never read
    p->w_kv = w_kv->data; p->swkv = DA > 0 ? w_kv->stride[0] : 0;
    p->b_kv = b_kv->data; p->sbkv = b_kv->stride[0];
    p->n = pos + 1;
  } else {
    if (pos < 0 || pos > S)
      return set_error(CF_ERR_VALUE, "pos=" + std::to_string(pos) + " is outside [0, " +
                                         std::to_string(S) + "] (context mode attends rows [0, pos))");
    p->append = false;
    p->n = pos;
  }
  if (kpm != nullptr) {
    CF_TRY(check("key_padding_mask", kpm, 2, {CF_BOOL}));
    CF_TRY(expect("key_padding_mask", kpm, {B, S}));
    p->kpm = static_cast<const uint8_t*>(kpm->data);
    p->skpm[0] = kpm->stride[0];
    p->skpm[1] = kpm->stride[1];
  }
  // Written: out, and the caches when a row is appended (read-only in context mode). `out`
  // may be h_b itself (same address and row stride: each element is read before written).
  const bool append = p->append;
  const bool out_is_h_b = out->data == h_b->data && (B <= 1 || out->stride[0] == h_b->stride[0]);
  const Span s_out = span_of("out", out), s_hb = out_is_h_b ? Span{"h_b"} : span_of("h_b", h_b);
  const Span s_kc = span_of("k_cache", k_cache), s_vc = span_of("v_cache", v_cache);
  const Span s_ha = span_or_empty("h_a", h_a), s_wkv = span_or_empty("w_kv", append ? w_kv : nullptr),
             s_bkv = span_or_empty("b_kv", append ? b_kv : nullptr), s_kpm = span_or_empty("key_padding_mask", kpm);
  const Span s_wq = span_of("w_q", w_q), s_wo = span_of("w_o", w_o);
  CF_TRY(check_no_self_overlap("out", out));
  if (append) {
    CF_TRY(check_no_self_overlap("k_cache", k_cache));
    CF_TRY(check_no_self_overlap("v_cache", v_cache));
    CF_TRY(check_disjoint({s_out, s_kc, s_vc}, {s_hb, s_ha, s_wq, s_wkv, s_bkv, s_wo, s_kpm}));
  } else {
    CF_TRY(check_disjoint({s_out}, {s_hb, s_wq, s_wo, s_kc, s_vc, s_kpm}));
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
