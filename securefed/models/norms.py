"""Normalization layers of a transformer's last blocks: where a FedIPR watermark lives."""

from __future__ import annotations

import torch

from ..errors import ModelError


def _is_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    named_norm = type(module).__name__.endswith(("LayerNorm", "RMSNorm", "GroupNorm"))
    return (isinstance(module, torch.nn.LayerNorm) or named_norm) and isinstance(weight, torch.nn.Parameter) \
        and weight.dim() == 1


def block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer's stack of blocks: the longest ModuleList of identical modules (BERT's encoder.layer,
    GPT-2's h, Llama's layers)."""
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)
              and len({type(child) for child in m}) == 1]
    if not stacks:
        raise ModelError(f"{type(model).__name__} has no stack of transformer blocks")
    return max(stacks, key=lambda item: len(item[1]))


def last_block_norms(model: torch.nn.Module, blocks: int) -> list[str]:
    """Names of the normalization layers in the last `blocks` blocks, in model order."""
    prefix, stack = block_list(model)
    if not 1 <= blocks <= len(stack):
        raise ModelError(f"the model has {len(stack)} blocks; cannot take the last {blocks}")
    names = [f"{prefix}.{i}.{name}" for i in range(len(stack) - blocks, len(stack))
             for name, module in stack[i].named_modules() if name and _is_norm(module)]
    if not names:
        raise ModelError(f"the last {blocks} blocks of {type(model).__name__} have no normalization layer")
    return names
