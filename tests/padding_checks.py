"""Shared checks: what a padded key or cache row holds (inf, -inf, NaN, anything) changes no
output and no gradient. Another stack's hidden states at its padded positions may hold
anything, and a dense P @ V multiplies a padded key's weight 0 by its value: 0 * inf is NaN.
Used by the CPU backends' tests, the Triton tests (interpreter and GPU) and the CUDA tests."""
from __future__ import annotations

import torch

from calm_fast.ops import reference as ref

NONFINITE = (float("nan"), float("inf"), float("-inf"))


def padded_inputs(dtype, device, head_dim=16):
    """q (2, 2, 67, d), k/v (2, 2, 70, d) with finite values at padded keys, and the mask.
    70 keys: two key tiles of 64 with a remainder; batch 0 is left-padded over keys 0-3, so
    in aligned mode (offset 3) its row 0 sees no key at all."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, t, head_dim, generator=gen) for t in (67, 70, 70))
    kpm = torch.ones(2, 70, dtype=torch.bool)
    kpm[0, :4] = False
    kpm[0, 40] = False
    kpm[0, 69] = False
    kpm[1, 65] = False
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [kpm.to(device)]


def fill_padded(kpm, k, v):
    """Copies of k, v (B, H, T, d) whose padded rows (kpm False) hold NaN, inf or -inf, in turn."""
    k, v = k.clone(), v.clone()
    for i, (b, j) in enumerate(torch.nonzero(~kpm.cpu()).tolist()):
        k[b, :, j] = NONFINITE[i % 3]
        v[b, :, j] = NONFINITE[(i + 1) % 3]
    return k, v


def check_padded_keys_are_ignored(attend, device, dtype=torch.float32, grads=True, head_dim=16):
    """attend(q, k, v, mask, key_padding_mask) -> out. Padded keys filled with NaN, inf or -inf
    (K and V, cycling) give exactly the output and gradients of padded keys holding finite
    values; the padded keys' gradients are 0."""
    q, k, v, kpm = padded_inputs(dtype, device, head_dim)
    bad_k, bad_v = fill_padded(kpm, k, v)
    for mask in ("aligned", "context"):
        results = []
        for kk, vv in ((k, v), (bad_k, bad_v)):
            leaves = [t.detach().clone().requires_grad_(grads) for t in (q, kk, vv)]
            out = attend(*leaves, mask, kpm)
            if grads:
                gen = torch.Generator().manual_seed(12)
                out.backward(torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype))
            results.append([out.detach()] + ([t.grad for t in leaves] if grads else []))
        clean, bad = results
        assert clean[0].isfinite().all(), mask
        for name, want, got in zip(("out", "dq", "dk", "dv"), clean, bad):
            assert torch.equal(got, want), f"{mask}: padded inf/NaN changed {name}"
        if grads:
            pad = ~kpm[:, None, :, None].expand_as(bad[2])
            assert (bad[2][pad] == 0).all() and (bad[3][pad] == 0).all(), mask
        if mask == "aligned":
            assert (clean[0][0, :, 0] == 0).all()  # the row that sees no key outputs 0


def check_decode_padded_rows_are_ignored(step, device, dtype=torch.float32):
    """step(h_b, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, kpm) -> out, a context-mode
    decode step (h_a None). Padded cache rows holding NaN/inf give exactly the output of padded
    rows holding finite values."""
    h, d, s, d_a = 2, 16, 37, 8
    d_b = h * d
    gen = torch.Generator().manual_seed(13)
    h_b = torch.randn(2, 1, d_b, generator=gen)
    w_q, w_o = (torch.randn(d_b, d_b, generator=gen) * 0.2 for _ in range(2))
    w_kv, b_kv = torch.randn(2 * d_b, d_a, generator=gen) * 0.2, torch.randn(2 * d_b, generator=gen)
    k, v = (torch.randn(2, h, s, d, generator=gen) for _ in range(2))
    kpm = torch.ones(2, s, dtype=torch.bool)
    kpm[0, :5] = False
    kpm[0, 20] = False
    kpm[1, 36] = False
    outs = []
    for kk, vv in ((k, v), fill_padded(kpm, k, v)):
        args = [t.to(device=device, dtype=dtype) for t in (h_b, w_q, w_kv, b_kv, w_o, kk, vv)]
        outs.append(step(*args, s, h, kpm.to(device)))
    assert outs[0].isfinite().all()
    assert torch.equal(outs[1], outs[0]), "padded inf/NaN cache rows changed the decode step"
    want = ref.bridge_decode_step(h_b, None, w_q, w_kv, b_kv, w_o, k.clone(), v.clone(), s, h, kpm)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[0].cpu().float(), want, atol=tol, rtol=tol)
