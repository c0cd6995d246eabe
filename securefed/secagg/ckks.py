"""CKKS summation with TenSEAL: the server adds ciphertexts it cannot read, and the clients open the sum.

Setup, once per job (three exchanges):
  1. CkksSetupStart → ChannelAdvert: every client advertises an X25519 channel key.
  2. KeyRequest → KeyBundle: the key holder (the lowest client id) makes the CKKS context and returns
     it without its secret key for the server, and with it, AES-GCM-encrypted, for every other client.
  3. KeyDelivery → KeyReceived: each client loads the secret context.

Per round, clients upload CKKS encryptions of [n_k·θ_k, n_k] (their weighted local model and weight)
in chunks of N/2 slots. The server adds them and the encrypted sum becomes the next global model:
a client opens it as Σ n_k·θ_k / Σ n_k, which is FedAvg. The server never sees a model in clear.

Parameters: N = 8192, coefficient moduli [60, 60] bits, scale 2^40, symmetric encryption. Summation
needs no multiplication, so one data level is enough; that keeps ciphertexts about 8× the float32
payload. Trust model: every client holds the secret key, so the server colluding with any one
client can decrypt every upload (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ProtocolError, RoundAborted, SetupFailed
from ..interfaces import SealedSum, SumClient, SumServer
from ..protocol import MaxLen, Message, message
from .channel import channel_key, public_bytes, seal, shared_secret, unseal

POLY_DEGREE = 8192
COEFF_BITS = [60, 60]
SCALE = 2.0**40
SLOTS = POLY_DEGREE // 2
MAX_CLIENTS = 100_000
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError)

Key32 = Annotated[bytes, MaxLen(32)]
Ids = Annotated[tuple[int, ...], MaxLen(MAX_CLIENTS)]
Blob = Annotated[bytes, MaxLen(2**20)]
Keys = Annotated[tuple[bytes, ...], MaxLen(MAX_CLIENTS, item=2**20)]
Chunks = Annotated[tuple[bytes, ...], MaxLen(2**16, item=2**20)]


@message(64)
class CkksSetupStart(Message):
    pass


@message(65)
class ChannelAdvert(Message):
    client: int
    channel_key: Key32


@message(66)
class KeyRequest(Message):
    """To the key holder: make the context and seal its secret key for each of these clients."""

    recipients: Ids
    channel_keys: Annotated[tuple[bytes, ...], MaxLen(MAX_CLIENTS, item=32)]


@message(67)
class KeyBundle(Message):
    public_context: Blob  # no secret key: what the server adds ciphertexts with
    recipients: Ids
    sealed_keys: Keys  # the secret context, AES-GCM-sealed for each recipient


@message(68)
class KeyDelivery(Message):
    holder: int
    channel_key: Key32  # the holder's
    sealed_key: Blob


@message(69)
class KeyReceived(Message):
    client: int


@message(70)
class CkksUpload(Message):
    round: int
    chunks: Chunks  # CKKS vectors of [n_k·θ_k, n_k], N/2 slots each


@message(71)
class CkksSum(Message):
    """The sealed global model: the encrypted sum of the uploads, which only clients can open."""

    round: int
    size: int  # entries in the model (the sum has one more: Σ n_k)
    chunks: Chunks


def new_context() -> ts.Context:
    context = ts.context(ts.SCHEME_TYPE.CKKS, POLY_DEGREE, coeff_mod_bit_sizes=COEFF_BITS,
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = SCALE
    return context


def serialize_context(context: ts.Context, *, secret: bool) -> bytes:
    return context.serialize(save_public_key=False, save_secret_key=secret, save_galois_keys=False,
                             save_relin_keys=False)


def load_context(data: bytes, *, secret: bool) -> ts.Context:
    """A context from a peer; it must hold the secret key exactly when `secret` is asked for."""
    try:
        context = ts.context_from(data)
    except _TENSEAL_ERRORS as exc:
        raise ProtocolError(f"not a CKKS context ({exc})") from None
    if context.is_private() != secret:
        raise ProtocolError("the CKKS context " + ("lacks its secret key" if secret else "carries a secret key"))
    context.global_scale = SCALE
    return context


def chunk_count(entries: int) -> int:
    return -(-entries // SLOTS)


@dataclass(frozen=True)
class CkksSettings:
    job: bytes  # binds the sealed keys to this job
    clients: int


# ---------------------------------------------------------------- client


class CkksClient(SumClient):
    def __init__(self, cid: int, settings: CkksSettings):
        self.cid = cid
        self.settings = settings
        self._channel: X25519PrivateKey | None = None
        self._context: ts.Context | None = None
        self._global: np.ndarray | None = None  # the global model this client last opened

    def reply(self, request: Message) -> Message:
        if isinstance(request, CkksSetupStart):
            self._channel, self._context = X25519PrivateKey.generate(), None
            return ChannelAdvert(client=self.cid, channel_key=public_bytes(self._channel))
        if isinstance(request, KeyRequest):
            return self._make_keys(request)
        if isinstance(request, KeyDelivery):
            return self._take_key(request)
        return super().reply(request)

    def _make_keys(self, request: KeyRequest) -> KeyBundle:
        channel = self._require_channel()
        if len(request.channel_keys) != len(request.recipients) or self.cid in request.recipients:
            raise ProtocolError("KeyRequest names its recipients inconsistently")
        if len(set(request.recipients)) != len(request.recipients):
            raise ProtocolError("KeyRequest names a recipient twice")
        context = new_context()
        secret = serialize_context(context, secret=True)
        sealed = []
        for recipient, key in zip(request.recipients, request.channel_keys):
            shared = channel_key(channel, key, job=self.settings.job, a=self.cid, b=recipient)
            sealed.append(seal(shared, secret, job=self.settings.job, stage="ckks-key", sender=self.cid,
                               recipient=recipient))
        self._context = context
        return KeyBundle(public_context=serialize_context(context, secret=False), recipients=request.recipients,
                         sealed_keys=tuple(sealed))

    def _take_key(self, delivery: KeyDelivery) -> KeyReceived:
        channel = self._require_channel()
        shared = channel_key(channel, delivery.channel_key, job=self.settings.job, a=self.cid, b=delivery.holder)
        secret = unseal(shared, delivery.sealed_key, job=self.settings.job, stage="ckks-key", sender=delivery.holder,
                        recipient=self.cid)
        self._context = load_context(secret, secret=True)
        return KeyReceived(client=self.cid)

    def _require_channel(self) -> X25519PrivateKey:
        if self._channel is None:
            raise ProtocolError("a CKKS key message arrived before the setup started")
        return self._channel

    def _require_context(self) -> ts.Context:
        if self._context is None:
            raise ProtocolError("this client holds no CKKS key: the setup did not complete")
        return self._context

    def open_model(self, model: Message, size: int) -> np.ndarray:
        if not isinstance(model, CkksSum):
            weights = super().open_model(model, size)
        else:
            context = self._require_context()
            if model.size != size or len(model.chunks) != chunk_count(size + 1):
                raise ProtocolError(f"the sealed model holds {model.size} weights in {len(model.chunks)} chunks, "
                                    f"this model has {size}")
            try:
                values = np.concatenate([ts.ckks_vector_from(context, chunk).decrypt() for chunk in model.chunks])
            except _TENSEAL_ERRORS as exc:
                raise ProtocolError(f"cannot decrypt the sealed model ({exc})") from None
            if values.size != size + 1 or not values[size] > 0.5:
                raise ProtocolError("the sealed model does not hold a weighted sum")
            weights = (values[:size] / values[size]).astype(np.float32)
            if not np.isfinite(weights).all():
                raise ProtocolError("the sealed model opens to non-finite weights")
        self._global = weights
        return weights

    def upload(self, round: int, vector: np.ndarray) -> CkksUpload:
        context = self._require_context()
        if self._global is None or self._global.size + 1 != vector.size:
            raise ProtocolError("no global model was opened for this upload")
        n = float(vector[-1])
        # FedAvg under encryption: send n_k·θ_k = n_k·Δ_k + n_k·θ_global, and n_k
        weighted = np.append(vector[:-1].astype(np.float64) + n * self._global.astype(np.float64), n)
        chunks = tuple(ts.ckks_vector(context, weighted[i : i + SLOTS]).serialize()
                       for i in range(0, weighted.size, SLOTS))
        return CkksUpload(round=round, chunks=chunks)


# ---------------------------------------------------------------- server


class CkksServer(SumServer):
    def __init__(self, settings: CkksSettings):
        self.settings = settings
        self._stage = "new"
        self._invited: frozenset[int] = frozenset()
        self._adverts: dict[int, bytes] = {}
        self._holder = -1
        self._context: ts.Context | None = None  # public: no secret key
        self._members: frozenset[int] = frozenset()
        self._round: tuple[int, frozenset[int], int] | None = None

    @property
    def holder(self) -> int:
        return self._holder

    def setup(self, clients: Sequence[int], rounds: range) -> dict[int, Message]:
        self._stage, self._invited, self._adverts, self._context = "advertise", frozenset(clients), {}, None
        return {c: CkksSetupStart() for c in sorted(clients)}

    def setup_step(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        if self._stage == "advertise":
            probe = X25519PrivateKey.generate()
            for cid, advert in sorted(replies.items()):
                if cid in self._invited and isinstance(advert, ChannelAdvert) and advert.client == cid:
                    try:
                        shared_secret(probe, advert.channel_key)
                    except ProtocolError:
                        continue
                    self._adverts[cid] = advert.channel_key
            self._require(len(self._adverts), "advertised a channel key")
            self._holder = min(self._adverts)
            others = tuple(c for c in sorted(self._adverts) if c != self._holder)
            self._stage = "keys"
            return {self._holder: KeyRequest(recipients=others, channel_keys=tuple(self._adverts[c] for c in others))}
        if self._stage == "keys":
            bundle = replies.get(self._holder)
            others = tuple(c for c in sorted(self._adverts) if c != self._holder)
            if not isinstance(bundle, KeyBundle) or bundle.recipients != others or len(bundle.sealed_keys) != len(
                    others):
                self._stage = "failed"
                raise SetupFailed(f"CKKS setup failed: the key holder, client {self._holder}, sent no usable keys")
            try:
                self._context = load_context(bundle.public_context, secret=False)
            except ProtocolError as exc:
                self._stage = "failed"
                raise SetupFailed(f"CKKS setup failed: client {self._holder}'s context: {exc}") from None
            self._stage = "deliver"
            return {c: KeyDelivery(holder=self._holder, channel_key=self._adverts[self._holder], sealed_key=key)
                    for c, key in zip(others, bundle.sealed_keys)}
        if self._stage == "deliver":
            received = {c for c, r in replies.items() if isinstance(r, KeyReceived) and r.client == c}
            self._members = frozenset(received | {self._holder})
            self._require(len(self._members), "received the key")
            self._stage = "ready"
            return {}
        raise ProtocolError(f"no setup step is pending (stage {self._stage})")

    def _require(self, count: int, what: str) -> None:
        if count < 2:
            self._stage = "failed"
            raise SetupFailed(f"CKKS setup failed: only {count} of {len(self._invited)} clients {what}; "
                              "at least 2 are needed")

    def open(self, round: int, cohort: Sequence[int], size: int) -> None:
        if self._stage != "ready":
            raise RoundAborted(f"round {round}: the CKKS setup is not complete")
        self._round = (round, frozenset(cohort), size)

    def step(self, replies: Mapping[int, Message]) -> SealedSum:
        if self._round is None:
            raise RoundAborted("no round is open")
        (number, cohort, size), self._round = self._round, None
        chunks, total, contributors, rejected = chunk_count(size), None, [], {}
        expected = [min(SLOTS, size - i) for i in range(0, size, SLOTS)]
        for cid, upload in sorted(replies.items()):
            if cid not in cohort or cid not in self._members:
                rejected[cid] = "not in this round's cohort, or holds no CKKS key"
                continue
            if not isinstance(upload, CkksUpload) or upload.round != number or len(upload.chunks) != chunks:
                rejected[cid] = f"expected a CkksUpload of {chunks} chunks for round {number}"
                continue
            try:
                vectors = [ts.ckks_vector_from(self._context, c) for c in upload.chunks]
                if [v.size() for v in vectors] != expected:
                    raise ValueError("chunk sizes differ from the model's")
                total = vectors if total is None else [t + v for t, v in zip(total, vectors)]
            except _TENSEAL_ERRORS as exc:
                rejected[cid] = f"unusable ciphertext ({exc})"
                continue
            contributors.append(cid)
        if total is None:
            raise RoundAborted(f"round {number}: no client contributed to the sum")
        sealed = CkksSum(round=number, size=size - 1, chunks=tuple(t.serialize() for t in total))
        return SealedSum(sealed=sealed, contributors=tuple(contributors), rejected=rejected)
