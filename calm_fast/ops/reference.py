"""Eager PyTorch ground truth for CALM's bridge: every kernel is tested against this file.

Shapes (B batch, H heads, d head dim, D_A / D_B model widths):
  q (B, H, Tq, d); k, v (B, H, Tk, d)
  key_padding_mask (B, Tk) bool, True = keep

Masks:
  "aligned": query i sees key j iff j <= i + (Tk - Tq). The queries are the *last* Tq
             positions of the same text the keys cover, so a one-token decode query sees
             the whole cache, and a full-length query is plain causal.
  "context": every query sees every (unpadded) key.
Padded keys are never seen, whatever they hold: an inf/NaN in a padded key or value changes
no output and no gradient.
A query row that sees no key at all (left padding) outputs exactly zero, not NaN, and
passes no gradient.
"""
from __future__ import annotations

import math

import torch

MASKS = ("aligned", "context")


def attention_mask(tq: int, tk: int, mask: str, key_padding_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, Tq, Tk) mask, True = may attend; None when nothing is masked."""
    allowed = None
    if mask == "aligned":
        i = torch.arange(tq, device=device)[:, None]
        j = torch.arange(tk, device=device)[None, :]
        allowed = (j <= i + (tk - tq))[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        allowed = kpm if allowed is None else (allowed & kpm)
    return allowed


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str = "aligned",
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, computed in fp32 (fp64 for fp64 inputs), returned
    in q's dtype."""
    out_dtype = q.dtype
    if k.shape[2] == 0:  # no key at all: every row is empty, so the output is zero
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    k, v = zero_padded_keys(k, v, key_padding_mask)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp64 stays fp64: no weight underflows early
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    scores = (qf @ kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    allowed = attention_mask(q.shape[2], k.shape[2], mask, key_padding_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if allowed is None:
        return (torch.softmax(scores, dim=-1) @ vf).to(out_dtype)
    # A row the mask leaves no key (left padding) outputs zero. Emptiness is the mask's alone:
    # a row whose visible scores are all -inf from infinite inputs gives NaN, as softmax does.
    empty = ~allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    out = probs @ vf
    return out.to(out_dtype)


def zero_padded_keys(k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v with the padded keys' rows set to 0. No row sees a padded key, yet a dense
    probs @ v would multiply its weight 0 by its value, and 0 * inf/NaN is NaN in every row;
    zeros make padding exact whatever a padded row holds (also their gradients: 0)."""
    if key_padding_mask is None:
        return k, v
    keep = key_padding_mask[:, None, :, None]
    return k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def project_kv(h_a: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor, w_k: torch.Tensor,
               w_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training form: P(h_a) = h_a W_p^T + b_p, then K = P W_k^T, V = P W_v^T."""
    p = torch.nn.functional.linear(h_a, w_proj, b_proj)
    return torch.nn.functional.linear(p, w_k), torch.nn.functional.linear(p, w_v)


def fold_projection(w_proj: torch.Tensor, b_proj: torch.Tensor, w_k: torch.Tensor,
                    w_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference form: P has no nonlinearity, so [K|V] = h_a W_kv^T + b_kv with
    W_kv = [W_k W_p; W_v W_p] (2 D_B x D_A) and b_kv = [W_k b_p; W_v b_p]."""
    w_kv = torch.cat([w_k @ w_proj, w_v @ w_proj], dim=0)
    b_kv = torch.cat([w_k @ b_proj, w_v @ b_proj], dim=0)
    return w_kv, b_kv


def bridge_forward(h_b: torch.Tensor, h_a: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor,
                   w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                   n_heads: int, mask: str = "aligned",
                   key_padding_mask: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """One CALM bridge: residual + W_o Attn(h_b W_q, P(h_a) W_k, P(h_a) W_v).

    h_b (B, Tq, D_B) anchor block output; h_a (B, Tk, D_A) augment block output.
    residual defaults to h_b (several bridges at one anchor layer read the same h_b and add
    their updates). Returns the updated anchor residual stream (B, Tq, D_B).
    """
    k, v = project_kv(h_a, w_proj, b_proj, w_k, w_v)
    q = torch.nn.functional.linear(h_b, w_q)
    attn = cross_attention(split_heads(q, n_heads), split_heads(k, n_heads),
                           split_heads(v, n_heads), mask, key_padding_mask)
    base = h_b if residual is None else residual
    return base + torch.nn.functional.linear(merge_heads(attn), w_o)


def bridge_decode_step(h_b: torch.Tensor, h_a: torch.Tensor | None, w_q: torch.Tensor,
                       w_kv: torch.Tensor, b_kv: torch.Tensor, w_o: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_heads: int,
                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of a bridge with its K/V cache.

    h_b (B, 1, D_B): the anchor's new row. h_a (B, 1, D_A): the augment's new row, or None
    in context mode (the cache is fixed). k_cache, v_cache (B, H, S, d).
    Aligned mode: writes K/V of h_a into cache row `pos` (in place), then attends over rows
    [0, pos]. Context mode (h_a None): attends over rows [0, pos).
    key_padding_mask (B, S) bool over cache rows, True = keep.
    Returns h_b + W_o attn, (B, 1, D_B).
    """
    return decode_step_with(cross_attention, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                            key_padding_mask)


def decode_step_with(attend, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                     key_padding_mask):
    """bridge_decode_step with `attend` (a cross_attention) as its attention."""
    d_b = h_b.shape[-1]
    n = pos
    if h_a is not None:
        kv = torch.nn.functional.linear(h_a, w_kv, b_kv)
        k_cache[:, :, pos:pos + 1] = split_heads(kv[..., :d_b], n_heads).to(k_cache.dtype)
        v_cache[:, :, pos:pos + 1] = split_heads(kv[..., d_b:], n_heads).to(v_cache.dtype)
        n = pos + 1
    q = split_heads(torch.nn.functional.linear(h_b, w_q), n_heads)
    kpm = None if key_padding_mask is None else key_padding_mask[:, :n]
    attn = attend(q, k_cache[:, :, :n], v_cache[:, :, :n], "context", kpm)
    return h_b + torch.nn.functional.linear(merge_heads(attn), w_o)
