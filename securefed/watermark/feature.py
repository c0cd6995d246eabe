"""FedIPR's feature watermark: the signs of secret projections of normalization scales carry the owner's bits.

Client i adds a hinge α·Σ_j ReLU(t_j − b_j·(Δγᵀw_j)) to its local loss (t_j: see hinge.py), where Δγ
is the carrier's shift from the base model's scales and w_j are the columns of its secret W. Projecting the
shift rather than the scales starts every bit at zero, so a small change of the scales sets it; the scales
themselves (about 0.6 in MiniLM) would put every projection far from zero, with a random sign, before training
began.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import LoraConfig
from ..errors import WatermarkError
from ..models.adapters import attach, base_name, lora_layers
from ..models.norms import last_block_norms
from ..models.registry import load_base, resolve
from .anatomy import anatomy
from .hinge import Hinge
from .keys import Carrier, WatermarkKey
from .reference import carrier_names, read, scale_vector, weights_digest

if TYPE_CHECKING:
    from .terms import Embedding


def scale_parameters(model: torch.nn.Module, carrier: Carrier) -> list[torch.nn.Parameter]:
    """The live scales the carrier names, in a plain model or in a peft model (its trained copies)."""
    wanted = {name for name, _ in carrier.parameters}
    found: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        plain = base_name(name)
        if plain in wanted and (plain not in found or ".modules_to_save." in name):
            found[plain] = p
    for name, size in carrier.parameters:
        if name not in found or found[name].numel() != size:
            raise WatermarkError(f"the model has no scale {name} of {size} values: the key was made for "
                                 f"another model ({carrier.model})")
    return [found[name] for name, _ in carrier.parameters]


def adapted_weights(model: torch.nn.Module) -> list[str]:
    """The weights a peft model's LoRA layers change, among those alignment can read (the readers of a norm)."""
    body = anatomy(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if body is None:
        return []
    readers = {name for group in body.groups for name in group.readers}
    names = list(lora_layers(model))
    return [name for name in names if name in readers]


def describe_carrier(model_name: str, model: torch.nn.Module, blocks: int, modules: Sequence[str]) -> Carrier:
    """The carrier of `modules` (the normalization layers of the last `blocks` blocks) and of the weights the
    model's LoRA layers adapt, from a model still holding its base values."""
    # sizes by base name: in a peft model, a submodule path such as Llama's "model.layers" resolves wrongly
    sizes = {base_name(name).replace(".base_layer.", "."): tuple(p.shape) for name, p in model.named_parameters()}
    weights = tuple((name, *sizes[name]) for name in adapted_weights(model))
    draft = Carrier(model_name, model.config.model_type, blocks,
                    tuple((f"{m}.weight", sizes[f"{m}.weight"][0]) for m in modules), "", weights)
    values = read(model, carrier_names(draft))
    return replace(draft, base=Carrier.digest(scale_vector(values, draft)),
                   weights_base=weights_digest(values, draft))


def base_carrier(model_name: str, blocks: int, targets: Sequence[str] | None = ()) -> Carrier:
    """The carrier of a base model (a registered name or a local folder): its last `blocks` blocks' scales and, unless
    `targets` is empty, the weights LoRA adapts on those module names (None: peft's default for the family)."""
    base = load_base(resolve(model_name), None)[0]
    norms = last_block_norms(base, blocks)
    if targets is not None and not targets:
        return describe_carrier(model_name, base, blocks, norms)
    lora = LoraConfig(method="lora", target_modules=list(targets) if targets else None)
    return describe_carrier(model_name, attach(base, lora), blocks, norms)


def check_carrier(key: WatermarkKey, carrier: Carrier, source: str) -> None:
    """Refuse a key made for another model, for other layers of this one, or for another adapter."""
    if key.carrier.model_type != carrier.model_type or key.carrier.base != carrier.base:
        raise WatermarkError(f"{source}: the key was made for another base model ({key.carrier.model}, "
                             f"{key.carrier.model_type}) than this one ({carrier.model}, {carrier.model_type})")
    if key.carrier.parameters != carrier.parameters:
        raise WatermarkError(f"{source}: the key marks {len(key.carrier.parameters)} normalization layers that "
                             f"differ from this job's {len(carrier.parameters)}; make keys with the job's blocks")
    if key.carrier.weights and key.carrier.weights != carrier.weights:
        raise WatermarkError(f"{source}: the key marks {len(key.carrier.weights)} adapted weights that differ from "
                             f"the {len(carrier.weights)} this job's LoRA adapts; make keys with the job's "
                             "target modules (keygen --targets)")


def check_capacity(bits: Sequence[int], carrier: Carrier) -> None:
    """All clients' bits must fit the carrier: beyond its size, one owner's bits would overwrite another's."""
    total = sum(bits)
    if total > carrier.size:
        raise WatermarkError(f"the clients' watermarks need {total} bits in all, but the carrier holds "
                             f"{carrier.size} scales: use fewer bits per key, or more blocks")


def matched_bits(key: WatermarkKey, values: np.ndarray, base: np.ndarray, projection: np.ndarray | None = None) -> int:
    """How many of the key's bits the scales carry: sign((γ − γ₀)ᵀW) = b; a zero projection carries none.
    `projection`: the key's W, if already made."""
    w = key.projection() if projection is None else projection
    projected = (values.astype(np.float64) - base) @ w.astype(np.float64)
    return int(np.sum(np.sign(projected) == key.message()))


class FeatureWatermark(Hinge):
    """The hinge (hinge.py) on the projections of the scales' shift from the base: (γ − γ₀)ᵀW."""

    name = "feature watermark"

    @classmethod
    def for_key(cls, key: WatermarkKey, embedding: Embedding) -> FeatureWatermark:
        settings = embedding.settings
        return cls(key, embedding.model, embedding.reference.scales, weight=settings.weight, margin=settings.margin,
                   clients=embedding.clients)

    def __init__(self, key: WatermarkKey, model: torch.nn.Module, base: np.ndarray, *, weight: float, margin: float,
                 clients: int):
        super().__init__(key, weight=weight, margin=margin, clients=clients)
        self.scales = scale_parameters(model, key.carrier)
        self.base = torch.from_numpy(np.asarray(base, dtype=np.float32))
        self.projection = torch.from_numpy(key.projection())

    def projected(self) -> torch.Tensor:
        return (torch.cat([p.reshape(-1) for p in self.scales]) - self.base) @ self.projection
