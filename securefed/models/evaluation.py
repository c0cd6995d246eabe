"""A model's scores on a split; here a classifier's loss and accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..data import EncodedDataset, PadCollator


@dataclass(frozen=True)
class Evaluation:
    """Scores by name: "loss" first, then the task's own (accuracy, rouge_l)."""

    metrics: dict[str, float]
    examples: int

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]


def in_inference(model: torch.nn.Module, lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The indices of each batch, examples of similar length together so little goes on padding; the model is in
    eval and inference mode until the iteration ends (the caller's code between batches too), then its mode is
    restored. Callers place results by the yielded indices."""
    order = np.argsort(lengths, kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                yield order[start : start + batch_size]
    finally:
        model.train(was_training)


def predictions(model: torch.nn.Module, dataset: EncodedDataset, collator: PadCollator,
                batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(indices, logits, labels) batch by batch, in inference (see `in_inference`)."""
    for indices in in_inference(model, dataset.lengths, batch_size):
        batch = collator.batch(dataset, indices)
        labels = batch.pop("labels")
        yield indices, model(**batch).logits, labels


def evaluate(model: torch.nn.Module, dataset: EncodedDataset, collator: PadCollator, batch_size: int) -> Evaluation:
    loss_sum, correct = 0.0, 0
    for _, logits, labels in predictions(model, dataset, collator, batch_size):
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(dataset)
    return Evaluation({"loss": loss_sum / n, "accuracy": correct / n}, examples=n)
