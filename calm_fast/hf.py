"""Load Hugging Face checkpoints (config.json + safetensors) into a calm_fast Decoder.

Supported: Llama, Mistral, Qwen2 (arch "llama": RMSNorm, RoPE, GQA, SwiGLU; Qwen2's q/k/v
biases) and GPT-2 (arch "gpt2"). config.json written by transformers 4.x (top-level
`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) both load.

Only what the decoder computes exactly is accepted: anything that would change the numbers
(RoPE scaling, partial rotary, biases the decoder lacks, another activation) is refused with a
ValueError naming the config key, never approximated. Weights are checked before any is
loaded: every expected tensor present, nothing unexpected, shapes and dtypes right. Pickle
checkpoints (pytorch_model.bin, *.pt, *.ckpt) are refused: unpickling runs arbitrary code.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import load_json
from .config import DecoderConfig
from .decoder import Decoder, rope_tables

__all__ = ["config_from_hf", "load_hf"]

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = LLAMA_FAMILY + ("gpt2",)

# Per-model defaults of transformers' config classes, for keys a config.json may omit.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gpt2": True}
_EPS_DEFAULT = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6, "gpt2": 1e-5}
_THETA_DEFAULT = 10000.0
# GPT-2's "gelu_new" is the tanh approximation, which is what the decoder computes.
_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh")
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some checkpoints carry that hold no weights (recomputed by every implementation).
_IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
            re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$"))
_PREFIX = {"llama": "model.", "gpt2": "transformer."}


# --------------------------------------------------------------------------- config

def _get(hf: dict, key: str, source, default=...):
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ValueError(f"{source}: missing required key {key!r}")
    return default


_WINDOW_DEFAULT = 4096  # MistralConfig's and Qwen2Config's sliding_window when the key is absent


def _rope_theta(hf: dict, source) -> float:
    """The RoPE base, refusing every variant the decoder does not compute (scaled RoPE would
    load fine and then produce wrong logits at every position)."""
    theta = None
    for key in ("rope_parameters", "rope_scaling"):  # 5.x, 4.x: both are checked
        block = hf.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ValueError(f"{source}: {key} must be an object, got {block!r}")
        if block and all(isinstance(v, dict) for v in block.values()):
            raise ValueError(f"{source}: per-layer-type {key} ({sorted(block)}) are not supported")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: {key} has rope type {rope_type!r}; only plain RoPE "
                             f"('default') is supported, scaled RoPE would give wrong logits")
        factor = block.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ValueError(f"{source}: {key}.partial_rotary_factor={factor} is not supported")
    # The base comes from the block transformers reads (`rope_scaling or rope_parameters`: a
    # non-empty rope_scaling wins), else from the top level.
    chosen = hf.get("rope_scaling") or hf.get("rope_parameters")
    if chosen and chosen.get("rope_theta") is not None:
        theta = chosen["rope_theta"]
    factor = hf.get("partial_rotary_factor")
    if factor is not None and factor != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={factor} is not supported")
    if theta is None:
        theta = hf.get("rope_theta")
    theta = _THETA_DEFAULT if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _sliding_window(hf: dict, model_type: str) -> int | None:
    """The attention window some layers use, or None when every layer attends to everything."""
    # A missing key is transformers' default window (4096), not "no window"; null is no window.
    if model_type == "mistral":
        return hf.get("sliding_window", _WINDOW_DEFAULT)
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        layer_types = hf.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        # Which layers slide changed across transformers versions: treat any as windowed.
        return hf.get("sliding_window", _WINDOW_DEFAULT)
    return None


def config_from_hf(hf: dict, source: str | os.PathLike = "config.json") -> DecoderConfig:
    """A DecoderConfig from a parsed Hugging Face config.json (dict). `source` names the file
    in error messages.

    Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is not implemented: a
    window smaller than max_position_embeddings caps max_seq_len at the window, with a
    warning. Within the window sliding attention equals full attention, so every sequence
    the decoder accepts is computed exactly; longer ones are refused by the decoder."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: config must be a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED)})")
    tie = hf.get("tie_word_embeddings", _TIE_DEFAULT[model_type])
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTS:
            raise ValueError(f"{source}: activation_function {act!r} is not supported "
                             f"(the decoder computes {_GPT2_ACTS})")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (need {want})")
        kwargs = dict(arch="gpt2", vocab_size=_get(hf, "vocab_size", source),
                      dim=_get(hf, "n_embd", source), n_layers=_get(hf, "n_layer", source),
                      n_heads=_get(hf, "n_head", source), ffn_dim=hf.get("n_inner"),
                      max_seq_len=_get(hf, "n_positions", source),
                      norm_eps=_get(hf, "layer_norm_epsilon", source, _EPS_DEFAULT["gpt2"]),
                      tie_embeddings=tie)
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (need 'silu')")
        if hf.get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if hf.get("attention_bias", False):
            # Llama's attention_bias also puts a bias on o_proj, which the decoder lacks.
            raise ValueError(f"{source}: attention_bias=true is not supported")
        max_len = _get(hf, "max_position_embeddings", source)
        window = _sliding_window(hf, model_type)
        if window is not None and window < max_len:
            warnings.warn(f"{source}: sliding-window attention (window {window}) is not "
                          f"implemented; max_seq_len is capped at {window} (from "
                          f"max_position_embeddings={max_len}), longer sequences are refused",
                          stacklevel=3)
            max_len = window
        kwargs = dict(arch="llama", vocab_size=_get(hf, "vocab_size", source),
                      dim=_get(hf, "hidden_size", source),
                      n_layers=_get(hf, "num_hidden_layers", source),
                      n_heads=_get(hf, "num_attention_heads", source),
                      n_kv_heads=hf.get("num_key_value_heads"),
                      ffn_dim=_get(hf, "intermediate_size", source), max_seq_len=max_len,
                      norm_eps=_get(hf, "rms_norm_eps", source, _EPS_DEFAULT[model_type]),
                      rope_theta=_rope_theta(hf, source), tie_embeddings=tie,
                      qkv_bias=model_type == "qwen2", head_dim=hf.get("head_dim"))
    try:
        return DecoderConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{source}: {e}") from None


# --------------------------------------------------------------------------- weight map

@dataclass(frozen=True)
class _Entry:
    """One checkpoint tensor and the decoder parameter(s) it becomes."""
    hf: str                       # checkpoint name, model prefix stripped
    ours: tuple[str, ...]
    kind: str = "copy"            # copy | conv1d (GPT-2, stored (in, out)) | qkv (fused conv1d)
    optional: bool = False        # a tied lm_head a checkpoint may or may not store

    def hf_shape(self, shapes: dict[str, tuple]) -> tuple:
        if self.kind == "copy":
            return shapes[self.ours[0]]
        if self.kind == "conv1d":
            return tuple(reversed(shapes[self.ours[0]]))
        out = sum(shapes[n][0] for n in self.ours)
        return (shapes[self.ours[0]][1], out) if len(shapes[self.ours[0]]) == 2 else (out,)

    def convert(self, t: torch.Tensor, shapes: dict[str, tuple]) -> list[torch.Tensor]:
        if self.kind == "copy":
            return [t]
        if t.dim() == 2:
            t = t.t()  # Conv1D keeps (in, out); Linear wants (out, in)
        if self.kind == "conv1d":
            return [t]
        return list(torch.split(t, [shapes[n][0] for n in self.ours], dim=0))


def _weight_map(cfg: DecoderConfig) -> list[_Entry]:
    e = []
    if cfg.arch == "gpt2":
        e += [_Entry("wte.weight", ("tok_emb.weight",)), _Entry("wpe.weight", ("pos_emb.weight",))]
        for i in range(cfg.n_layers):
            h, L = f"h.{i}.", f"layers.{i}."
            for p in ("weight", "bias"):
                e += [_Entry(f"{h}ln_1.{p}", (f"{L}attn_norm.{p}",)),
                      _Entry(f"{h}attn.c_attn.{p}", tuple(f"{L}attn.{w}.{p}" for w in ("wq", "wk", "wv")),
                             "qkv"),
                      _Entry(f"{h}attn.c_proj.{p}", (f"{L}attn.wo.{p}",), "conv1d"),
                      _Entry(f"{h}ln_2.{p}", (f"{L}mlp_norm.{p}",)),
                      _Entry(f"{h}mlp.c_fc.{p}", (f"{L}mlp.fc.{p}",), "conv1d"),
                      _Entry(f"{h}mlp.c_proj.{p}", (f"{L}mlp.proj.{p}",), "conv1d")]
        e += [_Entry(f"ln_f.{p}", (f"norm.{p}",)) for p in ("weight", "bias")]
    else:
        e.append(_Entry("embed_tokens.weight", ("tok_emb.weight",)))
        for i in range(cfg.n_layers):
            h, L = f"layers.{i}.", f"layers.{i}."
            e += [_Entry(f"{h}input_layernorm.weight", (f"{L}attn_norm.weight",)),
                  _Entry(f"{h}post_attention_layernorm.weight", (f"{L}mlp_norm.weight",))]
            for hf_name, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
                e.append(_Entry(f"{h}self_attn.{hf_name}.weight", (f"{L}attn.{ours}.weight",)))
                if cfg.qkv_bias and ours != "wo":
                    e.append(_Entry(f"{h}self_attn.{hf_name}.bias", (f"{L}attn.{ours}.bias",)))
            for hf_name, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                e.append(_Entry(f"{h}mlp.{hf_name}.weight", (f"{L}mlp.{ours}.weight",)))
        e.append(_Entry("norm.weight", ("norm.weight",)))
    # Tied: lm_head is the embedding; a stored copy is checked, not loaded.
    e.append(_Entry("lm_head.weight", ("lm_head.weight",), optional=cfg.tie_embeddings))
    return e


# --------------------------------------------------------------------------- files

def _weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file, or the shards an index
    names); refuses pickle-only directories."""
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' object")
        files = []
        for name in sorted(set(weight_map.values())):
            f = root / str(name)
            # A shard name must stay inside the checkpoint directory.
            if f.resolve().parent != root.resolve():
                raise ValueError(f"{index}: shard {name!r} is outside {root}")
            if not f.is_file():
                raise ValueError(f"{index}: shard file {f} is missing")
            files.append(f)
        return files
    found = sorted(root.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if len(found) > 1:
        raise ValueError(f"{root}: {len(found)} safetensors files but no "
                         f"model.safetensors.index.json to say which form the model")
    pickles = sorted(p.name for p in root.iterdir()
                     if p.is_file() and (p.suffix in _PICKLE_SUFFIXES or p.name.endswith(".bin.index.json")))
    if pickles:
        raise ValueError(f"{root}: only pickle checkpoints ({', '.join(pickles[:3])}); calm_fast "
                         f"never unpickles (it can run arbitrary code): convert them to "
                         f"safetensors first")
    raise ValueError(f"{root}: no model.safetensors or model.safetensors.index.json")


def _read_headers(files: list[Path], prefix: str) -> dict[str, tuple[Path, str, tuple, str]]:
    """name (prefix stripped) -> (file, stored name, shape, dtype string), from headers only."""
    found: dict[str, tuple[Path, str, tuple, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                meta = [(k, tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype())
                        for k in sf.keys()]
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        for stored, shape, dtype in meta:
            name = stored[len(prefix):] if stored.startswith(prefix) else stored
            if name in found:
                raise ValueError(f"{f}: tensor {stored!r} also stored as "
                                 f"{found[name][1]!r} in {found[name][0]}")
            found[name] = (f, stored, shape, dtype)
    return found


def _check_index(root: Path, found: dict, prefix: str) -> None:
    index = root / "model.safetensors.index.json"
    if (root / "model.safetensors").is_file() or not index.is_file():
        return
    for stored, fname in load_json(index)["weight_map"].items():
        name = stored[len(prefix):] if stored.startswith(prefix) else stored
        if name not in found or found[name][0].name != fname:
            raise ValueError(f"{index}: tensor {stored!r} is listed in {fname} but that file "
                             f"does not hold it")


def _check(entries: list[_Entry], found: dict, shapes: dict, root: Path) -> None:
    expected = {e.hf: e for e in entries}
    for e in entries:
        if e.hf not in found:
            if e.optional:
                continue
            raise ValueError(f"{root}: missing tensor {e.hf!r} (for {', '.join(e.ours)})")
        f, stored, shape, dtype = found[e.hf]
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{f}: tensor {stored!r} has dtype {dtype}, expected a float "
                             f"dtype ({', '.join(_FLOAT_DTYPES)}); quantized checkpoints "
                             f"are not supported")
        want = e.hf_shape(shapes)
        if shape != want:
            raise ValueError(f"{f}: tensor {stored!r} has shape {shape}, expected {want}")
    unexpected = [n for n in found if n not in expected and not any(p.search(n) for p in _IGNORED)]
    if unexpected:
        f, stored = found[unexpected[0]][:2]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ValueError(f"{f}: unexpected tensor {stored!r}{more}")


def _fill_buffers(model: Decoder) -> None:
    """Buffers are not in checkpoints: recompute them the way Decoder.__init__ does."""
    for name, _ in model.named_buffers():
        if name not in ("rope_cos", "rope_sin"):
            raise RuntimeError(f"load_hf does not know how to fill decoder buffer {name!r}")
    if model.cfg.arch == "llama":
        exact = model.rope_cos.dtype == torch.float64  # a float64 model keeps float64 tables
        cos, sin = rope_tables(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta,
                               torch.float64 if exact else torch.float32)
        model.rope_cos, model.rope_sin = cos.to(model.device), sin.to(model.device)


# --------------------------------------------------------------------------- load

def load_hf(path: str | os.PathLike, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None) -> Decoder:
    """A Decoder (eval mode) with the weights of the Hugging Face checkpoint directory `path`:
    config.json plus model.safetensors, or shards listed in model.safetensors.index.json.

    dtype: the parameters' dtype (None = the checkpoint's, from its embedding). device: where
    the parameters live (None = CPU). RoPE tables stay float32, as in Decoder.
    Raises ValueError naming the file and tensor on a missing, unexpected, wrongly shaped or
    non-float tensor, a corrupt file, an unsupported config, or a pickle-only directory.
    Memory: the model is allocated once, directly in `dtype` on `device`, and filled one
    tensor at a time (no random init, no second copy of the weights)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"not a checkpoint directory: {root}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    files = _weight_files(root)
    cfg_path = root / "config.json"
    cfg = config_from_hf(load_json(cfg_path), cfg_path)
    prefix = _PREFIX[cfg.arch]
    found = _read_headers(files, prefix)
    _check_index(root, found, prefix)

    with torch.device("meta"):
        model = Decoder(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    entries = _weight_map(cfg)
    targets = {n for e in entries for n in e.ours}
    if targets != set(shapes):  # the map and the decoder disagree: a calm_fast bug
        raise RuntimeError(f"hf weight map out of sync with Decoder: "
                           f"{sorted(targets ^ set(shapes))[:5]}")
    _check(entries, found, shapes, root)

    if dtype is None:
        dtype = _FLOAT_DTYPES[found[entries[0].hf][3]]  # the embedding's
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # to_empty may have untied them
    _fill_buffers(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[_Entry]] = {}
    for e in entries:
        if e.hf in found:
            by_file.setdefault(found[e.hf][0], []).append(e)
    tied_copy: torch.Tensor | None = None
    with torch.no_grad():
        for f, file_entries in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for e in file_entries:
                        t = sf.get_tensor(found[e.hf][1])
                        if e.optional:
                            tied_copy = t
                            continue
                        for name, part in zip(e.ours, e.convert(t, shapes)):
                            params[name].copy_(part)
            except SafetensorError as err:
                raise ValueError(f"{f}: corrupt safetensors file ({err})") from None
        if tied_copy is not None and not torch.equal(tied_copy.to(dtype).to(device),
                                                     model.tok_emb.weight):
            f, stored = found["lm_head.weight"][:2]
            raise ValueError(f"{f}: tensor {stored!r} differs from the embedding but config.json "
                             f"says tie_word_embeddings=true")
    return model.eval()
