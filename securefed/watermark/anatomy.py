"""Which weights of a model family read which normalization layer: what alignment needs to undo a thief's
reparameterization. A new family is a function here and one registry line.

A thief may change a model's weights without changing its function: permute the residual stream's channels, flip
or rescale them, and move a norm's scale into the layers that read it. Each norm's output is read by a group of
linear layers; some of their rows may be rescaled (a value row against the output projection's column, a query row
against its key row), some may not (a row feeding a GELU or SiLU). The rows that cannot move, or the query and key
rows that move inversely, fix the scale that the group's columns took from the norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.norms import block_list


@dataclass(frozen=True)
class Group:
    norm: str  # the norm's module name (its scale is `norm.weight`)
    readers: tuple[str, ...]  # the weights that read its output, in the base model
    gauge: tuple[str, ...]  # readers whose row scales average to one (see the module's docstring)


@dataclass(frozen=True)
class Anatomy:
    embedding: str  # [vocabulary, hidden]: its columns are the residual stream's channels
    groups: tuple[Group, ...]  # norms read by base weights
    unread: tuple[str, ...] = ()  # LayerNorms read only by a head the base lacks: their shift gives their scale
    rotations: bool = False  # RMSNorms read by linear layers only: the residual stream may rotate, not only permute

    def group_of_norm(self, norm: str) -> Group | None:
        return next((g for g in self.groups if g.norm == norm), None)

    def group_of_reader(self, weight: str) -> Group | None:
        return next((g for g in self.groups if weight in g.readers), None)


def bert(model: torch.nn.Module) -> Anatomy:
    """Post-LN BERT: each LayerNorm's output is the residual stream the next sublayer reads."""
    prefix, stack = block_list(model)
    backbone = prefix.removesuffix(".encoder.layer")
    attention = ("attention.self.query", "attention.self.key", "attention.self.value")
    groups, feeding = [], f"{backbone}.embeddings.LayerNorm"
    for i in range(len(stack)):
        block = f"{prefix}.{i}"
        groups.append(Group(feeding, tuple(f"{block}.{m}.weight" for m in attention),
                            (f"{block}.attention.self.query.weight", f"{block}.attention.self.key.weight")))
        groups.append(Group(f"{block}.attention.output.LayerNorm", (f"{block}.intermediate.dense.weight",),
                            (f"{block}.intermediate.dense.weight",)))
        feeding = f"{block}.output.LayerNorm"
    return Anatomy(f"{backbone}.embeddings.word_embeddings.weight", tuple(groups), (feeding,))


def llama(model: torch.nn.Module) -> Anatomy:
    """Pre-norm decoders with RMSNorm (Llama, Mistral, Qwen2): the norms' outputs are read by linear layers only."""
    prefix, stack = block_list(model)
    backbone = prefix.removesuffix(".layers")
    groups = []
    for i in range(len(stack)):
        block = f"{prefix}.{i}"
        q, k, v = (f"{block}.self_attn.{m}_proj.weight" for m in "qkv")
        gate, up = f"{block}.mlp.gate_proj.weight", f"{block}.mlp.up_proj.weight"
        groups += [Group(f"{block}.input_layernorm", (q, k, v), (q, k)),
                   Group(f"{block}.post_attention_layernorm", (gate, up), (gate,))]
    return Anatomy(f"{backbone}.embed_tokens.weight", tuple(groups), rotations=True)


ANATOMIES: dict[str, Callable[[torch.nn.Module], Anatomy]] = {
    "bert": bert,
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
}


def anatomy(model: torch.nn.Module) -> Anatomy | None:
    """The model's anatomy, or None for a family alignment does not know."""
    make = ANATOMIES.get(model.config.model_type)
    return make(model) if make else None
