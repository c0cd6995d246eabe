"""Round orchestration: sample a cohort, broadcast, aggregate through the secure sum, evaluate, commit."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import RoundAborted, SetupFailed
from .interfaces import Encoding, Exchange, Grid, Observer, SealedSum, SumResult, SumServer
from .models import Evaluation
from .protocol import EvaluateIns, EvaluateRes, Message, PlainModel, TrainIns, TrainRes, encode
from .rundir import RunDir
from .seeding import stream
from .weighting import BY_EXAMPLES, Weighting


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
        size: int,
        secure_sum: SumServer,
        grid: Grid,
        run: RunDir,
        evaluate: Callable[[np.ndarray], Evaluation] | None = None,
        observer: Observer | None = None,
        weighting: Weighting = BY_EXAMPLES,
        metrics: tuple[str, ...] = ("loss", "accuracy"),
    ):
        self.schedule = schedule
        self._bound = 0.0  # the encoding bound of the next round's update entries (0: the secure sum's widest)
        self._examples = 0.0  # Σ n_k of the last round's clear sum (0: not known)
        self.spec = spec
        self.size = size  # of the trainable vector
        self.secure_sum = secure_sum
        self.grid = grid
        self.run_dir = run
        self.evaluate = evaluate
        self.observer = observer or Observer()
        self.weighting = weighting
        self.metrics = metrics  # the names evaluation reports, recorded as dev_<name>

    def run(self, model: Message, start: int = 1) -> Message:
        """Run rounds `start`..`rounds` from the global `model` (a PlainModel, or sealed); every finished round is
        committed to the run directory. Returns the final global model."""
        rounds = range(start, self.schedule.rounds + 1)
        self._bound, self._examples = self._resumed(start)
        setup = self.setup(rounds) if rounds else None
        for round in rounds:
            if round > rounds.start:
                setup = self._take_in_late_clients(round) or setup
            model, record = self.round(round, model)
            if setup is not None:  # the once-per-job setup is charged to the first round it served
                record["setup"], setup = setup, None
            self.run_dir.commit(round, model, self.spec, record)
            self.observer.round_finished(record)
        return model

    def _take_in_late_clients(self, round: int) -> dict | None:
        """Clients whose nodes came online since the last round (a late start) join the rounds left: the secure
        sum's setup runs again for them if it needs to, and again after a setup that failed. Returns its cost."""
        joined = self.grid.joined()
        if joined:
            self.observer.notice(f"clients {sorted(joined)} joined before round {round}")
        if not self.secure_sum.renew(joined):
            return None
        try:
            return self.setup(range(round, self.schedule.rounds + 1))
        except SetupFailed as exc:  # the round aborts (its clients refuse to train); the next one tries again
            self.observer.notice(f"round {round}: {exc}")
            return None

    def _resumed(self, start: int) -> tuple[float, float]:
        """The encoding bound the last committed round chose for the next one, and its Σ n_k, so a resumed run is
        exact."""
        last = [r for r in self.run_dir.records() if r.get("round") == start - 1] if start > 1 else []
        record = last[-1] if last else {}
        return float(record.get("next_bound", 0.0)), float(record.get("next_examples", 0.0))

    def setup(self, rounds: range) -> dict:
        """Run the secure sum's setup for `rounds`; return what it cost."""
        log = _RoundLog(0, list(range(self.schedule.clients)))
        requests = self.secure_sum.setup(log.cohort, rounds)
        while requests:
            exchange = log.add(self.grid.exchange(requests))
            requests = self.secure_sum.setup_step(exchange.replies)
        for cid, reason in sorted(log.dropped.items()):
            self.observer.notice(f"setup: client {cid} dropped out ({reason})")
        return {"bytes_down": log.bytes_down, "bytes_up": log.bytes_up, "seconds": log.seconds,
                "dropped": len(log.dropped)}

    def round(self, round: int, model: Message) -> tuple[Message, dict]:
        log = _RoundLog(round, self.schedule.cohort(round))
        self.observer.round_started(round, self.schedule.rounds, log.cohort)
        results = self._train(log, model)
        aborted, previous, encoding = None, model, None
        try:
            result = self._sum(log, results, self.vector_size + 1)
            with log.aggregation:
                model = self.apply(model, result)
            log.contributors = len(result.contributors)
            self._examples = float(result.total[-1]) if isinstance(result, SumResult) else 0.0
            encoding = getattr(result, "encoding", None)
        except RoundAborted as exc:
            aborted = str(exc)
        with log.evaluation:
            evaluation = self._evaluate(log, model, sorted(results))
        if evaluation is None and self.weights(model) is None and model is not previous:
            # a sealed sum that a client cannot open (a client sent garbage) must not become the model
            aborted, model, log.contributors = "no client could open the sealed sum", previous, 0
        if aborted:
            self.observer.notice(f"round {round} aborted: {aborted}; the model is unchanged")
        for cid, reason in sorted(log.dropped.items()):
            self.observer.notice(f"round {round}: client {cid} dropped out ({reason})")
        record = {
            "round": round,
            "cohort": len(log.cohort),
            "contributors": log.contributors,
            "dropped": len(log.dropped),
            "train_loss": _mean([r.metrics["loss"] for r in results.values() if "loss" in r.metrics]),
            **{f"dev_{name}": evaluation.metrics.get(name) if evaluation else None for name in self.metrics},
            "bytes_down": log.bytes_down,
            "bytes_up": log.bytes_up,
            "seconds": {
                "train": log.train_seconds,
                "communication": log.seconds - log.client_seconds,
                "aggregation": log.aggregation.seconds,
                "evaluation": log.evaluation.seconds,
            },
        }
        spent = [r.metrics["epsilon"] for r in results.values() if "epsilon" in r.metrics]
        if spent:
            record["epsilon"] = max(spent)  # the largest ε any client has spent so far (its ledger has each)
            record["ledger_entries"] = {str(cid): int(r.metrics["ledger_entries"]) for cid, r in sorted(results.items())
                                        if "ledger_entries" in r.metrics}
        if encoding is not None and not aborted:
            record["encoding"] = _encoding_record(encoding, result.total)
            self._bound = self.next_bound(encoding)
        if self._bound:
            record["next_bound"] = self._bound
        if self._examples:
            record["next_examples"] = self._examples
        record.update(log.notes)
        if aborted:
            record["aborted"] = aborted
            model = self.unchanged(previous, round)
        return model, record

    # ------------------------------------------------------------ what the algorithm decides (FedAvg here)

    @property
    def vector_size(self) -> int:
        """Entries of a client's update vector, n_k apart."""
        return self.size

    def broadcast(self, model: Message, log: _RoundLog) -> Message:
        """What TrainIns carries from the global state: FedAvg sends the model itself."""
        return model

    def apply(self, model: Message, result: SumResult | SealedSum) -> Message:
        """The next global state from the round's sum."""
        return _aggregate(model, result, self.weighting)

    def unchanged(self, model: Message, round: int) -> Message:
        """The global state after round `round` aborted."""
        return model

    def next_bound(self, encoding: Encoding) -> float:
        """The encoding bound of the next round's update entries: the one the sum suggests (0: the widest)."""
        return encoding.following

    def weights(self, model: Message) -> np.ndarray | None:
        """The global weights, if this server can read them."""
        return model.weights if isinstance(model, PlainModel) else None

    # ------------------------------------------------------------ the round's exchanges

    def _train(self, log: _RoundLog, model: Message) -> dict[int, TrainRes]:
        """Broadcast the global model; keep the well-formed replies, count the rest as dropouts."""
        ins = TrainIns(round=log.round, spec=self.spec, model=self.broadcast(model, log), bound=self._bound,
                       examples=self._examples)
        log.told = hashlib.sha256(encode(ins)).digest()  # the same for every client: hardened SecAgg+ checks it
        members = self.secure_sum.participants(log.cohort)
        for cid in sorted(set(log.cohort) - set(members)):
            log.dropped[cid] = "not in the secure sum's setup, so not asked to train"
        exchange = log.add(self.grid.exchange(dict.fromkeys(members, ins)))
        log.train_seconds = exchange.client_seconds
        results = {}
        for cid, reply in exchange.replies.items():
            if not isinstance(reply, TrainRes) or reply.round != log.round:
                log.dropped[cid] = f"expected TrainRes for round {log.round}, got {type(reply).__name__}"
            elif (wrong := _invalid_metric(reply.metrics)) is not None:
                log.dropped[cid] = f"sent a training metric it may not: {wrong}"
            else:
                results[cid] = reply
        return results

    def _evaluate(self, log: _RoundLog, model: Message, trained: list[int]) -> Evaluation | None:
        """Score the model here if it is in clear, else ask a client that trained this round to."""
        weights = self.weights(model)
        if weights is not None:
            return self.evaluate(weights) if self.evaluate else None
        for cid in trained[:1]:
            exchange = log.add(self.grid.exchange({cid: EvaluateIns(round=log.round, spec=self.spec, model=model)}),
                               dropouts=False)
            reply = exchange.replies.get(cid)
            if isinstance(reply, EvaluateRes) and reply.round == log.round:
                if reply.metrics == {"examples": 0.0}:  # a node without a dev split opened it: no score
                    return Evaluation({}, examples=0)
                m = {k: reply.metrics.get(k, np.nan) for k in (*self.metrics, "examples")}
                if np.isfinite(list(m.values())).all():
                    examples = int(m.pop("examples"))
                    return Evaluation(m, examples=examples)
            self.observer.notice(f"round {log.round}: client {cid} could not evaluate the model")
        return None

    def _sum(self, log: _RoundLog, results: dict[int, TrainRes], size: int) -> SumResult | SealedSum:
        """Run the secure sum to its end: its server step, then any follow-up stages it asks for."""
        with log.aggregation:
            self.secure_sum.open(log.round, log.cohort, size, self._bound, log.told)
            step = self.secure_sum.step({cid: res.upload for cid, res in results.items()})
        while not isinstance(step, (SumResult, SealedSum)):
            follow_up = log.add(self.grid.exchange(step))
            log.aggregation.seconds += follow_up.client_seconds  # the clients' share of the protocol's work
            with log.aggregation:
                step = self.secure_sum.step(follow_up.replies)
        log.dropped.update(step.rejected)
        return step


# The training metrics a client may report, and the values each may take: anything else makes it a dropout, so
# that no client's numbers can stop the server (NaN, inf, a count of 1e300).
_TRAIN_METRICS = {
    "loss": lambda v: 0 <= v < 1e6,
    "seconds": lambda v: 0 <= v < 1e7,
    "epsilon": lambda v: 0 <= v <= 1e6,
    "ledger_entries": lambda v: v.is_integer() and 0 <= v <= 1e7,
}


def _encoding_record(encoding: Encoding, total: np.ndarray) -> dict:
    """What the round's fixed point cost: its bound, the clipped fraction, the largest rounding error on the sum
    and that error over the sum's largest entry."""
    largest = float(np.abs(total[:-1]).max()) if total.size > 1 else 0.0
    return {"bound": encoding.bound, "clipped": encoding.clipped, "error": encoding.error,
            "relative_error": encoding.error / largest if largest > 0 else None}


def _invalid_metric(metrics: Mapping[str, float]) -> str | None:
    for name, value in metrics.items():
        check = _TRAIN_METRICS.get(name)
        if check is None:
            return f"{name!r} is not one"
        if not (math.isfinite(value) and check(value)):
            return f"{name} = {value!r}"
    return None


def _aggregate(model: Message, result: SumResult | SealedSum, weighting: Weighting) -> Message:
    """FedAvg. A clear sum holds Σ n_k·Δ_k followed by Σ n_k; a sealed sum is the next model as it is."""
    if isinstance(result, SealedSum):
        return result.sealed
    if not isinstance(model, PlainModel):
        raise RoundAborted("a clear sum cannot update a sealed model")
    total_examples = examples_in(result)
    step = weighting.mean(result.total[:-1], total_examples, len(result.contributors))
    return PlainModel(weights=(model.weights + step).astype(np.float32))


def examples_in(result: SumResult) -> float:
    """Σ n_k of a clear sum, refused below one per contributor: a count below zero would amplify everyone's update."""
    total = float(result.total[-1])
    if not total >= len(result.contributors):
        raise RoundAborted(f"the contributors' example counts add up to {total:g}, less than one each")
    return total


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class _Stopwatch:
    """Accumulates the time spent inside its `with` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._started


@dataclass
class _RoundLog:
    """What one round cost and who dropped out, summed over its exchanges."""

    round: int
    cohort: list[int]
    contributors: int = 0
    told: bytes = b""  # SHA-256 of the TrainIns every client of the round was sent
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    client_seconds: float = 0.0
    train_seconds: float = 0.0
    aggregation: _Stopwatch = field(default_factory=_Stopwatch)
    evaluation: _Stopwatch = field(default_factory=_Stopwatch)
    notes: dict = field(default_factory=dict)  # what the algorithm adds to the round's record

    def add(self, exchange: Exchange, dropouts: bool = True) -> Exchange:
        if dropouts:
            self.dropped.update(exchange.dropped)
        self.bytes_down += exchange.bytes_down
        self.bytes_up += exchange.bytes_up
        self.seconds += exchange.seconds
        self.client_seconds += exchange.client_seconds
        return exchange
