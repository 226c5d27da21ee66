"""Safetensors + JSON files, written atomically (temp file, fsync, rename): a crash mid-save
leaves the previous file intact. Never unpickles anything."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing JSON file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save_bytes(data, metadata=metadata))


def load_tensors(path) -> dict[str, torch.Tensor]:
    return load_tensors_and_metadata(path)[0]


def load_tensors_and_metadata(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the file's string metadata (the header's __metadata__), from one read of
    the file: both always come from the same save, even while another process replaces it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing safetensors file: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load_bytes(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return tensors, dict(header.get("__metadata__") or {})


def check_shapes(path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present with the expected shape; no unknown names."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{path}: unexpected tensor(s) {unknown[:5]}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"expected {tuple(ref.shape)}")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensors[name].dtype}, expected float")
