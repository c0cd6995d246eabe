"""FedKSeed's messages (algorithms/fedkseed.py), here beside the round's own so that every process can decode them
without loading the algorithm (and torch): a node may answer each message in a new process. Tags 96-98."""

from __future__ import annotations

from typing import Annotated

import numpy as np

from .codec import Array, MaxLen, Message, message

Head = Annotated[bytes, MaxLen(32)]


@message(96)
class SeedUpdate(Message):
    """What TrainIns carries: round `round`'s mean scalars (none for round 0), to replay after chain head
    `parent`."""

    round: int
    parent: Head
    scalars: Annotated[np.ndarray, Array(("float32",))]


@message(97)
class SeedHistory(Message):
    """Rounds first.. of mean scalars, a row each, after chain head `parent`: the server's state (its checkpoint)
    and a catch-up for a client behind."""

    first: int
    parent: Head
    scalars: Annotated[np.ndarray, Array(("float32",), ndim=2)]


@message(98)
class ReplicaHead(Message):
    """A client's replica after a catch-up."""

    round: int
    head: Head
