"""calm_fast.hf.load_hf against transformers: tiny random Llama / Mistral / Qwen2 / GPT-2 built
offline, saved with save_pretrained, loaded back. Parity is fp32 max absolute logit error
<= 1e-4 (logits here are O(1..10)); greedy generation must match token for token."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import calm_fast
from calm_fast.hf import config_from_hf, load_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-4
VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="eager")


def _llama():
    # A non-default theta, so a loader that ignores it fails parity.
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rope_theta=1234.0))


def _mistral():
    # Window below max_position_embeddings: the loader caps max_seq_len at 64 (with a warning).
    return transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=64))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="eager"))


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """HF inits biases to zero and norms to one, which would hide a wrongly mapped bias or
    norm; random values everywhere make every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sliding-window")
        return load_hf(path, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (HF model, checkpoint dir), each built and saved once."""
    out = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        model = build().float().eval()
        assert model.config._attn_implementation == "eager"
        _randomize(model, i)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (model, d)
    return out


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :7] = False
    tokens[~mask] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask=None):
    kw = {}
    if mask is not None:  # the positions ours uses: cumsum(mask) - 1, clamped at 0
        kw = dict(attention_mask=mask.long(), position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(tokens, **kw).logits


def _max_err(a, b, mask=None):
    if mask is not None:
        a, b = a[mask], b[mask]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers(saved, name):
    hf, d = saved[name]
    ours = _load(d)
    assert ours.cfg.tie_embeddings == (name in ("qwen2", "gpt2"))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(tokens)
    ref = _hf_logits(hf, tokens)
    assert ref.abs().max() > 1.0  # logits far from flat, so argmax comparisons mean something
    assert _max_err(got, ref) <= ATOL

    tokens, mask = _padded_batch()
    with torch.no_grad():
        got = ours(tokens, mask)
    assert _max_err(got, _hf_logits(hf, tokens, mask), mask) <= ATOL


@pytest.mark.parametrize("name", list(BUILDERS))
def test_greedy_generation_matches_transformers(saved, name):
    hf, d = saved[name]
    ours = _load(d)
    tokens, mask = _padded_batch(seed=2)
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask.long(), do_sample=False, max_new_tokens=32,
                          min_new_tokens=32, pad_token_id=0, eos_token_id=None)
    got = calm_fast.generate(ours, tokens, max_new_tokens=32, attention_mask=mask)
    assert got.shape == ref.shape == (3, 42)
    assert torch.equal(got, ref)


def test_sharded_checkpoint(saved, tmp_path):
    hf, _ = saved["llama"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = _load(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert _max_err(ours(tokens), _hf_logits(hf, tokens)) <= ATOL


def test_sharded_missing_shard_and_wrong_index(saved, tmp_path):
    hf, _ = saved["llama"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # The index lists a tensor under a shard that does not hold it.
    wm = index["weight_map"]
    name = next(k for k, v in wm.items() if v == shards[0])
    wm[name] = shards[1]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{name}.*{shards[1]}|{shards[1]}.*{name}"):
        load_hf(tmp_path)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(ValueError, match=f"shard file .*{shards[1]}.* is missing"):
        load_hf(tmp_path)


def test_dtype_and_device_arguments(saved):
    hf, d = saved["qwen2"]
    ours = _load(d, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.rope_cos.dtype == torch.float32  # RoPE tables stay fp32, as in Decoder
    assert ours.lm_head.weight is ours.tok_emb.weight
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        err = _max_err(ours(tokens).float(), _hf_logits(hf, tokens))
    assert err < 0.1 * _hf_logits(hf, tokens).abs().max()
    with pytest.raises(TypeError, match="dtype"):
        load_hf(d, dtype=torch.int32)


# --------------------------------------------------------------------------- config styles

def _rewrite_config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def llama_copy(saved, tmp_path):
    hf, d = saved["llama"]
    dst = tmp_path / "llama"
    shutil.copytree(d, dst)
    return hf, dst


def test_config_5x_and_4x_styles_load_the_same(llama_copy):
    hf, d = llama_copy
    cfg5 = json.loads((d / "config.json").read_text())
    assert cfg5["rope_parameters"]["rope_theta"] == 1234.0 and "rope_theta" not in cfg5
    tokens = torch.randint(0, VOCAB, (2, 12))
    ref = _hf_logits(hf, tokens)
    with torch.no_grad():
        assert _max_err(_load(d)(tokens), ref) <= ATOL

    def to_4x(cfg):
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg["transformers_version"] = "4.46.0"
    _rewrite_config(d, to_4x)
    ours = _load(d)
    assert ours.cfg.rope_theta == 1234.0
    with torch.no_grad():
        assert _max_err(ours(tokens), ref) <= ATOL


@pytest.mark.parametrize("key,block,word", [
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}, "linear"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}, "llama3"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "dynamic"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
])
def test_unsupported_rope_is_refused(llama_copy, key, block, word):
    _, d = llama_copy
    _rewrite_config(d, lambda cfg: cfg.update({key: block}))
    with pytest.raises(ValueError, match=f"config.json.*{word}"):
        load_hf(d)


def test_sliding_window_caps_max_seq_len(saved):
    _, d = saved["mistral"]
    with pytest.warns(UserWarning, match="sliding-window.*capped at 64"):
        ours = load_hf(d)
    assert ours.cfg.max_seq_len == 64
    with pytest.raises(ValueError, match="65 tokens exceeds"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    base = json.loads((d / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no window, or one no smaller than the context: silent
        assert config_from_hf({**base, "sliding_window": None}).max_seq_len == 128
        assert config_from_hf({**base, "sliding_window": 4096}).max_seq_len == 128
        qwen = {**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 16}
        assert config_from_hf(qwen).max_seq_len == 128
    with pytest.warns(UserWarning, match="capped at 16"):
        assert config_from_hf({**qwen, "use_sliding_window": True}).max_seq_len == 16
    # No sliding_window key at all is transformers' default window of 4096, not "no window".
    long = {**base, "max_position_embeddings": 8192}
    for cfg in ({k: v for k, v in long.items() if k != "sliding_window"},
                {k: v for k, v in {**long, "model_type": "qwen2", "use_sliding_window": True}.items()
                 if k != "sliding_window"}):
        with pytest.warns(UserWarning, match="capped at 4096"):
            assert config_from_hf(cfg).max_seq_len == 4096


def test_rope_theta_comes_from_the_block_transformers_reads(saved):
    """transformers takes `rope_scaling or rope_parameters`, then the top-level rope_theta."""
    _, d = saved["mistral"]
    base = {**json.loads((d / "config.json").read_text()), "sliding_window": None}
    base.pop("rope_parameters", None)
    both = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
            "rope_scaling": {"rope_type": "default", "rope_theta": 777.0}}
    assert config_from_hf(both).rope_theta == 777.0
    no_theta = {**base, "rope_theta": 321.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
                "rope_scaling": {"rope_type": "default"}}
    assert config_from_hf(no_theta).rope_theta == 321.0
    assert config_from_hf({**both, "rope_scaling": None}).rope_theta == 5000.0


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_attention_heads": 5}, "config.json: .*n_heads=5"),
    ({"hidden_size": None}, "missing required key 'hidden_size'"),
])
def test_bad_config_is_refused(saved, edit, match):
    base = json.loads((saved["llama"][1] / "config.json").read_text())
    with pytest.raises(ValueError, match=match):
        config_from_hf({**base, **edit}, "config.json")


def test_gpt2_unsupported_options(saved):
    base = json.loads((saved["gpt2"][1] / "config.json").read_text())
    for edit in ({"activation_function": "relu"}, {"scale_attn_by_inverse_layer_idx": True},
                 {"scale_attn_weights": False}):
        with pytest.raises(ValueError, match=next(iter(edit))):
            config_from_hf({**base, **edit})


# --------------------------------------------------------------------------- bad files

def _rewrite_weights(d, edit):
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_pickle_only_directory_is_refused(saved, tmp_path):
    hf, d = saved["llama"]
    shutil.copy(d / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # never read back
    with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickles"):
        load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "nope")


def test_truncated_file_is_refused(llama_copy):
    _, d = llama_copy
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_hf(d)
    f.write_bytes(data[:20])  # header itself cut
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_hf(d)


def test_missing_tensor_is_refused(llama_copy):
    _, d = llama_copy
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'layers.1.mlp.up_proj.weight'"):
        load_hf(d)


def test_missing_untied_lm_head_is_refused(llama_copy):
    _, d = llama_copy
    _rewrite_weights(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        load_hf(d)


def test_wrong_shape_is_refused(llama_copy):
    _, d = llama_copy
    _rewrite_weights(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj"
                                         r".weight' has shape \(64, 64\), expected \(32, 64\)"):
        load_hf(d)


def test_gpt2_fused_qkv_wrong_shape_is_refused(saved, tmp_path):
    shutil.copytree(saved["gpt2"][1], tmp_path / "g")
    _rewrite_weights(tmp_path / "g", lambda t: t.update(
        {"transformer.h.0.attn.c_attn.weight": torch.zeros(192, 64)}))  # Linear layout, not Conv1D
    with pytest.raises(ValueError, match=r"c_attn.weight' has shape \(192, 64\), expected \(64, 192\)"):
        load_hf(tmp_path / "g")


def test_non_float_tensor_is_refused(llama_copy):
    _, d = llama_copy
    _rewrite_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(ValueError, match="model.safetensors: tensor 'model.norm.weight' has dtype I32"):
        load_hf(d)


def test_unexpected_tensor_is_refused_but_known_buffers_are_ignored(llama_copy):
    hf, d = llama_copy
    _rewrite_weights(d, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert _max_err(_load(d)(tokens), _hf_logits(hf, tokens)) <= ATOL
    _rewrite_weights(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(8)}))
    with pytest.raises(ValueError, match="model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_hf(d)


def test_tied_lm_head_copy_must_equal_embedding(saved, tmp_path):
    shutil.copytree(saved["qwen2"][1], tmp_path / "q")
    d = tmp_path / "q"
    _rewrite_weights(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert _load(d).lm_head.weight is not None  # an equal stored copy is fine
    _rewrite_weights(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from the embedding"):
        load_hf(d)
