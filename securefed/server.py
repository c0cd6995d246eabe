"""Round orchestration: sample a cohort, broadcast, aggregate through the secure sum, evaluate, commit."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import RoundAborted
from .interfaces import Exchange, Grid, Observer, SumResult, SumServer
from .protocol import TrainIns, TrainRes
from .rundir import RunDir
from .seeding import stream

if TYPE_CHECKING:
    from .models import Evaluation


@dataclass(frozen=True)
class Schedule:
    rounds: int
    clients: int
    cohort_size: int
    seed: int

    def cohort(self, round: int) -> list[int]:
        """The clients asked to train in `round`: a seeded draw, the same on every resume."""
        if self.cohort_size == self.clients:
            return list(range(self.clients))
        chosen = stream(self.seed, "cohort", round).choice(self.clients, self.cohort_size, replace=False)
        return sorted(int(c) for c in chosen)


class Server:
    def __init__(
        self,
        schedule: Schedule,
        spec: bytes,
        secure_sum: SumServer,
        grid: Grid,
        run: RunDir,
        evaluate: Callable[[np.ndarray], Evaluation] | None = None,
        observer: Observer | None = None,
    ):
        self.schedule = schedule
        self.spec = spec
        self.secure_sum = secure_sum
        self.grid = grid
        self.run_dir = run
        self.evaluate = evaluate
        self.observer = observer or Observer()

    def run(self, weights: np.ndarray, start: int = 1) -> np.ndarray:
        """Run rounds `start`..`rounds` from `weights`; every finished round is committed to the run directory."""
        for round in range(start, self.schedule.rounds + 1):
            weights, record = self.round(round, weights)
            self.run_dir.commit(round, weights, self.spec, record)
            self.observer.round_finished(record)
        return weights

    def round(self, round: int, weights: np.ndarray) -> tuple[np.ndarray, dict]:
        cohort = self.schedule.cohort(round)
        self.observer.round_started(round, self.schedule.rounds, cohort)
        traffic = _Traffic()
        self.secure_sum.open(round, cohort, weights.size + 1)

        exchange = traffic.add(self.grid.exchange({c: TrainIns(round=round, spec=self.spec, weights=weights)
                                                   for c in cohort}))
        dropped = dict(exchange.dropped)
        results = {}
        for cid, reply in exchange.replies.items():
            if isinstance(reply, TrainRes) and reply.round == round:
                results[cid] = reply
            else:
                dropped[cid] = f"expected TrainRes for round {round}, got {type(reply).__name__}"
        train_seconds = exchange.client_seconds

        aggregation = _Stopwatch()
        aborted = None
        try:
            with aggregation:
                step = self.secure_sum.step({cid: res.upload for cid, res in results.items()})
            while not isinstance(step, SumResult):
                follow_up = traffic.add(self.grid.exchange(step))
                aggregation.seconds += follow_up.client_seconds
                dropped.update(follow_up.dropped)
                with aggregation:
                    step = self.secure_sum.step(follow_up.replies)
            dropped.update(step.rejected)
            with aggregation:
                weights, contributors = _apply(weights, step), len(step.contributors)
        except RoundAborted as exc:
            aborted, contributors = str(exc), 0

        for cid, reason in sorted(dropped.items()):
            self.observer.notice(f"round {round}: client {cid} dropped out ({reason})")
        if aborted:
            self.observer.notice(f"round {round} aborted: {aborted}; the model is unchanged")

        evaluation_time = _Stopwatch()
        with evaluation_time:
            evaluation = self.evaluate(weights) if self.evaluate else None
        record = {
            "round": round,
            "cohort": len(cohort),
            "contributors": contributors,
            "dropped": len(dropped),
            "train_loss": _mean([r.metrics.get("loss", np.nan) for r in results.values()]),
            "dev_loss": evaluation.loss if evaluation else None,
            "dev_accuracy": evaluation.accuracy if evaluation else None,
            "bytes_down": traffic.bytes_down,
            "bytes_up": traffic.bytes_up,
            "seconds": {
                "train": train_seconds,
                "communication": traffic.seconds - traffic.client_seconds,
                "aggregation": aggregation.seconds,
                "evaluation": evaluation_time.seconds,
            },
        }
        if aborted:
            record["aborted"] = aborted
        return weights, record


def _apply(weights: np.ndarray, result: SumResult) -> np.ndarray:
    """FedAvg: the sum holds Σ n_k·Δ_k followed by Σ n_k."""
    total_examples = result.total[-1]
    if not total_examples > 0:
        raise RoundAborted("the contributors reported no training examples")
    return (weights + result.total[:-1] / total_examples).astype(np.float32)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class _Traffic:
    """Bytes and seconds summed over a round's exchanges."""

    def __init__(self) -> None:
        self.bytes_down = self.bytes_up = 0
        self.seconds = self.client_seconds = 0.0

    def add(self, exchange: Exchange) -> Exchange:
        self.bytes_down += exchange.bytes_down
        self.bytes_up += exchange.bytes_up
        self.seconds += exchange.seconds
        self.client_seconds += exchange.client_seconds
        return exchange


class _Stopwatch:
    """Accumulates the time spent inside its `with` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._started
