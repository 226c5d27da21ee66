"""Runtime limits: sequences past max_seq_len, batches past an allocated cache, token ids out
of range, empty prompts, bad sampling arguments: clear errors. Generation always stops."""
from __future__ import annotations

import math

import pytest
import torch

from calm_fast import CALM, Decoder, DecoderConfig, generate, stream

torch.set_num_threads(1)
CFG = dict(vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=12)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    anchor = Decoder(DecoderConfig(**CFG))
    aug = Decoder(DecoderConfig(**{**CFG, "dim": 8, "n_layers": 4}))
    calm = CALM(anchor, aug)
    ctx = CALM(anchor, aug, mode="context")
    return anchor, calm, ctx


BAD_TOKENS = [
    (torch.tensor([[1, 32]]), ValueError, "32, out of range"),
    (torch.tensor([[1, -1]]), ValueError, "negative"),
    (torch.tensor([[2**40]]), ValueError, "out of range"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer"),
    (torch.tensor([[True]]), TypeError, "integer"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(0, 3, dtype=torch.long), ValueError, "empty"),
    (torch.tensor([1, 2]), ValueError, "2-D"),
    ([[1, 2]], TypeError, "torch.Tensor"),
    (torch.zeros(1, 13, dtype=torch.long), ValueError, "max_seq_len"),
]


@pytest.mark.parametrize("tokens,exc,match", BAD_TOKENS)
def test_bad_tokens_forward(models, tokens, exc, match):
    for model in models[:2]:
        with pytest.raises(exc, match=match):
            model(tokens)


def test_context_mode_limits(models):
    _, _, ctx = models
    tok = torch.tensor([[1, 2]])
    for context, match in ((torch.tensor([[40]]), "out of range"), (torch.zeros(1, 0, dtype=torch.long), "empty"),
                           (torch.zeros(1, 13, dtype=torch.long), "max_seq_len"),
                           (torch.zeros(2, 3, dtype=torch.long), "batch")):
        with pytest.raises(ValueError, match=match):
            ctx(tok, context=context)
    with pytest.raises(ValueError, match="needs context"):
        ctx(tok)


def test_cache_limits(models):
    anchor, calm, _ = models
    cache = anchor.setup_cache(2, 6)
    with pytest.raises(ValueError, match="batch of 3 does not match the cache's batch of 2"):
        anchor(torch.zeros(3, 2, dtype=torch.long), cache=cache, pos=0)
    with pytest.raises(ValueError, match="exceeds the cache limit of 6"):
        anchor(torch.zeros(2, 4, dtype=torch.long), cache=cache, pos=3)
    with pytest.raises(ValueError, match="cache length"):
        anchor.setup_cache(1, 13)
    session = calm.start_session(2, 6)
    with pytest.raises(ValueError, match="batch"):
        session.step(torch.zeros(3, 1, dtype=torch.long), None, 0)
    session.step(torch.zeros(2, 5, dtype=torch.long), None, 0)
    with pytest.raises(ValueError, match="limit of 6"):
        session.step(torch.zeros(2, 2, dtype=torch.long), None, 5)


def test_negative_pos_is_refused(models):
    anchor = models[0]
    cache = anchor.setup_cache(1, 6)
    with pytest.raises(ValueError, match="pos"):
        anchor(torch.tensor([[1]]), cache=cache, pos=-1)


BAD_GENERATE = [
    (dict(prompt=[]), "at least one token"),
    (dict(prompt=[[1, 2], []]), "at least one token"),
    (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (dict(prompt=[[1, 99]]), "out of range"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=10), "exceeds max_seq_len"),
    (dict(max_new_tokens=10**9), "exceeds max_seq_len"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(eos_id=32), "eos_id"),
    (dict(eos_id=-1), "eos_id"),
]


@pytest.mark.parametrize("kw,match", BAD_GENERATE)
def test_bad_generate_arguments(models, kw, match):
    kw = {"prompt": [[1, 2, 3]], "max_new_tokens": 4, **kw}
    for model in models[:2]:
        with pytest.raises(ValueError, match=match):
            generate(model, **kw)


@pytest.mark.parametrize("temperature", [math.nan, math.inf])
def test_non_finite_temperature_is_refused(models, temperature):
    with pytest.raises(ValueError, match="temperature"):
        generate(models[0], [[1, 2, 3]], max_new_tokens=2, temperature=temperature)


def test_generation_always_stops(models):
    anchor, calm, ctx = models
    # Length limit: exactly max_new_tokens new tokens, up to max_seq_len in total.
    for model in (anchor, calm):
        out = generate(model, [[1, 2, 3]], max_new_tokens=9)
        assert out.shape == (1, 12)
        assert generate(model, [[1]], max_new_tokens=0).shape == (1, 1)
    out = generate(ctx, [[1, 2]], max_new_tokens=5, context=torch.tensor([[3, 4, 5]]))
    assert out.shape == (1, 7)
    # EOS: all logits equal, so greedy picks token 0; with eos_id=0 generation stops at once.
    with torch.no_grad():
        saved = anchor.lm_head.weight.clone()
        anchor.lm_head.weight.zero_()
    try:
        out = generate(anchor, [[1, 2]], max_new_tokens=8, eos_id=0)
        assert out.tolist() == [[1, 2, 0]]
        steps = list(stream(anchor, [[1, 2], [3]], max_new_tokens=8, eos_id=0))
        assert len(steps) == 1
    finally:
        with torch.no_grad():
            anchor.lm_head.weight.copy_(saved)


def test_nan_weights_do_not_hang_or_crash(models):
    """Garbage weights (NaN everywhere) still end generation at the length limit; sampling
    reports a clear error instead of crashing."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**CFG))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    out = generate(model, [[1, 2]], max_new_tokens=4)
    assert out.shape == (1, 6) and int(out.min()) >= 0 and int(out.max()) < 32
    with pytest.raises(RuntimeError):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0)
