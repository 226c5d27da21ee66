"""The reference bridge ops: mask semantics by hand, the projection fold, decode = prefill,
and the dispatch point's checks."""
import math

import pytest
import torch

from calm_fast import ops
from calm_fast.ops import reference


def naive_attention(q, k, v, allowed):
    """Loop-per-row float64 attention; `allowed[b][i][j]` True = visible."""
    b, h, tq, d = q.shape
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(tq):
            js = [j for j in range(k.shape[2]) if allowed(bi, i, j)]
            if not js:
                continue
            s = torch.stack([(q[bi, :, i].double() * k[bi, :, j].double()).sum(-1) for j in js], -1) / math.sqrt(d)
            p = torch.softmax(s, -1)
            out[bi, :, i] = (p[..., None] * v[bi][:, js].double()).sum(1)
    return out


@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 7), (5, 5), (3, 11), (13, 13)])
@pytest.mark.parametrize("mask", ["aligned", "context"])
@pytest.mark.parametrize("padded", [False, True])
def test_cross_attention_matches_naive(tq, tk, mask, padded):
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q, k, v = (torch.randn(2, 3, t, 8, generator=g) for t in (tq, tk, tk))
    kpm = None
    if padded:
        kpm = torch.ones(2, tk, dtype=torch.bool)
        kpm[1, : tk // 2 + 1] = False  # left padding, fully masking some aligned rows

    def allowed(b, i, j):
        ok = j <= i + (tk - tq) if mask == "aligned" else True
        return ok and (kpm is None or bool(kpm[b, j]))

    out = reference.cross_attention(q, k, v, mask, kpm)
    want = naive_attention(q, k, v, allowed)
    assert torch.isfinite(out).all()
    assert ((out.double() - want).norm() / want.norm().clamp_min(1e-30)).item() < 1e-6


def test_fully_masked_rows_are_zero_with_zero_grad():
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    kpm = torch.tensor([[False, False, True, True]])
    out = reference.cross_attention(q, k, v, "aligned", kpm)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))


def test_fold_projection_equals_two_step_projection():
    g = torch.Generator().manual_seed(0)
    d_a, d_b = 12, 20
    h_a = torch.randn(2, 5, d_a, generator=g, dtype=torch.float64)
    w_p, b_p = torch.randn(d_b, d_a, generator=g, dtype=torch.float64), torch.randn(d_b, generator=g, dtype=torch.float64)
    w_k, w_v = (torch.randn(d_b, d_b, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = reference.project_kv(h_a, w_p, b_p, w_k, w_v)
    w_kv, b_kv = reference.fold_projection(w_p, b_p, w_k, w_v)
    kv = torch.nn.functional.linear(h_a, w_kv, b_kv)
    torch.testing.assert_close(kv, torch.cat([k, v], -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_last_row_of_full_bridge(padded):
    g = torch.Generator().manual_seed(1)
    b, t, d_a, d_b, h = 2, 7, 10, 24, 4
    h_b, h_a = torch.randn(b, t, d_b, generator=g), torch.randn(b, t, d_a, generator=g)
    w_p, b_p = torch.randn(d_b, d_a, generator=g), torch.randn(d_b, generator=g)
    w_q, w_k, w_v, w_o = (torch.randn(d_b, d_b, generator=g) / 5 for _ in range(4))
    kpm = torch.ones(b, t, dtype=torch.bool)
    if padded:
        kpm[1, :3] = False
    full = reference.bridge_forward(h_b, h_a, w_p, b_p, w_q, w_k, w_v, w_o, h, "aligned", kpm if padded else None)
    w_kv, b_kv = reference.fold_projection(w_p, b_p, w_k, w_v)
    k_cache, v_cache = torch.zeros(b, h, t + 3, d_b // h), torch.zeros(b, h, t + 3, d_b // h)
    cache_mask = torch.nn.functional.pad(kpm, (0, 3))
    for p in range(t):
        out = reference.bridge_decode_step(h_b[:, p:p + 1], h_a[:, p:p + 1], w_q, w_kv, b_kv, w_o, k_cache, v_cache,
                                           p, h, cache_mask if padded else None)
        rows = kpm[:, p]
        torch.testing.assert_close(out[rows, 0], full[rows, p], rtol=1e-5, atol=1e-5)


def test_dispatch_lists_and_checks_backends():
    assert "reference" in ops.available_backends()
    assert "reference" in ops.available_backends("cpu")
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="backend must be"):
        ops.cross_attention(q, q, q, backend="cudnn")
    with pytest.raises(ValueError, match="mask must be one of"):
        ops.cross_attention(q, q, q, mask="causal")
    with pytest.raises(ValueError, match="4-D"):
        ops.cross_attention(q[0], q, q)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ops.cross_attention(torch.randn(1, 2, 5, 4), q, q)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape"):
        ops.cross_attention(q, q, q, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ops.cross_attention(q, q, q, key_padding_mask=torch.ones(1, 3))
    with pytest.raises(TypeError, match="dtypes differ"):
        ops.cross_attention(q, q.double(), q)


def test_decode_step_over_an_empty_context_returns_h_b():
    h_b = torch.randn(2, 1, 8)
    cache = torch.zeros(2, 2, 0, 4)
    w = torch.randn(8, 8)
    out = reference.bridge_decode_step(h_b, None, w, torch.randn(16, 6), torch.randn(16), w, cache, cache, 0, 2)
    assert torch.equal(out, h_b)
