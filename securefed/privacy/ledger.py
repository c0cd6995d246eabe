"""The per-client privacy ledger: append-only JSONL, one entry per round, each bound to the one before.

Entry: {"round", "q", "sigma", "steps", "epsilon", "delta", "target_epsilon", "prev"}, where `prev` is
the SHA-256 of the previous line's bytes (of a genesis string naming the job and client for the first).
Each append is fsynced before the round's update may leave the client. Before a round the client asks
`would_exceed`; a round that would take ε past the target is declined.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import SecurefedError
from ..rundir import append_durably
from .accounting import Spend, epsilon_prv

FIELDS = {"round": int, "q": float, "sigma": float, "steps": int, "epsilon": float, "delta": float,
          "target_epsilon": float, "prev": str}


class LedgerError(SecurefedError):
    """A ledger is missing, malformed, edited, reordered or over its budget."""


@dataclass(frozen=True)
class Entry:
    round: int
    q: float
    sigma: float
    steps: int
    epsilon: float
    delta: float
    target_epsilon: float
    prev: str

    @property
    def spend(self) -> Spend:
        return Spend(self.q, self.sigma, self.steps)


def genesis(job: bytes, client: int) -> str:
    return hashlib.sha256(b"securefed/ledger" + job + client.to_bytes(8, "little")).hexdigest()


def ledger_file(folder: Path, client: int) -> Path:
    return folder / f"client-{client}.jsonl"


class Ledger:
    """One client's ledger, read and checked on opening."""

    def __init__(self, path: Path, job: bytes, client: int):
        self.path, self.job, self.client = path, job, client
        self.entries = read(path, job, client) if path.exists() else []
        # the hash the next entry chains to: of the last line, or the genesis
        self._head = hashlib.sha256(path.read_bytes().rstrip(b"\n").split(b"\n")[-1]).hexdigest() if self.entries \
            else genesis(job, client)

    @property
    def schedule(self) -> list[Spend]:
        return [e.spend for e in self.entries]

    def would_exceed(self, spend: Spend, delta: float, target_epsilon: float) -> tuple[bool, float]:
        """Whether one more round spending `spend` would take ε (PRV) past the target, and that ε."""
        epsilon = epsilon_prv([*self.schedule, spend], delta)
        return epsilon > target_epsilon, epsilon

    def append(self, round: int, spend: Spend, delta: float, target_epsilon: float) -> Entry:
        if self.entries and round <= self.entries[-1].round:
            raise LedgerError(f"{self.path}: round {round} does not follow round {self.entries[-1].round}")
        entry = Entry(round=round, q=spend.q, sigma=spend.sigma, steps=spend.steps,
                      epsilon=epsilon_prv([*self.schedule, spend], delta), delta=delta,
                      target_epsilon=target_epsilon, prev=self._head)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry.__dict__, sort_keys=True)
        append_durably(self.path, (line + "\n").encode("utf-8"))
        self.entries.append(entry)
        self._head = hashlib.sha256(line.encode()).hexdigest()
        return entry


def read(path: Path, job: bytes, client: int) -> list[Entry]:
    """Every entry, after checking the schema, the hash chain and the order; errors name the file and line."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger ({exc})") from None
    if lines and lines[-1] == b"":
        lines.pop()
    entries, prev = [], genesis(job, client)
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LedgerError(f"{where}: not a JSON entry") from None
        entry = _entry(data, where)
        if entry.prev != prev:
            raise LedgerError(f"{where}: the hash chain is broken (a line before it was edited, deleted or moved)")
        if entries and entry.round <= entries[-1].round:
            raise LedgerError(f"{where}: round {entry.round} comes after round {entries[-1].round}")
        entries.append(entry)
        prev = hashlib.sha256(raw).hexdigest()
    return entries


def _entry(data, where: str) -> Entry:
    if not isinstance(data, dict) or set(data) != set(FIELDS):
        raise LedgerError(f"{where}: an entry has exactly the fields {', '.join(sorted(FIELDS))}")
    for name, kind in FIELDS.items():
        value = data[name]
        ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is float and isinstance(value, int)
                                                                          and not isinstance(value, bool))
        if not ok or (kind is float and not math.isfinite(value)):
            raise LedgerError(f"{where}: {name} is not a finite {kind.__name__}")
    entry = Entry(**{k: float(v) if FIELDS[k] is float else v for k, v in data.items()})
    if not (entry.round >= 1 and 0 < entry.q <= 1 and entry.sigma > 0 and entry.steps >= 1 and 0 < entry.delta < 1
            and entry.target_epsilon > 0 and entry.epsilon >= 0):
        raise LedgerError(f"{where}: a value is out of range")
    return entry

