"""What a job learns: the seam between the federated machinery and one kind of task.

A task kind says which model class loads, how a split becomes tokens and targets, the loss of a batch (the mean
of each example's own loss, so DP-SGD clips examples), and what evaluation reports. Metric names travel from
`metrics` through metrics.jsonl, the CLI and the report without other code naming them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import JobConfig
from ..data import EncodedDataset, Splits
from ..models import Evaluation

Collator = Callable[..., dict[str, torch.Tensor]]


class TaskKind(ABC):
    name: str
    metrics: tuple[str, ...]  # what evaluate() returns, "loss" first; the last is the headline shown per round

    def __init__(self, config: JobConfig):
        self.config = config

    @property
    def headline(self) -> str:
        return self.metrics[-1]

    @abstractmethod
    def load_splits(self) -> Splits:
        """The job's train and dev splits."""

    def label_order(self) -> list[str]:
        """The labels in the order every party uses, fixed by the one who writes a deployed job's App (none unless
        the task has labels)."""
        return []

    @abstractmethod
    def check_partition(self, path: Path) -> int:
        """How many examples a client's own data file holds, after checking it reads as the job's data."""

    @abstractmethod
    def party_splits(self, labels: list[str], partition: Path | None = None) -> Splits:
        """A deployed party's data: a client's own partition (no dev split), or the server's dev split alone."""

    @abstractmethod
    def check(self, tokenizer) -> None:
        """Raise a ConfigError if the job's settings do not fit this model's tokenizer."""

    @abstractmethod
    def encode(self, split, tokenizer) -> EncodedDataset:
        """A split's tokens and targets, cut to the job's max_length."""

    @abstractmethod
    def collator(self, tokenizer) -> Collator:
        """Pads a list of encoded examples into a batch with a `batch(dataset, indices)` method."""

    @abstractmethod
    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over the batch's examples of each one's loss."""

    @abstractmethod
    def example_losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's own loss, a vector over the batch (DP-ZO clips each example's difference of two)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, tokenizer, split, encoded: EncodedDataset) -> Evaluation:
        """The model's `metrics` on a split."""
