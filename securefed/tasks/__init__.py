"""Task kinds, by the name a job's [task] kind gives: a new kind is a new module and one line here."""

from __future__ import annotations

from ..config import JobConfig
from .base import TaskKind
from .classification import Classification
from .generation import Generation

TASKS: dict[str, type[TaskKind]] = {
    "classification": Classification,
    "generation": Generation,
}


def task_kind(config: JobConfig) -> TaskKind:
    return TASKS[config.task.kind](config)


__all__ = ["TASKS", "TaskKind", "task_kind"]
