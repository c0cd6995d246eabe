"""The loss terms that write a client's watermark (the scales' bits, the adapter's bits, the trigger set), by
name: a new one is a module in watermark/ whose term class has `for_key(key, embedding)`, and one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import WatermarkConfig
from ..data import EncodedDataset
from ..interfaces import LossTerm
from .delta import DeltaWatermark
from .feature import FeatureWatermark
from .keys import WatermarkKey
from .reference import Reference
from .trigger import TriggerLoss


@dataclass(frozen=True)
class Embedding:
    """What a term may read to write one client's watermark: the model and key-derived inputs, no example."""

    model: torch.nn.Module
    tokenizer: object
    settings: WatermarkConfig
    reference: Reference  # the carriers' values in the base model
    clients: int  # K, the clients averaged per round
    classes: int | None  # a classifier's labels; None for a causal LM
    max_length: int
    batch: Callable[[EncodedDataset], dict]  # a whole dataset as one batch of the task's
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]  # the task's mean loss of a batch


LOSS_TERMS: dict[str, Callable[[WatermarkKey, Embedding], LossTerm | None]] = {
    "feature": FeatureWatermark.for_key,
    "delta": DeltaWatermark.for_key,
    "trigger": TriggerLoss.for_key,
}


def watermark_terms(key: WatermarkKey, embedding: Embedding) -> list[LossTerm]:
    """Every term the key and settings call for (a key without triggers writes no trigger set)."""
    return [term for make in LOSS_TERMS.values() if (term := make(key, embedding)) is not None]
