"""Shared check: a 16-bit attention backward keeps the reference's accuracy when the value rows
are alike. Then dout·v_j - delta (delta = dout·out) is a small difference of large terms, and
a delta formed from the output rounded to bf16 (what a flash backward reads by default) puts an
error of ~2^-9 |dout||out| into every dq and dk: 50x the reference's on the case below. The
fused backends hand their backward the unrounded fp32 output when a gradient will be taken.
Used by the C++ backend's tests (CI) and the CUDA and Triton tests (GPU)."""
from __future__ import annotations

import torch

from calm_fast import ops


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def alike_value_inputs(device, dtype=torch.bfloat16, b=2, h=3, t=37, d=16):
    """q, k random; v rows = one shared row (magnitude 4) + 2.5% noise; dout random."""
    gen = torch.Generator().manual_seed(7)
    q, k, g = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    v = torch.randn(1, 1, 1, d, generator=gen) * 4 + 0.1 * torch.randn(b, h, t, d, generator=gen)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, g)]


def _grads(attn, q, k, v, g, dtype):
    qq, kk, vv = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
    out = attn(qq, kk, vv)
    return [out.detach()] + list(torch.autograd.grad(out, (qq, kk, vv), g.to(dtype)))


def check_16bit_grads_with_alike_values(backend: str, device, dtype=torch.bfloat16, mask="aligned"):
    """The backend's output and dq, dk, dv against float64 on the same 16-bit inputs: within 2x
    the reference's own 16-bit error (+1e-3); the inference output (no gradient) too."""
    q, k, v, g = alike_value_inputs(device, dtype)

    def attn(backend_name):
        return lambda a, b, c: ops.cross_attention(a, b, c, mask, None, backend_name)
    exact = _grads(attn("reference"), q, k, v, g, torch.float64)
    want = _grads(attn("reference"), q, k, v, g, dtype)
    got = _grads(attn(backend), q, k, v, g, dtype)
    for name, w, o, e in zip(("out", "dq", "dk", "dv"), want, got, exact):
        err_ref, err = rel(w, e), rel(o, e)
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        assert err <= 2 * err_ref + 1e-3, f"{backend} {name}: {err:.3g} vs reference {err_ref:.3g}"
    with torch.no_grad():  # the inference path (no fp32 output kept)
        out = ops.cross_attention(q, k, v, mask, None, backend)
    assert rel(out, exact[0]) <= 2 * rel(want[0], exact[0]) + 1e-3
