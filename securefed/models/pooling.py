"""Sentence-embedding pooling for encoders that were trained with it (the sentence-transformers layout).

A BERT classifier reads the pooler's tanh of the first token. Sentence encoders such as all-MiniLM-L6-v2 were
trained to mean-pool instead, and their first-token output is mostly shared by all inputs: on SST-2 about 70%
of its energy lies along the common mean, against 15% for the mean-pooled embedding, and a linear probe on it
scores 7 points lower. A classifier head on it then learns slowly, and under DP noise barely at all.

The embedding is not L2-normalized, even where the encoder's own pipeline does so: the head is linear, and on
unit vectors (a fifth of the mean-pooled norm on SST-2) it would need weights five times larger, so as many
more steps at a given learning rate.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token states under the attention mask; no parameters."""

    def __init__(self):
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return hidden_states.mean(1)
        mask = self.attention_mask[..., None].to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


POOLING_CONFIG = Path("1_Pooling") / "config.json"  # where sentence-transformers keeps it


def _mean_pooled(folder: Path) -> bool:
    """Whether the folder's sentence-transformers pooling config asks for the mean of the tokens."""
    try:
        pooling = json.loads((folder / POOLING_CONFIG).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: unreadable sentence-transformers pooling config: {exc}") from None
    if not isinstance(pooling, dict):
        raise ModelError(f"{folder}: unreadable sentence-transformers pooling config: not a JSON object")
    return bool(pooling.get("pooling_mode_mean_tokens"))


def use_sentence_pooling(model: torch.nn.Module, folder: Path) -> None:
    """Swap the first-token pooler for the masked mean that the encoder was trained with, if its folder says so."""
    if not _mean_pooled(folder):
        return
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise ModelError(f"{folder}: asks for mean pooling, but {type(model).__name__} has no pooler to replace")
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def remember_mask(module, args, kwargs):
        # The encoder calls its pooler with the token states only; the mask arrives with the encoder's own call.
        pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
