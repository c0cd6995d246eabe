"""Tokenize once, pad per batch: each batch is padded only to its own longest example."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


class EncodedDataset(torch.utils.data.Dataset):
    """Token ids (unpadded) and targets: an integer label per example (classification), or a target id per token,
    -100 where no loss is taken (generation)."""

    def __init__(self, input_ids: list[list[int]], labels: np.ndarray | list[list[int]]):
        if len(input_ids) != len(labels):
            raise ValueError("input_ids and labels differ in length")
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Each example's token count."""
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[list[int], int | list[int]]:
        label = self.labels[i]
        return self.input_ids[i], label if isinstance(label, list) else int(label)

    def subset(self, indices: np.ndarray) -> EncodedDataset:
        labels = self.labels[indices] if isinstance(self.labels, np.ndarray) else [self.labels[i] for i in indices]
        return EncodedDataset([self.input_ids[i] for i in indices], labels)

    def extended(self, other: EncodedDataset) -> EncodedDataset:
        if isinstance(self.labels, np.ndarray):
            return EncodedDataset(self.input_ids + other.input_ids, np.concatenate([self.labels, other.labels]))
        return EncodedDataset(self.input_ids + other.input_ids, list(self.labels) + list(other.labels))


def encode(texts: Sequence[str], tokenizer, max_length: int, labels: np.ndarray) -> EncodedDataset:
    if not texts:  # a deployed server holds no training data
        return EncodedDataset([], labels)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    return EncodedDataset(ids, labels)


class PadCollator:
    """Right-pads a list of (ids, label) pairs into model inputs."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def batch(self, dataset: EncodedDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self([dataset[int(i)] for i in indices])


IGNORE = -100  # the target of a token no loss is taken on (torch's cross-entropy ignore_index)


class CausalCollator:
    """Right-pads (ids, token targets) pairs into model inputs; padding is never a target."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for row, (ids, targets) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
            labels[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def batch(self, dataset: EncodedDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self([dataset[int(i)] for i in indices])


def left_padded(prompts: Sequence[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts padded on the left, so that every row's next token is generated at the same position."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}
