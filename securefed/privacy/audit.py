"""`securefed audit`: check every client's ledger and recompute its ε from the entries alone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .accounting import epsilon_prv, epsilon_rdp
from .ledger import LedgerError, read

# The logged ε may differ from the recomputed one by the PRV accountant's own numerical error.
TOLERANCE = 0.02


@dataclass(frozen=True)
class ClientAudit:
    client: int
    rounds: int
    steps: int
    q: float  # of the last round
    sigma: float  # of the last round
    epsilon_prv: float
    epsilon_rdp: float
    delta: float
    target_epsilon: float

    @property
    def budget_left(self) -> float:
        return self.target_epsilon - self.epsilon_prv


def witnessed_entries(records: Iterable[Mapping]) -> dict[int, int]:
    """How many entries the server saw each client's ledger reach, from the run's round records."""
    seen: dict[int, int] = {}
    for record in records:
        for client, entries in record.get("ledger_entries", {}).items():
            seen[int(client)] = max(seen.get(int(client), 0), int(entries))
    return seen


def audit_ledgers(folder: Path, job: bytes, clients: int, witnessed: Mapping[int, int] | None = None
                  ) -> list[ClientAudit]:
    """Audit `client-<i>.jsonl` for every client; raise LedgerError, naming the file and line, on any fault.

    `witnessed` (from `witnessed_entries`) anchors each chain's end: a ledger shorter than the server saw
    has lost its last lines, which the chain alone cannot show.
    """
    witnessed = witnessed or {}
    if not folder.is_dir():
        raise LedgerError(f"{folder}: no privacy ledgers (the job did not use differential privacy)")
    stray = sorted(p.name for p in folder.iterdir() if p.suffix == ".jsonl"
                   and p.stem not in {f"client-{c}" for c in range(clients)})
    if stray:
        raise LedgerError(f"{folder / stray[0]}: a ledger for a client this job does not have")
    results = []
    for client in range(clients):
        path = folder / f"client-{client}.jsonl"
        entries = read(path, job, client) if path.exists() else []
        if witnessed.get(client, 0) > len(entries):
            raise LedgerError(f"{path}: holds {len(entries)} entries, but the server saw it reach "
                              f"{witnessed[client]}: its last lines were removed")
        if not entries:
            continue
        deltas = {e.delta for e in entries}
        targets = {e.target_epsilon for e in entries}
        if len(deltas) > 1 or len(targets) > 1:
            raise LedgerError(f"{path}: δ or the target ε changes between entries")
        delta, target = deltas.pop(), targets.pop()
        for number, entry in enumerate(entries, start=1):
            recomputed = epsilon_prv([e.spend for e in entries[:number]], delta)
            if abs(recomputed - entry.epsilon) > TOLERANCE * max(1.0, recomputed):
                raise LedgerError(f"{path}:{number}: logs ε = {entry.epsilon:.4f}, but its entries give "
                                  f"{recomputed:.4f}")
            if recomputed > target:
                raise LedgerError(f"{path}:{number}: ε = {recomputed:.4f} exceeds the budget {target}")
        schedule = [e.spend for e in entries]
        last = entries[-1]
        results.append(ClientAudit(client, len(entries), sum(e.steps for e in entries), last.q, last.sigma,
                                   epsilon_prv(schedule, delta), epsilon_rdp(schedule, delta), delta, target))
    if not results:
        raise LedgerError(f"{folder}: no ledger has an entry")
    return results
