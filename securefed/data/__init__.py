"""Datasets, partitioners and tokenization."""

from .datasets import Split, Splits, load_splits
from .partition import partition
from .tokenize import EncodedDataset, PadCollator, encode

__all__ = ["EncodedDataset", "PadCollator", "Split", "Splits", "encode", "load_splits", "partition"]
