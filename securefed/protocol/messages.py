"""The messages of one federated round that every secure-sum mechanism shares.

Mechanism-specific messages (the secure sum's uploads and follow-up stages) live with
their mechanism and register their own tags. Tags: 1-15 here, 16-31 plaintext sum,
32-63 SecAgg+, 64-95 CKKS, 96-127 FedKSeed (seeds.py).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from .codec import Array, MaxLen, Message, message

SpecDigest = Annotated[bytes, MaxLen(32)]


@message(3)
class PlainModel(Message):
    """The global weights in clear."""

    weights: Annotated[np.ndarray, Array(("float32",))]


@message(1)
class TrainIns(Message):
    """Server to client: train on your data starting from this global model.

    `model` is a PlainModel, or a sealed aggregate that only the clients can open (CKKS). `bound` is the
    server's encoding bound for this round's update entries, for a fixed-point secure sum (0: the job's clip).
    `examples` is Σ n_k of the last round's sum, which the server learns anyway (0: not known, as in round 1 or
    under CKKS): a client's share of the example-weighted mean is about n_k over it.
    """

    round: int
    spec: SpecDigest
    model: Message
    bound: float = 0.0
    examples: float = 0.0


@message(2)
class TrainRes(Message):
    """Client to server: training metrics, and the first message of the secure sum carrying the update."""

    round: int
    metrics: dict[str, float]
    upload: Message


@message(4)
class EvaluateIns(Message):
    """Server to client: score this global model on the dev split (when the server cannot read the model)."""

    round: int
    spec: SpecDigest
    model: Message


@message(5)
class EvaluateRes(Message):
    round: int
    metrics: dict[str, float]  # loss, accuracy, examples; only examples = 0 from a client with no dev split,
    # which opened the model (so it is a sum clients can open) but could not score it


@message(6)
class FinalIns(Message):
    """Server to client: open the final global model and keep it. For a model only clients can open (CKKS), on a
    runtime whose clients keep their own files (Flower)."""

    round: int
    spec: SpecDigest
    model: Message


@message(7)
class FinalRes(Message):
    round: int
    digest: SpecDigest  # SHA-256 of the weights the client kept: every client should keep the same
