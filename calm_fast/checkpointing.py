"""Activation checkpointing of the anchor blocks that backward runs through.

Backward enters the frozen anchor only above its first bridge (blocks below it see no input
that requires grad, so autograd saves nothing for them). The blocks above the first bridge
are where CALM training spends its activation memory: each keeps its attention and MLP
intermediates for backward although none of its weights train. Checkpointing them keeps only
each block's input and recomputes the block in backward: roughly one extra anchor forward over
those blocks for a large cut in saved activations (figures in bench/bench_scaling.py and
docs/scaling.md).

PyTorch's own wrapper is used (the one torchtitan applies before FSDP): it strips its
`_checkpoint_wrapped_module.` prefix from state_dict keys, so saved anchors and Θ_C files keep
their names. Apply it before `fully_shard`.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, CheckpointWrapper,
                                                                        checkpoint_wrapper)


def backward_anchor_layers(calm) -> list[int]:
    """Anchor block indices that backward runs through: every block after the first bridge's
    anchor layer (the block at that layer itself ends before any bridge output exists)."""
    first = min(anchor_layer for m in calm.mappings for _, anchor_layer in m)
    return list(range(first + 1, calm.anchor.cfg.n_layers))


def apply_activation_checkpointing(calm, layers=None) -> list[int]:
    """Wrap anchor blocks (default: `backward_anchor_layers(calm)`) in non-reentrant activation
    checkpointing, in place. Idempotent. Returns the wrapped block indices."""
    n = calm.anchor.cfg.n_layers
    layers = backward_anchor_layers(calm) if layers is None else sorted(set(layers))
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"activation checkpointing: anchor layer {i!r} is out of range [0, {n})")
    for i in layers:
        block = calm.anchor.layers[i]
        if not isinstance(block, CheckpointWrapper):
            # non-reentrant: works with frozen weights, keyword args and FSDP2's hooks.
            calm.anchor.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return layers


def checkpointed_layers(calm) -> list[int]:
    return [i for i, b in enumerate(calm.anchor.layers) if isinstance(b, CheckpointWrapper)]


def unwrap_block(block: nn.Module) -> nn.Module:
    return block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
