"""Augment-state caching: m_A is frozen, so its tapped block outputs for a fixed dataset are
computed once into memory-mapped files and training reads them instead of running m_A.

What is cached is each bridge's K/V *input*, P's argument h_a (B, T, D_A) at every tapped
augment layer. The folded K/V themselves depend on Θ_C, which is what training changes, so
they cannot be cached for training.

On-disk layout (a directory, complete once index.json exists; built in a temp directory and
renamed):
    index.json            version, storage dtype, mode, per-augment taps/dims, fingerprints
    examples.bin          int64 (n, 3): row offset, length, crc32 of the token ids
    aug{a}_layer{l}.bin   raw rows (total_rows, D_A): float32, or bf16/fp16 as int16 bits
Rows of example i are rows [offset_i, offset_i + length_i) of every layer file: the states
of its real tokens only (no padding), keyed by dataset example index.

Equivalence with the uncached path: in aligned mode with right padding, a real position's
augment state does not depend on the padding or on the other rows of the batch (causal
attention), so states computed one batch at build time equal those CALM.forward computes in
any training batch, and padded rows are filled with zeros which only padded anchor positions
can attend. fp32 storage reproduces the loss to rounding; bf16/fp16 storage to ~1e-2.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .validation import check_tokens, is_int

VERSION = 1
INDEX = "index.json"
EXAMPLES = "examples.bin"
STORAGE = {"float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, np.int16),
           "float16": (torch.float16, np.int16)}


def _layer_file(a: int, layer: int) -> str:
    return f"aug{a}_layer{layer}.bin"


def token_crc(ids) -> int:
    return zlib.crc32(np.asarray(list(ids), dtype=np.int64).tobytes())


# ---- the cached forward -------------------------------------------------------------------
def forward_with_states(calm, tokens: torch.Tensor, states, attention_mask: torch.Tensor | None = None,
                        states_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CALM.forward with the augment models' tapped states given instead of computed.

    states: one {augment layer: (B, T_a, D_A)} per augment model, as CALM.augment_states
    returns. Aligned mode: T_a == T and the bridges' key padding is `attention_mask`, as in
    CALM.forward. Context mode: `states_mask` (B, T_a) bool marks the real context rows."""
    return calm(tokens, attention_mask, augment_states=states, context_mask=states_mask)


# ---- fingerprints ----------------------------------------------------------------------------
def augment_fingerprint(calm, a: int, weights: bool = True) -> dict:
    """What the cached states of augment `a` depend on: its config, its taps and (optionally)
    a sha256 of its weights, so a cache is never read for another model."""
    aug = calm.augments[a]
    fp = {"config": aug.cfg.to_dict(), "taps": calm._taps(a)}
    if weights:
        h = hashlib.sha256()
        for name, tensor in sorted(aug.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        fp["weights_sha256"] = h.hexdigest()
    return fp


# ---- building --------------------------------------------------------------------------------
def build_state_cache(calm, sequences, path, *, dtype: str = "bfloat16", batch_size: int = 32,
                      rank: int = 0, world_size: int = 1, overwrite: bool = False) -> Path:
    """Run every augment model once over `sequences` (lists of token ids: the full example in
    aligned mode, the context in context mode) and write their tapped states to `path`.

    Under torch.distributed every rank calls this with the same arguments and computes the
    examples i with i % world_size == rank into shared files (the directory must be on a file
    system all ranks see); rank 0 writes the index last. Returns the cache directory."""
    if dtype not in STORAGE:
        raise ValueError(f"state cache dtype must be one of {sorted(STORAGE)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    sequences = _token_lists(calm, sequences)
    path = Path(path)
    tmp = path.with_name(path.name + ".building")
    dist = _dist(world_size)
    if rank == 0:
        if (path / INDEX).exists() and not overwrite:
            raise FileExistsError(f"state cache {path} exists (pass overwrite=True to rebuild)")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rows = int(lengths.sum())
    torch_dtype, np_dtype = STORAGE[dtype]
    files = {(a, layer): _layer_file(a, layer) for a in range(len(calm.augments)) for layer in calm._taps(a)}
    dims = {a: aug.cfg.dim for a, aug in enumerate(calm.augments)}
    if rank == 0:
        for (a, layer), name in files.items():  # preallocate so every rank can write its rows
            with open(tmp / name, "wb") as f:
                f.truncate(rows * dims[a] * np.dtype(np_dtype).itemsize)
    if dist:
        dist.barrier()
    maps = {k: np.memmap(tmp / name, dtype=np_dtype, mode="r+", shape=(rows, dims[k[0]]))
            for k, name in files.items()}
    device = calm.anchor.device
    mine = list(range(rank, len(sequences), world_size))
    pad = 0
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        t = int(lengths[idx].max())
        tokens = torch.full((len(idx), t), pad, dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, :lengths[i]] = torch.tensor(sequences[i])
        # Right padding, no mask: exactly how the training path runs m_A (causal, so real rows
        # never see the pads).
        states = calm.augment_states(tokens.to(device), None)
        for (a, layer), mm in maps.items():
            s = states[a][layer].to(torch_dtype).cpu()
            if np_dtype is np.int16:
                s = s.view(torch.int16)
            arr = s.numpy()
            for r, i in enumerate(idx):
                mm[offsets[i]:offsets[i] + lengths[i]] = arr[r, :lengths[i]]
    for mm in maps.values():
        mm.flush()
    del maps
    if dist:
        dist.barrier()
    if rank == 0:
        crc = np.array([token_crc(s) for s in sequences], dtype=np.int64)
        table = np.stack([offsets, lengths, crc], axis=1)
        checkpoint.atomic_write_bytes(tmp / EXAMPLES, table.tobytes())
        index = {"version": VERSION, "dtype": dtype, "mode": calm.mode, "n_examples": len(sequences),
                 "rows": rows,
                 "augments": [{"dim": dims[a], "taps": calm._taps(a), "fingerprint": augment_fingerprint(calm, a)}
                              for a in range(len(calm.augments))]}
        checkpoint.save_json(tmp / INDEX, index)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    if dist:
        dist.barrier()
    return path


def _int_list(values, what: str) -> list[int]:
    """values (a list, range, 1-D integer tensor or array...) as a list of ints; a float, bool or
    anything else is a TypeError naming it (never truncated)."""
    if torch.is_tensor(values):
        if values.dim() != 1 or values.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{what} must be a 1-D int64/int32 tensor, got {values.dtype} of shape "
                            f"{tuple(values.shape)}")
        return values.tolist()
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list of ints, got {type(values).__name__}")
    values = list(values)
    bad = next((x for x in values if not is_int(x)), None)
    if bad is not None:
        raise TypeError(f"{what} holds {bad!r}: expected ints")
    return [int(x) for x in values]


def _token_lists(calm, sequences) -> list[list[int]]:
    """Checked token sequences: ints in [0, vocab), each one no longer than every augment
    model's max_seq_len (they run over it), before anything is written."""
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__"):
        raise TypeError(f"sequences must be a list of token-id lists, got {type(sequences).__name__}")
    seqs = [_int_list(s, f"sequence {i}") for i, s in enumerate(sequences)]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("build_state_cache needs a non-empty list of non-empty token sequences")
    limit = min(aug.cfg.max_seq_len for aug in calm.augments)
    vocab = calm.anchor.cfg.vocab_size
    for i, s in enumerate(seqs):
        if len(s) > limit:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the augment models' "
                             f"max_seq_len={limit}")
        check_tokens(torch.tensor([s], dtype=torch.long), vocab, f"sequence {i}")
    return seqs


def _dist(world_size: int):
    if world_size == 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but torch.distributed is "
                         f"{'not initialised' if not dist.is_initialized() else f'of size {dist.get_world_size()}'}")
    return dist


# ---- reading ---------------------------------------------------------------------------------
class StateCache:
    """A built cache, memory-mapped read-only. `batch(indices)` gives right-padded states in
    the layout forward_with_states takes."""

    def __init__(self, path, calm=None, verify_weights: bool = True):
        self.path = Path(path)
        self.index = checkpoint.load_json(self.path / INDEX)
        ix = self.index
        if ix.get("version") != VERSION:
            raise ValueError(f"{self.path}: state cache version {ix.get('version')!r}, expected {VERSION}")
        if ix.get("dtype") not in STORAGE:
            raise ValueError(f"{self.path}: unknown storage dtype {ix.get('dtype')!r}")
        self.dtype = ix["dtype"]
        self.torch_dtype, np_dtype = STORAGE[self.dtype]
        n, rows = int(ix["n_examples"]), int(ix["rows"])
        table_file = self.path / EXAMPLES
        if not table_file.is_file() or table_file.stat().st_size != n * 3 * 8:
            raise ValueError(f"{table_file}: missing or not {n} examples long (truncated cache?)")
        self.table = np.fromfile(table_file, dtype=np.int64).reshape(n, 3)
        if int(self.table[:, 1].sum()) != rows:
            raise ValueError(f"{table_file}: example lengths sum to {int(self.table[:, 1].sum())}, index says {rows}")
        self.maps: dict[tuple[int, int], np.memmap] = {}
        for a, aug in enumerate(ix["augments"]):
            for layer in aug["taps"]:
                f = self.path / _layer_file(a, layer)
                want = rows * aug["dim"] * np.dtype(np_dtype).itemsize
                if not f.is_file() or f.stat().st_size != want:
                    raise ValueError(f"{f}: missing or {f.stat().st_size if f.is_file() else 0} bytes, "
                                     f"expected {want} ({rows} rows x {aug['dim']} x {self.dtype})")
                self.maps[(a, layer)] = np.memmap(f, dtype=np_dtype, mode="r", shape=(rows, aug["dim"]))
        if calm is not None:
            self.check_compatible(calm, verify_weights)

    def __len__(self) -> int:
        return len(self.table)

    def check_compatible(self, calm, verify_weights: bool = True) -> None:
        ix = self.index
        if ix["mode"] != calm.mode:
            raise ValueError(f"{self.path}: cache built in {ix['mode']!r} mode, the CALM is in {calm.mode!r} mode")
        if len(ix["augments"]) != len(calm.augments):
            raise ValueError(f"{self.path}: cache holds {len(ix['augments'])} augment models, "
                             f"the CALM has {len(calm.augments)}")
        for a in range(len(calm.augments)):
            saved = ix["augments"][a]["fingerprint"]
            mine = augment_fingerprint(calm, a, weights=verify_weights)
            missing = sorted(set(mine["taps"]) - set(ix["augments"][a]["taps"]))
            if missing:
                raise ValueError(f"{self.path}: augment {a} layers {missing} are not cached")
            if saved["config"] != mine["config"]:
                raise ValueError(f"{self.path}: augment {a} config differs from the cached one")
            if verify_weights and saved.get("weights_sha256") != mine["weights_sha256"]:
                raise ValueError(f"{self.path}: augment {a} weights differ from those the cache was built with")

    def batch(self, indices, tokens=None, pad_to: int | None = None, device=None,
              dtype: torch.dtype = torch.float32):
        """States of examples `indices`, right-padded with zeros to `pad_to` (default: the
        longest): ([{layer: (B, T, D)}, ...] per augment, mask (B, T) bool of real rows).
        `tokens` (a list of id lists, or a (B, T) tensor whose first length_i columns are the
        example) is checked against the ids the states were built from."""
        indices = _int_list(indices, "indices")
        if not indices:
            raise ValueError("indices is empty: give at least one example index")
        if pad_to is not None and not is_int(pad_to):
            raise TypeError(f"pad_to must be an int or None, got {pad_to!r}")
        n = len(self.table)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"{self.path}: example index {bad[0]} out of range [0, {n})")
        offs, lens = self.table[indices, 0], self.table[indices, 1]
        t = int(lens.max()) if pad_to is None else int(pad_to)
        if t < int(lens.max()):
            raise ValueError(f"pad_to={t} is shorter than cached example of {int(lens.max())} rows")
        if tokens is not None:
            for r, i in enumerate(indices):
                ids = tokens[r][:lens[r]]
                ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
                if len(ids) != lens[r] or token_crc(ids) != int(self.table[i, 2]):
                    raise ValueError(f"{self.path}: example {i} tokens do not match the cached ones")
        out = []
        for a, aug in enumerate(self.index["augments"]):
            d = {}
            for layer in aug["taps"]:
                mm = self.maps[(a, layer)]
                buf = np.zeros((len(indices), t, aug["dim"]), dtype=mm.dtype)
                for r in range(len(indices)):
                    buf[r, :lens[r]] = mm[offs[r]:offs[r] + lens[r]]
                x = torch.from_numpy(buf)
                if self.torch_dtype != torch.float32:
                    x = x.view(self.torch_dtype)
                d[layer] = x.to(device=device, dtype=dtype)
            out.append(d)
        mask = torch.arange(t)[None, :] < torch.as_tensor(lens)[:, None]
        return out, mask.to(device)


def drop_augment_weights(calm) -> None:
    """Free the augment models' weights once training reads a state cache (they are never run
    again); anything that still calls them fails loudly on the meta device."""
    for aug in calm.augments:
        aug.to("meta")
