"""The "sdpa" backend: torch's own fused attention (F.scaled_dot_product_attention) with the
reference's semantics. Exact where it differs from plain SDPA: rows the mask leaves empty
(left padding) attend to every key inside SDPA, so no NaN is made, and are then zeroed, which
also zeroes their gradient.

Opt-in, not picked by "auto": torch's fused CPU kernel does not propagate NaN/inf inputs the way
the reference does (a NaN query can give a finite row), so it is for finite inputs only; padded
keys may hold anything (they are zeroed before SDPA, as in the reference)."""
import torch.nn.functional as F

from .reference import attention_mask, decode_step_with, zero_padded_keys


def supports(device, dtype) -> bool:
    return True


def cross_attention(q, k, v, mask, key_padding_mask):
    tq, tk = q.shape[2], k.shape[2]
    if tk == 0:
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    if key_padding_mask is None:
        if mask == "context":
            return F.scaled_dot_product_attention(q, k, v)
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Aligned with Tk > Tq (queries are the newest positions): no row is empty.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(tq, tk, mask, None, q.device))
    k, v = zero_padded_keys(k, v, key_padding_mask)  # padded inf/NaN must not reach any row
    allowed = attention_mask(tq, tk, mask, key_padding_mask, q.device)
    empty = ~allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty)
    return out.masked_fill(empty, 0.0)


def bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask):
    return decode_step_with(cross_attention, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                            key_padding_mask)
