"""A party's replica of a FedKSeed model: the aggregated scalars of every round it has taken, checked as a hash
chain, and the weights they replay to.

The scalars are the replica (16 KB a round at K = 4096). Weights are derived from them and kept on disk, one file
per chain head (the initial model's and the latest two), so a party holds no second copy of the model in memory:
it reads a replica's weights straight into the model it trains. In-process clients at the same round share one
file, and a resumed party rebuilds its weights bit-exactly from the initial model.

A client's scalars are also appended to a file of its own (a node's disk on Flower), fsynced before it answers: a
node that answers each message in a fresh process, or restarts, takes up its replica where it was.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import ProtocolError
from ..rundir import append_durably
from .seeds import SeedPool, extend

_KEPT = 2  # weight files kept besides the initial model's: the current round's and the one before
_LOCK = "lock"


class WeightStore:
    """Weights by chain head, as files in a folder of their own (removed with the store)."""

    def __init__(self, pool: SeedPool, initial: np.ndarray, origin: bytes, learning_rate: Callable[[int], float],
                 parent: Path):
        self.pool = pool
        self.learning_rate = learning_rate  # of round r: the step its scalars replay with
        self.origin = origin
        parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(parent)
        self.folder = Path(tempfile.mkdtemp(prefix="replicas-", dir=parent))
        making = self.folder / f".{_LOCK}"
        lock = os.open(making, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while this store lives: a folder whose lock is free is an orphan
        os.rename(making, self.folder / _LOCK)  # seen by another process only once held, never free in between
        weakref.finalize(self, _remove, self.folder, lock)
        self._recent: list[bytes] = []
        self._write(origin, np.ascontiguousarray(initial, dtype=np.float32))

    def load(self, replica: Replica, into: np.ndarray) -> None:
        """Fill `into` (float32, the model's size) with the weights `replica`'s rounds replay to."""
        start = max(r for r, head in enumerate(replica.heads) if self._path(head).exists())
        with self._path(replica.heads[start]).open("rb") as fh:
            if fh.readinto(memoryview(into).cast("B")) != into.nbytes:
                raise OSError(f"{fh.name}: a replica's weights file is cut short")
        if start == replica.round:
            return
        buffer = torch.from_numpy(into)
        for round in range(start + 1, replica.round + 1):
            self.pool.replay(buffer, replica.rows[round - 1], self.learning_rate(round))
        self._write(replica.head, into)

    def _write(self, head: bytes, weights: np.ndarray) -> None:
        path = self._path(head)
        tmp = path.with_suffix(".tmp")
        weights.tofile(tmp)
        os.replace(tmp, path)
        if head != self.origin:
            if head in self._recent:
                self._recent.remove(head)
            self._recent.append(head)
            while len(self._recent) > _KEPT:
                self._path(self._recent.pop(0)).unlink(missing_ok=True)

    def _path(self, head: bytes) -> Path:
        return self.folder / f"{head.hex()}.f32"


def _remove_orphans(parent: Path) -> None:
    """Weight folders whose process is gone (killed before it could remove them): nobody holds their lock."""
    for folder in parent.iterdir():
        try:
            lock = os.open(folder / _LOCK, os.O_RDWR)
        except OSError:
            continue  # not a store's folder, or one being made
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)  # alive
            continue
        _remove(folder, lock)


def _remove(folder: Path, lock: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.close(lock)


class Replica:
    """The rounds a party has taken, each named by the chain head it leads to; kept in `file` too, if given."""

    def __init__(self, store: WeightStore, seeds: int, file: Path | None = None):
        self.store = store
        self.seeds = seeds
        self.rows: list[np.ndarray] = []
        self.heads: list[bytes] = [store.origin]
        self.file = None
        if file is not None and file.exists():
            self._restore(file)
        self.file = file

    def _restore(self, file: Path) -> None:
        """The rounds taken before this process: whole rows, each checked on the chain again."""
        data = np.fromfile(file, dtype="<f4")
        whole = len(data) // self.seeds
        if whole * self.seeds != len(data):  # cut short mid-write: that round was never answered, so never taken
            os.truncate(file, whole * self.seeds * 4)
        try:
            self.take(1, self.store.origin, data[: whole * self.seeds].reshape(whole, self.seeds))
        except ProtocolError as exc:
            raise ProtocolError(f"{file}: this party's replica is damaged ({exc})") from None

    @property
    def round(self) -> int:
        return len(self.rows)

    @property
    def head(self) -> bytes:
        return self.heads[-1]

    def take(self, first: int, parent: bytes, rows: np.ndarray) -> None:
        """Rounds first.. of aggregated scalars, which the server says follow the chain head `parent`: rounds this
        replica holds must match, the rest extend it. Anything else is a server's lie or a lost replica."""
        if not 1 <= first <= self.round + 1:
            raise ProtocolError(f"the server's update starts at round {first}, but this replica holds rounds up to "
                                f"{self.round}: it needs the rounds between (a catch-up)")
        if parent != self.heads[first - 1]:
            raise ProtocolError(f"the server's update for round {first} does not follow the rounds this replica "
                                "took: the server's history differs from what it sent before")
        if rows.ndim != 2 or rows.shape[1] != self.seeds or not np.isfinite(rows).all():
            raise ProtocolError(f"the server's update is not finite rows of {self.seeds} scalars")
        taken = []
        for offset, row in enumerate(rows):
            round = first + offset
            head = extend(self.heads[round - 1], round, row)
            if round <= self.round:
                if head != self.heads[round]:
                    raise ProtocolError(f"the server's round {round} differs from the one this replica took")
                continue
            taken.append(np.array(row, dtype=np.float32))
            self.rows.append(taken[-1])
            self.heads.append(head)
        if taken and self.file is not None:
            append_durably(self.file, np.ascontiguousarray(taken, dtype="<f4").tobytes())

    def load(self, into: np.ndarray) -> None:
        """Put this replica's weights into `into`."""
        self.store.load(self, into)

    def history(self) -> np.ndarray:
        """Every round's scalars, a row each."""
        return np.array(self.rows, dtype=np.float32).reshape(self.round, self.seeds)

