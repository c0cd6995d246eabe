"""Sentence classification: a sequence-classification head, cross-entropy, accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import PadCollator, Splits, encode, load_splits
from ..data.datasets import check_partition, label_names, party_splits
from ..models import Evaluation, evaluate
from .base import TaskKind


class Classification(TaskKind):
    name = "classification"
    metrics = ("loss", "accuracy")

    def load_splits(self) -> Splits:
        return load_splits(self.config.data)

    def label_order(self) -> list[str]:
        return label_names(self.config.data)  # from the dev split: a client's partition may lack a label

    def check_partition(self, path: Path) -> int:
        return check_partition(self.config.data, path)

    def party_splits(self, labels: list[str], partition: Path | None = None) -> Splits:
        return party_splits(self.config.data, labels, partition)

    def check(self, tokenizer) -> None:
        pass

    def encode(self, split, tokenizer):
        return encode(split.texts, tokenizer, self.config.data.max_length, split.labels)

    def collator(self, tokenizer) -> PadCollator:
        return PadCollator(tokenizer.pad_token_id)

    def loss(self, module, batch):
        return module(**batch).loss  # the model's mean cross-entropy over the batch

    def example_losses(self, module, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.nn.functional.cross_entropy(module(**inputs).logits, batch["labels"], reduction="none")

    def evaluate(self, model, tokenizer, split, encoded) -> Evaluation:
        return evaluate(model, encoded, self.collator(tokenizer), self.config.data.eval_batch_size)
