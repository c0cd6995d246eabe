"""Tokenize once, pad per batch: each batch is padded only to its own longest example."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


class EncodedDataset(torch.utils.data.Dataset):
    """Token ids (unpadded) and integer labels."""

    def __init__(self, input_ids: list[list[int]], labels: np.ndarray):
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

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.input_ids[i], int(self.labels[i])

    def subset(self, indices: np.ndarray) -> EncodedDataset:
        return EncodedDataset([self.input_ids[i] for i in indices], self.labels[indices])

    def extended(self, other: EncodedDataset) -> EncodedDataset:
        return EncodedDataset(self.input_ids + other.input_ids, np.concatenate([self.labels, other.labels]))


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
