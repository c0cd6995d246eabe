"""Split a training set among clients: iid, Dirichlet(α) over labels, or by the value of a field.

Each partitioner returns one sorted index array per client; together they are disjoint.
The same seed always gives the same partition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ByFieldPartition, DirichletPartition, IidPartition, JobConfig, PartitionConfig
from ..errors import DataError
from ..seeding import stream
from .datasets import Split, load_splits, source_of
from .instructions import Instructions, instruction_source, load_instruction_splits
from .loaders import column, infer_format, write_table

_MAX_DRAWS = 200


def partition(split: Split | Instructions, clients: int, config: PartitionConfig, seed: int) -> list[np.ndarray]:
    if len(split) < clients:
        raise DataError(f"{split.path}: {len(split)} examples cannot be shared among {clients} clients")
    rng = stream(seed, "partition")
    match config:
        case IidPartition():
            return iid(len(split), clients, rng)
        case DirichletPartition(alpha=alpha, min_examples=minimum, field=field):
            return dirichlet(_classes(split, field), clients, alpha, minimum, rng)
        case ByFieldPartition(field=field):
            return by_field(column(split.table, field, split.path, "partition.field"), clients, split.path)
    raise AssertionError(f"unhandled partition {config!r}")


def _classes(split: Split | Instructions, field: str | None) -> np.ndarray:
    """What a Dirichlet draw skews: the label, or the values of a field (instruction data has no label)."""
    if field is None:
        if isinstance(split, Instructions):
            raise DataError(f"{split.path}: instruction data has no label to skew; set partition.field "
                            "(such as category)")
        return split.labels
    values = [str(v) for v in column(split.table, field, split.path, "partition.field")]
    codes = {value: i for i, value in enumerate(sorted(set(values)))}
    return np.array([codes[v] for v in values], dtype=np.int64)


def write_partitions(config: JobConfig, out: Path) -> list[Path]:
    """Each client's share of the job's training data as its own file, in the job's data format: what each
    organisation holds when the job runs across machines (a demonstration; real organisations bring theirs)."""
    if config.task.kind == "generation":
        train, header = load_instruction_splits(config.data)[0], True
        fmt = instruction_source(config.data).format or infer_format(train.path)
    else:
        train, source = load_splits(config.data).train, source_of(config.data)
        fmt, header = source.format or infer_format(source.train), source.header
    fed = config.federation
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for cid, rows in enumerate(partition(train, fed.clients, config.partition, fed.seed)):
        path = out / f"client-{cid}.{fmt}"
        write_table(train.table, rows.tolist(), path, fmt, header=header)
        paths.append(path)
    return paths


def iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]


def dirichlet(
    labels: np.ndarray, clients: int, alpha: float, minimum: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per label, client shares drawn from Dir(α); redrawn until every client has `minimum` examples."""
    if minimum * clients > len(labels):
        raise DataError(f"{len(labels)} examples cannot give {clients} clients {minimum} each (partition.min_examples)")
    by_label = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for indices in by_label:
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(np.int64)
            for client, chunk in enumerate(np.split(indices, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= minimum:
            return result
    raise DataError(
        f"Dirichlet(alpha={alpha}) left some client with fewer than {minimum} examples in {_MAX_DRAWS} draws; "
        "raise partition.alpha or lower partition.min_examples"
    )


def by_field(values: list, clients: int, path) -> list[np.ndarray]:
    """One client per distinct value of the field, in sorted order of the values."""
    keys = np.array([str(v) for v in values])
    distinct = np.unique(keys)
    if len(distinct) != clients:
        raise DataError(
            f"{path}: partition.field has {len(distinct)} distinct values but federation.clients is {clients}"
        )
    return [np.flatnonzero(keys == value) for value in distinct]
