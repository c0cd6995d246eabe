"""Base models, PEFT adapters and the flat trainable view."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, PeftConfig
from .adapters import attach, base_name
from .evaluation import Evaluation, evaluate
from .flatview import FlatView, ViewSpec
from .norms import last_block_norms
from .registry import CLASSIFICATION, load_base, resolve


@dataclass
class ModelBundle:
    """One model per process: every in-process client trains it in turn by swapping vectors."""

    model: object
    tokenizer: object
    view: FlatView
    base_path: Path
    carrier: tuple[str, ...] = ()  # normalization layers whose scales carry the watermark, written by its hinge alone

    @property
    def carrier_mask(self) -> np.ndarray:
        """Which entries of the trainable vector are carrier scales."""
        scales = scale_names(self.carrier)
        return np.concatenate([np.full(int(np.prod(shape)), base_name(name) in scales)
                               for name, shape in self.view.spec.entries])

    @property
    def max_positions(self) -> int:
        """The longest input the base model accepts, in tokens (unbounded if it does not say)."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2**31)


def scale_names(carrier: tuple[str, ...]) -> set[str]:
    """The carrier's scales, by parameter name."""
    return {f"{name}.weight" for name in carrier}


def build_model(model: ModelConfig, adapter: PeftConfig | None, label_names: list[str], init_seed: int,
                carrier_blocks: int = 0, kind: str = CLASSIFICATION) -> ModelBundle:
    """The model every party builds alike, a classifier or (`kind` generation) a causal LM; with `carrier_blocks`,
    the scales of the normalization layers in that many last blocks are in the trainable vector too, written by
    the watermark's hinge alone (client.py): the task does not train them, so they carry no example and no DP
    noise, and averaging them per client amplifies no one's data. Their shifts stay out."""
    base_path = resolve(model.name)
    # New weights (the head, adapter initialisations) come from init_seed: every party builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        base, tokenizer = load_base(base_path, label_names, kind)
        if model.dropout is not None:
            for layer in base.modules():
                if isinstance(layer, torch.nn.Dropout):
                    layer.p = model.dropout
        carrier = tuple(last_block_norms(base, carrier_blocks)) if carrier_blocks else ()
        peft_model = base if adapter is None else attach(base, adapter, carrier, kind)  # None: every parameter
    shifts = {f"{name}.bias" for name in carrier}
    for name, p in peft_model.named_parameters():
        if p.requires_grad and base_name(name) in shifts:
            p.requires_grad_(False)
    settings = json.dumps(adapter.model_dump(mode="json") if adapter else "full", sort_keys=True)
    view = FlatView(peft_model, model_type=base.config.model_type, adapter=settings)
    scales = scale_names(carrier)
    for name, p in peft_model.named_parameters():
        if base_name(name) in scales:
            p.requires_grad_(False)  # the task's gradient, and so DP-SGD, leave them alone
    return ModelBundle(peft_model, tokenizer, view, base_path, carrier)


__all__ = ["Evaluation", "FlatView", "ModelBundle", "ViewSpec", "build_model", "evaluate"]
