"""One CALM bridge (Θ_C for one layer pair): projection of augment states + cross-attention."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops


class Bridge(nn.Module):
    """residual + W_o Attn(h_b W_q, P(h_a) W_k, P(h_a) W_v), P = Linear(D_A -> D_B).

    W_o starts at zero, so a fresh bridge is the identity (CALM equals its anchor)."""

    def __init__(self, augment_dim: int, anchor_dim: int, n_heads: int):
        super().__init__()
        for name, v in (("augment_dim", augment_dim), ("anchor_dim", anchor_dim), ("n_heads", n_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Bridge {name} must be a positive int, got {v!r}")
        if anchor_dim % n_heads:
            raise ValueError(f"anchor dim {anchor_dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.proj = nn.Linear(augment_dim, anchor_dim)
        self.wq = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.wk = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.wv = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.wo = nn.Linear(anchor_dim, anchor_dim, bias=False)
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(anchor_dim))
        nn.init.zeros_(self.wo.weight)

    def forward(self, h_b, h_a, mask: str = "aligned", key_padding_mask=None, residual=None,
                backend: str = "auto"):
        return ops.bridge_forward(h_b, h_a, self.proj.weight, self.proj.bias, self.wq.weight,
                                  self.wk.weight, self.wv.weight, self.wo.weight, self.n_heads,
                                  mask, key_padding_mask, backend, residual)

    @torch.no_grad()
    def folded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference weights: [K|V] = h_a W_kv^T + b_kv (P folded into W_k, W_v)."""
        return ops.fold_projection(self.proj.weight, self.proj.bias, self.wk.weight, self.wv.weight)


class BridgeCache:
    """A bridge's decode state: folded K/V weights and its K/V cache (B, H, S, d)."""

    def __init__(self, bridge: Bridge, batch: int, max_len: int, dtype: torch.dtype):
        w = bridge.wq.weight
        self.w_kv, self.b_kv = (t.to(dtype) for t in bridge.folded_kv())
        self.w_q, self.w_o = w.detach().to(dtype), bridge.wo.weight.detach().to(dtype)
        self.n_heads = bridge.n_heads
        d_b = w.shape[0]
        shape = (batch, bridge.n_heads, max_len, d_b // bridge.n_heads)
        self.k = torch.zeros(shape, dtype=dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=dtype, device=w.device)

    def append(self, h_a: torch.Tensor, pos: int) -> None:
        """Write the K/V rows of augment states h_a (B, T, D_A) at rows [pos, pos+T)."""
        kv = torch.nn.functional.linear(h_a.to(self.w_kv.dtype), self.w_kv, self.b_kv)
        d_b = self.w_q.shape[0]
        t = h_a.shape[1]
        self.k[:, :, pos:pos + t] = ops.split_heads(kv[..., :d_b], self.n_heads)
        self.v[:, :, pos:pos + t] = ops.split_heads(kv[..., d_b:], self.n_heads)

    def attend(self, h_b, n_keys: int, mask: str, key_padding_mask, residual, backend: str):
        """residual + W_o Attn(h_b W_q, K[:n_keys], V[:n_keys]) for a block of queries."""
        q = ops.split_heads(torch.nn.functional.linear(h_b, self.w_q), self.n_heads)
        kpm = None if key_padding_mask is None else key_padding_mask[:, :n_keys]
        attn = ops.cross_attention(q, self.k[:, :, :n_keys], self.v[:, :, :n_keys], mask, kpm, backend)
        return residual + torch.nn.functional.linear(ops.merge_heads(attn), self.w_o)
