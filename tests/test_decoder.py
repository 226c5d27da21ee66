"""The decoder on its own: config validation, cached decoding = full recomputation (with left
padding), input errors, and generation (greedy = argmax loop, sampling restrictions, EOS)."""
from __future__ import annotations

import pytest
import torch

import calm_fast
from calm_fast import Decoder, DecoderConfig
from calm_fast.generate import left_pad, sample_next

VOCAB = 61
ATOL = 1e-5  # fp32 max abs logit error; logits here are O(1)


def _model(arch: str, seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = dict(arch=arch, vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=48)
    if arch == "llama":
        cfg.update(n_kv_heads=2, qkv_bias=True)  # GQA, and biases so they are exercised
    cfg.update(kw)
    model = Decoder(DecoderConfig(**cfg)).eval()
    # The default init (std 0.02) gives near-flat logits; larger weights make argmax and
    # cache errors visible.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


ARCHS = ["llama", "gpt2"]


def _padded_batch(seed=0, t=9):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, t), generator=g)
    mask = torch.ones(3, t, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :t - 2] = False
    return tokens, mask


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw,exc,match", [
    (dict(dim=66, n_heads=4), ValueError, "dim=66 is not divisible by n_heads=4"),
    (dict(n_heads=4, n_kv_heads=3), ValueError, "n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(vocab_size=0), ValueError, "vocab_size must be positive, got 0"),
    (dict(n_layers=-2), ValueError, "n_layers must be positive, got -2"),
    (dict(max_seq_len=0), ValueError, "max_seq_len must be positive, got 0"),
    (dict(n_kv_heads=0), ValueError, "n_kv_heads must be positive, got 0"),
    (dict(norm_eps=0.0), ValueError, "norm_eps must be positive, got 0.0"),
    (dict(arch="bert"), ValueError, "arch must be one of .* got 'bert'"),
    (dict(dim=64.0), TypeError, "dim must be an int, got float 64.0"),
    (dict(n_heads=True), TypeError, "n_heads must be an int, got bool True"),
    (dict(tie_embeddings="yes"), TypeError, "tie_embeddings must be a bool, got 'yes'"),
    (dict(arch="gpt2", n_kv_heads=2), ValueError, "n_kv_heads must equal n_heads"),
])
def test_config_validation(kw, exc, match):
    base = dict(vocab_size=10, dim=64, n_layers=1, n_heads=4)
    with pytest.raises(exc, match=match):
        DecoderConfig(**{**base, **kw})


def test_decoder_wants_a_config():
    with pytest.raises(TypeError, match="DecoderConfig, got dict"):
        Decoder({"dim": 8})


def test_config_json_round_trip():
    cfg = DecoderConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8)
    assert DecoderConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown DecoderConfig field.*'dims'"):
        DecoderConfig.from_dict({**cfg.to_dict(), "dims": 3})


def test_explicit_head_dim_and_tied_embeddings():
    model = _model("llama", head_dim=16, tie_embeddings=True)  # n_heads*head_dim != dim
    assert model.layers[0].attn.wq.weight.shape == (4 * 16, 32)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, VOCAB)


# --------------------------------------------------------------------------- cached decoding

def _cached_logits(model, tokens, mask, prefill: int):
    """Logits of every position, computed by a prefill of `prefill` tokens then one-token steps
    through the static cache."""
    model.setup_cache(tokens.shape[0], tokens.shape[1])
    m = None if mask is None else mask[:, :prefill]
    out = [model(tokens[:, :prefill], m, cache=model.cache, pos=0)]
    for pos in range(prefill, tokens.shape[1]):
        m = None if mask is None else mask[:, :pos + 1]
        out.append(model(tokens[:, pos:pos + 1], m, cache=model.cache, pos=pos))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_equals_full_recompute(arch, padded):
    model = _model(arch)
    tokens, mask = _padded_batch(t=12)
    if not padded:
        mask = None
    with torch.no_grad():
        full = model(tokens, mask)
        cached = _cached_logits(model, tokens, mask, prefill=5)
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
    assert torch.isfinite(full).all()
    assert full.abs().max() > 0.5
    assert (full - cached)[real].abs().max() <= ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_does_not_change_a_row(arch):
    """A padded row gives the logits it would give alone: pad tokens are invisible and do not
    advance positions."""
    model = _model(arch, seed=1)
    tokens, mask = _padded_batch(seed=1)
    with torch.no_grad():
        batch = model(tokens, mask)
        for i in range(tokens.shape[0]):
            alone = model(tokens[i:i + 1, mask[i]])
            assert (batch[i, mask[i]] - alone[0]).abs().max() <= ATOL
    # The control: the same row read with the padding as real tokens differs.
    with torch.no_grad():
        assert (model(tokens[1:2])[0, 3:] - batch[1, 3:]).abs().max() > 1e-3


def test_taps_after_block_and_stop_after():
    model = _model("llama")
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        ref = model(tokens)
        logits, taps = model(tokens, taps=(0, 1))
        assert torch.equal(logits, ref) and set(taps) == {0, 1}
        none, taps0 = model(tokens, taps=(0,), stop_after=0)
        assert none is None and torch.equal(taps0[0], taps[0])
        shifted = model(tokens, after_block={0: lambda h: h + 1.0})
        assert not torch.allclose(shifted, ref)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("tokens,exc,match", [
    (torch.tensor([[1, VOCAB]]), ValueError, f"token id {VOCAB}, out of range for vocab_size={VOCAB}"),
    (torch.tensor([[1, -1]]), ValueError, r"negative token id \(-1\)"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids, got dtype torch.float32"),
    (torch.zeros(1, 49, dtype=torch.long), ValueError, "49 tokens exceeds the max_seq_len limit of 48"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, r"empty: shape \(1, 0\)"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"2-D \(batch, seq\), got shape \(4,\)"),
    ([[1, 2]], TypeError, "torch.Tensor of token ids, got list"),
])
def test_bad_tokens(tokens, exc, match):
    with pytest.raises(exc, match=match):
        _model("gpt2")(tokens)


def test_bad_attention_mask_and_cache_use():
    model = _model("llama")
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* \(2, 4\), got \(2, 3\)"):
        model(tokens, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer 0/1, got torch.float32"):
        model(tokens, torch.ones(2, 4))
    cache = model.setup_cache(2, 6)
    with pytest.raises(ValueError, match="batch of 1 does not match the cache's batch of 2"):
        model(tokens[:1], cache=cache)
    with pytest.raises(ValueError, match="8 tokens exceeds the cache limit of 6"):
        model(tokens, cache=cache, pos=4)
    with pytest.raises(ValueError, match=r"cache length 49 must be in \[1, max_seq_len=48\]"):
        model.setup_cache(1, 49)


# --------------------------------------------------------------------------- generation

def _argmax_loop(model, tokens, mask, n):
    seq, m = tokens, mask
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq, m)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if m is not None:
                m = torch.cat([m, torch.ones_like(nxt, dtype=torch.bool)], dim=1)
    return seq


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_argmax_loop(arch):
    model = _model(arch, seed=2)
    tokens, mask = _padded_batch(seed=2)
    out = calm_fast.generate(model, tokens, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(out, _argmax_loop(model, tokens, mask, 12))
    assert len(set(out[:, 9:].flatten().tolist())) > 3  # not a degenerate repeat of one token
    unpadded = calm_fast.generate(model, tokens[:1], max_new_tokens=12)
    assert torch.equal(unpadded, _argmax_loop(model, tokens[:1], None, 12))
    # Lists of prompts of different lengths are left padded the same way.
    prompts = [tokens[i, mask[i]].tolist() for i in range(3)]
    from_lists = calm_fast.generate(model, prompts, max_new_tokens=12, pad_id=0)
    assert torch.equal(from_lists[:, 9:], out[:, 9:])


def test_sampling_restrictions_reduce_to_greedy():
    model = _model("llama", seed=3)
    tokens, mask = _padded_batch(seed=3)
    greedy = calm_fast.generate(model, tokens, max_new_tokens=10, attention_mask=mask)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        g = torch.Generator().manual_seed(0)
        out = calm_fast.generate(model, tokens, max_new_tokens=10, attention_mask=mask,
                                 temperature=1.5, generator=g, **kw)
        assert torch.equal(out, greedy), kw


def test_seeded_sampling_is_reproducible():
    model = _model("gpt2", seed=4)
    prompt = torch.randint(0, VOCAB, (2, 4))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return calm_fast.generate(model, prompt, max_new_tokens=20, temperature=2.0, generator=g)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))  # 40 draws near-uniform over 61 tokens


def test_sample_next_draws_only_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, generator=g)
    logits[0, [3, 7, 11]] += 20.0  # three dominant tokens
    top3 = set(logits[1].topk(3).indices.tolist())
    probs = torch.softmax(logits[1], -1)
    order = probs.argsort(descending=True)
    # The nucleus for top_p=0.5: the smallest prefix of the ranking holding half the mass.
    k = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    nucleus = set(order[:k].tolist())
    many = lambda row: logits[row:row + 1].expand(2000, -1)  # 2000 draws in one call
    seen_k = set(sample_next(many(1), 1.0, top_k=3, generator=g).tolist())
    seen_p = set(sample_next(many(1), 1.0, top_p=0.5, generator=g).tolist())
    seen_row0 = set(sample_next(many(0), 1.0, top_k=5, generator=g).tolist())
    assert seen_k == top3
    assert seen_p == nucleus and len(nucleus) < 30
    assert seen_row0 <= {3, 7, 11} | set(logits[0].topk(5).indices.tolist())


def test_eos_stops_generation():
    model = _model("llama", seed=5)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    greedy = calm_fast.generate(model, prompt, max_new_tokens=16)[0, 5:].tolist()
    k = 3
    eos = greedy[k]
    first = greedy.index(eos)  # may come earlier than k
    out = calm_fast.generate(model, prompt, max_new_tokens=16, eos_id=eos)
    assert out[0, 5:].tolist() == greedy[:first + 1]
    # In a batch, a finished row keeps emitting EOS while the others go on.
    other = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([prompt, other])
    other_greedy = calm_fast.generate(model, other, max_new_tokens=16)[0, 5:].tolist()
    out = calm_fast.generate(model, batch, max_new_tokens=16, eos_id=eos)
    n = out.shape[1] - 5
    assert out[0, 5:first + 6].tolist() == greedy[:first + 1]
    assert (out[0, first + 6:] == eos).all()
    assert out[1, 5:].tolist()[:n] == other_greedy[:n]


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative int, got -1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    (dict(top_k=0), "top_k must be a positive int or None, got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] or None, got 0.0"),
    (dict(eos_id=VOCAB), f"eos_id {VOCAB} is out of range"),
    (dict(max_new_tokens=45), "prompt of 4 tokens \\+ max_new_tokens=45 exceeds max_seq_len=48"),
])
def test_generate_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        calm_fast.generate(_model("gpt2"), torch.zeros(1, 4, dtype=torch.long), **kw)


def test_left_pad():
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


def test_float64_model_keeps_float64_precision():
    """Regression (audit, session 10): RMSNorm and RoPE computed in float32 (x.float()) and the
    RoPE tables kept float32's rounding after .double(), so a float64 model was only float32
    accurate (~5e-8 off), silently: it is the ground truth some checks hold float32 kernels to."""
    from calm_fast.decoder import RMSNorm, apply_rope, rope_tables
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, dtype=torch.float64, generator=gen)
    norm = RMSNorm(16, 1e-5).double()
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert (norm(x) - exact).abs().max().item() <= 1e-14
    xq = torch.randn(1, 1, 4, 8, dtype=torch.float64, generator=gen)
    ang = torch.rand(1, 1, 4, 8, dtype=torch.float64, generator=gen)
    rot = torch.cat([-xq[..., 4:], xq[..., :4]], -1)
    want = xq * ang.cos() + rot * ang.sin()
    assert (apply_rope(xq, ang.cos(), ang.sin()) - want).abs().max().item() <= 1e-14
    cfg = DecoderConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, max_seq_len=64)
    model = Decoder(cfg).double()
    cos64, sin64 = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, torch.float64)
    assert torch.equal(model.rope_cos, cos64) and torch.equal(model.rope_sin, sin64)
    assert model.float().rope_cos.dtype == torch.float32  # and back: the float32 tables
    assert torch.equal(model.rope_cos, rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)[0])
    # 16-bit and float32 activations still normalise in float32 (unchanged)
    xb = x.float().bfloat16()
    assert torch.equal(RMSNorm(16, 1e-5)(xb), (xb.float() * torch.rsqrt(
        xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16())
