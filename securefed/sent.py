"""The rounds a client has sent an update for, kept durably: no client sends two updates for one round.

A server that ran a round twice, the second time without client B (after restarting the secure sum's setup, after
a crash of its own, or as a new Flower run of the same job), could subtract the two sums and read B's update: each
client's update is a function of the round and the global model, and a DP client would replay its stored release.
So a client writes the round here, fsynced, before its update leaves, and refuses that round for good: after a
crash it sits the round out rather than send its update again.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ProtocolError, RunDirError
from .rundir import write_atomic


class SentRounds:
    """One client's record; `path` None keeps it in memory (a client without a run directory)."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.rounds: set[int] = set()
        if path is not None and path.exists():
            try:
                self.rounds = {int(line) for line in path.read_text(encoding="ascii").split()}
            except (OSError, ValueError) as exc:
                raise RunDirError(f"{path}: unreadable record of the rounds sent ({exc})") from None

    def check(self, round: int) -> None:
        """Refuse `round` if an update for it was sent before."""
        if round in self.rounds:
            raise ProtocolError(f"refused: this client already sent its update for round {round}, and never sends "
                                "one round twice (two sums of one round could be subtracted)")

    def claim(self, round: int) -> None:
        """Record `round` as sent, durably, or refuse it if it was sent before."""
        self.check(round)
        if self.path is not None:
            write_atomic(self.path, "".join(f"{r}\n" for r in sorted(self.rounds | {round})).encode("ascii"))
        self.rounds.add(round)
