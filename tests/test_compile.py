"""torch.compile(fullgraph=True) traces the composed model: forward and training step equal eager;
a compiled cached decode step does not recompile at every position."""
import pytest
import torch

from test_calm import make_calm, rand_tokens, V


def test_compiled_forward_and_training_step_match_eager():
    torch._dynamo.reset()
    calm = make_calm("aligned", n_aug=1)
    x = rand_tokens(2, 12)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False

    def loss_fn(tokens, m):
        logits = calm(tokens[:, :-1], m)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))

    eager = loss_fn(x, mask)
    eager.backward()
    eager_grads = [p.grad.clone() for p in calm.trainable_parameters()]
    calm.zero_grad(set_to_none=True)
    compiled = torch.compile(loss_fn, fullgraph=True)(x, mask)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip((p.grad for p in calm.trainable_parameters()), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


_ANCHOR = _CACHE = None  # module globals, as a script's compiled step would reach them


def _step(t, pos):
    return _ANCHOR(t, cache=_CACHE, pos=pos)


def test_compiled_cached_decode_does_not_recompile_per_position():
    """A compiled cached decoder step (dynamic shapes) compiles for the prefill and once more
    for decode steps, not once per position: the cache's fill count is checked in eager calls
    only (a compiled step would guard on it: recompiled at every position until the limit,
    then a hard failure under fullgraph), and it stays right after compiled steps."""
    global _ANCHOR, _CACHE
    torch._dynamo.reset()
    _ANCHOR = make_calm("aligned", n_aug=1).anchor.eval()
    _CACHE = _ANCHOR.setup_cache(1, 24)
    compiles = []

    def count(gm, example_inputs):
        compiles.append(gm)
        return gm
    step = torch.compile(_step, backend=count, fullgraph=True, dynamic=True)
    tokens = rand_tokens(1, 16)
    with torch.no_grad():
        want = _ANCHOR(tokens)[:, -1]
        step(tokens[:, :4], 0)
        for pos in range(4, 15):
            step(tokens[:, pos:pos + 1], pos)
        got = _ANCHOR(tokens[:, 15:16], cache=_CACHE, pos=15)[:, -1]  # eager, after compiled steps
        assert len(compiles) <= 2, f"{len(compiles)} compilations for 12 steps"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="leaves a gap"):
            _ANCHOR(tokens[:, :1], cache=_CACHE, pos=18)


def test_compiled_bf16_attention_training_matches_eager():
    """The 16-bit training path (an fp32 output kept for the backward, cast down after the op)
    traces with fullgraph=True on the C++ backend and gives eager's gradients bit for bit."""
    import pytest
    from calm_fast import ops
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("calm_fast._C is not built")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=gen).bfloat16().requires_grad_() for _ in range(3))

    def loss(q, k, v):
        return ops.cross_attention(q, k, v, "aligned", None, "cpp").float().pow(2).sum()
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
