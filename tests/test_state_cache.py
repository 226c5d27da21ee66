"""Augment-state caching: cached training reproduces the uncached path; bad caches are refused."""
import pytest
import torch

from calm_fast.composed import CALM
from calm_fast.decoder import Decoder
from calm_fast.demo import model_config
from calm_fast.distributed import StepSampler, theta_c
from calm_fast.state_cache import StateCache, build_state_cache, drop_augment_weights, forward_with_states
from calm_fast.tasks.kv_arith import SCALES, KVArith, collate, prompt_context
from calm_fast.train import TrainConfig, answer_loss, fit

torch.set_num_threads(1)
TASK = KVArith(SCALES["tiny"])


def _calm(mode="aligned", seed=0):
    torch.manual_seed(seed)
    m_A = Decoder(model_config(TASK, "m_A", "tiny"))
    m_B = Decoder(type(m_A.cfg).from_dict({**model_config(TASK, "m_B", "tiny").to_dict(), "n_layers": 3}))
    calm = CALM(m_B, [m_A], mapping=[(0, 0), (1, 1), (1, 2)], mode=mode)
    torch.manual_seed(seed + 1)
    for p in calm.bridges.parameters():  # W_o off zero: the states must matter to the loss
        torch.nn.init.normal_(p, std=0.2)
    return calm


def _data(n=12):
    return TASK.sample("kv_arithmetic", "held_in", n, "cache-test")


def _seqs(ex, mode):
    return [e.prompt if mode == "context" else e.prompt + e.answer for e in ex]


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("mode", ["aligned", "context"])
def test_cache_states_fp32_forward_equals_uncached(tmp_path, mode):
    calm, ex = _calm(mode), _data()
    build_state_cache(calm, _seqs(ex, mode), tmp_path / "c", dtype="float32", batch_size=5)
    cache = StateCache(tmp_path / "c", calm)
    idx = [7, 2, 11, 0]
    batch = [ex[i] for i in idx]
    tokens, mask, _ = collate(batch, TASK.tok.pad_id)
    if mode == "aligned":
        states, _ = cache.batch(idx, tokens=tokens, pad_to=tokens.shape[1])
        got = forward_with_states(calm, tokens, states)
        ref = calm(tokens)
    else:
        ctx, cmask = prompt_context(batch)
        states, smask = cache.batch(idx, tokens=ctx, pad_to=ctx.shape[1])
        assert torch.equal(smask, cmask)
        got = forward_with_states(calm, tokens, states, states_mask=smask)
        ref = calm(tokens, context=ctx, context_mask=cmask)
    keep = mask | torch.roll(mask, 1, 1)  # real positions (pads after the last are never read)
    assert _rel(got[keep], ref[keep]) < 1e-5
    assert abs(answer_loss(got, tokens, mask) - answer_loss(ref, tokens, mask)) < 1e-5 * answer_loss(ref, tokens, mask)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cache_states_half_storage_within_1e_2(tmp_path, dtype):
    calm, ex = _calm(), _data()
    build_state_cache(calm, _seqs(ex, "aligned"), tmp_path / "c", dtype=dtype)
    cache = StateCache(tmp_path / "c", calm)
    elem = 2
    assert (tmp_path / "c" / "aug0_layer1.bin").stat().st_size == cache.index["rows"] * calm.augments[0].cfg.dim * elem
    tokens, mask, _ = collate(ex, TASK.tok.pad_id)
    states, _ = cache.batch(range(len(ex)), tokens=tokens, pad_to=tokens.shape[1])
    ref_logits, got_logits = calm(tokens), forward_with_states(calm, tokens, states)
    ref, got = answer_loss(ref_logits, tokens, mask), answer_loss(got_logits, tokens, mask)
    assert abs(got - ref) / ref < 1e-2
    assert not torch.equal(got_logits, ref_logits)  # it really went through half precision


def test_cache_states_training_matches_uncached_over_10_steps(tmp_path):
    ex = _data(16)
    cfg = TrainConfig(steps=10, batch_size=4, lr=3e-3, warmup=2, log_every=1, progress=False)
    sampler = StepSampler(len(ex), cfg.batch_size, seed=1)
    runs = {}
    for cached in (False, True):
        calm = _calm()
        cache = None
        if cached:
            build_state_cache(calm, _seqs(ex, "aligned"), tmp_path / "c", dtype="float32")
            cache = StateCache(tmp_path / "c", calm)
            drop_augment_weights(calm)  # proves m_A never runs again

        def step_loss(step, micro, calm=calm, cache=cache):
            idx = sampler.global_indices(step, micro)
            tokens, mask, _ = collate([ex[i] for i in idx], TASK.tok.pad_id)
            if cache is None:
                logits = calm(tokens)
            else:
                states, _ = cache.batch(idx, tokens=tokens, pad_to=tokens.shape[1])
                logits = forward_with_states(calm, tokens, states)
            return answer_loss(logits, tokens, mask), tokens.numel()

        recs = fit(theta_c(calm), step_loss, cfg, modules=[calm])
        runs[cached] = [r["loss"] for r in recs]
    assert len(runs[True]) == 10 and runs[True][-1] < runs[True][0]
    for a, b in zip(runs[True], runs[False]):
        assert abs(a - b) / b < 1e-5, (runs[True], runs[False])


def test_cache_states_refuses_mismatched_or_damaged_caches(tmp_path):
    calm, ex = _calm(), _data()
    path = tmp_path / "c"
    build_state_cache(calm, _seqs(ex, "aligned"), path, dtype="bfloat16")
    with pytest.raises(FileExistsError):
        build_state_cache(calm, _seqs(ex, "aligned"), path)
    with pytest.raises(ValueError, match="dtype"):
        build_state_cache(calm, _seqs(ex, "aligned"), tmp_path / "d", dtype="int8")
    cache = StateCache(path, calm)
    tokens, _, _ = collate(ex[:2], TASK.tok.pad_id)
    with pytest.raises(ValueError, match="do not match"):
        cache.batch([1, 0], tokens=tokens)  # the right tokens, the wrong indices
    with pytest.raises(ValueError, match="out of range"):
        cache.batch([len(ex)])
    with pytest.raises(ValueError, match="weights differ"):
        StateCache(path, _calm(seed=5))  # same shapes, another m_A
    with pytest.raises(ValueError, match="mode"):
        StateCache(path, _calm(mode="context"))
    states, _ = cache.batch([0, 1], pad_to=tokens.shape[1])
    with pytest.raises(ValueError, match="shape"):
        forward_with_states(calm, tokens[:, :-1], states)
    with pytest.raises(ValueError, match="no state for augment layer"):
        forward_with_states(calm, tokens, [{0: states[0][0]}])
    f = path / "aug0_layer1.bin"
    f.write_bytes(f.read_bytes()[:-2])  # truncated layer file
    with pytest.raises(ValueError, match="bytes, expected"):
        StateCache(path)


def test_bad_sequences_and_indices_are_refused(tmp_path):
    """Regression: bad ids and too-long sequences gave a bare IndexError from inside the augment
    model, float ids were truncated, batch([]) raised numpy's reduction error and batch([1.9])
    read example 1."""
    calm = _calm()
    vocab, limit = calm.anchor.cfg.vocab_size, calm.augments[0].cfg.max_seq_len
    for seqs, exc, match in (([[1, 2, vocab]], ValueError, f"sequence 0 holds token id {vocab}, out of range"),
                             ([[1, 2], [1, -2]], ValueError, r"sequence 1 holds a negative token id \(-2\)"),
                             ([[1] * (limit + 1)], ValueError, f"more than the augment models' max_seq_len={limit}"),
                             ([[1.7, 2.2]], TypeError, "sequence 0 holds 1.7"),
                             ([[1, True]], TypeError, "sequence 0 holds True"),
                             ([torch.tensor([1.0, 2.0])], TypeError, "int64/int32 tensor"),
                             ([[]], ValueError, "non-empty")):
        with pytest.raises(exc, match=match):
            build_state_cache(calm, seqs, tmp_path / "bad", dtype="float32")
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.building").exists()
    path = build_state_cache(calm, [[1, 2, 3], torch.tensor([4, 5])], tmp_path / "ok", dtype="float32")
    cache = StateCache(path, calm)
    with pytest.raises(ValueError, match="indices is empty"):
        cache.batch([])
    for bad in ([1.9], [True], torch.tensor([1.0])):
        with pytest.raises(TypeError, match="indices"):
            cache.batch(bad)
    with pytest.raises(TypeError, match="pad_to"):
        cache.batch([0], pad_to=4.5)
    assert cache.batch(range(2))[1].tolist() == [[True, True, True], [True, True, False]]
