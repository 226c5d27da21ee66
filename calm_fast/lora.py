"""LoRA on a Decoder (the paper's Table 5 ablation: the same number of added parameters as
Θ_C, spent on low-rank updates of the anchor's own weights instead of a bridge to m_A)."""
from __future__ import annotations

import math

import torch
from torch import nn

# Attention (wq, wk, wv, wo) and MLP projections: w1/w2/w3 in the Llama family, fc/proj in GPT-2.
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "fc", "proj")


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(x)); base frozen, B starts at zero (identity at init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        _check_rank(rank)
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha)):
            raise ValueError(f"LoRA alpha must be a finite number or None, got {alpha!r}")
        self.base = base
        base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x):
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")


def _targets(model: nn.Module):
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if child_name in TARGETS and isinstance(child, nn.Linear):
                yield mod, child_name, child


def lora_params_per_rank(model: nn.Module) -> int:
    return sum(c.in_features + c.out_features for _, _, c in _targets(model))


def rank_for_budget(model: nn.Module, n_params: int) -> int:
    """The rank whose LoRA parameter count is closest to n_params."""
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params <= 0:
        raise ValueError(f"n_params must be a positive int, got {n_params!r}")
    per_rank = lora_params_per_rank(model)
    if per_rank == 0:
        raise ValueError(f"{type(model).__name__} has no LoRA target layers (nn.Linear named one of {TARGETS})")
    return max(1, round(n_params / per_rank))


def add_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """Freeze `model`, wrap every attention and MLP projection with LoRA; returns the new
    trainable parameters. Once per model: a second call would freeze the first adapters."""
    _check_rank(rank)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters (add_lora was called on it); "
                         f"use its existing adapters or a fresh model")
    if not any(True for _ in _targets(model)):
        raise ValueError(f"{type(model).__name__} has no LoRA target layers (nn.Linear named one of {TARGETS})")
    model.requires_grad_(False)
    params = []
    for parent, name, child in list(_targets(model)):
        wrapped = LoRALinear(child, rank)
        setattr(parent, name, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params
