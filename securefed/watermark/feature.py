"""FedIPR's feature watermark: the signs of secret projections of normalization scales carry the owner's bits.

Client i adds a hinge α·Σ_j ReLU(t_j − b_j·(Δγᵀw_j)) to its local loss (t_j: see FeatureWatermark), where Δγ
is the carrier's shift from the base model's scales and w_j are the columns of its secret W. Projecting the
shift rather than the scales starts every bit at zero, so a small change of the scales sets it; the scales
themselves (about 0.6 in MiniLM) would put every projection far from zero, with a random sign, before training
began.

The term reads no example, only the carrier and the key. Its gradient therefore joins the step after
DP-SGD's clipping and noise (see client.py): it costs no privacy, and no clipping dilutes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import WatermarkError
from ..interfaces import LossTerm
from ..models.adapters import base_name
from ..models.norms import last_block_norms
from ..models.registry import load_base, resolve
from .keys import Carrier, WatermarkKey

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


def scale_values(model: torch.nn.Module, carrier: Carrier) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in scale_parameters(model, carrier)]).float().numpy()


def describe_carrier(model_name: str, model: torch.nn.Module, blocks: int, modules: Sequence[str]) -> Carrier:
    """The carrier of `modules` (the normalization layers of the last `blocks` blocks), from a model still holding
    its base scales."""
    # sizes by base name: in a peft model, a submodule path such as Llama's "model.layers" resolves wrongly
    sizes = {base_name(name): p.numel() for name, p in model.named_parameters()}
    draft = Carrier(model_name, model.config.model_type, blocks,
                    tuple((f"{m}.weight", sizes[f"{m}.weight"]) for m in modules), "")
    values = scale_values(model, draft)
    return Carrier(draft.model, draft.model_type, blocks, draft.parameters, Carrier.digest(values))


def _base_model(name: str) -> torch.nn.Module:
    return load_base(resolve(name), None)[0]


def base_carrier(model_name: str, blocks: int) -> Carrier:
    """The carrier of a base model (a registered name or a local folder): its last `blocks` blocks' scales."""
    base = _base_model(model_name)
    return describe_carrier(model_name, base, blocks, last_block_norms(base, blocks))


def base_scales(key: WatermarkKey) -> np.ndarray:
    """The carrier's values in the base model the key was made for, checked against the key."""
    values = scale_values(_base_model(key.carrier.model), key.carrier)
    if Carrier.digest(values) != key.carrier.base:
        raise WatermarkError(f"the base model {key.carrier.model} here differs from the one the key was made for")
    return values


def check_carrier(key: WatermarkKey, carrier: Carrier, source: str) -> None:
    """Refuse a key made for another model, or for other layers of this one."""
    if key.carrier.model_type != carrier.model_type or key.carrier.base != carrier.base:
        raise WatermarkError(f"{source}: the key was made for another base model ({key.carrier.model}, "
                             f"{key.carrier.model_type}) than this one ({carrier.model}, {carrier.model_type})")
    if key.carrier.parameters != carrier.parameters:
        raise WatermarkError(f"{source}: the key marks {len(key.carrier.parameters)} normalization layers that "
                             f"differ from this job's {len(carrier.parameters)}; make keys with the job's blocks")


def check_capacity(bits: Sequence[int], carrier: Carrier) -> None:
    """All clients' bits must fit the carrier: beyond its size, one owner's bits would overwrite another's."""
    total = sum(bits)
    if total > carrier.size:
        raise WatermarkError(f"the clients' watermarks need {total} bits in all, but the carrier holds "
                             f"{carrier.size} scales: use fewer bits per key, or more blocks")


def matched_bits(key: WatermarkKey, values: np.ndarray, base: np.ndarray) -> int:
    """How many of the key's bits the scales carry: sign((γ − γ₀)ᵀW) = b; a zero projection carries none."""
    projected = (values.astype(np.float64) - base) @ key.projection().astype(np.float64)
    return int(np.sum(np.sign(projected) == key.message()))


class FeatureWatermark(LossTerm):
    """α·Σ_j ReLU(t_j − b_j·(Δγᵀw_j)): the hinge on this client's bits.

    The carrier is averaged over the K clients, so a client's own move of a bit reaches the global model
    divided by K. The target therefore aims at the global model: from the round's starting projection s_j,
    t_j = s_j + K·(m − s_j), so that after averaging the bit stands at the margin m. A bit already past the
    margin is held at the margin only.
    """

    name = "feature watermark"

    @classmethod
    def for_key(cls, key: WatermarkKey, embedding: Embedding) -> FeatureWatermark:
        settings = embedding.settings
        return cls(key, embedding.model, embedding.carrier_base, weight=settings.weight, margin=settings.margin,
                   clients=embedding.clients)

    def __init__(self, key: WatermarkKey, model: torch.nn.Module, base: np.ndarray, *, weight: float, margin: float,
                 clients: int):
        self.scales = scale_parameters(model, key.carrier)
        self.base = torch.from_numpy(np.asarray(base, dtype=np.float32))
        self.projection = torch.from_numpy(key.projection())
        self.message = torch.from_numpy(key.message())
        self.weight, self.margin, self.clients = weight, margin, clients
        self.target = torch.full_like(self.message, margin)

    def _signed(self) -> torch.Tensor:
        shift = torch.cat([p.reshape(-1) for p in self.scales]) - self.base
        return self.message * (shift @ self.projection)

    def begin_round(self) -> None:
        with torch.no_grad():
            start = self._signed()
        # past the margin, only the margin is defended: defending each round's start would ratchet the bits
        # up on every round's noise
        self.target = torch.where(start < self.margin, start + self.clients * (self.margin - start), self.margin)

    def __call__(self) -> torch.Tensor:
        return self.weight * torch.relu(self.target - self._signed()).sum()
