"""A party's replica of a FedKSeed model: the aggregated scalars of every round it has taken, checked as a hash
chain, and the weights they replay to.

The scalars are the replica (16 KB a round at K = 4096). Weights are derived from them and kept on disk, one file
per chain head (the initial model's and the latest two), so a party holds no second copy of the model in memory:
it reads a replica's weights straight into the model it trains. In-process clients at the same round share one
file, and a resumed party rebuilds its weights bit-exactly from the initial model.
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
        lock = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while this store lives: a folder whose lock is free is an orphan
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
    """The rounds a party has taken, each named by the chain head it leads to."""

    def __init__(self, store: WeightStore, seeds: int):
        self.store = store
        self.seeds = seeds
        self.rows: list[np.ndarray] = []
        self.heads: list[bytes] = [store.origin]

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
        for offset, row in enumerate(rows):
            round = first + offset
            head = extend(self.heads[round - 1], round, row)
            if round <= self.round:
                if head != self.heads[round]:
                    raise ProtocolError(f"the server's round {round} differs from the one this replica took")
                continue
            self.rows.append(np.array(row, dtype=np.float32))
            self.heads.append(head)

    def load(self, into: np.ndarray) -> None:
        """Put this replica's weights into `into`."""
        self.store.load(self, into)

    def history(self) -> np.ndarray:
        """Every round's scalars, a row each."""
        return np.array(self.rows, dtype=np.float32).reshape(self.round, self.seeds)
