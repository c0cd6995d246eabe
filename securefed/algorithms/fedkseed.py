"""FedKSeed (Qin et al., ICML 2024): full-parameter zeroth-order tuning where a round costs a K-vector each way.

A client takes zeroth-order steps along perturbations drawn from K shared seeds, adds up one scalar per seed, and
puts [n_k · scalars, n_k] into the secure sum. The server keeps the history of the example-weighted mean scalars;
it sends the last round's down, and every party replays it on its own replica (replica.py). A client behind gets
the rounds it lacks first (a catch-up, counted apart from the round's bytes). With [privacy], each step's scalar
is DP-ZO's (privacy/dpzo.py).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import torch

from ..client import Client
from ..config import FedKSeedConfig, JobConfig
from ..errors import ConfigError, ProtocolError, RoundAborted
from ..interfaces import Encoding, SealedSum, SumResult
from ..models.gguf import cache_root
from ..protocol import Message, TrainIns, TrainRes
from ..protocol.seeds import ReplicaHead, SeedHistory, SeedUpdate
from ..rundir import RunDir
from ..seeding import stream
from ..server import Server, _RoundLog, examples_in
from .base import Algorithm
from .replica import Replica, WeightStore
from .seeds import SeedPool, genesis

_PASS_TOKENS = 512  # a forward pass without gradients, cut by length: padding is most of a mixed batch's cost


class SeedClient(Client):
    """A client that keeps a replica and trains it by zeroth-order steps."""

    def __init__(self, *args, pool: SeedPool, replica: Replica, settings: FedKSeedConfig, example_losses,
                 secret: bytes, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool
        self.replica = replica
        self.settings = settings
        self.example_losses = example_losses  # the task's: a loss per example of a batch
        self.secret = secret  # draws the seeds of the steps: the server must not know which client used which
        self._scalars = np.zeros(settings.seeds)

    def handle(self, msg: Message) -> Message:
        if isinstance(msg, SeedHistory):
            self.replica.take(msg.first, msg.parent, msg.scalars)
            return ReplicaHead(round=self.replica.round, head=self.replica.head)
        return super().handle(msg)

    def _start(self, ins: TrainIns) -> bytes:
        """Take the round's update into the replica and its weights into the model; the chain head names them."""
        self._check(ins.spec, ins.round)
        update = ins.model
        if not isinstance(update, SeedUpdate):
            raise ProtocolError(f"a FedKSeed client takes a SeedUpdate, not a {type(update).__name__}")
        if update.round != ins.round - 1:
            raise ProtocolError(f"the server sends round {update.round}'s scalars with round {ins.round}")
        if update.round == 0:
            if update.scalars.size or update.parent != self.replica.heads[0]:
                raise ProtocolError("the server's round 1 does not start from the job's initial model")
        else:
            self.replica.take(update.round, update.parent, update.scalars.reshape(1, -1))
        if self.replica.round != ins.round - 1:
            raise ProtocolError(f"this replica holds round {self.replica.round}, past the server's {ins.round - 1}")
        self.replica.load(self.view.numpy())
        return self.replica.head

    def open(self, model: Message, spec: bytes, round: int) -> np.ndarray:
        raise ProtocolError("a FedKSeed client opens no model: it replays the rounds' scalars on its replica")

    def _train_locally(self, round: int, share: float | None = None) -> list[float]:
        """Two-point zeroth-order steps from the replica's weights, each along a seed's perturbation; one scalar
        per step, added up per seed."""
        cfg, settings = self.training, self.settings
        rate, epsilon = cfg.learning_rate_at(round), settings.perturbation
        weights = self.view.buffer
        chances = self.pool.probabilities(self.replica.history()) if settings.pro else None
        chooser = stream(int.from_bytes(self.secret, "big"), "fedkseed-steps", round, self.cid)
        noise = None
        if self.wrapper:
            self.wrapper.admit(round)
            batches = self.wrapper.batches(round, self.examples, cfg.steps)
            noise = self.wrapper.noise(round)
        else:
            batches = list(self._batches(round))
        self._scalars = np.zeros(settings.seeds)
        losses = []
        self.model.eval()  # the two passes must compute one function: no dropout
        with torch.no_grad():
            for step, indices in enumerate(batches, start=1):
                seed = int(chooser.choice(settings.seeds, p=chances))
                offset, differences = 0.0, torch.zeros(0)  # a Poisson batch may be empty: DP-ZO still adds noise
                if len(indices):
                    self.pool.axpy(weights, seed, epsilon)
                    plus = self._losses(indices)
                    self.pool.axpy(weights, seed, -2 * epsilon)
                    minus = self._losses(indices)
                    offset, differences = epsilon, (plus - minus) / (2 * epsilon)  # the weights are at w − εz
                    losses.append(float((plus + minus).mean()) / 2)
                scalar = (self.wrapper.noisy_mean(differences, noise) if self.wrapper
                          else float(differences.mean()))
                scalar = min(max(scalar, -settings.max_scalar), settings.max_scalar)
                self.pool.axpy(weights, seed, offset - rate * scalar)  # back to w, then the step
                self._scalars[seed] += scalar
                self.observer.local_progress(self.cid, step, cfg.steps)
        return losses or [0.0]

    def _losses(self, indices: np.ndarray) -> torch.Tensor:
        parts = [self.example_losses(self.model, self.collator.batch(self.data, part))
                 for part in self._micro_batches(indices, _PASS_TOKENS)]
        return torch.cat(parts).double()

    def _contribution(self) -> np.ndarray:
        """[n_k · the round's scalar per seed, n_k]: the example-weighted mean of the sums is the global move."""
        return np.append(self._scalars * self.examples, self.examples).astype(np.float32)


class SeedServer(Server):
    """Keeps the history of mean scalars, sends the last round down, and catches up clients that are behind."""

    def __init__(self, *args, replica: Replica, steps: int, max_scalar: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.replica = replica  # the server's own: for evaluation and the final model
        self.steps = steps  # each client's per round
        self.max_scalar = max_scalar  # S: a step's scalar is within ±S
        self._held: dict[int, int] = {}  # the rounds each client is known to hold (0 after a failed catch-up, or
        # on resume)

    @property
    def vector_size(self) -> int:
        return self.replica.seeds

    def broadcast(self, model: SeedHistory, log: _RoundLog) -> Message:
        self._take(model)
        last = log.round - 1
        self._catch_up(log, last - 1)
        if last == 0:
            return SeedUpdate(round=0, parent=self.replica.heads[0], scalars=np.zeros(0, np.float32))
        return SeedUpdate(round=last, parent=self.replica.heads[last - 1], scalars=self.replica.rows[last - 1])

    def _catch_up(self, log: _RoundLog, upto: int) -> None:
        """Send each client of the cohort that is behind the rounds up to `upto` it lacks; recorded apart."""
        behind = {cid: self._held.get(cid, 0) for cid in log.cohort if self._held.get(cid, 0) < upto}
        if not behind:
            return
        requests = {cid: SeedHistory(first=held + 1, parent=self.replica.heads[held],
                                     scalars=np.stack(self.replica.rows[held:upto]))
                    for cid, held in behind.items()}
        exchange = self.grid.exchange(requests)
        for cid in behind:
            reply = exchange.replies.get(cid)
            # a client may hold more than the server knew of (it kept its replica on disk across a restart)
            if (isinstance(reply, ReplicaHead) and upto <= reply.round <= self.replica.round
                    and reply.head == self.replica.heads[reply.round]):
                self._held[cid] = reply.round
            else:  # it lost its replica, or refused ours: the next catch-up starts from round 1
                self._held[cid] = 0
        log.notes["catch_up"] = {"clients": len(behind), "caught_up": sum(self._held.get(c, 0) >= upto
                                                                          for c in behind),
                                 "bytes_down": exchange.bytes_down, "bytes_up": exchange.bytes_up}

    def _train(self, log: _RoundLog, model: Message) -> dict[int, TrainRes]:
        results = super()._train(log, model)
        for cid in results:  # it took the round's update; one that dropped out keeps what it was known to hold
            self._held[cid] = log.round - 1
        return results

    def apply(self, model: SeedHistory, result: SumResult | SealedSum) -> SeedHistory:
        if not isinstance(result, SumResult):
            raise RoundAborted("FedKSeed adds its scalars in a sum the server reads")
        contributors, examples = len(result.contributors), examples_in(result)
        mean = (result.total[:-1] / examples).astype(np.float32)
        self._check_plausible(mean, contributors)
        return _appended(model, mean)

    def _check_plausible(self, mean: np.ndarray, contributors: int) -> None:
        """What honest clients' clipped steps can sum to, the most the server can check of a sum: a seed's mean
        within steps·S, and no more seeds touched than the contributors took steps."""
        if not np.isfinite(mean).all():
            raise RoundAborted("the sum of scalars is not finite")
        touched, largest = np.count_nonzero(mean), float(np.abs(mean).max(initial=0.0))
        if touched > contributors * self.steps:
            raise RoundAborted(f"the sum touches {touched} seeds, more than {contributors} clients' "
                               f"{self.steps} steps each can")
        if largest > self.steps * self.max_scalar * (1 + 1e-3):  # slack for the fixed point's rounding
            raise RoundAborted(f"a seed's mean scalar is {largest:g}, past {self.steps} steps within "
                               f"±{self.max_scalar:g}")

    def unchanged(self, model: SeedHistory, round: int) -> SeedHistory:
        return model if model.first + len(model.scalars) > round else _appended(model, np.zeros(self.vector_size,
                                                                                                  np.float32))

    def next_bound(self, encoding: Encoding) -> float:
        """Always the clip: scalar sums are sparse and heavy-tailed, so one round's largest says little of the next."""
        return 0.0

    def weights(self, model: Message) -> np.ndarray | None:
        if not isinstance(model, SeedHistory):
            return None
        self._take(model)
        weights = np.empty(self.size, np.float32)
        self.replica.load(weights)
        return weights

    def _take(self, model: SeedHistory) -> None:
        self.replica.take(model.first, model.parent, model.scalars)


def _appended(model: SeedHistory, row: np.ndarray) -> SeedHistory:
    return SeedHistory(first=model.first, parent=model.parent, scalars=np.vstack([model.scalars, row[None]]))


class FedKSeed(Algorithm):
    def __init__(self, config: JobConfig, spec: bytes, initial: np.ndarray):
        super().__init__(config, spec, initial)
        self.settings: FedKSeedConfig = config.algorithm
        budget = self.settings.max_replica_bytes
        if initial.nbytes > budget:
            raise ConfigError(f"algorithm.max_replica_bytes: the model's replica takes {initial.nbytes:,} bytes "
                              f"(float32), past the budget of {budget:,}")
        fed = config.federation
        self.pool = SeedPool(fed.seed, self.settings.seeds, initial.size)
        self.store = WeightStore(self.pool, initial, genesis(spec, self.settings.seeds), fed.learning_rate_at,
                                 cache_root() / "replicas")

    def replica(self, file: Path | None = None) -> Replica:
        return Replica(self.store, self.settings.seeds, file)

    def initial(self, weights: np.ndarray) -> SeedHistory:
        return SeedHistory(first=1, parent=self.store.origin,
                           scalars=np.zeros((0, self.settings.seeds), np.float32))

    def client(self, cid: int, *args, example_losses, run: RunDir | None, **kwargs) -> SeedClient:
        # the secret and the replica stay with the clients (in the run directory, or a node's own)
        secret = run.secret_key("fedkseed") if run is not None else secrets.token_bytes(32)
        replica = self.replica(run.replica_file(cid) if run is not None else None)
        return SeedClient(cid, *args, pool=self.pool, replica=replica, settings=self.settings,
                          example_losses=example_losses, secret=secret, **kwargs)

    def server(self, *args, **kwargs) -> SeedServer:
        return SeedServer(*args, replica=self.replica(), steps=self.config.federation.local_steps,
                          max_scalar=self.settings.max_scalar, **kwargs)
