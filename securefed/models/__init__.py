"""Base models, PEFT adapters and the flat trainable view."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, PeftConfig
from .adapters import attach
from .evaluation import Evaluation, evaluate
from .flatview import FlatView, ViewSpec
from .registry import load_base, resolve


@dataclass
class ModelBundle:
    """One model per process: every in-process client trains it in turn by swapping vectors."""

    model: object
    tokenizer: object
    view: FlatView
    base_path: Path

    @property
    def max_positions(self) -> int:
        """The longest input the base model accepts, in tokens (unbounded if it does not say)."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2**31)


def build_model(model: ModelConfig, adapter: PeftConfig, label_names: list[str], init_seed: int) -> ModelBundle:
    base_path = resolve(model.name)
    # New weights (the head, adapter initialisations) come from init_seed: every party builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        base, tokenizer = load_base(base_path, label_names)
        if model.dropout is not None:
            for layer in base.modules():
                if isinstance(layer, torch.nn.Dropout):
                    layer.p = model.dropout
        peft_model = attach(base, adapter)
    settings = json.dumps(adapter.model_dump(mode="json"), sort_keys=True)
    view = FlatView(peft_model, model_type=base.config.model_type, adapter=settings)
    return ModelBundle(peft_model, tokenizer, view, base_path)


__all__ = ["Evaluation", "FlatView", "ModelBundle", "ViewSpec", "build_model", "evaluate"]
