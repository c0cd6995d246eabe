"""Training wrappers, by the [privacy] mechanism a job names: a new one is a module here in privacy/, one line
below, and its name among PrivacyConfig.mechanism's values."""

from __future__ import annotations

from ..config import JobConfig
from ..interfaces import TrainingWrapper
from .dpsgd import DPSGD
from .dpzo import DPZO

MECHANISMS: dict[str, type[TrainingWrapper]] = {
    "dp-sgd": DPSGD,
    "dp-zo": DPZO,
}


def mechanism(config: JobConfig) -> type[TrainingWrapper] | None:
    """The job's training wrapper; None for a job without privacy."""
    return MECHANISMS[config.privacy.mechanism] if config.privacy is not None else None
