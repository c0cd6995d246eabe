"""`securefed audit --empirical JOB.toml`: run the job once with canaries on one client, and bound ε from below.

The canaries and their inclusion bits come from a fresh secret of the audit, never from the job seed.
The bound is set beside the ε that the client's ledger claims; a bound above the claim means that the
training leaks more than its accounting says.
"""

from __future__ import annotations

import math
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import job as jobs
from .config import JobConfig
from .errors import ConfigError
from .interfaces import Observer
from .privacy.audit import audit_ledgers, witnessed_entries
from .privacy.empirical import (
    centered_by_label,
    count_correct,
    epsilon_lower_bound,
    label_margins,
    make_canaries,
)
from .runtime.local import execute, prepare


@dataclass(frozen=True)
class EmpiricalAudit:
    client: int
    canaries: int
    included: int
    guesses: int
    correct: int
    confidence: float
    epsilon_lower_bound: float
    epsilon_claimed: float  # the client's ε by the PRV accountant; inf without DP
    delta: float

    @property
    def refuted(self) -> bool:
        """The run leaked more than the accountant allows."""
        return self.epsilon_lower_bound > self.epsilon_claimed

    def as_dict(self) -> dict:
        return {**asdict(self), "refuted": self.refuted}


def run_with_canaries(config: JobConfig, *, client: int = 0, canaries: int = 1000, guesses: int | None = None,
                      confidence: float = 0.95, out: Path | None = None,
                      observer: Observer | None = None) -> EmpiricalAudit:
    fed = config.federation
    if config.task.kind != "classification":
        raise ConfigError(f"audit --empirical plants labelled canaries: it runs on classification jobs only so far, "
                          f"not {config.task.kind}")
    if not 0 <= client < fed.clients:
        raise ConfigError(f"--client {client}: the job has clients 0 to {fed.clients - 1}")
    if canaries < 2:
        raise ConfigError("--canaries must be at least 2")
    guesses = guesses if guesses is not None else max(2, canaries // 10)
    if not 2 <= guesses <= canaries:
        raise ConfigError(f"--guesses must be between 2 and the number of canaries ({canaries})")
    scratch = None if out else Path(tempfile.mkdtemp(prefix="securefed-canaries-"))
    try:
        prepared = prepare(config, out=out or scratch / config.name)
        task = prepared.task
        rng = np.random.default_rng(secrets.randbits(128))
        planted = make_canaries(task.bundle.tokenizer, canaries, len(task.splits.label_names), config.data.max_length,
                                 rng)
        datasets = jobs.client_datasets(task)
        datasets[client] = datasets[client].extended(planted.data.subset(np.flatnonzero(planted.included)))
        start = task.bundle.view.get()
        result = execute(prepared, observer=observer, datasets=datasets)
        scores = _scores(task, planted, start, result.weights)
        claimed, delta = math.inf, 0.0
        if config.privacy is not None:
            delta = config.privacy.delta
            ledgers = audit_ledgers(result.run.ledger_dir, config.job_id, fed.clients,
                                    witnessed_entries(result.records))
            claimed = next(row.epsilon_prv for row in ledgers if row.client == client)
        correct = count_correct(scores, planted.included, guesses)
        return EmpiricalAudit(
            client=client, canaries=canaries, included=int(planted.included.sum()), guesses=guesses,
            correct=correct, confidence=confidence,
            epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, delta, confidence),
            epsilon_claimed=claimed, delta=delta)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _scores(task: jobs.Task, planted, start: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Higher means "more likely trained on": the rise in each canary's log-odds of its label, less its label's
    median (black box: only the model's outputs before and after training)."""
    view, model = task.bundle.view, task.bundle.model
    view.set(start)
    before = label_margins(model, planted.data, task.collator)
    view.set(final)
    return centered_by_label(label_margins(model, planted.data, task.collator) - before, planted.data.labels)
