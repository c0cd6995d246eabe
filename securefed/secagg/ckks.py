"""CKKS summation with TenSEAL: the server adds ciphertexts it cannot read, and the clients open the sum.

Setup, once per job (three exchanges):
  1. CkksSetupStart → ChannelAdvert: every client advertises an X25519 channel key (signed with its
     Ed25519 identity when the job lists identities).
  2. KeyRequest → KeyBundle: the key holder (the lowest client id) makes the CKKS context and seals
     its secret key with AES-GCM for every other client.
  3. KeyDelivery → KeyReceived: each client checks the holder's advert and loads the secret context.
The server makes its own context from the fixed parameters, without a secret key.

Per round, clients upload CKKS encryptions of [w_k·θ_k, w_k, 1/1024], w_k = n_k / 1024 (their weighted
local model, weight and a count), in chunks of N/2 slots whose last four hold contributor tags; per-client entries
(the watermark carrier) go unweighted. The server adds them and the encrypted sum becomes the next global
model: a client opens it as Σ w_k·θ_k / Σ w_k, which is FedAvg, per-client entries over the count. The
server never sees a model in clear.

Contributor tags: the key holder also seals a random tag key with the secret key. Each chunk keeps its
last TAGS slots for tags: client k's tags for round r and chunk c are pseudo-random values in [0, 1) from
that key, which the server never holds. A sealed sum names its contributors, and a client opens it only if
the tag slots of every chunk hold the sum of exactly those clients' tags (and it names at least two): a
server that returns one client's upload, k copies of it, or chunks assembled from different combinations,
is caught.

Every ciphertext from a peer is checked (one ciphertext of two polynomials, at the first level, scale
2^40, NTT form, exact slot count) before TenSEAL adds or decrypts it: malformed ones would crash the
native library.

Parameters: N = 8192, coefficient moduli [60, 60] bits, scale 2^40, symmetric encryption. Summation
needs no multiplication, so one data level is enough; that keeps ciphertexts about 8× the float32
payload. Trust model: every client holds the secret key, so the server colluding with any one
client can decrypt every upload (docs/security.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ProtocolError, RoundAborted, SetupFailed
from ..interfaces import SealedSum, SumClient, SumServer
from ..protocol import MaxLen, Message, decode, encode, message
from ..weighting import BY_EXAMPLES, Weighting
from . import identity
from .channel import channel_key, check_public_key, public_bytes, seal, unseal
from .ckks_wire import check_vector_wire
from .prg import derive_key, expand

POLY_DEGREE = 8192
COEFF_BITS = [60, 60]
SCALE = 2.0**40
SLOTS = POLY_DEGREE // 2
MAX_CLIENTS = 1_500  # the key bundle of n−1 sealed secret keys (131 KB each) must fit in one message
WEIGHT_UNIT = 1024.0  # n_k travels as n_k / 1024, so that sums over large datasets stay in range
MAX_SLOT = 2.0**18  # a summed slot must stay below 2^19 (60-bit modulus at scale 2^40); a margin of 2
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError, IndexError)
# two polynomials of N coefficients per modulus, 8 bytes each, uncompressed, and room for SEAL's header
MAX_CIPHERTEXT = 2 * POLY_DEGREE * len(COEFF_BITS) * 8 + 4096
TAGS = 4  # contributor tag slots: a forged sum passes with probability about (2·TAG_TOLERANCE)^TAGS
TAG_TOLERANCE = 1e-5  # CKKS noise on a summed slot is below 1e-7 here, even over MAX_CLIENTS uploads
TAG_KEY_BYTES = 32
MAX_ROUNDS = 100_000

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
    signature: Annotated[bytes, MaxLen(64)]  # Ed25519, when the job lists identities; else empty


@message(66)
class KeyRequest(Message):
    """To the key holder: make the context and seal its secret key for each of these clients."""

    adverts: Annotated[tuple[ChannelAdvert, ...], MaxLen(MAX_CLIENTS)]


@message(67)
class KeyBundle(Message):
    recipients: Ids
    sealed_keys: Keys  # the secret context, AES-GCM-sealed for each recipient


@message(68)
class KeyDelivery(Message):
    holder: ChannelAdvert
    sealed_key: Blob


@message(69)
class KeyReceived(Message):
    client: int


@message(70)
class CkksUpload(Message):
    round: int
    chunks: Chunks  # [w_k·θ_k, w_k, count] in CKKS vectors of N/2 slots, each ending in its four tags


@message(71)
class CkksSum(Message):
    """The sealed global model: the encrypted sum of the uploads, which only clients can open."""

    round: int
    size: int  # entries in the model (the sum also holds Σ w_k, the count and the tags)
    contributors: Ids  # whose uploads the sum holds, ascending: the tags must say the same
    chunks: Chunks


@message(72)
class CkksState(Message):
    """A client's CKKS keys and the sums it opened, between the processes of a deployed client. Never sent: the
    node seals it under a key of its own folder (runtime/node.py)."""

    channel: Annotated[bytes, MaxLen(32)]  # its X25519 channel key, private, until it holds the CKKS key
    context: Blob  # the secret CKKS context, once keyed
    tag_key: Annotated[bytes, MaxLen(TAG_KEY_BYTES)]
    opened_rounds: Annotated[tuple[int, ...], MaxLen(MAX_ROUNDS)]
    opened: Annotated[tuple[bytes, ...], MaxLen(MAX_ROUNDS, item=32)]  # each round's one sum, as its digest


def new_context() -> ts.Context:
    context = ts.context(ts.SCHEME_TYPE.CKKS, POLY_DEGREE, coeff_mod_bit_sizes=COEFF_BITS,
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = SCALE
    return context


def serialize_context(context: ts.Context, *, secret: bool) -> bytes:
    return context.serialize(save_public_key=False, save_secret_key=secret, save_galois_keys=False,
                             save_relin_keys=False)


def load_context(data: bytes, *, secret: bool) -> ts.Context:
    """A serialized context; it must hold the secret key exactly when `secret` is asked for."""
    try:
        context = ts.context_from(data)
    except _TENSEAL_ERRORS as exc:
        raise ProtocolError(f"not a CKKS context ({exc})") from None
    if context.is_private() != secret:
        raise ProtocolError("the CKKS context " + ("lacks its secret key" if secret else "carries a secret key"))
    context.global_scale = SCALE
    return context


def payload_sizes(model_size: int) -> list[int]:
    """How the values of a sealed vector for a model of `model_size` weights (and w_k and a count) fill the chunks:
    every chunk keeps its last TAGS slots for tags, so each proves by itself whom it holds."""
    entries, per_chunk = model_size + 2, SLOTS - TAGS
    return [min(per_chunk, entries - i) for i in range(0, entries, per_chunk)]


def contributor_tags(tag_key: bytes, job: bytes, round: int, client: int, chunks: int) -> np.ndarray:
    """Client `client`'s tags for `round`, a row of TAGS per chunk, in [0, 1), from the key every client holds
    and the server does not."""
    key = derive_key(tag_key, job=job, purpose="ckks-tag", round=round, parties=(client,))
    return (expand(key, TAGS * chunks).astype(np.float64) / 2.0**32).reshape(chunks, TAGS)


def checked_vector(context: ts.Context, data: bytes, slots: int) -> ts.CKKSVector:
    """A peer's ciphertext, refused unless it is exactly what this job's parameters produce."""
    check_vector_wire(data, slots, MAX_CIPHERTEXT)
    try:
        vector = ts.ckks_vector_from(context, data)
        parts = vector.ciphertext()
        ok = vector.size() == slots and list(vector.shape) == [slots] and len(parts) == 1
        if ok:
            part = parts[0]
            ok = (part.size() == 2 and part.parms_id() == context.data.seal_context().first_parms_id()
                  and part.scale == SCALE and part.is_ntt_form())
    except _TENSEAL_ERRORS as exc:
        raise ProtocolError(f"not a CKKS ciphertext ({exc})") from None
    if not ok:
        raise ProtocolError("a CKKS ciphertext does not match the job's parameters or size")
    return vector


@dataclass(frozen=True)
class CkksSettings:
    job: bytes  # binds the sealed keys to this job
    clients: int
    identities: tuple[bytes, ...] = ()  # every client's Ed25519 public key, if the job lists identities
    weighting: Weighting = BY_EXAMPLES


def advert_content(settings: CkksSettings, client: int, channel: bytes) -> bytes:
    return b"securefed/ckks-advert" + settings.job + client.to_bytes(8, "little", signed=True) + channel


def check_advert(settings: CkksSettings, advert: ChannelAdvert) -> None:
    if not 0 <= advert.client < settings.clients:
        raise ProtocolError(f"a channel advert names client {advert.client}, outside the job")
    check_public_key(advert.channel_key)
    if settings.identities and not identity.verify(settings.identities[advert.client], advert.signature,
                                                   advert_content(settings, advert.client, advert.channel_key)):
        raise ProtocolError(f"the channel advert of client {advert.client} is not signed by its identity")


# ---------------------------------------------------------------- client


class CkksClient(SumClient):
    answers = (CkksSetupStart, KeyRequest, KeyDelivery)

    def __init__(self, cid: int, settings: CkksSettings, identity_key: Ed25519PrivateKey | None = None):
        if settings.identities and identity_key is None:
            raise ValueError("a job with identities needs the client's identity key")
        self.cid = cid
        self.settings = settings
        self.identity_key = identity_key
        self._channel: X25519PrivateKey | None = None
        self._context: ts.Context | None = None
        self._tag_key = b""
        self._global: np.ndarray | None = None  # the global model this client last opened
        self._opened: dict[int, bytes] = {}  # round → digest of the one sealed sum of it this client opens

    def state(self) -> bytes:
        channel = self._channel.private_bytes_raw() if self._channel is not None and self._context is None else b""
        context = serialize_context(self._context, secret=True) if self._context is not None else b""
        return encode(CkksState(channel=channel, context=context, tag_key=self._tag_key,
                                opened_rounds=tuple(self._opened), opened=tuple(self._opened.values())))

    def restore(self, state: bytes) -> None:
        if not state:
            return
        saved = decode(state, CkksState)
        if len(saved.opened_rounds) != len(saved.opened) or len(saved.tag_key) not in (0, TAG_KEY_BYTES):
            raise ProtocolError("a CKKS client state that does not hold together")
        try:
            self._channel = X25519PrivateKey.from_private_bytes(saved.channel) if saved.channel else None
        except ValueError:
            raise ProtocolError("a CKKS client state with a broken channel key") from None
        self._context = load_context(saved.context, secret=True) if saved.context else None
        self._tag_key = saved.tag_key
        self._opened = dict(zip(saved.opened_rounds, saved.opened))

    def reply(self, request: Message) -> Message:
        if isinstance(request, CkksSetupStart):
            return self._advertise()
        if isinstance(request, KeyRequest):
            return self._make_keys(request)
        if isinstance(request, KeyDelivery):
            return self._take_key(request)
        return super().reply(request)

    def _advertise(self) -> ChannelAdvert:
        if self._context is not None:
            raise ProtocolError("refused: this client is keyed for the job already")
        self._channel = X25519PrivateKey.generate()
        channel = public_bytes(self._channel)
        signature = (self.identity_key.sign(advert_content(self.settings, self.cid, channel))
                     if self.identity_key else b"")
        return ChannelAdvert(client=self.cid, channel_key=channel, signature=signature)

    def _make_keys(self, request: KeyRequest) -> KeyBundle:
        channel = self._require_channel()
        recipients = tuple(a.client for a in request.adverts)
        if len(set(recipients)) != len(recipients) or self.cid in recipients:
            raise ProtocolError("refused: KeyRequest names its recipients inconsistently")
        for advert in request.adverts:
            check_advert(self.settings, advert)
        context, tag_key = new_context(), os.urandom(TAG_KEY_BYTES)
        secret = tag_key + serialize_context(context, secret=True)
        sealed = []
        for advert in request.adverts:
            shared = channel_key(channel, advert.channel_key, job=self.settings.job, a=self.cid, b=advert.client)
            sealed.append(seal(shared, secret, job=self.settings.job, stage="ckks-key", sender=self.cid,
                               recipient=advert.client))
        self._context, self._tag_key = context, tag_key
        return KeyBundle(recipients=recipients, sealed_keys=tuple(sealed))

    def _take_key(self, delivery: KeyDelivery) -> KeyReceived:
        channel = self._require_channel()
        holder = delivery.holder
        check_advert(self.settings, holder)
        if holder.client == self.cid:
            raise ProtocolError("refused: a key delivery naming this client as the holder")
        shared = channel_key(channel, holder.channel_key, job=self.settings.job, a=self.cid, b=holder.client)
        secret = unseal(shared, delivery.sealed_key, job=self.settings.job, stage="ckks-key", sender=holder.client,
                        recipient=self.cid)
        if len(secret) <= TAG_KEY_BYTES:
            raise ProtocolError("the sealed key holds no CKKS context")
        self._context, self._tag_key = load_context(secret[TAG_KEY_BYTES:], secret=True), secret[:TAG_KEY_BYTES]
        return KeyReceived(client=self.cid)

    def _require_channel(self) -> X25519PrivateKey:
        if self._channel is None or self._context is not None:
            raise ProtocolError("a CKKS key message arrived out of order")
        return self._channel

    def _require_context(self) -> ts.Context:
        if self._context is None:
            raise ProtocolError("this client holds no CKKS key: the setup did not complete")
        return self._context

    def open_model(self, model: Message, size: int) -> np.ndarray:
        weights = self._open_sealed(model, size) if isinstance(model, CkksSum) else super().open_model(model, size)
        self._global = weights
        return weights

    def _open_sealed(self, model: CkksSum, size: int) -> np.ndarray:
        context = self._require_context()
        sizes = payload_sizes(size)
        if model.size != size or len(model.chunks) != len(sizes):
            raise ProtocolError(f"the sealed model holds {model.size} weights in {len(model.chunks)} chunks, "
                                f"this model has {size}")
        named = model.contributors
        if len(named) < 2 or list(named) != sorted(set(named)) or not 0 <= named[0] < named[-1] < self.settings.clients:
            raise ProtocolError("refused: a sealed model must name at least two distinct contributors of the job")
        digest = hashlib.sha256(encode(model)).digest()
        if self._opened.setdefault(model.round, digest) != digest:
            raise ProtocolError(f"refused: a second, different sealed sum of round {model.round}")
        vectors = [checked_vector(context, chunk, n + TAGS) for chunk, n in zip(model.chunks, sizes)]
        try:
            opened = [np.asarray(v.decrypt()) for v in vectors]
        except _TENSEAL_ERRORS as exc:
            raise ProtocolError(f"cannot decrypt the sealed model ({exc})") from None
        expected = sum(contributor_tags(self._tag_key, self.settings.job, model.round, c, len(sizes)) for c in named)
        found = np.stack([chunk[n:] for chunk, n in zip(opened, sizes)])
        if not np.abs(found - expected).max() <= TAG_TOLERANCE:  # every chunk, before any value is used
            raise ProtocolError(f"refused: the sealed model of round {model.round} is not the sum of the "
                                f"{len(named)} contributors it names")
        values = np.concatenate([chunk[:n] for chunk, n in zip(opened, sizes)])
        if not (values[size] > 0.5 / WEIGHT_UNIT and values[size + 1] > 0.5 / WEIGHT_UNIT):
            raise ProtocolError("the sealed model does not hold a weighted sum")
        count = np.round(values[size + 1] * WEIGHT_UNIT)  # a sum of ones: round away CKKS's noise
        weights = self.settings.weighting.mean(values[:size], values[size], count / WEIGHT_UNIT).astype(np.float32)
        if not np.isfinite(weights).all():
            raise ProtocolError("the sealed model opens to non-finite weights")
        return weights

    def upload(self, round: int, vector: np.ndarray, bound: float = 0.0, told: bytes = b"") -> CkksUpload:
        context = self._require_context()
        if self._global is None or self._global.size + 1 != vector.size:
            raise ProtocolError("no global model was opened for this upload")
        n = float(vector[-1])
        # FedAvg under encryption: c·θ_k = c·Δ_k + c·θ_global (c = n_k, or 1 for per-client entries), then n_k and a
        # count of one, all over 1024
        local = vector[:-1].astype(np.float64) + self.settings.weighting.scale(n) * self._global.astype(np.float64)
        weighted = np.append(local, [n, 1.0]) / WEIGHT_UNIT
        if not np.abs(weighted).max() * self.settings.clients < MAX_SLOT:
            raise ProtocolError("the weighted model is too large for CKKS at scale 2^40: the sum could wrap around")
        sizes = payload_sizes(vector.size - 1)
        tags = contributor_tags(self._tag_key, self.settings.job, round, self.cid, len(sizes))
        starts = np.cumsum([0, *sizes])
        try:
            chunks = tuple(ts.ckks_vector(context, np.append(weighted[a:b], row)).serialize()
                           for a, b, row in zip(starts, starts[1:], tags))
        except _TENSEAL_ERRORS as exc:
            raise ProtocolError(f"cannot encrypt the update ({exc})") from None
        return CkksUpload(round=round, chunks=chunks)


# ---------------------------------------------------------------- server


class CkksServer(SumServer):
    def __init__(self, settings: CkksSettings):
        self.settings = settings
        self._stage = "new"
        self._invited: frozenset[int] = frozenset()
        self._adverts: dict[int, ChannelAdvert] = {}
        self._holder = -1
        self._context: ts.Context | None = None  # parameters only: no secret key
        self._members: frozenset[int] = frozenset()
        self._round: tuple[int, frozenset[int], int] | None = None

    @property
    def holder(self) -> int:
        return self._holder

    @property
    def members(self) -> frozenset[int]:
        """The clients that hold the key."""
        return self._members

    def setup(self, clients: Sequence[int], rounds: range) -> dict[int, Message]:
        self._stage, self._invited, self._adverts, self._context = "advertise", frozenset(clients), {}, None
        return {c: CkksSetupStart() for c in sorted(clients)}

    def setup_step(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        if self._stage == "advertise":
            return self._request_keys(replies)
        if self._stage == "keys":
            return self._deliver_keys(replies)
        if self._stage == "deliver":
            received = {c for c, r in replies.items() if isinstance(r, KeyReceived) and r.client == c}
            self._members = frozenset(received & set(self._adverts) | {self._holder})
            self._require(len(self._members), "received the key")
            self._stage = "ready"
            return {}
        raise ProtocolError(f"no setup step is pending (stage {self._stage})")

    def _request_keys(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        for cid, advert in sorted(replies.items()):
            if cid in self._invited and isinstance(advert, ChannelAdvert) and advert.client == cid:
                try:
                    check_advert(self.settings, advert)
                except ProtocolError:
                    continue
                self._adverts[cid] = advert
        self._require(len(self._adverts), "advertised a channel key")
        self._holder = min(self._adverts)
        self._stage = "keys"
        return {self._holder: KeyRequest(adverts=tuple(a for c, a in sorted(self._adverts.items())
                                                       if c != self._holder))}

    def _deliver_keys(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        bundle = replies.get(self._holder)
        others = tuple(c for c in sorted(self._adverts) if c != self._holder)
        if not isinstance(bundle, KeyBundle) or bundle.recipients != others or len(bundle.sealed_keys) != len(others):
            self._stage = "failed"
            raise SetupFailed(f"CKKS setup failed: the key holder, client {self._holder}, sent no usable keys")
        self._context = load_context(serialize_context(new_context(), secret=False), secret=False)
        self._stage = "deliver"
        return {c: KeyDelivery(holder=self._adverts[self._holder], sealed_key=key)
                for c, key in zip(others, bundle.sealed_keys)}

    def _require(self, count: int, what: str) -> None:
        if count < 2:
            self._stage = "failed"
            raise SetupFailed(f"CKKS setup failed: only {count} of {len(self._invited)} clients {what}; "
                              "at least 2 are needed")

    def open(self, round: int, cohort: Sequence[int], size: int, bound: float = 0.0, told: bytes = b"") -> None:
        if self._stage != "ready":
            raise RoundAborted(f"round {round}: the CKKS setup is not complete")
        self._round = (round, frozenset(cohort), size)

    def step(self, replies: Mapping[int, Message]) -> SealedSum:
        if self._round is None:
            raise RoundAborted("no round is open")
        (number, cohort, size), self._round = self._round, None
        sizes, total, contributors, rejected = [n + TAGS for n in payload_sizes(size - 1)], None, [], {}
        for cid, upload in sorted(replies.items()):
            if cid not in cohort or cid not in self._members:
                rejected[cid] = "not in this round's cohort, or holds no CKKS key"
                continue
            if not isinstance(upload, CkksUpload) or upload.round != number or len(upload.chunks) != len(sizes):
                rejected[cid] = f"expected a CkksUpload of {len(sizes)} chunks for round {number}"
                continue
            try:
                vectors = [checked_vector(self._context, c, n) for c, n in zip(upload.chunks, sizes)]
                total = vectors if total is None else [t + v for t, v in zip(total, vectors)]
            except ProtocolError as exc:
                rejected[cid] = str(exc)
                continue
            except _TENSEAL_ERRORS as exc:
                rejected[cid] = f"unusable ciphertext ({exc})"
                continue
            contributors.append(cid)
        if total is None:
            raise RoundAborted(f"round {number}: no client contributed to the sum")
        sealed = CkksSum(round=number, size=size - 1, contributors=tuple(contributors),
                         chunks=tuple(t.serialize() for t in total))
        return SealedSum(sealed=sealed, contributors=tuple(contributors), rejected=rejected)
