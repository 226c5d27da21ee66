"""The C++ CPU kernels (calm_fast._C through calm_fast.ops.native) against ops/reference.py."""
from __future__ import annotations

import ctypes
import pytest
import torch

from calm_fast.ops import reference as ref

native = pytest.importorskip("calm_fast.ops.native", reason="calm_fast._C is not built "
                             "(run `python setup.py build_ext --inplace`)")
if native._C is None:
    pytest.skip("calm_fast._C (CPU kernels) is not built", allow_module_level=True)

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-5}


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    den = want.norm().item()
    return (out - want).norm().item() / den if den > 0 else (out - want).norm().item()


def make_kpm(b: int, tk: int, kind: str, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    kpm = torch.rand(b, tk, generator=gen) > 0.3
    if kind == "left_pad":  # left padding: the first keys of each sequence are padding
        kpm = torch.ones(b, tk, dtype=torch.bool)
        for i in range(b):
            kpm[i, : (i * 3 + 2) % max(tk, 1)] = False
    if kind == "empty_row" and b > 0:
        kpm[0] = False  # batch 0 sees no key at all
    return kpm


# (B, H, Tq, Tk, d): size 1, primes, non-multiples of the 32/64 blocks, Tq != Tk, Tq = 1.
# Tq <= 3 takes the kernel's per-row path (attention.hpp, kRowPathMaxTq), the rest the tiles.
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 1, 37, 16), (1, 2, 13, 13, 7), (2, 2, 67, 131, 64),
          (1, 1, 97, 97, 128), (3, 1, 5, 70, 33), (2, 2, 3, 70, 67), (1, 3, 2, 2, 64)]


def _attention_case(shape, mask, kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, tq, tk, d = shape
    q, k, v = (torch.randn(b, h, t, d, generator=gen).to(dtype) for t in (tq, tk, tk))
    return q, k, v, make_kpm(b, tk, kind, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "random", "left_pad", "empty_row"])
@pytest.mark.parametrize("mask", ["aligned", "context"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_forward_backward(shape, mask, kind, dtype):
    q, k, v, kpm = _attention_case(shape, mask, kind, dtype)
    qn, kn, vn = (t.clone().requires_grad_() for t in (q, k, v))
    out = native.cross_attention(qn, kn, vn, mask, kpm)
    assert out.dtype == dtype and out.shape == q.shape
    # Reference on the same (possibly bf16) values, upcast to fp64 for the comparison.
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    want = ref.cross_attention(qr, kr, vr, mask, kpm)
    assert rel(out, want) <= TOL[dtype]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(dtype))
    want.backward(grad)
    for name, got, exp in (("dq", qn.grad, qr.grad), ("dk", kn.grad, kr.grad), ("dv", vn.grad, vr.grad)):
        assert got.dtype == dtype
        assert rel(got, exp) <= TOL[dtype] * (2 if dtype == torch.bfloat16 else 1), name


def test_rows_that_see_nothing_are_zero_with_zero_grads():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[0, :4] = False  # aligned: rows 0..3 of batch 0 see only padding
    kpm[1, :] = False  # batch 1 sees nothing
    out = native.cross_attention(q, k, v, "aligned", kpm)
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, :, 4:].abs().sum() > 0
    out.sum().backward()
    assert torch.equal(q.grad[0, :, :4], torch.zeros_like(q.grad[0, :, :4]))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[0, :, :4], torch.zeros_like(k.grad[0, :, :4]))  # padding keys
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    _, lse = native.native_attn_fwd(q.detach(), k.detach(), v.detach(), kpm, "aligned")
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, :4]).all()


def test_aligned_mask_hides_future_keys():
    # Changing key/value j must not change queries that may not see j.
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3))
    base = native.cross_attention(q, k, v, "aligned")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5] += 10
    v2[:, :, 5] -= 10
    moved = native.cross_attention(q, k2, v2, "aligned")
    assert torch.equal(base[:, :, :5], moved[:, :, :5])
    assert not torch.allclose(base[:, :, 5:], moved[:, :, 5:])


def test_strided_views_match_contiguous():
    # split_heads gives (B, H, T, d) views with a unit innermost stride: used without a copy.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, 4 * 16, generator=gen)
    y = torch.randn(2, 19, 4 * 16, generator=gen)
    q, k = ref.split_heads(x, 4), ref.split_heads(y, 4)
    assert not q.is_contiguous()
    v_odd = torch.randn(2, 4, 16, 19, generator=gen).transpose(-1, -2)  # innermost stride != 1
    got = native.cross_attention(q, k, v_odd, "aligned")
    want = native.cross_attention(q.contiguous(), k.contiguous(), v_odd.contiguous(), "aligned")
    assert torch.equal(got, want)


@pytest.mark.parametrize("mask", ["aligned", "context"])
def test_gradcheck_float64(mask):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, True, True, False, True, True, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: native.cross_attention(a, b, c, mask, kpm),
                                    (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------- decode step

def _decode_case(b, h, d, d_a, s, dtype, context, kpm_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d_b = h * d

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    h_b = r(b, 1, d_b)
    h_a = None if context else r(b, 1, d_a)
    w_q, w_o = r(d_b, d_b, scale=d_b ** -0.5), r(d_b, d_b, scale=d_b ** -0.5)
    w_kv, b_kv = r(2 * d_b, d_a, scale=d_a ** -0.5), r(2 * d_b)
    k_cache, v_cache = r(b, h, s, d), r(b, h, s, d)
    kpm = make_kpm(b, s, kpm_kind, gen)
    return h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, kpm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", [False, True], ids=["aligned", "context"])
@pytest.mark.parametrize("kpm_kind", ["none", "random", "empty_row"])
@pytest.mark.parametrize("b,h,d,d_a,s,pos", [(1, 1, 1, 1, 1, 0), (1, 4, 16, 40, 50, 17),
                                             (3, 3, 5, 13, 7, 6), (2, 2, 64, 97, 130, 0),
                                             (1, 8, 32, 64, 300, 257)])
def test_decode_step_matches_reference(b, h, d, d_a, s, pos, kpm_kind, context, dtype):
    args = _decode_case(b, h, d, d_a, s, dtype, context, kpm_kind)
    h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, kpm = args
    if context and pos == 0:  # no cache row to attend (the reference needs at least one)
        out = native.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, h, kpm)
        assert torch.equal(out, h_b)
        return
    up = [None if t is None else t.double() for t in args]
    k_ref, v_ref = up[6].clone(), up[7].clone()
    want = ref.bridge_decode_step(up[0], up[1], up[2], up[3], up[4], up[5], k_ref, v_ref, pos, h, kpm)
    k_before = k_cache.clone()
    out = native.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, h, kpm)
    assert out.dtype == dtype and out.shape == h_b.shape
    assert rel(out, want) <= TOL[dtype]
    assert rel(k_cache, k_ref) <= TOL[dtype] and rel(v_cache, v_ref) <= TOL[dtype]
    changed = (k_cache != k_before).any(dim=-1)  # (B, H, S): only row pos may change
    if context:
        assert not changed.any()
    else:
        others = torch.ones(s, dtype=torch.bool)
        others[pos] = False
        assert not changed[:, :, others].any()


def test_decode_context_mode_with_no_rows_returns_h_b():
    args = _decode_case(2, 2, 8, 8, 4, torch.float32, True, "none")
    h_b, _, w_q, w_kv, b_kv, w_o, k_cache, v_cache, _ = args
    out = native.bridge_decode_step(h_b, None, w_q, w_kv, b_kv, w_o, k_cache, v_cache, 0, 2)
    assert torch.equal(out, h_b)


def test_decode_head_with_all_scores_neginf_is_nan():
    # q overflows to inf on head 0 and every key is negative: that head's kept scores are all
    # -inf, softmax is NaN there (reference), so the whole step is (W_o mixes the heads).
    h, d, s, d_a = 2, 16, 9, 8
    d_b = h * d
    gen = torch.Generator().manual_seed(5)
    h_b = torch.zeros(1, 1, d_b)
    h_b[0, 0, :d] = 1e30
    w_q, w_o = torch.eye(d_b) * 1e30, torch.randn(d_b, d_b, generator=gen) * 0.1
    w_kv, b_kv = torch.randn(2 * d_b, d_a, generator=gen) * 0.1, torch.zeros(2 * d_b)
    k, v = -torch.rand(1, h, s, d, generator=gen) - 0.1, torch.randn(1, h, s, d, generator=gen)
    want = ref.bridge_decode_step(h_b, None, w_q, w_kv, b_kv, w_o, k.clone(), v.clone(), s, h)
    got = native.bridge_decode_step(h_b, None, w_q, w_kv, b_kv, w_o, k.clone(), v.clone(), s, h)
    assert want.isnan().all() and got.isnan().all()


def test_cached_decoding_equals_full_attention():
    # Appending rows one step at a time gives the aligned attention over the whole sequence.
    gen = torch.Generator().manual_seed(8)
    b, h, d, d_a, t = 2, 2, 8, 12, 9
    d_b = h * d
    w_q, w_o = torch.randn(d_b, d_b, generator=gen) * 0.2, torch.randn(d_b, d_b, generator=gen) * 0.2
    w_kv, b_kv = torch.randn(2 * d_b, d_a, generator=gen) * 0.2, torch.randn(2 * d_b, generator=gen)
    h_b, h_a = torch.randn(b, t, d_b, generator=gen), torch.randn(b, t, d_a, generator=gen)
    k_cache, v_cache = torch.zeros(b, h, t, d), torch.zeros(b, h, t, d)
    steps = [native.bridge_decode_step(h_b[:, i:i + 1], h_a[:, i:i + 1], w_q, w_kv, b_kv, w_o,
                                       k_cache, v_cache, i, h) for i in range(t)]
    kv = torch.nn.functional.linear(h_a, w_kv, b_kv)
    k, v = ref.split_heads(kv[..., :d_b], h), ref.split_heads(kv[..., d_b:], h)
    q = ref.split_heads(torch.nn.functional.linear(h_b, w_q), h)
    full = h_b + torch.nn.functional.linear(ref.merge_heads(ref.cross_attention(q, k, v, "aligned")), w_o)
    assert rel(torch.cat(steps, dim=1), full) <= 1e-5


# ------------------------------------------------------------------ torch integration

def test_opcheck_attention_and_decode():
    q, k, v, kpm = _attention_case((2, 2, 5, 9, 8), "aligned", "random", torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for mask, m in (("aligned", kpm), ("context", None)):
        torch.library.opcheck(native.native_attn_fwd, (q, k, v, m, mask))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))  # fp32 out for bf16
    torch.library.opcheck(native.native_attn_fwd, (qb, kb, vb, kpm, "aligned", True))
    out, lse = native.native_attn_fwd(q.detach(), k.detach(), v.detach(), kpm, "aligned")
    torch.library.opcheck(native.native_attn_bwd,
                          (q.detach(), k.detach(), v.detach(), kpm, "aligned", out, torch.randn_like(out), lse))
    for context in (False, True):
        args = list(_decode_case(2, 2, 8, 12, 10, torch.float32, context, "random"))
        torch.library.opcheck(native.native_decode_step, (*args[:8], 4, 2, args[8]))


def test_torch_compile_fullgraph_traces_the_ops():
    torch._dynamo.reset()
    q, k, v, kpm = _attention_case((1, 2, 7, 11, 8), "aligned", "random", torch.float32)
    args = list(_decode_case(1, 2, 8, 12, 10, torch.float32, False, "none"))

    def fn(q, k, v, kpm, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache):
        att = native.cross_attention(q, k, v, "aligned", kpm)
        step = native.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, 3, 2)
        return att.square().sum(), step

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    qg = q.clone().requires_grad_()
    caches_c = [args[6].clone(), args[7].clone()]
    loss, step = compiled(qg, k, v, kpm, *args[:6], *caches_c)
    loss.backward()
    qe = q.clone().requires_grad_()
    caches_e = [args[6].clone(), args[7].clone()]
    loss_e, step_e = fn(qe, k, v, kpm, *args[:6], *caches_e)
    loss_e.backward()
    assert torch.allclose(loss, loss_e) and torch.equal(step, step_e)
    assert torch.equal(qg.grad, qe.grad)
    assert torch.equal(caches_c[0], caches_e[0]) and torch.equal(caches_c[1], caches_e[1])


def test_supports_and_dispatch():
    assert native.supports(CPU, torch.float32) and native.supports(CPU, torch.bfloat16)
    assert not native.supports(CPU, torch.float16)
    from calm_fast import ops
    assert "cpp" in ops.available_backends(CPU)
    q, k, v, _ = _attention_case((1, 2, 5, 5, 8), "aligned", "none", torch.float32)
    assert torch.equal(ops.cross_attention(q, k, v, backend="cpp"), native.cross_attention(q, k, v))


# ------------------------------------------------------------------------ bad inputs

def test_bad_attention_inputs_raise_clear_errors():
    q, k, v, _ = _attention_case((1, 2, 5, 6, 8), "aligned", "none", torch.float32)
    with pytest.raises(TypeError, match="float16"):
        native.cross_attention(q.half(), k.half(), v.half())
    with pytest.raises(TypeError, match="k has dtype torch.float64"):
        native.cross_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="must be 4-D"):
        native.cross_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k \(1, 2, 6, 4\)"):
        native.cross_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        native.cross_attention(k, q, q)
    with pytest.raises(ValueError, match="mask must be one of"):
        native.cross_attention(q, k, v, "causal")
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        native.cross_attention(q, k, v, "aligned", torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(1, 6\)"):
        native.cross_attention(q, k, v, "aligned", torch.ones(1, 5, dtype=torch.bool))


def test_bad_decode_inputs_raise_clear_errors():
    args = list(_decode_case(1, 2, 8, 12, 10, torch.float32, False, "none"))
    call = native.bridge_decode_step
    with pytest.raises(ValueError, match="pos=10 is outside"):
        call(*args[:8], 10, 2)
    with pytest.raises(ValueError, match="pos=-1"):
        call(*args[:8], -1, 2)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        call(*args[:8], 0, 0)
    with pytest.raises(ValueError, match="not a multiple of n_heads=3"):
        call(*args[:8], 0, 3)
    with pytest.raises(ValueError, match="w_kv must have shape"):
        call(args[0], args[1], args[2], args[3][:, :5], *args[4:8], 0, 2)
    with pytest.raises(TypeError, match="v_cache has dtype torch.bfloat16"):
        call(*args[:7], args[7].bfloat16(), 0, 2)
    strided = torch.zeros(1, 2, 8, 10).transpose(-1, -2)
    with pytest.raises(ValueError, match="k_cache is written in place"):
        call(*args[:6], strided, args[7], 0, 2)


def test_required_tensors_given_as_none_raise_type_error():
    q, k, v, _ = _attention_case((1, 1, 2, 3, 4), "context", "none", torch.float32)
    for i, name in enumerate("qkv"):
        args = [q, k, v]
        args[i] = None
        with pytest.raises(TypeError, match=f"cross_attention: {name} must be a tensor, got NoneType"):
            native.cross_attention(*args, "context")
    args = list(_decode_case(1, 2, 4, 3, 5, torch.float32, False, "none"))
    for i, name in ((0, "h_b"), (2, "w_q"), (5, "w_o"), (6, "k_cache"), (7, "v_cache")):
        bad = list(args[:8])
        bad[i] = None
        with pytest.raises(TypeError, match=f"bridge_decode_step: {name} must be a tensor, got NoneType"):
            native.bridge_decode_step(*bad, 1, 2)


def _so_path() -> str:
    return native._C.__file__


def _desc_struct():
    from cuda_emulator import CfTensor  # the cf_tensor of calm_fast.h, as ctypes sees it
    return CfTensor


def test_c_api_rejects_null_negative_and_overflowing_sizes():
    lib = ctypes.CDLL(_so_path())
    lib.cf_last_error.restype = ctypes.c_char_p
    T = _desc_struct()
    buf = torch.zeros(64)

    def t(shape, ptr=buf.data_ptr(), dtype=0):
        strides, s = [0] * len(shape), 1
        for i in reversed(range(len(shape))):
            strides[i] = s
            s = s * max(shape[i], 1) if s * max(shape[i], 1) < 2 ** 62 else s
        return T(ptr, dtype, len(shape), (ctypes.c_int64 * 4)(*shape, *[0] * (4 - len(shape))),
                 (ctypes.c_int64 * 4)(*strides, *[0] * (4 - len(shape))))

    def fwd(q, k, v, out, lse):
        ptrs = [None if x is None else ctypes.byref(x) for x in (q, k, v)]
        return lib.cf_attn_fwd_cpu(*ptrs, None, 0, ctypes.byref(out), ctypes.byref(lse))

    ok = t([1, 1, 2, 4])
    obuf, lbuf = torch.zeros(8), torch.zeros(2)  # outputs must not share memory with inputs
    assert fwd(ok, ok, ok, t([1, 1, 2, 4], ptr=obuf.data_ptr()), t([1, 1, 2], ptr=lbuf.data_ptr())) == 0
    assert fwd(None, ok, ok, ok, t([1, 1, 2])) == 1
    assert b"q: tensor descriptor is NULL" in lib.cf_last_error()
    assert fwd(ok, t([1, 1, 2, 4], ptr=0), ok, ok, t([1, 1, 2])) == 1
    assert b"k: data pointer is NULL" in lib.cf_last_error()
    assert fwd(t([1, -1, 2, 4]), ok, ok, ok, t([1, 1, 2])) == 2
    assert b"negative size" in lib.cf_last_error()
    huge = t([2 ** 40, 2 ** 40, 2, 4])
    assert fwd(huge, ok, ok, ok, t([1, 1, 2])) == 4
    assert b"overflows int64" in lib.cf_last_error()
    neg_stride = t([1, 1, 2, 4])
    neg_stride.stride[2] = -4
    assert fwd(neg_stride, ok, ok, ok, t([1, 1, 2])) == 2
    assert fwd(t([1, 1, 2, 4], dtype=3), ok, ok, ok, t([1, 1, 2])) == 3
    assert b"float16" in lib.cf_last_error()
    assert lib.cf_decode_step_cpu(None, None, None, None, None, None, None, None, None,
                                  ctypes.c_int64(0), ctypes.c_int64(1), None) == 1


def test_written_tensors_must_not_overlap_themselves_or_inputs():
    """out/lse (forward), dq/dk/dv (backward), out and the appended caches (decode step) are
    refused when they overlap themselves (stride 0 over a dim of size > 1) or share memory with
    an input or another output; legitimate slices of one buffer still pass."""
    lib = ctypes.CDLL(_so_path())
    lib.cf_last_error.restype = ctypes.c_char_p
    T = _desc_struct()

    def d(t, shape=None, stride=None):
        shape, stride = list(t.shape if shape is None else shape), list(t.stride() if stride is None else stride)
        n = len(shape)
        return ctypes.byref(T(t.data_ptr(), {torch.float32: 0, torch.bool: 4}[t.dtype], n,
                              (ctypes.c_int64 * 4)(*shape, *[0] * (4 - n)), (ctypes.c_int64 * 4)(*stride, *[0] * (4 - n))))

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=gen) for _ in range(3))
    out, lse = torch.empty(1, 2, 8, 4), torch.empty(1, 2, 8)
    fwd = lambda o, l, kk=k: lib.cf_attn_fwd_cpu(d(q), d(kk), d(v), None, 1, o, l)  # noqa: E731
    assert fwd(d(out), d(lse)) == 0
    assert fwd(d(k), d(lse)) == 2 and b"out: overlaps the input k" in lib.cf_last_error()
    assert fwd(d(out), d(out, [1, 2, 8], [16, 8, 1])) == 2 and b"out: overlaps lse" in lib.cf_last_error()
    row = torch.empty(4)
    assert fwd(d(row, [1, 2, 8, 4], [0, 0, 0, 1]), d(lse)) == 2
    assert b"out: stride 0 over dim 1 of size 2" in lib.cf_last_error()
    assert fwd(d(out), d(lse, [1, 2, 8], [16, 0, 1])) == 2 and b"lse: stride 0" in lib.cf_last_error()
    assert fwd(d(out, [1, 2, 8, 4], [64, 4, 4, 1]), d(lse)) == 2  # rows 4 apart: elements overlap
    assert b"out: strides (64, 4, 4, 1)" in lib.cf_last_error()
    # Inputs may share memory: q, k, v as slices of one packed (B, T, 3, H, d) tensor.
    qkv = torch.randn(1, 8, 3, 2, 4, generator=gen)
    pq, pk, pv = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    got = native.cross_attention(pq, pk, pv, "aligned")
    assert rel(got, ref.cross_attention(pq, pk, pv, "aligned")) <= 1e-5
    # Backward: dq/dk/dv must not alias the forward's tensors or each other.
    C = native._C
    o, l = native.native_attn_fwd(q, k, v, None, "context")
    dout, dq, dk, dv = (torch.empty(1, 2, 8, 4) for _ in range(4))
    desc = native._desc
    C.attn_bwd(desc(q), desc(k), desc(v), None, 1, desc(o), desc(dout), desc(l), desc(dq), desc(dk), desc(dv))
    with pytest.raises(ValueError, match="dq: overlaps the input dout"):
        C.attn_bwd(desc(q), desc(k), desc(v), None, 1, desc(o), desc(dout), desc(l), desc(dout), desc(dk), desc(dv))
    with pytest.raises(ValueError, match="dk: overlaps dv"):
        C.attn_bwd(desc(q), desc(k), desc(v), None, 1, desc(o), desc(dout), desc(l), desc(dq), desc(dk), desc(dk))
    # Decode step (aligned mode writes the caches): an expand()ed cache, k and v caches in one
    # memory, a cache or out over a weight are refused; out = h_b and two halves of one
    # allocation are fine; context mode only reads the caches (expanded is fine there).
    b, h, hd, d_a, s, pos = 2, 2, 4, 3, 6, 2
    args = list(_decode_case(b, h, hd, d_a, s, torch.float32, False, "none"))
    h_b, h_a, w_q, w_kv, b_kv, w_o, kc, vc, _ = args
    call = native.bridge_decode_step
    with pytest.raises(ValueError, match="k_cache is written in place but elements share memory"):
        call(h_b, h_a, w_q, w_kv, b_kv, w_o, kc[:1].expand_as(kc), vc, pos, h)
    with pytest.raises(ValueError, match="k_cache: overlaps v_cache"):
        call(h_b, h_a, w_q, w_kv, b_kv, w_o, kc, kc, pos, h)
    with pytest.raises(ValueError, match="k_cache: overlaps the input w_q"):
        buf = torch.randn(b * h * s * hd)  # w_q and k_cache views of one buffer
        call(h_b, h_a, buf[:w_q.numel()].view(w_q.shape), w_kv, b_kv, w_o, buf.view(kc.shape), vc, pos, h)
    kv = torch.stack([kc, vc])  # two halves of one allocation
    want = ref.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc.clone(), vc.clone(), pos, h)
    assert rel(call(h_b, h_a, w_q, w_kv, b_kv, w_o, kv[0], kv[1], pos, h), want) <= 1e-5
    ctx = ref.bridge_decode_step(h_b, None, w_q, None, None, w_o, kc[:1].expand_as(kc), vc, pos, h)
    assert rel(call(h_b, None, w_q, None, None, w_o, kc[:1].expand_as(kc), vc, pos, h), ctx) <= 1e-5
    kc2, vc2 = kc.clone(), vc.clone()
    C.decode_step(*[desc(t) for t in (h_b, h_a, w_q, w_kv, b_kv, w_o, kc2, vc2)], None, pos, h, desc(h_b))
    assert rel(h_b, want) <= 1e-5  # out = h_b (allowed alias)
    with pytest.raises(ValueError, match="out: overlaps the input w_o"):
        C.decode_step(*[desc(t) for t in (h_b, h_a, w_q, w_kv, b_kv, w_o, kc, vc)], None, pos, h,
                      desc(w_o.view(-1)[:b * h * hd].view(b, 1, h * hd)))


def test_dtype_codes_are_not_truncated_and_unknown_codes_are_named():
    C = native._C
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 2)
    d = lambda t, code=0: (t.data_ptr(), code, tuple(t.shape), t.stride())  # noqa: E731
    for code in (7, 2 ** 32, 2 ** 32 + 2, -2 ** 40):  # 2**32 used to be read as 0 (float32)
        with pytest.raises(TypeError, match=f"q: unknown dtype code {code}"):
            C.attn_fwd(d(q, code), d(k), d(v), None, 1, d(out), d(lse))


def test_set_num_threads_refuses_absurd_counts():
    lib = ctypes.CDLL(_so_path())
    lib.cf_last_error.restype = ctypes.c_char_p
    try:
        assert lib.cf_set_num_threads(1000000) == 2  # libgomp used to abort the process later
        assert b"num_threads=1000000 exceeds the limit" in lib.cf_last_error()
        with pytest.raises(ValueError, match="num_threads=5000 exceeds"):
            native._C.set_num_threads(5000)
        assert lib.cf_set_num_threads(2) == 0
    finally:
        lib.cf_set_num_threads(0)


def check_zero_augment_width_appends_the_bias(decode_step) -> None:
    """D_A = 0: torch gives the empty h_a / w_kv NULL data pointers; the step is still in
    aligned mode (h_a given) and its new K/V row is b_kv (a linear map of zero features).
    `decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads)`."""
    b, h, hd, s, pos = 2, 2, 4, 5, 2
    gen = torch.Generator().manual_seed(0)
    d_b = h * hd
    h_b, h_a = torch.randn(b, 1, d_b, generator=gen), torch.empty(b, 1, 0)
    w_q, w_o = torch.randn(d_b, d_b, generator=gen), torch.randn(d_b, d_b, generator=gen)
    w_kv, b_kv = torch.empty(2 * d_b, 0), torch.randn(2 * d_b, generator=gen)
    kc, vc = torch.randn(b, h, s, hd, generator=gen), torch.randn(b, h, s, hd, generator=gen)
    kr, vr, kn, vn = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    want = ref.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kr, vr, pos, h)
    got = decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kn, vn, pos, h)
    assert torch.equal(kn, kr) and torch.equal(vn, vr)
    assert rel(got, want) <= 1e-5


def test_decode_step_with_zero_augment_width_appends_the_bias():
    check_zero_augment_width_appends_the_bias(native.bridge_decode_step)


def test_bindings_raise_python_exceptions():
    C = native._C
    good = (torch.zeros(1).data_ptr(), C.F32, (1, 1, 1, 1), (1, 1, 1, 1))
    lse = (torch.zeros(1).data_ptr(), C.F32, (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="data pointer is NULL"):
        C.attn_fwd((0, C.F32, (1, 1, 1, 1), (1, 1, 1, 1)), good, good, None, 0, good, lse)
    with pytest.raises(ValueError, match="does not fit in int64"):
        C.attn_fwd((1, C.F32, (2 ** 70, 1, 1, 1), (1, 1, 1, 1)), good, good, None, 0, good, lse)
    with pytest.raises(ValueError, match="mask: expected 0"):
        C.attn_fwd(good, good, good, None, 7, good, lse)
    with pytest.raises(TypeError, match="expected"):
        C.attn_fwd("q", good, good, None, 0, good, lse)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_instruction_set_copy(isa):
    # The kernels are compiled once per ISA and picked at run time: check the narrower copies.
    C = native._C
    widest = C.cpu_isa()
    try:
        order = ["default", "avx2", "avx512"]  # a CPU without `isa` gets a narrower copy
        assert order.index(C.set_cpu_isa(isa)) <= order.index(isa)
        g = torch.Generator().manual_seed(0)
        for dt, tq in ((torch.float32, 45), (torch.bfloat16, 45), (torch.float32, 2), (torch.bfloat16, 3)):
            q = torch.randn(2, 3, tq, 40, generator=g).to(dt).requires_grad_()
            k, v = (torch.randn(2, 3, 45, 40, generator=g).to(dt).requires_grad_() for _ in range(2))
            kpm = torch.rand(2, 45, generator=g) > 0.2
            out = native.cross_attention(q, k, v, "aligned", kpm)
            out.sum().backward()
            qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
            want = ref.cross_attention(qr, kr, vr, "aligned", kpm)
            want.sum().backward()
            for got, exp in ((out, want), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
                assert rel(got, exp) <= 2 * TOL[dt]
        # The decode step's blocked dot products: head dims below, at and off the vector
        # width, cache lengths off the key block, padding, and float64's narrower lanes.
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            for b, h, d, d_a, s, pos, kpm_kind in [(2, 4, 16, 24, 33, 20, "random"),
                                                   (3, 3, 5, 13, 7, 6, "empty_row"),
                                                   (1, 2, 64, 40, 50, 36, "none"),
                                                   (2, 1, 67, 9, 41, 40, "random")]:
                args = _decode_case(b, h, d, d_a, s, dt, False, kpm_kind)
                up = [None if t is None else t.double() for t in args]
                want = ref.bridge_decode_step(*up[:6], up[6].clone(), up[7].clone(), pos, h, args[8])
                got = native.bridge_decode_step(*args[:8], pos, h, args[8])
                assert rel(got, want) <= TOL[dt], (isa, dt, b, h, d, s, pos)
    finally:
        C.set_cpu_isa(widest)


# ------------------------------------------------------------- non-finite and odd layouts

def test_strided_key_padding_mask_and_weights():
    gen = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(1, 2, 3, 4, generator=gen), torch.randn(1, 2, 5, 4, generator=gen), \
        torch.randn(1, 2, 5, 4, generator=gen)
    kpm = torch.tensor([[True, False, True, True, True, True, False, True, True, False]])[:, ::2]
    assert kpm.stride(-1) == 2
    assert rel(native.cross_attention(q, k, v, "context", kpm), ref.cross_attention(q, k, v, "context", kpm)) <= 1e-5
    # Column-major weights are copied densely; the copies must outlive the kernel call.
    d_b, d_a, h = 8, 6, 2
    h_b, h_a = torch.randn(1, 1, d_b, generator=gen), torch.randn(1, 1, d_a, generator=gen)
    w_q, w_o = (torch.randn(d_b, d_b, generator=gen).t() for _ in range(2))
    w_kv, b_kv = torch.randn(d_a, 2 * d_b, generator=gen).t(), torch.randn(2 * d_b, generator=gen)
    kc, vc = torch.randn(1, h, 4, d_b // h, generator=gen), torch.randn(1, h, 4, d_b // h, generator=gen)
    want = ref.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc.clone(), vc.clone(), 2, h)
    for _ in range(3):
        got = native.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc.clone(), vc.clone(), 2, h)
        assert rel(got, want) <= 1e-5


def test_non_finite_values_in_masked_keys_do_not_leak():
    gen = torch.Generator().manual_seed(10)
    q, k, v = torch.randn(1, 1, 3, 4, generator=gen), torch.randn(1, 1, 5, 4, generator=gen), \
        torch.randn(1, 1, 5, 4, generator=gen)
    k[0, 0, 4, 1] = float("nan")
    v[0, 0, 4, 0] = float("inf")  # the last key: padded, and in the future of rows 0 and 1
    kpm = torch.tensor([[True, True, True, True, False]])
    q.requires_grad_()
    out = native.cross_attention(q, k, v, "context", kpm)
    out.sum().backward()
    assert out.isfinite().all() and q.grad.isfinite().all()
    assert native.cross_attention(q, k, v, "aligned")[:, :, :2].isfinite().all()


def test_nan_scores_give_nan_rows():
    q = torch.tensor([[[[float("nan")], [1.0]]]])
    k = torch.tensor([0.5, 1.0]).view(1, 1, 2, 1)
    v = torch.tensor([2.0, 3.0]).view(1, 1, 2, 1)
    out = native.cross_attention(q, k, v, "context")
    assert out[0, 0, 0].isnan().all() and out[0, 0, 1].isfinite().all()
    h_b = torch.ones(1, 1, 2)
    kc = torch.tensor([[[[float("nan"), 0.0], [1.0, 1.0]]]])  # (1, 1, 2, 2): row 0 has NaN
    step = native.bridge_decode_step(h_b, None, torch.eye(2), None, None, torch.eye(2), kc, kc.clone(), 2, 1)
    assert step.isnan().all()


def test_visible_nan_value_with_underflowed_weight_gives_nan():
    # exp(-687) underflows to 0, but the key is visible: 0 * NaN must keep the row NaN.
    q = torch.tensor([[[[24.0983]]]])
    k = torch.tensor([5.2450, 2.6693, -18.4115, 1.3855, -41.0478, 10.1249]).view(1, 1, 6, 1)
    v = torch.tensor([1.0111, -1.4352, float("nan"), 0.5220, 1.2379, -0.8646]).view(1, 1, 6, 1)
    kpm = torch.tensor([[True, True, True, False, True, True]])
    assert native.cross_attention(q, k, v, "aligned", kpm).isnan().all()
    h_b = torch.zeros(1, 1, 1)
    out = native.bridge_decode_step(h_b, None, torch.tensor([[24.0983]]), None, None, torch.eye(1),
                                    k.clone(), v.clone(), 6, 1, kpm)
    assert out.isnan().all()


def test_allowed_keys_with_all_scores_neginf_give_nan_not_empty():
    # Emptiness is the mask's alone (reference.py): infinite inputs that make every allowed
    # score -inf give NaN like softmax, while a row the mask leaves no key gives 0.
    q = torch.tensor([[[[float("inf")]]]])
    k = torch.tensor([-1.0, -2.0]).view(1, 1, 2, 1)
    v = torch.tensor([2.0, 4.0]).view(1, 1, 2, 1)
    assert native.cross_attention(q, k, v, "context").isnan().all()
    assert (native.cross_attention(q, k, v, "context", torch.tensor([[False, False]])) == 0).all()
    step = native.bridge_decode_step(torch.zeros(1, 1, 1), None, torch.tensor([[float("inf")]]), None, None,
                                     torch.eye(1), k.clone(), v.clone(), 2, 1)
    assert step.isnan().all()


def test_neginf_score_key_with_nonfinite_value_gives_nan_in_its_column():
    # A visible key scored -inf keeps softmax weight 0, and 0 * NaN (or 0 * inf) = NaN in the
    # reference, also when every other allowed score of its 64-key tile is -inf or padded
    # (the tiled path used to skip such a tile). Only the value's non-finite columns turn NaN.
    inf, nan = float("inf"), float("nan")
    for tq in (3, 4, 70):  # the per-row path (<= 3 rows) and the tiles
        b, h, tk, d = 1, 2, 130, 4
        gen = torch.Generator().manual_seed(tq)
        q = torch.ones(b, h, tq, d)
        k, v = torch.randn(b, h, tk, d, generator=gen) * 0.1, torch.randn(b, h, tk, d, generator=gen)
        k[:, :, 0] = torch.tensor([-inf, 0.0, 0.0, 0.0])  # score -inf for every query row
        v[:, 0, 0, 1] = nan
        v[:, 1, 0, 2] = inf
        k[:, :, 65] = torch.tensor([-inf, 0.0, 0.0, 0.0])  # also -inf in the second tile
        v[:, :, 65, 3] = nan
        kpm = torch.ones(b, tk, dtype=torch.bool)
        kpm[:, 1:64] = False   # the rest of tile 0 is padding
        kpm[:, 66:100] = False
        for mask in ("context", "aligned"):
            # aligned: only the rows that see key 65 (the reference lets a hidden key's NaN
            # value meet its weight 0 too; the kernels keep hidden keys out, csrc/README.md)
            r0 = 0 if mask == "context" else max(0, 65 - (tk - tq))
            want = ref.cross_attention(q, k, v, mask, kpm)[:, :, r0:]
            got = native.cross_attention(q, k, v, mask, kpm)[:, :, r0:]
            assert torch.equal(got.isnan(), want.isnan()), (tq, mask)
            fin = want.isfinite()
            assert torch.allclose(got[fin], want[fin], atol=1e-5), (tq, mask)
    # The decode step (its attention is the per-row path).
    h_b = torch.ones(1, 1, 4)
    kc = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(1)) * 0.1
    vc = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(2))
    kc[0, 0, 0] = torch.tensor([-inf, 0.0, 0.0, 0.0])
    vc[0, 0, 0, 2] = nan
    w_q = torch.eye(4)
    want = ref.bridge_decode_step(h_b, None, w_q, None, None, torch.eye(4), kc.clone(), vc.clone(), 5, 1)
    got = native.bridge_decode_step(h_b, None, w_q, None, None, torch.eye(4), kc.clone(), vc.clone(), 5, 1)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()


def test_cuda_backward_math_propagates_nan_rows():
    """The CUDA backward math (native._attn_bwd_cuda, on CPU tensors) treats only lse = -inf
    (a row that sees no key) as empty; a NaN lse (NaN score, or every visible score -inf) used
    to be taken for empty too, so dv missed the NaN the reference gives."""
    gen = torch.Generator().manual_seed(5)
    b, h, tq, tk, d = 2, 2, 5, 7, 4
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for t in (tq, tk, tk))
    q[0, 0, 1, 0] = float("nan")        # a NaN row
    q[1, 1, 3] = float("inf")           # with k[1, 1, :, 0] < 0 ...
    k[1, 1, :, :] = -torch.rand(tk, d, generator=gen) - 0.5  # ... every visible score -inf: NaN row
    kpm = torch.ones(b, tk, dtype=torch.bool)
    kpm[0, 5] = False
    kpm[1, :2] = False
    dout = torch.randn(b, h, tq, d, generator=gen)
    for mask in ("aligned", "context"):
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        ref.cross_attention(qr, kr, vr, mask, kpm).backward(dout.double())
        out, lse = native.native_attn_fwd(q, k, v, kpm, mask)
        assert lse.isnan().sum() >= 2
        for name, got, want in zip("qkv", native._attn_bwd_cuda(q, k, v, kpm, mask, out, dout, lse),
                                   (qr.grad, kr.grad, vr.grad)):
            assert torch.equal(got.isnan(), want.isnan()), (mask, name)
            fin = want.isfinite()
            assert torch.allclose(got[fin].double(), want[fin], atol=1e-5), (mask, name)


def test_cuda_backward_math_on_cpu_tensors():
    """The CUDA backend's backward is PyTorch math (no CUDA kernel yet; native._attn_bwd_cuda).
    Run on CPU tensors here, with P's lse from the C++ forward, so CI checks it: it matches the
    reference's gradients, and padded keys holding inf/NaN change no gradient."""
    from padding_checks import fill_padded, padded_inputs
    q, k, v, kpm = padded_inputs(torch.float32, CPU)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    for mask in ("aligned", "context"):
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        ref.cross_attention(qr, kr, vr, mask, kpm).backward(grad.double())
        grads = []
        for kk, vv in ((k, v), fill_padded(kpm, k, v)):
            out, lse = native.native_attn_fwd(q, kk, vv, kpm, mask)
            grads.append(native._attn_bwd_cuda(q, kk, vv, kpm, mask, out, grad, lse))
        for clean, bad, want in zip(*grads, (qr.grad, kr.grad, vr.grad)):
            assert torch.equal(bad, clean), mask
            assert rel(clean, want) <= 1e-5, mask


@pytest.mark.parametrize("mask", ["aligned", "context"])
def test_bf16_backward_with_alike_value_rows(mask):
    """Regression (audit, session 10): the C++ backward formed delta = dout·out from the bf16
    output; with alike value rows its dq, dk were 50x less accurate than the reference's. It
    now reads the unrounded fp32 output the forward keeps when a gradient will be taken."""
    from precision_checks import check_16bit_grads_with_alike_values
    check_16bit_grads_with_alike_values("cpp", CPU, torch.bfloat16, mask)


def test_cuda_backward_math_with_alike_value_rows():
    """The CUDA backend's backward math (on CPU tensors) recomputes the output from P instead of
    reading the 16-bit one its forward wrote: the same case as above, within 2x the reference."""
    from precision_checks import alike_value_inputs, rel as rel_err
    q, k, v, g = alike_value_inputs(CPU)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ref.cross_attention(qd, kd, vd, "aligned"), (qd, kd, vd), g.double())
    qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
    ref_bf16 = torch.autograd.grad(ref.cross_attention(qb, kb, vb, "aligned"), (qb, kb, vb), g)
    out, lse = native.native_attn_fwd(q, k, v, None, "aligned")  # bf16 out, as the CUDA kernels write
    got = native._attn_bwd_cuda(q, k, v, None, "aligned", out, g, lse)
    for name, o, r, e in zip("qkv", got, ref_bf16, want):
        assert rel_err(o, e) <= 2 * rel_err(r, e) + 1e-3, name


def test_c_api_accepts_fp32_out_for_bf16_only():
    """cf_attn_fwd_cpu / cf_attn_bwd_cpu: out may be fp32 for bf16 inputs (the unrounded output);
    any other mismatch between out and q is still refused by name."""
    q, k, v = (torch.randn(1, 2, 5, 8).bfloat16() for _ in range(3))
    out32, lse = torch.empty(1, 2, 5, 8), torch.empty(1, 2, 5)
    native._C.attn_fwd(*[native._desc(t) for t in (q, k, v)], None, 0, native._desc(out32), native._desc(lse))
    want = ref.cross_attention(q.float(), k.float(), v.float(), "aligned")
    assert rel(out32, want) <= 1e-5  # fp32 accumulation, not rounded to bf16
    with pytest.raises(TypeError, match="out"):
        q32 = q.float()
        native._C.attn_fwd(*[native._desc(t) for t in (q32, q32, q32)], None, 0,
                           native._desc(torch.empty(1, 2, 5, 8).double()), native._desc(lse))
    with pytest.raises(TypeError, match="out"):
        native._C.attn_fwd(*[native._desc(t) for t in (q, k, v)], None, 0,
                           native._desc(torch.empty(1, 2, 5, 8).half()), native._desc(lse))


def test_cuda_backward_math_keeps_rows_before_a_nonfinite_future_value_finite():
    """The CUDA backward math recomputes the output from P (no rounded output); forming it as
    p @ v multiplied a future key's weight 0 by its inf value and made the earlier rows' delta,
    hence their dq, NaN (review, session 10). It sums p * dp over the keys each row sees."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, 1, 4, 8, generator=gen) for _ in range(4))
    v[0, 0, 3, 0] = float("inf")  # key 3: seen by row 3 only (aligned, Tq = Tk)
    out, lse = native.native_attn_fwd(q, k, v, None, "aligned")
    assert torch.isfinite(out[0, 0, :3]).all()
    dq, dk, dv = native._attn_bwd_cuda(q, k, v, None, "aligned", out, g, lse)
    assert torch.isfinite(dq[0, 0, :3]).all() and not torch.isfinite(dq[0, 0, 3]).all()
