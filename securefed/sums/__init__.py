"""Secure sums, by the name a job's [secagg] mode gives: a new one is a new module, one line here, and its
section's schema in config.py (one member of SecAggConfig)."""

from __future__ import annotations

from ..config import JobConfig
from ..weighting import BY_EXAMPLES, Weighting
from .base import SecureSum
from .ckks import Ckks
from .plain import PlainSum
from .secaggplus import SecAggPlus

SECURE_SUMS: dict[str, type[SecureSum]] = {
    "secaggplus": SecAggPlus,
    "ckks": Ckks,
    "none": PlainSum,
}


def sum_kind(config: JobConfig) -> type[SecureSum]:
    return SECURE_SUMS[config.secagg.mode]


def secure_sum(config: JobConfig, weighting: Weighting = BY_EXAMPLES) -> SecureSum:
    return sum_kind(config)(config, weighting)


__all__ = ["SECURE_SUMS", "SecureSum", "secure_sum", "sum_kind"]
