"""Algorithms, by the name a job's [algorithm] gives: a new one is a module here, one line below, and its section's
schema in config.py (one member of AlgorithmConfig)."""

from __future__ import annotations

from ..config import JobConfig
from .base import Algorithm
from .fedavg import FedAvg
from .fedkseed import FedKSeed

ALGORITHMS: dict[str, type[Algorithm]] = {
    "fedavg": FedAvg,
    "fedkseed": FedKSeed,
}


def algorithm(config: JobConfig, spec: bytes, initial) -> Algorithm:
    return ALGORITHMS[config.algorithm.name](config, spec, initial)


__all__ = ["ALGORITHMS", "Algorithm", "algorithm"]
