"""The plaintext sum: clients send their vectors in clear and the server adds them.

It protects nothing. It is the baseline that secure mechanisms are measured against,
and the reference their sums must equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import numpy as np

from ..errors import RoundAborted
from ..interfaces import SumClient, SumResult, SumServer
from ..protocol import Array, Message, message


@message(16)
class PlainUpload(Message):
    round: int
    vector: Annotated[np.ndarray, Array(("float32",))]


class PlainSumClient(SumClient):
    def upload(self, round: int, vector: np.ndarray, bound: float = 0.0, told: bytes = b"") -> Message:
        return PlainUpload(round=round, vector=np.asarray(vector, dtype=np.float32))


class PlainSumServer(SumServer):
    def __init__(self) -> None:
        self._round = -1
        self._size = 0
        self._cohort: frozenset[int] = frozenset()

    def open(self, round: int, cohort: Sequence[int], size: int, bound: float = 0.0, told: bytes = b"") -> None:
        self._round, self._size, self._cohort = round, size, frozenset(cohort)

    def step(self, replies: Mapping[int, Message]) -> SumResult:
        total = np.zeros(self._size, dtype=np.float64)
        contributors, rejected = [], {}
        for cid, reply in sorted(replies.items()):
            if cid not in self._cohort:
                rejected[cid] = "not in this round's cohort"
            elif not isinstance(reply, PlainUpload) or reply.round != self._round:
                rejected[cid] = f"expected PlainUpload for round {self._round}"
            elif reply.vector.shape != (self._size,):
                rejected[cid] = f"vector of {reply.vector.shape[0]} entries, expected {self._size}"
            else:
                total += reply.vector
                contributors.append(cid)
        if not contributors:
            raise RoundAborted(f"round {self._round}: no client contributed to the sum")
        return SumResult(total=total, contributors=tuple(contributors), rejected=rejected)
