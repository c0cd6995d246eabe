"""The adapter's watermark: the owner's bits again, in the signs of secret projections of the effective weight
change ΔW = W − W₀ of the weights the job adapts (LoRA's ΔW = scaling·BA).

Bit j reads Σ_w u_jᵀ·ΔW_w·v_j (keys.py: `delta_projection`). ΔW is what fine-tuning bought: a thief who resets it
to the base's weights gives the adaptation back, and refactoring the adapter (B·A = (BR)(R⁻¹A)) leaves ΔW, so the
bits, unchanged. A merged model holds W₀ + ΔW, and verification reads ΔW against the base model after alignment.
The hinge (hinge.py) writes them as it writes the scales' bits, after DP-SGD's noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import WatermarkError
from ..models.adapters import lora_layers
from .hinge import Hinge
from .keys import WatermarkKey

if TYPE_CHECKING:
    from .terms import Embedding

MAX_REACH = 1000.0


def delta_projected(pairs: Sequence[tuple[np.ndarray, np.ndarray]], deltas: Sequence[np.ndarray]) -> np.ndarray:
    """The B projections of the adapted weights' changes, in the carrier's order (`pairs`: the key's
    `delta_projection()`)."""
    return sum(np.sum(u.astype(np.float64) * (delta @ v.astype(np.float64)), axis=0)
               for delta, (u, v) in zip(deltas, pairs, strict=True))


def matched_delta_bits(key: WatermarkKey, deltas: Sequence[np.ndarray],
                       pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> int:
    pairs = key.delta_projection() if pairs is None else pairs
    return int(np.sum(np.sign(delta_projected(pairs, deltas)) == key.message()))


class DeltaWatermark(Hinge):
    """The hinge on Σ_w u_jᵀ·(scaling·B_w·A_w)·v_j, read from the live LoRA factors."""

    name = "adapter watermark"

    @classmethod
    def for_key(cls, key: WatermarkKey, embedding: Embedding) -> DeltaWatermark | None:
        """None when the key marks no adapted weights (a key made before them, or for a method other than LoRA)."""
        if not key.carrier.weights:
            return None
        settings = embedding.settings
        return cls(key, embedding.model, weight=settings.weight, margin=settings.margin, clients=embedding.clients)

    def __init__(self, key: WatermarkKey, model: torch.nn.Module, *, weight: float, margin: float, clients: int):
        super().__init__(key, weight=weight, margin=margin, clients=clients)
        self.start: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the round's factors (A₀, B₀)
        layers = lora_layers(model)
        self.layers = []
        for (name, rows, columns), (u, v) in zip(key.carrier.weights, key.delta_projection(), strict=True):
            layer = layers.get(name)
            if layer is None or tuple(layer.base_layer.weight.shape) != (rows, columns):
                raise WatermarkError(f"the key marks the adapted weight {name} ({rows}×{columns}), which this "
                                     "job's adapter does not train")
            self.layers.append((layer, torch.from_numpy(u), torch.from_numpy(v)))

    def reach(self, share: float | None) -> float:
        """1/w: LoRA's factors average over examples (1/K while the share is not known). At most MAX_REACH, so a
        server that lies about last round's examples cannot make a client throw its model away."""
        return self.clients if share is None else min(MAX_REACH, 1 / max(share, 1 / MAX_REACH))

    def __call__(self) -> torch.Tensor:
        # a small client's bits must move its local factors 1/(K·w) times as far: the hinge pulls as much harder
        return max(1.0, self.factor / self.clients) * super().__call__()

    def begin_round(self, share: float | None = None) -> None:
        # at the round's start the first-order reading equals the exact one, so the start may be taken first
        self.start = [(layer.lora_A["default"].weight.detach().clone(),
                       layer.lora_B["default"].weight.detach().clone()) for layer, _, _ in self.layers]
        super().begin_round(share)

    def projected(self) -> torch.Tensor:
        """Within a round, to first order in the move from the round's factors A₀, B₀: B·A₀ + B₀·A − B₀·A₀. Averaging
        the factors passes that part of a client's move on times its share w, but the product of its moves on B and
        A only times w². Aiming 1/w as far through the exact product, a small client reached its target partly
        through that product, and the average missed the aim (tests/test_watermark_attacks.py)."""
        total = 0
        for (layer, u, v), (a0, b0) in zip(self.layers, self.start or [(None, None)] * len(self.layers), strict=True):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            change = b @ (a @ v) if a0 is None else b @ (a0 @ v) + b0 @ ((a - a0) @ v)
            total = total + layer.scaling["default"] * torch.sum(u * change, dim=0)
        return total
