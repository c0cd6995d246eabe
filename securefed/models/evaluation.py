"""Loss and accuracy of a classifier on a dataset."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import EncodedDataset, PadCollator


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    examples: int


def evaluate(model: torch.nn.Module, dataset: EncodedDataset, collator: PadCollator, batch_size: int) -> Evaluation:
    # Batches of similar length waste little on padding; the order does not change the result.
    order = np.argsort([len(ids) for ids in dataset.input_ids], kind="stable")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collator.batch(dataset, order[start : start + batch_size])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    n = len(order)
    return Evaluation(loss=loss_sum / n, accuracy=correct / n, examples=n)
