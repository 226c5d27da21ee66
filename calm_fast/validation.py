"""Input checks shared by the decoder, CALM and generation: one clear error per bad value."""
from __future__ import annotations

import numbers

import torch


def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool: what a token id, index or count may be."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_tokens(tokens, vocab_size: int, name: str = "tokens") -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):  # what nn.Embedding indexes with
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype} "
                        f"(expected torch.int64 or torch.int32)")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tokens.shape)}")
    if torch.compiler.is_compiling():
        return  # data-dependent checks would break the graph; eager callers still check
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        raise ValueError(f"{name} holds a negative token id ({lo})")
    if hi >= vocab_size:
        raise ValueError(f"{name} holds token id {hi}, out of range for vocab_size={vocab_size}")


def check_attention_mask(mask, tokens: torch.Tensor, pos: int = 0, name: str = "attention_mask"):
    """Returns the mask as bool (B, pos+T), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    expected = (tokens.shape[0], pos + tokens.shape[1])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (batch, positions so far) = {expected}, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point:
            raise TypeError(f"{name} must be bool or integer 0/1, got {mask.dtype}")
        mask = mask != 0
    return mask
