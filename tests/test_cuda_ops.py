"""The CUDA kernels (calm_fast._C_cuda through calm_fast.ops.native) against ops/reference.py.

Skipped without a CUDA device or without the CUDA module; run by bench/gpu_check.sh.
"""
from __future__ import annotations

import pytest
import torch

from calm_fast.ops import reference as ref
from padding_checks import check_decode_padded_rows_are_ignored, check_padded_keys_are_ignored
from precision_checks import check_16bit_grads_with_alike_values

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
native = pytest.importorskip("calm_fast.ops.native", reason="calm_fast native kernels are not built")
if native._C_cuda is None:
    pytest.skip("calm_fast._C_cuda is not built (no nvcc at build time)", allow_module_level=True)

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    den = want.norm().item()
    return (out - want).norm().item() / den if den > 0 else (out - want).norm().item()


def make_kpm(b, tk, kind, gen):
    if kind == "none":
        return None
    kpm = torch.rand(b, tk, generator=gen) > 0.3
    if kind == "empty_row":
        kpm[0] = False
    return kpm.to(DEV)


# d = 64 / 128 take the tensor-core kernel for bf16/fp16; the others the generic one.
SHAPES = [(1, 1, 1, 1, 64), (2, 3, 1, 37, 128), (1, 2, 13, 13, 7), (2, 2, 67, 131, 64),
          (1, 2, 200, 200, 128), (3, 1, 5, 70, 33), (1, 1, 129, 300, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["none", "random", "empty_row"])
@pytest.mark.parametrize("mask", ["aligned", "context"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_forward_backward(shape, mask, kind, dtype):
    gen = torch.Generator().manual_seed(0)
    b, h, tq, tk, d = shape
    q, k, v = (torch.randn(b, h, t, d, generator=gen).to(dtype).to(DEV) for t in (tq, tk, tk))
    kpm = make_kpm(b, tk, kind, gen)
    qn, kn, vn = (t.clone().requires_grad_() for t in (q, k, v))
    out = native.cross_attention(qn, kn, vn, mask, kpm)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    want = ref.cross_attention(qr, kr, vr, mask, kpm)
    assert out.dtype == dtype and rel(out, want) <= TOL[dtype]
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEV)
    out.backward(grad.to(dtype))
    want.backward(grad)
    for got, exp in ((qn.grad, qr.grad), (kn.grad, kr.grad), (vn.grad, vr.grad)):
        assert rel(got, exp) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_backward_with_alike_value_rows(dtype):
    check_16bit_grads_with_alike_values("cuda", DEV, dtype)


def test_cuda_matches_cpu_kernel_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 100, 64, generator=gen) for _ in range(3))
    kpm = torch.ones(2, 100, dtype=torch.bool)
    kpm[0, :40] = False
    kpm[1] = False
    cpu, lse_cpu = native.native_attn_fwd(q, k, v, kpm, "aligned")
    for dt in (torch.float32, torch.bfloat16):
        out, lse = native.native_attn_fwd(q.to(DEV, dt), k.to(DEV, dt), v.to(DEV, dt), kpm.to(DEV), "aligned")
        assert rel(out.cpu(), cpu) <= TOL[dt]
        assert torch.isneginf(lse[1]).all() and torch.equal(out[1].float().cpu(), torch.zeros_like(cpu[1]))
        assert torch.isneginf(lse[0, :, :40]).all()
        finite = torch.isfinite(lse_cpu)
        assert torch.allclose(lse.cpu()[finite], lse_cpu[finite], atol=TOL[dt] * 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("context", [False, True], ids=["aligned", "context"])
@pytest.mark.parametrize("kpm_kind", ["none", "random"])
# b = 5: more batch rows than one pass over a weight row takes (4); d = 256: the kernel's limit.
@pytest.mark.parametrize("b,h,d,d_a,s,pos", [(1, 1, 1, 1, 1, 0), (1, 4, 16, 40, 50, 17),
                                             (3, 3, 5, 13, 7, 6), (2, 2, 64, 96, 130, 129),
                                             (5, 2, 64, 24, 67, 66), (1, 2, 256, 64, 40, 39),
                                             (1, 32, 128, 2048, 2048, 2000)])
def test_decode_step_matches_reference(b, h, d, d_a, s, pos, kpm_kind, context, dtype):
    gen = torch.Generator().manual_seed(2)
    d_b = h * d

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEV)
    h_b, h_a = r(b, 1, d_b), (None if context else r(b, 1, d_a))
    w_q, w_o = r(d_b, d_b, scale=d_b ** -0.5), r(d_b, d_b, scale=d_b ** -0.5)
    w_kv, b_kv = r(2 * d_b, d_a, scale=d_a ** -0.5), r(2 * d_b)
    k_cache, v_cache = r(b, h, s, d), r(b, h, s, d)
    kpm = make_kpm(b, s, kpm_kind, gen)
    if context and pos == 0:
        out = native.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, h, kpm)
        assert torch.equal(out, h_b)
        return
    up = [None if t is None else t.double() for t in (h_b, h_a, w_q, w_kv, b_kv, w_o)]
    k_ref, v_ref = k_cache.double(), v_cache.double()
    want = ref.bridge_decode_step(*up, k_ref, v_ref, pos, h, kpm)
    out = native.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, h, kpm)
    torch.cuda.synchronize()
    assert out.dtype == dtype and rel(out, want) <= TOL[dtype]
    assert rel(k_cache, k_ref) <= TOL[dtype] and rel(v_cache, v_ref) <= TOL[dtype]


def test_decode_step_is_one_launch_and_graph_capturable():
    gen = torch.Generator().manual_seed(3)
    h, d, s = 8, 64, 256
    d_b = h * d
    t = lambda *shape: torch.randn(*shape, generator=gen).to(DEV, torch.bfloat16) * 0.05  # noqa: E731
    args = [t(1, 1, d_b), t(1, 1, d_b), t(d_b, d_b), t(2 * d_b, d_b), t(2 * d_b), t(d_b, d_b),
            t(1, h, s, d), t(1, h, s, d)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        native.bridge_decode_step(*args, 10, h)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "decode_step_kernel" in e.name]
    assert len(kernels) == 1, kernels
    eager = native.bridge_decode_step(*args, 11, h)
    graph = torch.cuda.CUDAGraph()
    static_pos = 11
    with torch.cuda.graph(graph):
        captured = native.bridge_decode_step(*args, static_pos, h)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_opcheck_and_compile_on_cuda():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 9, 64, generator=gen).to(DEV, torch.bfloat16).requires_grad_() for _ in range(3))
    kpm = (torch.rand(2, 9, generator=gen) > 0.2).to(DEV)
    torch.library.opcheck(native.native_attn_fwd, (q, k, v, kpm, "aligned"))
    d_b, h = 32, 2
    dec = [torch.randn(*sh, generator=gen).to(DEV) for sh in
           ((1, 1, d_b), (1, 1, 24), (d_b, d_b), (2 * d_b, 24), (2 * d_b,), (d_b, d_b), (1, h, 10, 16), (1, h, 10, 16))]
    torch.library.opcheck(native.native_decode_step, (*dec, 4, h, None))
    torch._dynamo.reset()

    def fn(q, k, v):
        return native.cross_attention(q, k, v, "aligned", kpm).float().square().sum()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # traces; no inductor compile time
    loss = compiled(q, k, v)
    loss.backward()
    assert torch.isfinite(q.grad).all()
    assert torch.allclose(loss, fn(q, k, v), rtol=1e-2)


def test_bad_inputs_on_cuda():
    q = torch.randn(1, 2, 4, 64, device=DEV)
    with pytest.raises(ValueError, match="k is on cpu"):
        native.cross_attention(q, q.cpu(), q)
    with pytest.raises(TypeError, match="float64"):
        native.cross_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="key_padding_mask is on cpu"):
        native.cross_attention(q, q, q, "aligned", torch.ones(1, 4, dtype=torch.bool))
    assert native.supports(DEV, torch.bfloat16) and not native.supports(DEV, torch.float64)


# d = 64 in bf16 takes the tensor-core kernel, d = 16 the generic one.
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 16), (torch.bfloat16, 16), (torch.bfloat16, 64)])
def test_padded_nonfinite_keys_are_ignored(dtype, head_dim):
    check_padded_keys_are_ignored(native.cross_attention, "cuda", dtype, head_dim=head_dim)
    check_decode_padded_rows_are_ignored(
        lambda h_b, *rest: native.bridge_decode_step(h_b, None, *rest), "cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 2, 67, 131, 64), (1, 2, 200, 200, 128)], ids=lambda s: "x".join(map(str, s)))
def test_wmma_kernel_still_matches(shape, dtype, monkeypatch):
    """The mma.sync kernel is the default for bf16/fp16 at d = 64/128; CALM_FAST_CUDA_ATTN=wmma
    keeps the older WMMA kernel reachable, and both match the reference."""
    gen = torch.Generator().manual_seed(4)
    b, h, tq, tk, d = shape
    q, k, v = (torch.randn(b, h, t, d, generator=gen).to(dtype).to(DEV) for t in (tq, tk, tk))
    kpm = make_kpm(b, tk, "random", gen)
    want = ref.cross_attention(q.double(), k.double(), v.double(), "aligned", kpm)
    mma = native.cross_attention(q, k, v, "aligned", kpm)
    monkeypatch.setenv("CALM_FAST_CUDA_ATTN", "wmma")
    wmma = native.cross_attention(q, k, v, "aligned", kpm)
    assert rel(mma, want) <= TOL[dtype] and rel(wmma, want) <= TOL[dtype]
