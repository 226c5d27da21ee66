"""Runtime limits: sequences past max_seq_len, batches past an allocated cache, token ids out
of range, empty prompts, bad sampling arguments: clear errors. Generation always stops."""
from __future__ import annotations

import math

import pytest
import torch

from calm_fast import CALM, Decoder, DecoderConfig, generate, ops, stream

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
    # Regression: int16/int8/uint8 ids passed the check, then nn.Embedding raised a RuntimeError.
    (torch.tensor([[1, 2]], dtype=torch.int16), TypeError, r"got dtype torch.int16 \(expected torch.int64 or torch.int32\)"),
    (torch.tensor([[1, 2]], dtype=torch.int8), TypeError, "got dtype torch.int8"),
    (torch.tensor([[1, 2]], dtype=torch.uint8), TypeError, "got dtype torch.uint8"),
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


# ------------------------------------------------ the bridge ops: one check for every backend

def _decode_args(b=2, h=4, d_b=32, d_a=16, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    return dict(h_b=r(b, 1, d_b), h_a=r(b, 1, d_a), w_q=r(d_b, d_b), w_kv=r(2 * d_b, d_a), b_kv=r(2 * d_b),
                w_o=r(d_b, d_b), k_cache=torch.zeros(b, h, s, d_b // h), v_cache=torch.zeros(b, h, s, d_b // h),
                pos=2, n_heads=h, key_padding_mask=None)


BAD_DECODE = [
    (dict(h_a=torch.randn(1, 1, 16)), ValueError, r"h_a must be \(B, 1, D_A\) with B=2"),
    (dict(h_b=torch.randn(1, 1, 32)), ValueError, "k_cache must have shape"),
    (dict(key_padding_mask=torch.ones(2, 1, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, S\)"),
    (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask must be a bool"),
    (dict(pos=True), TypeError, "pos must be an int"),
    (dict(pos=2.0), TypeError, "pos must be an int"),
    (dict(pos=8), ValueError, "pos=8 is outside"),
    (dict(n_heads=0), ValueError, "n_heads must be a positive int"),
    (dict(n_heads=True), ValueError, "n_heads must be a positive int"),
    (dict(n_heads=3), ValueError, "not a multiple of n_heads=3"),
    (dict(h_b=torch.zeros(2, 1, 0), w_q=torch.zeros(0, 0), w_kv=torch.zeros(0, 16), b_kv=torch.zeros(0),
          w_o=torch.zeros(0, 0), k_cache=torch.zeros(2, 2, 8, 0), v_cache=torch.zeros(2, 2, 8, 0)),
     ValueError, "D_B=0 must be positive"),  # passed 0 % n_heads; ZeroDivisionError on triton, reference
    (dict(h_a=torch.randn(2, 1, 16, dtype=torch.float64)), TypeError, "h_a has dtype torch.float64"),
    (dict(w_kv=torch.randn(64, 15)), ValueError, "w_kv must have shape"),
    (dict(w_q=torch.randn(32, 16)), ValueError, "w_q must have shape"),
]


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
@pytest.mark.parametrize("bad,exc,match", BAD_DECODE)
def test_decode_step_checks_inputs_on_every_backend(backend, bad, exc, match):
    """Regression: the reference and sdpa backends broadcast a batch-1 h_a over a batch-2 cache,
    a (B, 1) mask over (B, S) rows, took pos=True as 1 and divided by n_heads=0."""
    args = {**_decode_args(), **bad}
    k_before = args["k_cache"].clone()
    with pytest.raises(exc, match=match):
        ops.bridge_decode_step(**args, backend=backend)
    assert torch.equal(args["k_cache"], k_before), "a refused decode step wrote into the cache"


def test_decode_step_accepts_good_inputs():
    for backend in ops.available_backends("cpu"):
        args = _decode_args()
        assert ops.bridge_decode_step(**args, backend=backend).shape == (2, 1, 32)
        args = {**_decode_args(), "h_a": None, "w_kv": None, "b_kv": None, "pos": 8}  # context mode
        assert ops.bridge_decode_step(**args, backend=backend).shape == (2, 1, 32)


def _forward_args(b=1, t=3, d_b=8, d_a=4):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(h_b=r(b, t, d_b), h_a=r(b, t, d_a), w_proj=r(d_b, d_a), b_proj=r(d_b), w_q=r(d_b, d_b),
                w_k=r(d_b, d_b), w_v=r(d_b, d_b), w_o=r(d_b, d_b), n_heads=2)


BAD_FORWARD = [
    (dict(residual=torch.randn(3, 3, 8)), ValueError, r"residual must have shape \(1, 3, 8\)"),
    (dict(n_heads=0), ValueError, "n_heads must be a positive int"),
    (dict(n_heads=3), ValueError, "not a multiple of n_heads=3"),
    (dict(h_a=torch.randn(2, 3, 4)), ValueError, "h_a batch 2 differs from h_b batch 1"),
    (dict(w_proj=torch.randn(8, 5)), ValueError, "w_proj must have shape"),
    (dict(h_b=torch.ones(1, 3, 8, dtype=torch.long)), TypeError, "h_b must be a floating-point"),
]


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
@pytest.mark.parametrize("bad,exc,match", BAD_FORWARD)
def test_bridge_forward_checks_inputs(backend, bad, exc, match):
    """Regression: a batch-3 residual broadcast a batch-1 bridge; n_heads=0 raised
    ZeroDivisionError, n_heads=3 a reshape RuntimeError."""
    with pytest.raises(exc, match=match):
        ops.bridge_forward(**{**_forward_args(), **bad}, backend=backend)


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_cross_attention_head_dim_zero_is_refused(backend):
    """Regression: the reference backend raised ZeroDivisionError, sdpa returned an empty tensor."""
    q = torch.randn(1, 1, 2, 0)
    with pytest.raises(ValueError, match="head dim must be > 0"):
        ops.cross_attention(q, q, q, "aligned", None, backend)


# --------------------------------------------------------- CALM / Decoder / Bridge arguments

def test_aligned_mode_checks_every_augments_max_seq_len():
    """Regression: only the anchor's max_seq_len was checked; an augment with a shorter one
    raised IndexError from its position table (gpt2) or RoPE table (llama)."""
    torch.manual_seed(0)
    anchor = Decoder(DecoderConfig(**{**CFG, "max_seq_len": 16}))
    for arch in ("gpt2", "llama"):
        aug = Decoder(DecoderConfig(**{**CFG, "arch": arch, "dim": 8, "n_layers": 4, "max_seq_len": 8}))
        with pytest.raises(ValueError, match="exceeds augment model 0's max_seq_len=8"):
            CALM(anchor, aug)(torch.zeros(1, 10, dtype=torch.long))


def test_cache_dtype_must_be_the_models(models):
    """Regression: start_session(dtype=bf16) / setup_cache(dtype=bf16) on an fp32 model built
    the cache, then SDPA failed on the first step."""
    anchor, calm, _ = models
    for dtype in (torch.bfloat16, torch.int64):
        with pytest.raises(ValueError, match="session dtype must be the CALM's dtype torch.float32"):
            calm.start_session(1, 4, dtype=dtype)
        with pytest.raises(ValueError, match="cache dtype must be the model's dtype torch.float32"):
            anchor.setup_cache(1, 4, dtype)
    calm.start_session(1, 4, dtype=torch.float32)  # its own dtype: fine


def test_cached_pos_must_not_leave_a_gap(models):
    """Regression: pos=6 after 3 cached tokens attended to 3 never-written (zero) rows:
    silently wrong logits. Rewriting from an earlier position stays allowed."""
    anchor, calm, _ = models
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    cache = anchor.setup_cache(1, 8)
    anchor(x[:, :3], cache=cache, pos=0)
    with pytest.raises(ValueError, match="pos=6 leaves a gap: the cache holds 3"):
        anchor(x[:, 3:4], cache=cache, pos=6)
    anchor(x[:, 2:3], cache=cache, pos=2)  # rewrite position 2: the cache now holds 3 again
    out = anchor(x[:, 3:6], cache=cache, pos=3)
    torch.testing.assert_close(out, anchor(x)[:, 3:6])
    session = calm.start_session(1, 8)
    session.step(x[:, :3], None, 0)
    with pytest.raises(ValueError, match="leaves a gap"):
        session.step(x[:, 3:4], None, 6)
    torch.testing.assert_close(session.step(x[:, 3:6], None, 3), calm(x)[:, 3:6])


def test_small_argument_errors():
    """Regression: each of these crashed with a ZeroDivisionError / RuntimeError / IndexError,
    was accepted, or named the wrong problem."""
    from calm_fast.bridge import Bridge
    for heads in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="n_heads must be a positive int"):
            Bridge(4, 8, heads)
    torch.manual_seed(0)
    d = Decoder(DecoderConfig(**CFG))
    with pytest.raises(ValueError, match="pos=3 without a cache"):
        d(torch.ones(1, 4, dtype=torch.long), pos=3)
    for stop in (2, -1, 1.0):
        with pytest.raises(ValueError, match=r"stop_after must be a block index in \[0, 2\)"):
            d(torch.ones(1, 4, dtype=torch.long), stop_after=stop)
    for batch in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="cache batch size must be a positive int"):
            d.setup_cache(batch, 4)
    augs = [Decoder(DecoderConfig(**{**CFG, "dim": 8, "n_layers": 4})) for _ in range(2)]
    calm = CALM(d, augs, mapping=[None, [(3, 1)]])  # None: the default for that augment
    assert calm.mappings == [[(3, 1)], [(3, 1)]]
    with pytest.raises(ValueError, match="augment model 0 is torch.bfloat16 on cpu but the anchor is torch.float32 on cpu"):
        CALM(d, Decoder(DecoderConfig(**{**CFG, "dim": 8})).to(torch.bfloat16))
    calm = CALM(d, augs[0])
    calm.anchor.to(torch.bfloat16)  # converted after construction
    try:
        with pytest.raises(ValueError, match="augment model 0 is torch.float32 but the anchor is torch.bfloat16"):
            calm(torch.ones(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="augment model 0 is torch.float32"):
            calm.start_session(1, 4)
    finally:
        calm.anchor.to(torch.float32)


# ------------------------------------------------------------------------------ generation

def test_generate_refuses_inputs_it_used_to_misread(models):
    """Regression: float ids were truncated (1.7 -> 1), eos_id=1.5 was accepted, and generate()
    ignored an attention_mask given with list prompts (stream() refused it)."""
    anchor = models[0]
    with pytest.raises(TypeError, match="token ids must be ints, got 1.7 in prompt 0"):
        generate(anchor, [[1.7, 2.9, 3.2]], max_new_tokens=2)
    with pytest.raises(TypeError, match="token ids must be ints"):
        generate(anchor, [[1, True]], max_new_tokens=2)
    with pytest.raises(TypeError, match="token ids must be ints, got 1.5 in the prompt"):
        generate(anchor, [1, 1.5], max_new_tokens=2)
    for eos in (1.5, True):
        with pytest.raises(ValueError, match="eos_id must be an int token id"):
            generate(anchor, [[1, 2, 3]], max_new_tokens=2, eos_id=eos)
    for fn in (generate, lambda *a, **k: list(stream(*a, **k))):
        with pytest.raises(ValueError, match="attention_mask is built from the prompt lists"):
            fn(anchor, [[1, 2, 3]], max_new_tokens=2, attention_mask=torch.ones(1, 3, dtype=torch.bool))


def test_generate_refuses_right_padding(models):
    """Regression: with a right-padded mask the short row's next token was read at a pad
    position: silently different tokens than the same prompt alone."""
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    for mask, row in (([[1, 1, 1, 1], [1, 1, 0, 0]], 1), ([[1, 0, 1, 1], [1, 1, 1, 1]], 0),
                      ([[0, 0, 0, 0], [1, 1, 1, 1]], 0)):
        for model in models[:2]:
            with pytest.raises(ValueError, match=rf"row\(s\) \[{row}\] are not left-padded"):
                generate(model, prompt, max_new_tokens=2, attention_mask=torch.tensor(mask).bool())
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).bool()
    for model in models[:2]:
        batch = generate(model, left, max_new_tokens=4, attention_mask=mask)[1, 4:]
        assert torch.equal(batch, generate(model, [[9, 10]], max_new_tokens=4)[0, 2:])


def test_tiny_temperature_is_greedy_not_a_crash():
    """Regression: logits / 1e-45 overflowed to inf, so softmax gave NaN and multinomial raised."""
    from calm_fast.generate import sample_next
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [10.0, -10.0, 9.0, 0.0]])
    for t in (1e-45, 1e-30, 5e-324):
        assert sample_next(logits, temperature=t).tolist() == [1, 0]


# ------------------------------------------------------------------------------ TrainConfig

@pytest.mark.parametrize("kw,match", [
    (dict(min_lr_ratio=-3.0), r"min_lr_ratio must be a number in \[0, 1\], got -3.0"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"), (dict(min_lr_ratio=math.nan), "min_lr_ratio"),
    (dict(lr=math.inf), "lr must be a finite number > 0"), (dict(lr=0.0), "lr must be"),
    (dict(lr=math.nan), "lr must be"), (dict(lr=True), "lr must be"), (dict(lr="1e-3"), "lr must be"),
    (dict(clip=math.nan), "clip must be a finite number >= 0"), (dict(clip=-1.0), "clip"), (dict(clip=None), "clip"),
    (dict(betas=(0.9,)), "betas must be a pair of numbers in"), (dict(betas=(1.5, 0.9)), "betas"),
    (dict(betas=0.9), "betas"), (dict(betas=(0.9, math.nan)), "betas"),
    (dict(weight_decay=-5.0), "weight_decay must be a finite number >= 0"), (dict(weight_decay=math.inf), "weight_decay"),
])
def test_train_config_refuses_bad_optimizer_settings(kw, match):
    """Regression: these were accepted; min_lr_ratio=-3 made the cosine schedule's lr negative
    and fit() climbed the gradient."""
    from calm_fast.train import TrainConfig
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw, progress=False)


def test_train_config_keeps_valid_settings():
    from calm_fast.train import TrainConfig
    cfg = TrainConfig(lr=1, min_lr_ratio=0, clip=0, weight_decay=0, betas=[0, 0.999], progress=False)
    assert cfg.betas == (0.0, 0.999) and TrainConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------ LoRA

def test_lora_misuse_is_refused():
    """Regression: a second add_lora froze the first adapters and returned []; rank=1.5/True
    failed inside torch.empty; rank_for_budget on a model without targets divided by zero."""
    from calm_fast import lora
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**CFG))
    first = lora.add_lora(model, 2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(model, 2)
    assert first and all(p.requires_grad for p in first)
    for rank in (1.5, True, 0, -1):
        with pytest.raises(ValueError, match="LoRA rank must be a positive int"):
            lora.add_lora(Decoder(DecoderConfig(**CFG)), rank)
    with pytest.raises(ValueError, match="alpha"):
        lora.LoRALinear(torch.nn.Linear(2, 2), 1, alpha=math.nan)
    empty = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="no LoRA target layers"):
        lora.rank_for_budget(empty, 100)
    with pytest.raises(ValueError, match="no LoRA target layers"):
        lora.add_lora(empty, 1)
    with pytest.raises(ValueError, match="n_params must be a positive int"):
        lora.rank_for_budget(Decoder(DecoderConfig(**CFG)), 0)
