"""The "sdpa" backend (torch's fused attention) against ops/reference.py: outputs and grads."""
import pytest
import torch

from calm_fast import ops
from calm_fast.ops import reference


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 13), (7, 7), (5, 17), (31, 31)])
@pytest.mark.parametrize("mask", ["aligned", "context"])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_reference(tq, tk, mask, padded):
    g = torch.Generator().manual_seed(7 * tq + tk)
    q, k, v = (torch.randn(3, 2, t, 24, generator=g, requires_grad=True) for t in (tq, tk, tk))
    kpm = None
    if padded:
        kpm = torch.ones(3, tk, dtype=torch.bool)
        kpm[1, : tk - 1] = False   # leaves some aligned rows empty
        kpm[2, :] = False          # a fully padded sequence
    out = ops.cross_attention(q, k, v, mask, kpm, backend="sdpa")
    ref = reference.cross_attention(q, k, v, mask, kpm)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    go = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, want):
        assert torch.isfinite(a).all()
        assert (a - b).norm() <= 1e-5 * max(b.norm().item(), 1.0)  # dq is exactly 0 when Tk = 1


def test_sdpa_decode_step_matches_reference():
    g = torch.Generator().manual_seed(3)
    b, h, d_a, d_b, s = 2, 4, 12, 32, 9
    h_b, h_a = torch.randn(b, 1, d_b, generator=g), torch.randn(b, 1, d_a, generator=g)
    w_q, w_o = torch.randn(d_b, d_b, generator=g), torch.randn(d_b, d_b, generator=g)
    w_kv, b_kv = torch.randn(2 * d_b, d_a, generator=g), torch.randn(2 * d_b, generator=g)
    caches = [torch.randn(b, h, s, d_b // h, generator=g) for _ in range(2)]
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[0, :4] = False
    ref_caches = [c.clone() for c in caches]
    out = ops.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, *caches, 5, h, kpm, backend="sdpa")
    ref = reference.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, *ref_caches, 5, h, kpm)
    assert rel(out, ref) < 1e-5
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
