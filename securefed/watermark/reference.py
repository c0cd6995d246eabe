"""What verification compares a model against: the base model's values of the key's carriers, and of the weights
alignment reads. Read from the base model the key names, and checked against the key's hashes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import WatermarkError
from ..models.adapters import base_name
from ..models.registry import load_base, resolve
from .align import needed
from .anatomy import Anatomy, anatomy
from .keys import Carrier, WatermarkKey


def read(model: torch.nn.Module, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Named weights of a plain or peft model, as float64 arrays under their base-model names; a LoRA layer's
    weight is its effective weight W₀ + ΔW."""
    wanted, found, rank = set(names), {}, {}
    for module_name, module in model.named_modules():
        lora = getattr(module, "lora_A", None)
        if lora is not None and "default" in lora and hasattr(module, "base_layer"):
            name = base_name(module_name) + ".weight"
            if name in wanted:
                found[name], rank[name] = module.base_layer.weight + module.get_delta_weight("default"), 3
    for name, p in model.named_parameters():
        plain = base_name(name).replace(".base_layer.", ".")
        priority = 2 if ".modules_to_save." in name else 1
        if plain in wanted and priority > rank.get(plain, 0):
            found[plain], rank[plain] = p, priority
    missing = sorted(wanted - set(found))
    if missing:
        raise WatermarkError(f"the model has no {missing[0]}: the key was made for another model")
    return {name: value.detach().double().numpy() for name, value in found.items()}


def carrier_names(carrier: Carrier) -> list[str]:
    return [name for name, _ in carrier.parameters] + [name for name, _, _ in carrier.weights]


def scale_vector(values: dict[str, np.ndarray], carrier: Carrier) -> np.ndarray:
    return np.concatenate([values[name].reshape(-1) for name, _ in carrier.parameters])


def weights_digest(values: dict[str, np.ndarray], carrier: Carrier) -> str:
    if not carrier.weights:
        return ""
    return Carrier.digest(np.concatenate([values[name].reshape(-1) for name, _, _ in carrier.weights]))


@dataclass(frozen=True)
class Reference:
    carrier: Carrier
    values: dict[str, np.ndarray]  # base-model values by name
    anatomy: Anatomy | None = None  # set when `values` holds what alignment reads

    @property
    def scales(self) -> np.ndarray:
        return scale_vector(self.values, self.carrier)

    @classmethod
    def of(cls, model: torch.nn.Module, carrier: Carrier, *, alignable: bool = False) -> Reference:
        """From a model that still holds its base values (a job's model before training, or the base itself)."""
        names = carrier_names(carrier)
        body = anatomy(model) if alignable else None
        if body is not None:
            norms = [name.removesuffix(".weight") for name, _ in carrier.parameters]
            names += needed(body, norms, [name for name, _, _ in carrier.weights])
        return cls(carrier, read(model, names), body)

    @classmethod
    def load(cls, key: WatermarkKey) -> Reference:
        """From the base model the key names, checked against the key's hashes; with alignment's weights when the
        model's family has an anatomy."""
        carrier = key.carrier
        base = load_base(resolve(carrier.model), None)[0]
        reference = cls.of(base, carrier, alignable=True)
        if Carrier.digest(reference.scales) != carrier.base or weights_digest(reference.values, carrier) != \
                carrier.weights_base:
            raise WatermarkError(f"the base model {carrier.model} here differs from the one the key was made for")
        return reference
