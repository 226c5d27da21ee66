"""Loading untrusted files: only safetensors and JSON are read, pickle is refused without
being opened, every config field is validated, and a bad file gives an error naming the file
(and the tensor). Checkpoints are built here without transformers (HF names, safetensors)."""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from calm_fast import CALM, CompositionConfig, Decoder, DecoderConfig, load_hf, train
from calm_fast.hf import _weight_map

torch.set_num_threads(1)
CFG = dict(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, max_seq_len=16)
HF_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24,
             "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _hf_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**CFG, norm_eps=1e-5))
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for e in _weight_map(model.cfg):
        name = e.hf if e.hf == "lm_head.weight" else "model." + e.hf
        out[name] = params[e.ours[0]].detach().clone()
    return out


def _write_hf(root: Path, tensors=None, config=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(HF_CONFIG if config is None else config))
    save_file(_hf_tensors() if tensors is None else tensors, str(root / "model.safetensors"))
    return root


@pytest.fixture
def hf_dir(tmp_path):
    return _write_hf(tmp_path / "ckpt")


def test_good_checkpoint_loads(hf_dir):
    model = load_hf(hf_dir)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)


# ----------------------------------------------------------------------------- pickle

class _Payload:
    """Unpickling this creates a file: proof that something was unpickled."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.ckpt", "weights.pth",
                                  "model.pkl"])
def test_pickle_only_directory_is_refused_unopened(tmp_path, name):
    root = tmp_path / "ckpt"
    root.mkdir()
    marker = tmp_path / "EXECUTED"
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    (root / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match=r"pickle.*never unpickles"):
        load_hf(root)
    assert not marker.exists(), "a pickle file was unpickled"


def test_pickle_beside_safetensors_is_ignored(hf_dir, tmp_path):
    marker = tmp_path / "EXECUTED"
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    load_hf(hf_dir)
    assert not marker.exists()


def test_pickle_named_safetensors_is_refused(hf_dir, tmp_path):
    marker = tmp_path / "EXECUTED"
    (hf_dir / "model.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf(hf_dir)
    assert not marker.exists()


# ----------------------------------------------------------------------------- config

BAD_DECODER_FIELDS = [
    ("vocab_size", 0), ("vocab_size", -5), ("vocab_size", 3.0), ("vocab_size", "32"), ("vocab_size", True),
    ("vocab_size", None), ("vocab_size", 2**40), ("dim", 15), ("dim", 0), ("n_layers", 0), ("n_layers", 1.5),
    ("n_heads", 0), ("n_heads", 3), ("n_kv_heads", 0), ("n_kv_heads", 3), ("n_kv_heads", 4),
    ("ffn_dim", 0), ("ffn_dim", -1), ("max_seq_len", 0), ("max_seq_len", 2**62), ("norm_eps", 0.0),
    ("norm_eps", -1e-5), ("norm_eps", math.nan), ("norm_eps", math.inf), ("norm_eps", "1e-5"),
    ("rope_theta", 0), ("rope_theta", math.nan), ("rope_theta", math.inf), ("rope_theta", True),
    ("tie_embeddings", 1), ("tie_embeddings", "false"), ("qkv_bias", None), ("head_dim", 0),
    ("head_dim", 7), ("head_dim", 2.0), ("arch", "gpt3"), ("arch", None), ("arch", 1),
]


@pytest.mark.parametrize("field,value", BAD_DECODER_FIELDS)
def test_bad_decoder_config_field(field, value):
    with pytest.raises((TypeError, ValueError), match=field if field not in ("dim", "n_heads") else "dim|n_heads"):
        DecoderConfig(**{**CFG, field: value})


def test_decoder_config_consistency():
    with pytest.raises(ValueError, match="gpt2"):
        DecoderConfig(arch="gpt2", vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1)
    with pytest.raises(ValueError, match="unknown DecoderConfig field"):
        DecoderConfig.from_dict({**CFG, "rope_scaling": 2.0})
    with pytest.raises(TypeError, match="JSON object"):
        DecoderConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="invalid DecoderConfig JSON"):
        DecoderConfig.from_json("{not json")


BAD_COMPOSITION = [
    {"mode": "sideways"}, {"anchor_dim": -1}, {"anchor_dim": 16.0}, {"anchor_heads": "2"},
    {"anchor_dim": 10, "anchor_heads": 3}, {"augment_dims": [0], "mappings": [[[0, 1]]]},
    {"augment_dims": [8], "mappings": [[[0.7, 1]]]}, {"augment_dims": [8], "mappings": [[[-1, 1]]]},
    {"augment_dims": [8], "mappings": [[[0, 1, 2]]]}, {"augment_dims": [8], "mappings": [[["0", 1]]]},
    {"augment_dims": [8], "mappings": [[]]}, {"augment_dims": [8], "mappings": [[[0, 1], [0, 1]]]},
    {"augment_dims": [8], "mappings": []}, {"augment_dims": 8, "mappings": [[[0, 1]]]},
    {"augment_dims": [8], "mappings": [[[True, 1]]]},
]


@pytest.mark.parametrize("fields", BAD_COMPOSITION)
def test_bad_composition_config(fields):
    with pytest.raises((TypeError, ValueError)):
        CompositionConfig(**fields)


BAD_HF_CONFIGS = [
    ("not json", "config.json"), ("[1, 2]", "config.json"), ('"llama"', "config.json"),
    (json.dumps({**HF_CONFIG, "hidden_size": "16"}), "config.json"),
    (json.dumps({**HF_CONFIG, "num_hidden_layers": -2}), "config.json"),
    (json.dumps({**HF_CONFIG, "num_key_value_heads": 3}), "config.json"),
    (json.dumps({**HF_CONFIG, "max_position_embeddings": 10**30}), "config.json"),
    (json.dumps({**HF_CONFIG, "rms_norm_eps": None, "rope_theta": -1}), "config.json"),
    (json.dumps({**HF_CONFIG, "model_type": None}), "config.json"),
    ("\xff\xfe garbage", "config.json"),
]


@pytest.mark.parametrize("text,match", BAD_HF_CONFIGS)
def test_bad_hf_config_json(hf_dir, text, match):
    (hf_dir / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises((TypeError, ValueError), match=match):
        load_hf(hf_dir)


def test_missing_config_json(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(hf_dir)


# ----------------------------------------------------------------------------- safetensors

def _truncations(n: int) -> list[int]:
    return sorted({0, 1, 7, 8, 9, 20, n // 3, n // 2, n - 100, n - 1})


def test_truncated_safetensors_name_the_file(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    for cut in _truncations(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="model.safetensors"):
            load_hf(hf_dir)


def test_corrupt_safetensors_headers(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    first = next(k for k in header if k != "__metadata__")
    variants = {
        "huge header length": struct.pack("<Q", 2**63 - 1) + data[8:],
        "header not json": struct.pack("<Q", hlen) + b"{" * hlen + data[8 + hlen:],
        "random bytes": os.urandom(len(data)),
    }
    for what, edit in (("offsets past the end", {"data_offsets": [0, 10**12]}),
                       ("negative shape", {"shape": [-1, 16]}),
                       ("shape/offsets disagree", {"shape": [1000, 1000]}),
                       ("unknown dtype", {"dtype": "Q7"})):
        h = dict(header)
        h[first] = {**header[first], **edit}
        raw = json.dumps(h).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        variants[what] = struct.pack("<Q", len(raw)) + raw + data[8 + hlen:]
    for what, blob in variants.items():
        path.write_bytes(blob)
        with pytest.raises(ValueError, match="model.safetensors"):
            load_hf(hf_dir)


def test_missing_wrong_shape_and_dtype_name_file_and_tensor(tmp_path):
    good = _hf_tensors()
    name = "model.layers.1.self_attn.k_proj.weight"
    cases = {
        "missing": ({k: v for k, v in good.items() if k != name}, r"missing tensor 'layers.1.self_attn"),
        "shape": ({**good, name: torch.zeros(9, 16)}, rf"model.safetensors: tensor '{name}' has shape"),
        "transposed": ({**good, name: good[name].t().contiguous()}, rf"'{name}' has shape"),
        "int dtype": ({**good, name: torch.zeros(8, 16, dtype=torch.int32)}, rf"'{name}' has dtype"),
        "bool dtype": ({**good, name: torch.zeros(8, 16, dtype=torch.bool)}, rf"'{name}' has dtype"),
        "unexpected": ({**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, "unexpected tensor"),
    }
    for i, (what, (tensors, match)) in enumerate(cases.items()):
        root = _write_hf(tmp_path / f"c{i}", tensors)
        with pytest.raises(ValueError, match=match):
            load_hf(root)


def test_bad_shard_index(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "shard1.safetensors")
    index = hf_dir / "model.safetensors.index.json"
    for content, match in (("{", "not valid JSON"), ('{"weight_map": {}}', "weight_map"),
                           ('{"weight_map": {"x": "../../etc/passwd"}}', "outside"),
                           ('{"weight_map": {"x": "missing.safetensors"}}', "missing")):
        index.write_text(content)
        with pytest.raises(ValueError, match=match):
            load_hf(hf_dir)


# ------------------------------------------------------------------ bridges (Θ_C) files

def _calm():
    torch.manual_seed(0)
    anchor = Decoder(DecoderConfig(**CFG))
    aug = Decoder(DecoderConfig(**{**CFG, "dim": 8, "n_layers": 4}))
    return CALM(anchor, aug)


def test_bridge_files(tmp_path):
    calm = _calm()
    calm.save_bridges(tmp_path)
    ok = (tmp_path / "bridges.safetensors").read_bytes()
    for cut in _truncations(len(ok)):
        (tmp_path / "bridges.safetensors").write_bytes(ok[:cut])
        with pytest.raises(ValueError, match="bridges.safetensors"):
            calm.load_bridges(tmp_path)
    sd = {k: v.clone() for k, v in calm.bridges.state_dict().items()}
    name = next(iter(sd))
    for tensors, match in (({k: v for k, v in sd.items() if k != name}, "missing tensor"),
                           ({**sd, name: torch.zeros(3)}, rf"tensor '{name}' has shape"),
                           ({**sd, name: sd[name].to(torch.int64)}, rf"tensor '{name}' has dtype"),
                           ({**sd, "extra": torch.zeros(1)}, "unexpected tensor")):
        save_file(tensors, str(tmp_path / "bridges.safetensors"))
        with pytest.raises(ValueError, match="bridges.safetensors"):
            calm.load_bridges(tmp_path)
    (tmp_path / "calm_config.json").write_text("{")
    with pytest.raises(ValueError, match="calm_config.json"):
        calm.load_bridges(tmp_path)
    (tmp_path / "calm_config.json").write_text(json.dumps({"mode": "aligned", "mappings": [[[0.5, 1]]],
                                                           "augment_dims": [8]}))
    with pytest.raises((TypeError, ValueError)):
        calm.load_bridges(tmp_path)


# -------------------------------------------------------------- training checkpoints

def _train_state(tmp_path):
    params = {"w": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.zeros(3))}
    cfg = train.TrainConfig(steps=2, progress=False)
    opt = train.make_optimizer(params, cfg)
    ((params["w"].sum() + params["b"].sum()) ** 2).backward()
    opt.step()
    train.save_checkpoint(tmp_path, 1, params, opt)
    return params, cfg


def test_training_checkpoint_truncated_or_bad_json(tmp_path):
    params, cfg = _train_state(tmp_path)
    data = (tmp_path / "state.safetensors").read_bytes()
    for cut in _truncations(len(data)):
        (tmp_path / "state.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="state.safetensors"):
            train.load_checkpoint(tmp_path, params, train.make_optimizer(params, cfg))
    (tmp_path / "state.safetensors").write_bytes(data)
    # state.json is only a human-readable copy: the checkpoint is the one safetensors file.
    (tmp_path / "state.json").write_text("[")
    assert train.load_checkpoint(tmp_path, params, train.make_optimizer(params, cfg))["step"] == 1


@pytest.mark.parametrize("edit", ["missing", "broadcast_shape", "int_dtype", "meta_missing_keys"])
def test_training_checkpoint_bad_tensors_name_file_and_tensor(tmp_path, edit):
    params, cfg = _train_state(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = str(tmp_path / "state.safetensors")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    if edit == "missing":
        del tensors["param.w"]
    elif edit == "broadcast_shape":
        tensors["param.w"] = torch.ones(1, 3)  # broadcastable to (4, 3)
    elif edit == "int_dtype":
        tensors["param.w"] = torch.ones(4, 3, dtype=torch.int32)
    elif edit == "meta_missing_keys":
        metadata = {train.CKPT_META: json.dumps({"step": 1})}
    save_file(tensors, path, metadata=metadata)
    match = r"state\.safetensors.*(param\.w|metadata)"
    with pytest.raises(ValueError, match=match):
        train.load_checkpoint(tmp_path, params, train.make_optimizer(params, cfg))


def test_training_checkpoint_of_another_configuration_names_the_difference(tmp_path):
    # A run directory left by another configuration (here: one parameter more or less) must say
    # which parameters differ, not print two lists whose first entries are equal.
    params, cfg = _train_state(tmp_path)
    fewer = {"w": params["w"]}
    with pytest.raises(ValueError, match=r"state\.safetensors.*unexpected \['b'\].*another configuration"):
        train.load_checkpoint(tmp_path, fewer, train.make_optimizer(fewer, cfg))
    more = {**params, "extra": torch.nn.Parameter(torch.zeros(2))}
    with pytest.raises(ValueError, match=r"missing \['extra'\]"):
        train.load_checkpoint(tmp_path, more, train.make_optimizer(more, cfg))
    swapped = {"b": params["b"], "w": params["w"]}
    with pytest.raises(ValueError, match="another order"):
        train.load_checkpoint(tmp_path, swapped, train.make_optimizer(swapped, cfg))
