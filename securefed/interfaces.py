"""What client and server may know of a mechanism, and of the runtime that carries their messages.

client.py and server.py see only these types. job.py picks the implementations, so a new
secure sum, loss term or runtime is a new file plus a line in job.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence, Set
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import ProtocolError
from .protocol import Message, PlainModel, decode

if TYPE_CHECKING:
    import torch

    from .config import JobConfig
    from .rundir import RunDir


# ---------------------------------------------------------------- secure sum


@dataclass(frozen=True)
class Encoding:
    """How exactly a fixed-point sum carried the updates: the bound their entries were encoded in, the mean fraction
    of entries the contributors clipped to it (summed securely with the rest), the largest rounding error on an
    entry of the sum, and the bound the next round should use (0: the widest)."""

    bound: float
    clipped: float
    error: float
    following: float


@dataclass(frozen=True)
class SumResult:
    """The sum of the contributors' vectors; nothing about any single one."""

    total: np.ndarray
    contributors: tuple[int, ...]
    rejected: Mapping[int, str] = field(default_factory=dict)
    encoding: Encoding | None = None  # for a sum in fixed point


@dataclass(frozen=True)
class SealedSum:
    """A sum the server cannot read: it becomes the next global model, which only clients can open.

    The sealed vectors are [n_k·θ_k, n_k]: the opened model is Σ n_k·θ_k / Σ n_k, FedAvg itself.
    """

    sealed: Message
    contributors: tuple[int, ...]
    rejected: Mapping[int, str] = field(default_factory=dict)


class SumClient(ABC):
    """One client's side of a secure-sum protocol: a state machine over typed messages."""

    answers: tuple[type[Message], ...] = ()  # the follow-up stages reply() takes; a node sends the rest to its client

    def open_model(self, model: Message, size: int) -> np.ndarray:
        """The `size` global weights inside a TrainIns or EvaluateIns."""
        if not isinstance(model, PlainModel):
            raise ProtocolError(f"this client cannot open a {type(model).__name__}")
        if model.weights.shape != (size,):
            raise ProtocolError(f"the global model has {model.weights.shape[0]} weights, this model has {size}")
        return model.weights

    def admit(self, round: int, weight: float) -> None:  # noqa: B027 - most sums take any round's upload
        """Raise a SecurefedError, before the client trains (and, under DP, spends), if `upload` would refuse the
        round or this client's weight n_k."""

    def state(self) -> bytes:
        """The protocol state, for a runtime that runs each message in a new process (Flower); empty when none."""
        return b""

    def restore(self, state: bytes) -> None:
        """Take up the state `state()` returned."""
        if state:
            raise ProtocolError(f"{type(self).__name__} keeps no state to restore")

    @abstractmethod
    def upload(self, round: int, vector: np.ndarray, bound: float = 0.0, told: bytes = b"") -> Message:
        """The first message of the round, carrying (a protected form of) `vector` = [n_k·Δ_k, n_k]; `bound` is the
        server's encoding bound for the round's update entries (a fixed-point sum's; 0: the job's widest); `told`
        the SHA-256 of the round's TrainIns as this client received it."""

    def reply(self, request: Message) -> Message:
        """Answer a follow-up stage of the protocol."""
        raise ProtocolError(f"unexpected {type(request).__name__} for this secure-sum protocol")


class SumServer(ABC):
    """The server's side: collects uploads, may ask for more, and yields only the sum."""

    def setup(self, clients: Sequence[int], rounds: range) -> Mapping[int, Message]:
        """Requests that open the protocol's once-per-job setup for `rounds`; none if it needs no setup."""
        return {}

    def setup_step(self, replies: Mapping[int, Message]) -> Mapping[int, Message]:
        """Take the setup replies that arrived; return the next requests, or none once the setup is complete.

        Raises SetupFailed when too few clients took part for the protocol to work.
        """
        return {}

    def participants(self, cohort: Sequence[int]) -> list[int]:
        """The clients of `cohort` whose uploads this sum can take this round. Only they are asked to train, so no
        client spends its privacy budget on a round it cannot join (one left out of the last setup still holds an
        earlier one). A sum without setup takes anyone."""
        return list(cohort)

    def renew(self, joined: Set[int]) -> bool:
        """Whether clients `joined`, newly reachable, need the setup run again (for the rounds left) to take part;
        True too when the last setup did not complete. A sum without setup takes anyone's upload."""
        return False

    @abstractmethod
    def open(self, round: int, cohort: Sequence[int], size: int, bound: float = 0.0, told: bytes = b"") -> None:
        """Start a round for `cohort`, whose vectors have `size` entries, encoded within `bound`, after every
        client was sent the TrainIns whose SHA-256 is `told` (see upload)."""

    @abstractmethod
    def step(self, replies: Mapping[int, Message]) -> Mapping[int, Message] | SumResult | SealedSum:
        """Take the replies that arrived; return the next requests, or the result.

        Raises RoundAborted when the sum cannot be completed.
        """


# ---------------------------------------------------------------- local training


class LossTerm(ABC):
    """An extra term of a client's local loss that reads the model's parameters and key-derived inputs only,
    never a client's example (a watermark). Its gradient joins every step after any DP-SGD clipping and noise."""

    name: str

    def begin_round(self, share: float | None = None) -> None:  # noqa: B027 - most terms need no notice
        """Called before each round's local training, with the global weights in place. `share`: about this
        client's weight in the round's example-weighted mean (None: not known)."""

    @abstractmethod
    def __call__(self) -> torch.Tensor:
        """A scalar tensor, differentiable in the parameters it reads."""


class TrainingWrapper(ABC):
    """Changes how a client trains (DP-SGD): which batches it draws, what runs them, and what each round costs.

    The client calls, per round: `replay` (a release already made for this round and model, if any), else
    `admit`, `batches`, `wrap`, the training loop (with `empty_step` for an empty batch), and `commit` before
    the update leaves it. A wrapper is made per client by `for_client`, from what `prepare` made once per loaded
    model.
    """

    @classmethod
    def prepare(cls, model: torch.nn.Module, probe: dict, loss: Callable[[torch.nn.Module, dict], torch.Tensor]):
        """What the clients of one process share (Opacus's per-example-gradient module), made once per model and
        checked on `probe`, a small batch: an unsuitable model fails here, before any client trains."""
        return None

    @classmethod
    @abstractmethod
    def for_client(cls, config: JobConfig, prepared, cid: int, examples: int, rounds: int, run: RunDir
                   ) -> TrainingWrapper:
        """Client `cid`'s wrapper, for its `examples` examples over the `rounds` rounds it may take part in; its
        ledger and secrets live in `run`."""

    @abstractmethod
    def replay(self, round: int, start: bytes) -> np.ndarray | None:
        """The vector this client already released for `round` from the model whose digest is `start` (after a
        crash), or None."""

    @abstractmethod
    def admit(self, round: int) -> None:
        """Raise a SecurefedError if the client must not train in `round` (its budget would be exceeded)."""

    @abstractmethod
    def batches(self, round: int, examples: int, steps: int) -> list[np.ndarray]:
        """The indices of each step's batch; a batch may be empty."""

    @abstractmethod
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, round: int):
        """The module to run forward and the optimizer to step for `round`."""

    @abstractmethod
    def loss_scale(self, part: int, batch: int) -> float:
        """The factor on the mean loss of `part` examples of a `batch`-example step (split for memory)."""

    @abstractmethod
    def empty_step(self, optimizer) -> None:
        """A step for an empty batch (DP-SGD still adds its noise)."""

    @abstractmethod
    def commit(self, round: int, start: bytes, vector: np.ndarray) -> dict[str, float]:
        """Record the round durably before its update leaves the client; metrics to report (ε so far)."""

    def unrecorded(self) -> AbstractContextManager:
        """A context whose forward and backward passes the wrapper leaves alone (a loss term's)."""
        return nullcontext()


# ---------------------------------------------------------------- runtime


@dataclass
class Exchange:
    """What came back from sending one message to each of several clients."""

    replies: dict[int, Message]
    dropped: dict[int, str]
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0  # wall time of the whole exchange
    client_seconds: float = 0.0  # of which the clients spent computing

    def receive(self, cid: int, wire: bytes) -> None:
        """Count and decode one client's reply; a malformed one makes that client a dropout."""
        self.bytes_up += len(wire)
        try:
            self.replies[cid] = decode(wire)
        except ProtocolError as exc:
            self.dropped[cid] = f"sent a malformed reply: {exc}"


class Grid(ABC):
    """Carries messages between the server and clients; knows nothing of their meaning."""

    @abstractmethod
    def exchange(self, requests: Mapping[int, Message]) -> Exchange:
        """Deliver each request to its client and collect the replies; a vanished client is `dropped`."""

    def joined(self) -> Set[int]:
        """The clients that became reachable since the last call (a node that came online late); none by default."""
        return frozenset()


# ---------------------------------------------------------------- progress


class Observer:
    """Receives progress events; the CLI shows them, everything else ignores them."""

    def round_started(self, round: int, rounds: int, cohort: Sequence[int]) -> None:
        pass

    def local_progress(self, client: int, step: int, steps: int) -> None:
        pass

    def round_finished(self, record: Mapping) -> None:
        pass

    def notice(self, text: str) -> None:
        pass
