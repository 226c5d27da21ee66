"""A minimal decoder-only LM: Llama family (RMSNorm, RoPE, GQA, SwiGLU, optional q/k/v bias)
and GPT-2 family (LayerNorm, learned positions, GELU), with a static KV cache.

CALM's seam is explicit: `forward` can return the residual stream after chosen blocks
(`taps`), apply a function to it after chosen blocks (`after_block`), and stop early
(`stop_after`, no LM head)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import DecoderConfig
from .validation import check_tokens, check_attention_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # by hand, not F.rms_norm: ONNX opset 18 has no RMSNormalization
        compute = _compute_dtype(x)
        xf = x.to(compute)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(compute)).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """16-bit activations are normalised and rotated in float32; float64 stays float64 (a
    float64 model is the ground truth some checks compare float32 kernels against)."""
    return torch.promote_types(x.dtype, torch.float32)


def rope_tables(head_dim: int, max_len: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)  # HF layout: the two halves rotate together
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d); cos/sin (B, 1, T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    compute = _compute_dtype(x)
    return (x.to(compute) * cos + rotated.to(compute) * sin).to(x.dtype)


class StaticKVCache:
    """Preallocated per-layer K/V (B, n_kv, S, d), written in place at the decode position.
    `filled`: how many positions hold tokens (the end of the last write); a forward may
    write at pos <= filled (pos < filled rewrites from there on), never past a gap."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_len = batch, max_len
        self.filled = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int):
        t = k.shape[2]
        self.k[layer][:, :, pos:pos + t] = k
        self.v[layer][:, :, pos:pos + t] = v
        self.filled = pos + t
        return self.k[layer][:, :, :pos + t], self.v[layer][:, :, :pos + t]


class ConcatKVCache:
    """Functional cache for graph export: past tensors in, past+new ("present") out."""

    def __init__(self, past_k: list[torch.Tensor], past_v: list[torch.Tensor]):
        self.past_k, self.past_v = past_k, past_v
        self.present_k: list[torch.Tensor | None] = [None] * len(past_k)
        self.present_v: list[torch.Tensor | None] = [None] * len(past_v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int):
        k_all = torch.cat([self.past_k[layer], k], dim=2)
        v_all = torch.cat([self.past_v[layer], v], dim=2)
        self.present_k[layer], self.present_v[layer] = k_all, v_all
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        gpt2 = cfg.arch == "gpt2"
        qkv_bias = gpt2 or cfg.qkv_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=gpt2)
        self.use_rope = not gpt2

    def forward(self, x, rope, mask, cache, layer: int, pos: int):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, pos)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn_mask, is_causal = mask
        y = _sdpa(q, k, v, attn_mask, is_causal, cached=cache is not None)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


# SDPA backends for cached CUDA steps: all but cuDNN attention, which torch prefers on Hopper
# but which builds a new execution plan for every new key length, and a cached decode step's
# key length grows by one per token (public reports: tens of ms per build; an H100 run of
# bench/gpu_calm_check.py generated at 9.8 tokens/s). Flash / memory-efficient need no plans.
_CACHED_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, attn_mask, is_causal: bool, cached: bool):
    if cached and q.is_cuda and not torch.compiler.is_compiling():
        with sdpa_kernel(_CACHED_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gpt2 = cfg.arch == "gpt2"
        if self.gpt2:
            self.fc = nn.Linear(cfg.dim, cfg.ffn_dim)
            self.proj = nn.Linear(cfg.ffn_dim, cfg.dim)
        else:
            self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
            self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
            self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        if self.gpt2:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)) if cfg.arch == "gpt2" else \
            (lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.attn_norm, self.attn = norm(), Attention(cfg)
        self.mlp_norm, self.mlp = norm(), MLP(cfg)

    def forward(self, x, rope, mask, cache, layer, pos):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer, pos)
        return x + self.mlp(self.mlp_norm(x))


def positions_from_mask(attention_mask: torch.Tensor | None, b: int, t: int, pos: int,
                        device) -> torch.Tensor:
    """Position ids (B, T) of the newest T tokens: left padding does not advance positions."""
    if attention_mask is None:
        return torch.arange(pos, pos + t, device=device).expand(b, t)
    p = attention_mask.long().cumsum(-1) - 1
    return p.clamp(min=0)[:, -t:]


def self_attention_mask(attention_mask: torch.Tensor | None, t: int, pos: int,
                        device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for SDPA. The mask is (B, 1, T, pos+T) bool: causal and not padded.
    Without padding no mask is built: a prefill is plain causal, and one new token sees the
    whole cache. Each query may always see itself, so a padded query row is never empty (no
    NaN); real tokens never see padded keys."""
    if attention_mask is None and pos == 0:
        return None, True
    if attention_mask is None and t == 1:
        return None, False
    s = pos + t
    i = torch.arange(pos, s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    allowed = (j <= i)[None, None]
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :s]) | (j == i)[None, None]
    return allowed, False


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if not isinstance(cfg, DecoderConfig):
            raise TypeError(f"Decoder expects a DecoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.arch == "gpt2" else \
            RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.cache: StaticKVCache | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cfg.arch == "llama" and self.rope_cos.dtype == torch.float64:
            # .double() cast the float32 tables up, float32's rounding included: recompute them
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                   torch.float64)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def setup_cache(self, batch_size: int, max_len: int | None = None,
                    dtype: torch.dtype | None = None) -> StaticKVCache:
        """Allocate the static KV cache for `batch_size` sequences of up to `max_len` tokens."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"cache batch size must be a positive int, got {batch_size!r}")
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise ValueError(f"cache length must be an int, got {max_len!r}")
        if not 0 < max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]")
        own = self.tok_emb.weight.dtype
        if dtype is not None and dtype != own:
            # The attention reads the cache with this model's activations: one dtype for both
            # (convert the model with .to(dtype) instead).
            raise ValueError(f"cache dtype must be the model's dtype {own}, got {dtype!r} (to decode in "
                             f"another floating dtype, convert the model with .to())")
        self.cache = StaticKVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len,
                                   self.cfg.head_dim, own, self.device)
        return self.cache

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cache=None, pos: int = 0, taps=(), after_block: dict[int, Callable] | None = None,
                stop_after: int | None = None, validate: bool = True):
        """Run the stack over `tokens` (B, T), the newest T tokens of their sequences.

        attention_mask: (B, pos+T) bool over every position so far, True = real token
          (None = no padding). cache: a StaticKVCache/ConcatKVCache; `pos` = number of
          tokens already in it. taps: block indices whose outputs to return.
          after_block: {block index: f(h) -> h} applied to that block's output; index -1 is
          the embedding output (the input to block 0).
          stop_after: run blocks 0..stop_after only and return no logits.
        Returns logits (B, T, vocab), or (logits or None, {tap: state}) when taps are asked.
        """
        if validate:
            check_tokens(tokens, self.cfg.vocab_size, "tokens")
            if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
                raise ValueError(f"pos must be a non-negative int (tokens already in the cache), got {pos!r}")
            attention_mask = check_attention_mask(attention_mask, tokens, pos)
            limit = self.cfg.max_seq_len if cache is None or not hasattr(cache, "max_len") \
                else cache.max_len
            if pos + tokens.shape[1] > limit:
                raise ValueError(f"sequence of {pos + tokens.shape[1]} tokens exceeds the "
                                 f"{'cache' if cache is not None else 'max_seq_len'} limit of {limit}")
            if cache is not None and getattr(cache, "batch", tokens.shape[0]) != tokens.shape[0]:
                raise ValueError(f"batch of {tokens.shape[0]} does not match the cache's batch "
                                 f"of {cache.batch}")
            # Eager only: a compiled step would guard on the count and recompile at every pos.
            filled = None if torch.compiler.is_compiling() else getattr(cache, "filled", None)
            if filled is not None and pos > filled:
                raise ValueError(f"pos={pos} leaves a gap: the cache holds {filled} token(s), so the next "
                                 f"tokens go at pos <= {filled} (pos < {filled} rewrites from there)")
            if cache is None and pos != 0:
                raise ValueError(f"pos={pos} without a cache: pos counts the tokens already in a cache, "
                                 f"so it must be 0 when none is given")
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or not 0 <= stop_after < self.cfg.n_layers):
            raise ValueError(f"stop_after must be a block index in [0, {self.cfg.n_layers}), got {stop_after!r}")
        b, t = tokens.shape
        positions = positions_from_mask(attention_mask, b, t, pos, tokens.device)
        h = self.tok_emb(tokens)
        rope = None
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions)
        else:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        mask = self_attention_mask(attention_mask, t, pos, tokens.device)
        last = self.cfg.n_layers - 1 if stop_after is None else stop_after
        tapped = {}
        if after_block is not None and -1 in after_block:  # -1: the embedding output, input to block 0
            h = after_block[-1](h)
        for i in range(last + 1):
            h = self.layers[i](h, rope, mask, cache, i, pos)
            if after_block is not None and i in after_block:
                h = after_block[i](h)
            if i in taps:
                tapped[i] = h
        logits = None
        if stop_after is None:
            logits = self.lm_head(self.norm(h))
        return (logits, tapped) if taps else logits
