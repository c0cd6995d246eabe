"""Datasets for classification jobs: built-in presets and user files, as train and dev splits."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .loaders import Table, column, load_table


@dataclass(frozen=True)
class Source:
    """Where a split's rows come from and which fields hold text and label."""

    train: Path
    dev: Path
    format: str | None
    header: bool
    columns: list[str] | None
    text_field: str
    label_field: str


def _builtin(folder: str, train: str, dev: str, **fields: Any) -> Source:
    root = Path(str(resources.files(__package__) / "builtin" / folder))
    return Source(train=root / train, dev=root / dev, format="tsv", **fields)


def builtin_sources() -> dict[str, Source]:
    return {
        "sst2": _builtin("sst2", "train.tsv", "dev.tsv", header=True, columns=None,
                         text_field="sentence", label_field="label"),
        "ag_news": _builtin("ag_news", "train_subset.tsv", "test.tsv", header=False, columns=["text", "label"],
                            text_field="text", label_field="label"),
    }


def source_of(config: DataConfig) -> Source:
    if config.dataset is not None:
        return builtin_sources()[config.dataset]
    assert config.train is not None and config.dev is not None  # guaranteed by DataConfig
    return Source(train=config.train, dev=config.dev, format=config.format, header=config.header,
                  columns=config.columns, text_field=config.text_field, label_field=config.label_field)


@dataclass(frozen=True)
class Split:
    """One split: texts, integer labels, and the whole table for partitioning by other fields."""

    texts: list[str]
    labels: np.ndarray
    table: Table
    path: Path

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Splits:
    train: Split
    dev: Split
    label_names: list[str]


def load_splits(config: DataConfig) -> Splits:
    """Load train and dev; labels are mapped to 0..K-1 in a fixed order taken from train."""
    source = source_of(config)
    tables = {name: _load(source, path, name) for name, path in (("train", source.train), ("dev", source.dev))}
    label_names = _label_order(column(tables["train"], source.label_field, source.train, "data.label_field"))
    if len(label_names) < 2:
        raise DataError(f"{source.train}: a classification task needs at least 2 labels, found {label_names}")
    return Splits(_split(source, tables["train"], source.train, label_names, "train"),
                  _split(source, tables["dev"], source.dev, label_names, "train"), label_names)


def label_names(config: DataConfig) -> list[str]:
    """The label order of a job whose training data lies with its clients: the dev split's. Where the training file
    is at hand too, dev must have all of its labels."""
    source = source_of(config)
    names = _label_order(column(_load(source, source.dev, "dev"), source.label_field, source.dev, "data.label_field"))
    if source.train.is_file():
        train = column(_load(source, source.train, "train"), source.label_field, source.train, "data.label_field")
        missing = sorted({str(v) for v in train} - set(names))
        if missing:
            raise DataError(f"{source.dev}: no example of label {missing[0]!r}, which the training data has; a "
                            "deployed job takes its labels from dev")
    return names


def load_labelled(config: DataConfig, path: Path, label_names: list[str], setting: str) -> Split:
    """A file in the job's data format (a client's own partition, or the dev split), with the job's labels."""
    source = source_of(config)
    return _split(source, _load(source, path, setting), path, label_names, "the job")


def check_partition(config: DataConfig, path: Path) -> int:
    """The number of examples in a client's own data file, after checking that it reads in the job's format and has
    the job's text and label fields."""
    source = source_of(config)
    table = _load(source, path, "partition")
    column(table, source.text_field, path, "data.text_field")
    return len(column(table, source.label_field, path, "data.label_field"))


def party_splits(config: DataConfig, label_names: list[str], partition: Path | None = None) -> Splits:
    """A deployed party's data: a client's own partition (and no dev split), or the server's dev split alone."""
    if partition is not None:
        return Splits(load_labelled(config, partition, label_names, "partition"), _empty(partition), label_names)
    dev = source_of(config).dev
    return Splits(_empty(dev), load_labelled(config, dev, label_names, "dev"), label_names)


def _empty(path: Path) -> Split:
    return Split(texts=[], labels=np.empty(0, dtype=np.int64), table={}, path=path)


def _load(source: Source, path: Path, setting: str) -> Table:
    table = load_table(path, source.format, header=source.header, columns=source.columns)  # type: ignore[arg-type]
    if not table or not next(iter(table.values())):
        raise DataError(f"{path}: no rows (data.{setting})")
    return table


def _split(source: Source, table: Table, path: Path, label_names: list[str], labels_from: str) -> Split:
    index = {name: i for i, name in enumerate(label_names)}
    texts = column(table, source.text_field, path, "data.text_field")
    raw = column(table, source.label_field, path, "data.label_field")
    labels = np.empty(len(raw), dtype=np.int64)
    for row, value in enumerate(raw):
        key = str(value)
        if key not in index:
            raise DataError(f"{path}: row {row + 1} has label {key!r}, which {labels_from} does not have")
        labels[row] = index[key]
    return Split(texts=[str(t) for t in texts], labels=labels, table=table, path=path)


def _label_order(values: list[Any]) -> list[str]:
    """Numeric labels in numeric order (so SST-2's '0' stays class 0), others alphabetically."""
    distinct = {str(v) for v in values}
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)
