"""CALM: a frozen anchor, frozen augmenting model(s), and the trainable bridges between them."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, ops
from .bridge import Bridge, BridgeCache
from .config import MODES, CompositionConfig
from .decoder import Decoder
from .validation import check_attention_mask, check_tokens

BRIDGES_FILE = "bridges.safetensors"
CONFIG_FILE = "calm_config.json"
# Key of the composition config (JSON) in bridges.safetensors' metadata: the tensors and the
# config they belong to are one file, replaced atomically; calm_config.json is a readable copy.
CONFIG_META = "calm_fast.calm_config"


def default_mapping(n_augment: int, n_anchor: int) -> list[tuple[int, int]]:
    """The paper's rule: every 4th augment block output (n = N_A/4 taps, the last being m_A's
    final block), paired in order with n anchor blocks at stride N_B/n (the last being m_B's
    final block). 0-based block indices."""
    n = max(1, n_augment // 4)
    if n > n_anchor:
        raise ValueError(f"the default mapping needs {n} anchor layers but the anchor has {n_anchor}; "
                         f"pass an explicit mapping")
    aug = [n_augment - 1 - 4 * (n - 1 - k) for k in range(n)]
    anchor = [((k + 1) * n_anchor) // n - 1 for k in range(n)]
    return list(zip(aug, anchor))


def check_mapping(mapping, n_augment: int, n_anchor: int) -> list[tuple[int, int]]:
    if not isinstance(mapping, (list, tuple)) or len(mapping) == 0:
        raise ValueError(f"mapping must be a non-empty list of (augment_layer, anchor_layer) pairs, got {mapping!r}")
    pairs = []
    for pair in mapping:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"mapping entry {pair!r} is not an (augment_layer, anchor_layer) pair of ints")
        a, b = pair
        if not 0 <= a < n_augment:
            raise ValueError(f"mapping pair {tuple(pair)}: augment layer {a} is out of range [0, {n_augment})")
        if not -1 <= b < n_anchor:
            raise ValueError(f"mapping pair {tuple(pair)}: anchor layer {b} is out of range [-1, {n_anchor}) "
                             f"(-1 is the embedding output)")
        pairs.append((a, b))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"mapping has duplicate pairs: {pairs}")
    return pairs


def write_bridges(directory, tensors: dict[str, torch.Tensor], config: CompositionConfig) -> None:
    """What CALM.save_bridges writes, from a bridges state dict (e.g. gathered from shards):
    bridges.safetensors with the config in its metadata (the one atomic commit), then the
    readable copy calm_config.json."""
    directory = Path(directory)
    cfg = config.to_dict()
    checkpoint.save_tensors(directory / BRIDGES_FILE, tensors,
                            metadata={CONFIG_META: json.dumps(cfg, sort_keys=True)})
    checkpoint.save_json(directory / CONFIG_FILE, cfg)


def read_bridges(directory) -> tuple[CompositionConfig, dict[str, torch.Tensor], Path]:
    """(config, tensors, where the config came from) of a directory written by save_bridges.

    The config is the one stored inside bridges.safetensors (read in the same single read as
    the tensors, so they are always from one save). calm_config.json is only a readable copy:
    when it disagrees (a save stopped between its two writes), a warning says so and the
    embedded config is used. Files written before the config was embedded (no metadata) are
    read with calm_config.json, as they always were."""
    directory = Path(directory)
    path = directory / BRIDGES_FILE
    tensors, metadata = checkpoint.load_tensors_and_metadata(path)
    embedded = metadata.get(CONFIG_META)
    copy_path = directory / CONFIG_FILE
    if embedded is None:  # the older format: the config lives in calm_config.json only
        return CompositionConfig.from_dict(checkpoint.load_json(copy_path)), tensors, copy_path
    try:
        cfg = CompositionConfig.from_dict(json.loads(embedded))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: the composition config in its metadata is invalid ({e})") from None
    try:
        copy = checkpoint.load_json(copy_path) if copy_path.is_file() else None
        copy = None if copy is None else CompositionConfig.from_dict(copy).to_dict()
    except (ValueError, TypeError):
        copy = "unreadable"
    if copy is not None and copy != cfg.to_dict():
        warnings.warn(f"{copy_path} differs from the composition config stored in {path} (a save "
                      f"stopped between its two writes?); using the one in {path.name}", stacklevel=3)
    return cfg, tensors, path


def read_bridges_config(directory) -> CompositionConfig:
    """The composition config of a directory written by save_bridges (see read_bridges)."""
    return read_bridges(directory)[0]


class CALM(nn.Module):
    """anchor + augment(s) + bridges. `mapping`: None (paper default for every augment), a list
    of pairs (one augment model) or a list of such lists (one per augment model)."""

    def __init__(self, anchor: Decoder, augments, mapping=None, mode: str = "aligned",
                 backend: str = "auto"):
        super().__init__()
        if isinstance(augments, Decoder):
            augments = [augments]
        if not isinstance(anchor, Decoder) or not augments or \
                not all(isinstance(a, Decoder) for a in augments):
            raise TypeError("CALM needs a Decoder anchor and a non-empty list of Decoder augments")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for i, aug in enumerate(augments):
            if aug.cfg.vocab_size != anchor.cfg.vocab_size:
                raise ValueError(f"augment model {i} has vocab_size {aug.cfg.vocab_size} but the anchor has "
                                 f"{anchor.cfg.vocab_size}: CALM needs one shared tokenizer")
            w_b, w_a = anchor.tok_emb.weight, aug.tok_emb.weight
            if w_a.dtype != w_b.dtype or w_a.device != w_b.device:
                raise ValueError(f"augment model {i} is {w_a.dtype} on {w_a.device} but the anchor is "
                                 f"{w_b.dtype} on {w_b.device}: build the CALM from models of one dtype "
                                 f"and device (convert the whole CALM with .to() afterwards)")
        self.anchor = anchor
        self.augments = nn.ModuleList(augments)
        self.mode, self.backend = mode, backend
        self.mappings = self._resolve_mappings(mapping)
        acfg = anchor.cfg
        self.bridges = nn.ModuleList(
            nn.ModuleList(Bridge(aug.cfg.dim, acfg.dim, acfg.n_heads) for _ in m)
            for aug, m in zip(self.augments, self.mappings))
        for base in (self.anchor, *self.augments):
            base.requires_grad_(False)
            base.eval()

    def _resolve_mappings(self, mapping) -> list[list[tuple[int, int]]]:
        n_b = self.anchor.cfg.n_layers
        if mapping is None:
            return [default_mapping(a.cfg.n_layers, n_b) for a in self.augments]
        # One list per augment model (None = the default for that one), or one list of pairs.
        nested = isinstance(mapping, (list, tuple)) and len(mapping) > 0 and \
            all(m is None or (isinstance(m, (list, tuple)) and len(m) > 0 and isinstance(m[0], (list, tuple)))
                for m in mapping)
        per_aug = list(mapping) if nested else [mapping]
        if len(per_aug) != len(self.augments):
            raise ValueError(f"{len(per_aug)} mappings given for {len(self.augments)} augment models")
        return [check_mapping(m, a.cfg.n_layers, n_b) if m is not None else default_mapping(a.cfg.n_layers, n_b)
                for m, a in zip(per_aug, self.augments)]

    # ---- Θ_C --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bridges.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        for base in (self.anchor, *self.augments):
            base.eval()  # frozen bases stay in inference mode
        return self

    @property
    def config(self) -> CompositionConfig:
        return CompositionConfig(mode=self.mode, mappings=[list(m) for m in self.mappings],
                                 anchor_dim=self.anchor.cfg.dim, anchor_heads=self.anchor.cfg.n_heads,
                                 augment_dims=[a.cfg.dim for a in self.augments])

    def save_bridges(self, directory) -> None:
        """Θ_C only: bridges.safetensors, whose metadata holds the composition config, written
        atomically (temp file + rename: the one commit point of a save), then calm_config.json,
        a readable copy that loading does not rely on. A crash at any point leaves a directory
        whose bridges.safetensors is one whole save, tensors and config together."""
        write_bridges(directory, dict(self.bridges.state_dict()), self.config)

    def load_bridges(self, directory) -> None:
        """Load Θ_C saved by save_bridges; refuses a composition that differs from this one
        (mode, mappings, widths, heads) or tensors of the wrong names or shapes."""
        directory = Path(directory)
        cfg, tensors, where = read_bridges(directory)
        mine = self.config
        if cfg.mode != mine.mode:
            raise ValueError(f"{where}: the bridges were trained in {cfg.mode!r} mode, this CALM is in "
                             f"{mine.mode!r} mode")
        if cfg.mappings != mine.mappings or cfg.augment_dims != mine.augment_dims or \
                cfg.anchor_dim != mine.anchor_dim or cfg.anchor_heads != mine.anchor_heads:
            raise ValueError(f"{where}: saved composition {cfg.to_dict()} does not match "
                             f"this model's {mine.to_dict()}")
        expected = self.bridges.state_dict()
        checkpoint.check_shapes(directory / BRIDGES_FILE, tensors, expected)
        self.bridges.load_state_dict(tensors)

    # ---- forward ----------------------------------------------------------------------------
    def _taps(self, a: int) -> list[int]:
        return sorted({aug_layer for aug_layer, _ in self.mappings[a]})

    def augment_states(self, tokens, attention_mask=None) -> list[dict[int, torch.Tensor]]:
        """Tapped block outputs of every augment model; no autograd, no LM head, and only up to
        its deepest tapped block."""
        states = []
        with torch.no_grad():
            for a, aug in enumerate(self.augments):
                taps = self._taps(a)
                _, tapped = aug(tokens, attention_mask, taps=set(taps), stop_after=taps[-1], validate=False)
                states.append(tapped)
        return states

    def _by_anchor_layer(self):
        """{anchor layer: [(augment index, bridge index, augment layer), ...]}."""
        table: dict[int, list[tuple[int, int, int]]] = {}
        for a, m in enumerate(self.mappings):
            for k, (aug_layer, anchor_layer) in enumerate(m):
                table.setdefault(anchor_layer, []).append((a, k, aug_layer))
        return table

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                augment_states: list[dict[int, torch.Tensor]] | None = None):
        """Logits (B, T, vocab). Aligned mode: both models read `tokens`. Context mode: the
        augment models read `context` (B, Tc) with `context_mask` (B, Tc) bool.
        augment_states: the augment models' tapped states, as `augment_states()` returns them,
        given instead of computed (e.g. read from a state cache, calm_fast.state_cache); in
        context mode `context_mask` then marks their real rows."""
        check_tokens(tokens, self.anchor.cfg.vocab_size, "tokens")
        attention_mask = check_attention_mask(attention_mask, tokens)
        if tokens.shape[1] > self.anchor.cfg.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len={self.anchor.cfg.max_seq_len}")
        if augment_states is not None:
            if context is not None:
                raise ValueError("give either context tokens or augment_states, not both")
            states = self._check_states(augment_states, tokens, context_mask)
            aug_mask, mask = (attention_mask, "aligned") if self.mode == "aligned" else (context_mask, "context")
        else:
            aug_tokens, aug_mask, mask = self._augment_input(tokens, attention_mask, context, context_mask)
            if not torch.is_autocast_enabled(self.anchor.tok_emb.weight.device.type):
                self._check_dtypes()  # under autocast the matmuls cast, so any mix runs
            states = self.augment_states(aug_tokens, aug_mask)

        def inject(anchor_layer, entries):
            def f(h):
                out = h
                for a, k, aug_layer in entries:
                    out = self.bridges[a][k](h, states[a][aug_layer], mask, aug_mask, residual=out,
                                             backend=self.backend)
                return out
            return f

        after = {layer: inject(layer, e) for layer, e in self._by_anchor_layer().items()}
        return self.anchor(tokens, attention_mask, after_block=after, validate=False)

    def _check_dtypes(self) -> None:
        """Anchor and augments of one dtype (one of them converted after construction fails
        deep inside a matmul otherwise)."""
        w = self.anchor.tok_emb.weight
        for i, aug in enumerate(self.augments):
            if aug.tok_emb.weight.dtype != w.dtype:
                raise ValueError(f"augment model {i} is {aug.tok_emb.weight.dtype} but the anchor is {w.dtype}: "
                                 f"convert the whole CALM with .to() (a forward also runs under torch.autocast)")

    def _check_states(self, states, tokens, context_mask):
        """Given augment states: one {augment layer: (B, T_a, D_A)} per augment model, T_a = T
        in aligned mode; cast to the bridges' device and dtype."""
        aligned = self.mode == "aligned"
        if not isinstance(states, (list, tuple)) or len(states) != len(self.mappings):
            raise ValueError(f"augment_states must hold one dict per augment model ({len(self.mappings)}), "
                             f"got {type(states).__name__}")
        b, t = tokens.shape
        out, t_a = [], None
        for a, m in enumerate(self.mappings):
            w = self.bridges[a][0].proj.weight
            got = {}
            for aug_layer, _ in m:
                s = states[a].get(aug_layer) if isinstance(states[a], dict) else None
                if s is None:
                    raise ValueError(f"augment_states[{a}] has no state for augment layer {aug_layer}")
                t_a = s.shape[1] if t_a is None and s.dim() == 3 else t_a
                if s.dim() != 3 or s.shape[0] != b or s.shape[2] != w.shape[1] or s.shape[1] != (t if aligned else t_a):
                    want = f"({b}, {t if aligned else t_a}, {w.shape[1]})"
                    raise ValueError(f"augment_states[{a}][{aug_layer}] has shape {tuple(s.shape)}, expected {want}")
                got[aug_layer] = s.to(device=w.device, dtype=w.dtype)
            out.append(got)
        if not aligned and context_mask is not None and tuple(context_mask.shape) != (b, t_a):
            raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}, expected ({b}, {t_a})")
        return out

    def _augment_input(self, tokens, attention_mask, context, context_mask):
        if self.mode == "aligned":
            if context is not None:
                raise ValueError("context was given but the CALM is in 'aligned' mode (both models read tokens)")
            for i, aug in enumerate(self.augments):
                if tokens.shape[1] > aug.cfg.max_seq_len:
                    raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds augment model {i}'s "
                                     f"max_seq_len={aug.cfg.max_seq_len} (aligned mode: it reads the same tokens)")
            return tokens, attention_mask, "aligned"
        if context is None:
            raise ValueError("CALM in 'context' mode needs context=... tokens for the augment models")
        check_tokens(context, self.anchor.cfg.vocab_size, "context")
        for aug in self.augments:
            if context.shape[1] > aug.cfg.max_seq_len:
                raise ValueError(f"context of {context.shape[1]} tokens exceeds the augment max_seq_len "
                                 f"{aug.cfg.max_seq_len}")
        if context.shape[0] != tokens.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != tokens batch {tokens.shape[0]}")
        context_mask = check_attention_mask(context_mask, context, name="context_mask")
        return context, context_mask, "context"

    # ---- cached decoding --------------------------------------------------------------------
    def start_session(self, batch: int, max_len: int, *, context=None, context_mask=None,
                      dtype: torch.dtype | None = None) -> "CALMSession":
        return CALMSession(self, batch, max_len, context=context, context_mask=context_mask, dtype=dtype)


class CALMSession:
    """Every cache incremental: anchor KV, augment KV (aligned mode), each bridge's K/V."""

    def __init__(self, calm: CALM, batch: int, max_len: int, *, context=None, context_mask=None,
                 dtype=None):
        self.calm = calm
        own = calm.anchor.tok_emb.weight.dtype
        if dtype is not None and dtype != own:
            raise ValueError(f"session dtype must be the CALM's dtype {own}, got {dtype!r} (to decode in "
                             f"another floating dtype, convert the CALM with .to())")
        dtype = own
        calm._check_dtypes()
        self.anchor_cache = calm.anchor.setup_cache(batch, max_len, dtype)
        self.table = calm._by_anchor_layer()
        self.context_mask = None
        if calm.mode == "aligned":
            if context is not None:
                raise ValueError("context was given but the CALM is in 'aligned' mode")
            self.aug_caches = [aug.setup_cache(batch, max_len, dtype) for aug in calm.augments]
            bridge_len = max_len
        else:
            if context is None:
                raise ValueError("CALM in 'context' mode needs context=... tokens")
            dummy = torch.zeros(batch, 1, dtype=torch.long, device=context.device)
            _, aug_mask, _ = calm._augment_input(dummy, None, context, context_mask)
            self.context_mask = aug_mask
            bridge_len = context.shape[1]
        self.bridge_caches = [[BridgeCache(b, batch, bridge_len, dtype) for b in bs] for bs in calm.bridges]
        if calm.mode == "context":
            states = calm.augment_states(context, self.context_mask)
            with torch.no_grad():
                for a, m in enumerate(calm.mappings):
                    for k, (aug_layer, _) in enumerate(m):
                        self.bridge_caches[a][k].append(states[a][aug_layer], 0)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, pos: int,
             validate: bool = True) -> torch.Tensor:
        """Feed the newest tokens (B, T) at cache position `pos`; logits (B, T, vocab).
        validate=False skips the input checks (generate's own sampled tokens need none)."""
        calm = self.calm
        aligned = calm.mode == "aligned"
        states = None
        if aligned:
            states = []
            for a, aug in enumerate(calm.augments):
                taps = calm._taps(a)
                _, tapped = aug(tokens, attention_mask, cache=self.aug_caches[a], pos=pos, taps=set(taps),
                                stop_after=taps[-1], validate=validate)
                states.append(tapped)
        t = tokens.shape[1]
        backend = calm.backend
        cache_mask = None  # the decode kernels take key padding over all cache rows (B, S)
        if aligned and attention_mask is not None:
            cache_mask = torch.nn.functional.pad(attention_mask, (0, self.anchor_cache.max_len - pos - t))

        def inject(entries):
            def f(h):
                out = h
                for a, k, aug_layer in entries:
                    bc = self.bridge_caches[a][k]
                    if t == 1 and len(entries) == 1:
                        # The fused decode step: (aligned) append the K/V row, attend, project,
                        # add. Context mode attends over all rows of the fixed context cache.
                        h_a, rows, kpm = ((states[a][aug_layer], pos, cache_mask) if aligned
                                          else (None, bc.k.shape[2], self.context_mask))
                        out = ops.bridge_decode_step(h, h_a, bc.w_q, bc.w_kv, bc.b_kv, bc.w_o, bc.k, bc.v,
                                                     rows, bc.n_heads, kpm, backend)
                    elif aligned:
                        bc.append(states[a][aug_layer], pos)
                        out = bc.attend(h, pos + t, "aligned", attention_mask, out, backend)
                    else:
                        out = bc.attend(h, bc.k.shape[2], "context", self.context_mask, out, backend)
                return out
            return f

        after = {layer: inject(e) for layer, e in self.table.items()}
        return calm.anchor(tokens, attention_mask, cache=self.anchor_cache, pos=pos, after_block=after,
                           validate=validate)
