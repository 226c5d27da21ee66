"""Validated configuration dataclasses with a JSON round-trip."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = ("llama", "gpt2")
MODES = ("aligned", "context")


# Sizes beyond this are refused: kernels index rows with 32-bit ints in places, and a size
# read from an untrusted config.json must not turn into an unbounded allocation.
MAX_SIZE = 2**31 - 1


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    if value > MAX_SIZE:
        raise ValueError(f"{name}={value} is out of range (at most {MAX_SIZE})")


def _positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if value == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")


class _JSONMixin:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__} config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path):
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str)
                                              and not text_or_path.lstrip().startswith("{")):
            text_or_path = Path(text_or_path).read_text()
        try:
            d = json.loads(text_or_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid {cls.__name__} JSON: {e}") from None
        return cls.from_dict(d)


@dataclass
class DecoderConfig(_JSONMixin):
    """One decoder-only LM. arch "llama" covers Llama/Mistral/Qwen2 (RMSNorm, RoPE, GQA,
    SwiGLU); arch "gpt2" covers GPT-2 (LayerNorm, learned positions, GELU, tied embeddings)."""
    arch: str = "llama"
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None      # None = n_heads (no GQA)
    ffn_dim: int | None = None         # None = 4*dim (gpt2) or the Llama rule
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qkv_bias: bool = False             # Qwen2 has q/k/v biases
    head_dim: int | None = None        # None = dim // n_heads

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _positive_int("n_kv_heads", self.n_kv_heads)
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim if self.arch == "gpt2" else _llama_ffn(self.dim)
        _positive_int("ffn_dim", self.ffn_dim)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        _positive_int("head_dim", self.head_dim)
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE (arch 'llama')")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        _positive_float("norm_eps", self.norm_eps)
        _positive_float("rope_theta", self.rope_theta)
        if self.arch == "gpt2":
            if self.n_kv_heads != self.n_heads:
                raise ValueError("gpt2 arch has no grouped-query attention: n_kv_heads must equal n_heads")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _llama_ffn(dim: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return 64 * ((hidden + 63) // 64)


@dataclass
class CompositionConfig(_JSONMixin):
    """How augmenting models attach to the anchor: one mapping per augment model, each a list
    of (augment_layer, anchor_layer) pairs, 0-based block indices; anchor layer -1 is the
    anchor's embedding output (the input to block 0)."""
    mode: str = "aligned"
    mappings: list = field(default_factory=list)
    anchor_dim: int = 0
    anchor_heads: int = 0
    augment_dims: list = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # anchor_dim / anchor_heads: 0 = not recorded (the defaults); else positive.
        _positive_int("anchor_dim", self.anchor_dim, minimum=0)
        _positive_int("anchor_heads", self.anchor_heads, minimum=0)
        if self.anchor_dim and self.anchor_heads and self.anchor_dim % self.anchor_heads:
            raise ValueError(f"anchor_dim={self.anchor_dim} is not divisible by anchor_heads={self.anchor_heads}")
        if not isinstance(self.augment_dims, (list, tuple)):
            raise TypeError(f"augment_dims must be a list of ints, got {self.augment_dims!r}")
        for d in self.augment_dims:
            _positive_int("augment_dims entry", d)
        self.augment_dims = list(self.augment_dims)
        if not isinstance(self.mappings, (list, tuple)):
            raise TypeError(f"mappings must be a list of lists of (augment_layer, anchor_layer) pairs, "
                            f"got {self.mappings!r}")
        mappings = []
        for m in self.mappings:
            if not isinstance(m, (list, tuple)) or not m:
                raise ValueError(f"each mapping must be a non-empty list of pairs, got {m!r}")
            pairs = []
            for pair in m:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"mapping entry {pair!r} is not an (augment_layer, anchor_layer) pair")
                _positive_int("mapping augment layer index", pair[0], minimum=0)
                _positive_int("mapping anchor layer index", pair[1], minimum=-1)  # -1: the embedding output
                pairs.append(tuple(pair))
            if len(set(pairs)) != len(pairs):
                raise ValueError(f"mapping has duplicate pairs: {pairs}")
            mappings.append(pairs)
        self.mappings = mappings
        if len(self.mappings) != len(self.augment_dims):
            raise ValueError(f"{len(self.mappings)} mappings for {len(self.augment_dims)} augment models")
