"""CALM composition: identity at init, causality, cached decoding, freezing, mapping, Θ_C I/O."""
import pytest
import torch

import calm_fast as cf
from calm_fast.ops import reference

V = 61


def make_decoder(arch="llama", dim=48, n_layers=4, n_heads=4, n_kv_heads=None, vocab=V, seed=0, max_seq_len=64):
    torch.manual_seed(seed)
    return cf.Decoder(cf.DecoderConfig(arch=arch, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                                       n_kv_heads=n_kv_heads, max_seq_len=max_seq_len))


def make_calm(mode="aligned", n_aug=1, randomize=True, seed=0):
    anchor = make_decoder("llama", dim=64, n_layers=8, n_heads=4, n_kv_heads=2, seed=seed)
    augs = [make_decoder("gpt2" if i % 2 else "llama", dim=32 + 16 * i, n_layers=4 + 4 * i, n_heads=2, seed=seed + 1 + i)
            for i in range(n_aug)]
    calm = cf.CALM(anchor, augs, mode=mode)
    if randomize:
        randomize_bridges(calm, seed)
    return calm


def randomize_bridges(calm, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in calm.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def rand_tokens(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def left_pad_mask(lengths, t):
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = True
    return mask


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- identity at init -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["aligned", "context"])
@pytest.mark.parametrize("n_aug", [1, 2])
def test_identity_at_init(mode, n_aug):
    calm = make_calm(mode, n_aug, randomize=False)
    x = rand_tokens(3, 13)
    kw = {"context": rand_tokens(3, 7, seed=5)} if mode == "context" else {}
    torch.testing.assert_close(calm(x, **kw), calm.anchor(x), atol=1e-6, rtol=0)


def test_bridges_change_output_once_trained():
    calm = make_calm("aligned", randomize=True)
    x = rand_tokens(2, 9)
    assert (calm(x) - calm.anchor(x)).abs().max() > 1e-3


# ---- causality ------------------------------------------------------------------------------
@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("n_aug", [1, 2])
def test_aligned_mode_is_causal(train_mode, n_aug):
    calm = make_calm("aligned", n_aug)
    calm.train(train_mode)
    x = rand_tokens(2, 16)
    base = calm(x)
    for t in (0, 5, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1 + torch.arange(2)) % V
        out = calm(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert (out[:, t:] - base[:, t:]).abs().max() > 0  # the change is seen from t on


def test_unmasked_cross_attention_would_leak():
    """The check above has power: without the causal mask (context mode fed the same text),
    logits before t do change — the leak of both public CALM implementations."""
    calm = make_calm("context")
    x = rand_tokens(2, 16)
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % V
    assert (calm(y, context=y)[:, :12] - calm(x, context=x)[:, :12]).abs().max() > 1e-4


# ---- cached decoding ------------------------------------------------------------------------
def run_cached(calm, seq, mask, prompt_len, **ctx):
    """Prefill the prompt, then feed the rest one token at a time; logits of every position."""
    b, t = seq.shape
    session = calm.start_session(b, t, **ctx)
    outs = [session.step(seq[:, :prompt_len], None if mask is None else mask[:, :prompt_len], 0)]
    for p in range(prompt_len, t):
        outs.append(session.step(seq[:, p:p + 1], None if mask is None else mask[:, :p + 1], p))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("mode", ["aligned", "context"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n_aug", [1, 2])
def test_cached_decoding_equals_full_recompute(mode, padded, n_aug):
    calm = make_calm(mode, n_aug).eval()
    seq = rand_tokens(3, 20, seed=3)
    mask = left_pad_mask([20, 14, 17], 20) if padded else None
    ctx = {}
    if mode == "context":
        ctx = {"context": rand_tokens(3, 9, seed=4),
               "context_mask": left_pad_mask([9, 5, 7], 9) if padded else None}
    cached = run_cached(calm, seq, mask, 6, **ctx)
    with torch.no_grad():
        full = calm(seq, mask, **ctx)
    keep = mask if mask is not None else torch.ones(seq.shape, dtype=torch.bool)
    assert rel_err(cached[keep], full[keep]) < 1e-5
    # and step by step: recomputing the prefix at each length gives the same last logits
    for p in (6, 11, 19):
        with torch.no_grad():
            pref = calm(seq[:, :p + 1], None if mask is None else mask[:, :p + 1], **ctx)
        rows = keep[:, p]
        assert rel_err(cached[rows, p], pref[rows, p]) < 1e-5


@pytest.mark.parametrize("mode", ["aligned", "context"])
def test_greedy_generate_equals_argmax_loop(mode):
    calm = make_calm(mode).eval()
    prompts = [[3, 9, 27, 4, 1, 8], [5, 2], [7, 7, 7, 1]]
    ctx = {}
    if mode == "context":
        ctx = {"context": rand_tokens(3, 5, seed=8), "context_mask": left_pad_mask([5, 3, 4], 5)}
    out = cf.generate(calm, prompts, max_new_tokens=12, **ctx)
    for i, p in enumerate(prompts):
        seq = torch.tensor([p])
        row_ctx = {}
        if mode == "context":
            m = ctx["context_mask"][i]
            row_ctx = {"context": ctx["context"][i:i + 1, m]}
        with torch.no_grad():
            for _ in range(12):
                nxt = calm(seq, **row_ctx)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        assert out[i, -(len(p) + 12):].tolist() == seq[0].tolist()


def test_generate_stops_at_eos_and_streams():
    calm = make_calm().eval()
    prompt = torch.tensor([[1, 2, 3]])
    first = cf.generate(calm, prompt, max_new_tokens=6)
    eos = int(first[0, 4])  # the second generated token
    got = []
    out = cf.generate(calm, prompt, max_new_tokens=6, eos_id=eos, callback=got.append)
    assert out[0, -1].item() == eos and out.shape[1] <= 5
    assert len(got) == out.shape[1] - 3


# ---- frozen bases ---------------------------------------------------------------------------
def test_bases_frozen_after_training():
    calm = make_calm("aligned", n_aug=2, randomize=False)
    before = {k: v.clone() for k, v in calm.state_dict().items() if not k.startswith("bridges.")}
    bridge_before = [p.detach().clone() for p in calm.trainable_parameters()]
    opt = torch.optim.AdamW(calm.trainable_parameters(), lr=1e-2)
    x = rand_tokens(2, 12)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(calm(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in calm.state_dict().items():
        if not k.startswith("bridges."):
            assert torch.equal(v, before[k]), k
    for name, p in calm.named_parameters():
        if not name.startswith("bridges."):
            assert p.grad is None and not p.requires_grad, name
    assert any(not torch.equal(a, b) for a, b in zip(bridge_before, calm.trainable_parameters()))
    assert {id(p) for p in calm.trainable_parameters()} == {id(p) for p in calm.bridges.parameters()}


def test_augment_runs_only_to_deepest_tap_without_autograd():
    calm = make_calm("aligned", randomize=False)
    calls = []
    for i, layer in enumerate(calm.augments[0].layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, out.requires_grad)))
    calm.augments[0].lm_head.register_forward_hook(lambda *a: calls.append(("head", None)))
    calm(rand_tokens(1, 5))
    deepest = max(a for a, _ in calm.mappings[0])
    assert [c[0] for c in calls] == list(range(deepest + 1))
    assert not any(rg for _, rg in calls)


# ---- several augments add up -----------------------------------------------------------------
def test_updates_of_several_augments_add_up():
    anchor = make_decoder("llama", dim=64, n_layers=4, n_heads=4)
    a1, a2 = make_decoder("llama", dim=32, n_layers=4, n_heads=2, seed=1), make_decoder("gpt2", dim=40, n_layers=4, n_heads=2, seed=2)
    calm = cf.CALM(anchor, [a1, a2], mapping=[[(3, 3)], [(1, 3)]])
    randomize_bridges(calm)
    x = rand_tokens(2, 10)
    with torch.no_grad():
        _, h = anchor(x, taps={3})
        h = h[3]
        _, s1 = a1(x, taps={3})
        _, s2 = a2(x, taps={1})
        deltas = []
        for br, s in ((calm.bridges[0][0], s1[3]), (calm.bridges[1][0], s2[1])):
            deltas.append(reference.bridge_forward(h, s, br.proj.weight, br.proj.bias, br.wq.weight, br.wk.weight,
                                                   br.wv.weight, br.wo.weight, br.n_heads) - h)
        expected = anchor.lm_head(anchor.norm(h + deltas[0] + deltas[1]))
        assert rel_err(calm(x), expected) < 1e-5


# ---- mapping --------------------------------------------------------------------------------
@pytest.mark.parametrize("n_a,n_b,expected", [
    (4, 8, [(3, 7)]),
    (8, 16, [(3, 7), (7, 15)]),
    (12, 24, [(3, 7), (7, 15), (11, 23)]),
    (24, 32, [(3, 4), (7, 9), (11, 15), (15, 20), (19, 25), (23, 31)]),
])
def test_default_mapping(n_a, n_b, expected):
    assert cf.default_mapping(n_a, n_b) == expected


def test_default_mapping_used_by_calm():
    calm = make_calm(n_aug=2, randomize=False)
    assert calm.mappings == [cf.default_mapping(4, 8), cf.default_mapping(8, 8)]


@pytest.mark.parametrize("mapping,match", [
    ([(4, 1)], "augment layer 4 is out of range"),
    ([(0, 8)], "anchor layer 8 is out of range"),
    ([(0, -2)], "anchor layer -2 is out of range"),
    ([(-1, 2)], "augment layer -1"),
    ([], "non-empty"),
    ([(1,)], "pair"),
])
def test_bad_explicit_mapping(mapping, match):
    with pytest.raises(ValueError, match=match):
        cf.CALM(make_decoder(n_layers=8), [make_decoder(n_layers=4)], mapping=mapping)


# ---- anchor layer -1: the bridge writes into the anchor's embedding output ---------------------
def make_embedding_calm(mode="aligned"):
    anchor = make_decoder("gpt2", dim=64, n_layers=3, n_heads=4, seed=7)
    calm = cf.CALM(anchor, [make_decoder("llama", dim=32, n_layers=4, n_heads=2, seed=8)],
                   mapping=[(3, -1), (1, 1)], mode=mode)
    randomize_bridges(calm, 3)
    return calm.eval()


def test_anchor_layer_minus_one_is_the_input_to_block_0():
    calm = make_embedding_calm()
    x = rand_tokens(2, 11, seed=9)
    emb = calm.anchor.tok_emb(x) + calm.anchor.pos_emb(torch.arange(11))
    states = calm.augment_states(x)[0]
    bridge = calm.bridges[0][0]
    seen = {}
    calm.anchor.layers[0].register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    with torch.no_grad():
        calm(x)
        expected = reference.bridge_forward(emb, states[3], bridge.proj.weight, bridge.proj.bias, bridge.wq.weight,
                                            bridge.wk.weight, bridge.wv.weight, bridge.wo.weight, bridge.n_heads,
                                            "aligned")
    torch.testing.assert_close(seen["h"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["aligned", "context"])
def test_anchor_layer_minus_one_cached_and_causal(mode):
    calm = make_embedding_calm(mode)
    seq = rand_tokens(2, 14, seed=10)
    ctx = {"context": rand_tokens(2, 6, seed=11)} if mode == "context" else {}
    with torch.no_grad():
        full = calm(seq, **ctx)
    assert rel_err(run_cached(calm, seq, None, 5, **ctx), full) < 1e-5
    if mode == "aligned":
        y = seq.clone()
        y[:, 8] = (y[:, 8] + 1) % V
        with torch.no_grad():
            torch.testing.assert_close(calm(y)[:, :8], full[:, :8], atol=0, rtol=0)


# ---- bad input ------------------------------------------------------------------------------
def test_vocab_mismatch_is_an_error():
    with pytest.raises(ValueError, match="vocab_size 50 .* anchor has 61"):
        cf.CALM(make_decoder(), [make_decoder(vocab=50)])


@pytest.mark.parametrize("tokens,err,match", [
    (torch.tensor([[1, 2, V]]), ValueError, f"token id {V}"),
    (torch.tensor([[1, -2, 3]]), ValueError, "negative"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(1, 65, dtype=torch.long), ValueError, "max_seq_len"),
    ([[1, 2]], TypeError, "torch.Tensor"),
])
def test_bad_tokens(tokens, err, match):
    calm = make_calm(randomize=False)
    with pytest.raises(err, match=match):
        calm(tokens)


def test_bad_generate_arguments():
    calm = make_calm(randomize=False)
    with pytest.raises(ValueError, match="at least one token"):
        cf.generate(calm, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        cf.generate(calm, [[1, 2]], max_new_tokens=63)
    with pytest.raises(ValueError, match="top_p"):
        cf.generate(calm, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="context"):
        cf.generate(calm, [[1, 2]], max_new_tokens=2, context=torch.tensor([[1]]))


def test_context_mode_needs_context():
    calm = make_calm("context", randomize=False)
    with pytest.raises(ValueError, match="needs context"):
        calm(rand_tokens(1, 4))


# ---- Θ_C save / load ------------------------------------------------------------------------
def test_save_load_bridges_roundtrip(tmp_path):
    calm = make_calm(n_aug=2)
    calm.save_bridges(tmp_path)
    other = make_calm(n_aug=2, randomize=False)
    other.load_bridges(tmp_path)
    x = rand_tokens(2, 8)
    torch.testing.assert_close(other(x), calm(x), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridges.safetensors", "calm_config.json"]


def test_save_load_bridges_with_an_embedding_bridge(tmp_path):
    calm = make_embedding_calm()
    calm.save_bridges(tmp_path)
    other = cf.CALM(calm.anchor, calm.augments, mapping=[(3, -1), (1, 1)])
    other.load_bridges(tmp_path)
    x = rand_tokens(2, 8)
    torch.testing.assert_close(other(x), calm(x), atol=0, rtol=0)
    assert cf.CompositionConfig.from_json((tmp_path / "calm_config.json").read_text()).mappings == [[(3, -1), (1, 1)]]


def test_load_bridges_rejects_wrong_shapes(tmp_path):
    from calm_fast import checkpoint
    calm = make_calm()
    calm.save_bridges(tmp_path)
    tensors = checkpoint.load_tensors(tmp_path / "bridges.safetensors")
    tensors["0.0.wq.weight"] = torch.zeros(3, 3)
    checkpoint.save_tensors(tmp_path / "bridges.safetensors", tensors)
    with pytest.raises(ValueError, match=r"0\.0\.wq\.weight.*shape \(3, 3\)"):
        calm.load_bridges(tmp_path)


def test_load_bridges_rejects_other_composition(tmp_path):
    make_calm(n_aug=2).save_bridges(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        make_calm(n_aug=1).load_bridges(tmp_path)


def test_load_bridges_rejects_truncated_file(tmp_path):
    calm = make_calm()
    calm.save_bridges(tmp_path)
    f = tmp_path / "bridges.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="bridges.safetensors"):
        calm.load_bridges(tmp_path)


def test_state_dict_nests_in_other_modules():
    class Wrapper(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.calm = make_calm(seed=seed)
            self.head = torch.nn.Linear(2, 2)

    a, b = Wrapper(0), Wrapper(1)
    b.load_state_dict(a.state_dict())
    x = rand_tokens(1, 6)
    torch.testing.assert_close(b.calm(x), a.calm(x), atol=0, rtol=0)
    assert any(k.startswith("calm.bridges.0.0.") for k in a.state_dict())


@pytest.mark.parametrize("mode", ["aligned", "context"])
def test_given_augment_states_equal_computed(mode):
    calm = make_calm(mode, n_aug=2)
    x = rand_tokens(2, 9)
    src = rand_tokens(2, 6, seed=9) if mode == "context" else x
    cmask = left_pad_mask([6, 4], 6) if mode == "context" else None
    states = calm.augment_states(src, cmask)
    kw = {"context": src, "context_mask": cmask} if mode == "context" else {}
    want = calm(x, **kw)
    got = calm(x, augment_states=states, context_mask=cmask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    bad = [dict(s) for s in states]
    layer = next(iter(bad[0]))
    bad[0][layer] = bad[0][layer][:, :3] if mode == "aligned" else bad[0][layer][:1]
    with pytest.raises(ValueError, match=rf"augment_states\[0\]\[{layer}\] has shape"):
        calm(x, augment_states=bad, context_mask=cmask)
