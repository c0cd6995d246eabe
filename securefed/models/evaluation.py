"""Loss and accuracy of a classifier on a dataset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..data import EncodedDataset, PadCollator


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    examples: int


def predictions(model: torch.nn.Module, dataset: EncodedDataset, collator: PadCollator,
                batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(indices, logits, labels) batch by batch, in eval and inference mode until the iteration ends (the caller's
    code between batches too); the model's mode is then restored. Batches hold examples of similar length, so
    little goes on padding; callers place results by the yielded indices."""
    order = np.argsort(dataset.lengths, kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                batch = collator.batch(dataset, indices)
                labels = batch.pop("labels")
                yield indices, model(**batch).logits, labels
    finally:
        model.train(was_training)


def evaluate(model: torch.nn.Module, dataset: EncodedDataset, collator: PadCollator, batch_size: int) -> Evaluation:
    loss_sum, correct = 0.0, 0
    for _, logits, labels in predictions(model, dataset, collator, batch_size):
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(dataset)
    return Evaluation(loss=loss_sum / n, accuracy=correct / n, examples=n)
