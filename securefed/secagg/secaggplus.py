"""SecAgg+: pairwise masking over a sparse neighbour graph (Bell et al. 2020), dropout recovery by
Shamir shares (Bonawitz et al. 2017). Client and server are state machines over typed messages.

Setup, once per job (three exchanges):
  1. SetupStart → KeyAdvert: each client draws, for every round of the job, an X25519 mask key pair
     and a self-mask seed, and advertises the public keys, seed commitments and a channel key.
  2. ShareRequest → EncryptedShares: the server picks a k-regular graph; each client Shamir-shares
     (t of k) every round's mask private key and self seed among its neighbours, encrypted pairwise.
  3. ShareDelivery → SetupDone: the server routes the ciphertexts; each client keeps its neighbours'.

Per round (two exchanges):
  1. MaskedUpload (inside TrainRes): y = encode(x) + PRG(self seed) + Σ ±PRG(pair key) mod 2^32.
  2. UnmaskRequest → UnmaskReply: for each neighbour, a client reveals its share of the self seed if
     the server names that neighbour a survivor, or of the mask key if it names it dropped; never
     both, and only once per round.

Secrets are per round, so what the server reconstructs in one round (a survivor's seed, a dropped
client's mask key) tells it nothing about any other round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ProtocolError, RoundAborted, SetupFailed, UpdateRefused
from ..interfaces import Encoding, SumClient, SumResult, SumServer
from ..protocol import Array, MaxLen, Message, decode, encode, message
from ..seeding import stream
from . import identity, shamir
from .channel import channel_key, check_public_key, public_bytes, seal, shared_secret, unseal
from .encoding import FixedPoint
from .graph import neighbour_graph
from .prg import Keystreams, derive_key

MAX_CLIENTS = 100_000
MAX_ROUNDS = 100_000  # the most rounds one setup may cover (FederationConfig allows as many)
_SHARES_PER_ROUND = 2 * shamir.SHARE_BYTES  # mask-key share, then self-seed share
BOUND_MARGIN = 2.0  # the next round's encoding bound, over the largest entry of this round's sum

Key32 = Annotated[bytes, MaxLen(32)]
KeyTable = Annotated[np.ndarray, Array(("uint8",), ndim=2)]  # one 32-byte row per round
Ids = Annotated[tuple[int, ...], MaxLen(MAX_CLIENTS)]
Ciphertexts = Annotated[tuple[bytes, ...], MaxLen(MAX_CLIENTS, item=MAX_ROUNDS * _SHARES_PER_ROUND + 64)]
Shares = Annotated[tuple[bytes, ...], MaxLen(MAX_CLIENTS, item=shamir.SHARE_BYTES)]
Signature = Annotated[bytes, MaxLen(64)]
Signatures = Annotated[tuple[bytes, ...], MaxLen(MAX_CLIENTS, item=64)]


@message(32)
class SetupStart(Message):
    first_round: int
    last_round: int


@message(33)
class KeyAdvert(Message):
    client: int
    first_round: int
    channel_key: Key32
    mask_keys: KeyTable  # X25519 public key of each round
    seed_commitments: KeyTable  # SHA-256 of each round's self-mask seed
    signature: Signature  # Ed25519 over all of the above, in hardened mode; else empty


@message(34)
class ShareRequest(Message):
    neighbours: Ids
    adverts: tuple[KeyAdvert, ...]  # in the order of `neighbours`


@message(35)
class EncryptedShares(Message):
    recipients: Ids
    ciphertexts: Ciphertexts


@message(36)
class ShareDelivery(Message):
    senders: Ids
    ciphertexts: Ciphertexts


@message(37)
class SetupDone(Message):
    neighbours: int


@message(38)
class MaskedUpload(Message):
    round: int
    vector: Annotated[np.ndarray, Array(("uint32",))]


@message(39)
class UnmaskRequest(Message):
    round: int
    survivors: Ids  # neighbours whose upload is in the sum: reveal their self-seed shares
    dropped: Ids  # neighbours whose upload is not: reveal their mask-key shares
    everyone: Ids  # hardened mode: the round's whole survivor list, as signed; else empty
    signatures: Signatures  # hardened mode: each survivor neighbour's signature of `everyone` (empty if none came)


@message(41)
class SurvivorsRequest(Message):
    """Hardened mode's consistency check: sign the list of clients whose uploads are in the sum."""

    round: int
    survivors: Ids


@message(42)
class SurvivorsSigned(Message):
    round: int
    signature: Signature


@message(40)
class UnmaskReply(Message):
    round: int
    own_seed_share: Annotated[bytes, MaxLen(shamir.SHARE_BYTES)]  # the replying survivor's share of its own seed
    seed_shares: Shares  # in the order of `survivors`
    key_shares: Shares  # in the order of `dropped`


@message(43)
class ClientState(Message):
    """A client's setup and progress, carried between processes (a deployed client runs one per message)."""

    first_round: int
    last_round: int
    channel: Key32  # the X25519 private keys and seeds, raw
    secret_rounds: Ids  # the rounds whose mask key and self seed the client still holds
    mask_keys: KeyTable
    seeds: KeyTable
    adverts: tuple[KeyAdvert, ...]
    own_shares: Annotated[bytes, MaxLen(MAX_ROUNDS * _SHARES_PER_ROUND)]
    holders: Ids  # the neighbours whose shares the client holds
    held: Ciphertexts
    ready: bool
    uploaded: Ids
    earlier: Ids  # uploaded for under an earlier setup
    signed_rounds: Ids
    signed: Ciphertexts  # each round's signed survivor list, as int64s
    answered: Ids
    told_rounds: Ids
    told: Ciphertexts  # each uploaded round's instructions (SHA-256 of its TrainIns), as the client received them


@dataclass(frozen=True)
class SecAggPlusSettings:
    job: bytes  # binds every key and ciphertext to this job
    clients: int
    rounds: int  # the job's last round: no setup reaches past it
    degree: int  # k: neighbours per client
    threshold: int  # t: shares needed to recover a secret
    clip: float  # bound on n_k, and the widest bound on an entry of n_k·Δ (the server may set a tighter one per round)
    seed: int  # the job seed: graph choice and stochastic rounding
    identities: tuple[bytes, ...] = ()  # hardened mode: every client's Ed25519 public key, by client id

    @property
    def hardened(self) -> bool:
        return bool(self.identities)

    def encoding(self, bound: float) -> FixedPoint:
        """The fixed point of a round's masked vector [n_k·Δ_k, n_k, clipped fraction]: the update's entries
        within `bound`, n_k within the clip, the fraction of entries clipped within 1."""
        return FixedPoint(bound, self.clients, tail=(self.clip, 1.0))

    def round_bound(self, bound: float) -> float:
        """The bound a round's update entries are encoded in: the server's choice (0: the clip), within the clip.
        The same bound for everyone only costs or gains precision; a bound for one client alone would single its
        update out of the sum, which hardened mode refuses (each survivor signs the instructions it was given)."""
        if bound == 0:
            return self.clip
        if not (math.isfinite(bound) and self.clip * 2.0**-60 <= bound <= self.clip):
            raise ProtocolError(f"the server's encoding bound {bound!r} is outside (clip·2^-60, clip]")
        return bound


def seed_commitment(settings: SecAggPlusSettings, client: int, round: int, seed: bytes) -> bytes:
    return hashlib.sha256(b"securefed/self-seed" + settings.job + struct.pack("<qq", client, round) + seed).digest()


def advert_content(settings: SecAggPlusSettings, advert: KeyAdvert) -> bytes:
    return (b"securefed/advert" + settings.job + struct.pack("<qq", advert.client, advert.first_round)
            + advert.channel_key + advert.mask_keys.tobytes() + advert.seed_commitments.tobytes())


def survivors_content(settings: SecAggPlusSettings, round: int, survivors: Sequence[int], told: bytes) -> bytes:
    """What a hardened client signs after uploading: the round's survivor list and the instructions it was given
    (the global model and the encoding bound), so that neighbours reveal shares only for a story they all share."""
    return (b"securefed/survivors" + settings.job + struct.pack("<q", len(told)) + told
            + struct.pack(f"<q{len(survivors)}q", round, *survivors))


def signed_by(settings: SecAggPlusSettings, client: int, signature: bytes, content: bytes) -> bool:
    return 0 <= client < len(settings.identities) and identity.verify(settings.identities[client], signature, content)


def self_mask(settings: SecAggPlusSettings, seed: bytes, round: int, client: int, streams: Keystreams) -> np.ndarray:
    """Client's own mask in `round`, valid until `streams` makes the next."""
    return streams.expand(derive_key(seed, job=settings.job, purpose="self-mask", round=round, parties=(client,)))


def pair_mask(settings: SecAggPlusSettings, secret: bytes, round: int, a: int, b: int,
              streams: Keystreams) -> np.ndarray:
    """The mask clients a and b share in `round`; the lower id adds it, the higher subtracts it."""
    key = derive_key(secret, job=settings.job, purpose="pair-mask", round=round, parties=tuple(sorted((a, b))))
    return streams.expand(key)


# ---------------------------------------------------------------- client


@dataclass
class _Setup:
    rounds: range
    channel: X25519PrivateKey
    mask_keys: dict[int, X25519PrivateKey]
    seeds: dict[int, bytes]
    adverts: dict[int, KeyAdvert] = field(default_factory=dict)  # neighbours', after the share request
    own_shares: bytes = b""  # this client's shares of its own secrets, for every round
    held: dict[int, bytes] = field(default_factory=dict)  # neighbour → its shares for every round
    ready: bool = False
    uploaded: set[int] = field(default_factory=set)
    earlier: set[int] = field(default_factory=set)  # rounds uploaded for under an earlier setup: never again
    signed: dict[int, tuple[int, ...]] = field(default_factory=dict)  # round → the survivor list signed
    answered: set[int] = field(default_factory=set)
    told: dict[int, bytes] = field(default_factory=dict)  # round → the digest of the instructions it uploaded on


class SecAggPlusClient(SumClient):
    answers = (SetupStart, ShareRequest, ShareDelivery, SurvivorsRequest, UnmaskRequest)

    def __init__(self, cid: int, settings: SecAggPlusSettings, identity_key: Ed25519PrivateKey | None = None):
        if settings.hardened and identity_key is None:
            raise ValueError("hardened SecAgg+ needs the client's identity key")
        self.cid = cid
        self.settings = settings
        self.identity_key = identity_key
        self._setup: _Setup | None = None

    def reply(self, request: Message) -> Message:
        if isinstance(request, SetupStart):
            return self._advertise(request)
        if isinstance(request, ShareRequest):
            return self._share(request)
        if isinstance(request, ShareDelivery):
            return self._receive(request)
        if isinstance(request, SurvivorsRequest):
            return self._sign_survivors(request)
        if isinstance(request, UnmaskRequest):
            return self._unmask(request)
        return super().reply(request)

    def state(self) -> bytes:
        setup = self._setup
        if setup is None:
            return b""
        kept = sorted(setup.mask_keys)
        return encode(ClientState(
            first_round=setup.rounds.start, last_round=setup.rounds.stop - 1, channel=setup.channel.private_bytes_raw(),
            secret_rounds=tuple(kept), mask_keys=_table(setup.mask_keys[r].private_bytes_raw() for r in kept),
            seeds=_table(setup.seeds[r] for r in kept), adverts=tuple(setup.adverts[v] for v in sorted(setup.adverts)),
            own_shares=setup.own_shares, holders=tuple(sorted(setup.held)),
            held=tuple(setup.held[v] for v in sorted(setup.held)), ready=setup.ready,
            uploaded=tuple(sorted(setup.uploaded)), earlier=tuple(sorted(setup.earlier)),
            signed_rounds=tuple(sorted(setup.signed)),
            signed=tuple(np.array(setup.signed[r], dtype="<i8").tobytes() for r in sorted(setup.signed)),
            answered=tuple(sorted(setup.answered)), told_rounds=tuple(sorted(setup.told)),
            told=tuple(setup.told[r] for r in sorted(setup.told))))

    def restore(self, state: bytes) -> None:
        if not state:
            self._setup = None
            return
        s = decode(state, ClientState)
        if not (len(s.secret_rounds) == len(s.mask_keys) == len(s.seeds) and len(s.holders) == len(s.held)
                and len(s.signed_rounds) == len(s.signed) and len(s.told_rounds) == len(s.told)):
            raise ProtocolError("the saved SecAgg+ client state is inconsistent")
        self._setup = _Setup(
            rounds=range(s.first_round, s.last_round + 1), channel=X25519PrivateKey.from_private_bytes(s.channel),
            mask_keys={r: X25519PrivateKey.from_private_bytes(bytes(k)) for r, k in zip(s.secret_rounds, s.mask_keys)},
            seeds={r: bytes(seed) for r, seed in zip(s.secret_rounds, s.seeds)},
            adverts={a.client: a for a in s.adverts}, own_shares=s.own_shares, held=dict(zip(s.holders, s.held)),
            ready=s.ready, uploaded=set(s.uploaded), earlier=set(s.earlier),
            signed={r: tuple(int(v) for v in np.frombuffer(b, dtype="<i8")) for r, b in zip(s.signed_rounds, s.signed)},
            answered=set(s.answered), told=dict(zip(s.told_rounds, map(bytes, s.told))))

    def _advertise(self, start: SetupStart) -> KeyAdvert:
        if not 1 <= start.first_round <= start.last_round <= self.settings.rounds:
            raise ProtocolError(f"SetupStart names rounds {start.first_round}..{start.last_round}")
        rounds = range(start.first_round, start.last_round + 1)
        # A new setup replaces any earlier one, with fresh secrets, but not the rounds already uploaded for: a
        # server that restarted the setup and ran an uploaded round again without one client could subtract.
        earlier = self._setup.uploaded | self._setup.earlier if self._setup is not None else set()
        setup = _Setup(rounds, X25519PrivateKey.generate(), {r: X25519PrivateKey.generate() for r in rounds},
                       {r: os.urandom(32) for r in rounds}, earlier=earlier)
        self._setup = setup
        advert = KeyAdvert(
            client=self.cid, first_round=rounds.start, channel_key=public_bytes(setup.channel),
            mask_keys=_table(public_bytes(setup.mask_keys[r]) for r in rounds),
            seed_commitments=_table(seed_commitment(self.settings, self.cid, r, setup.seeds[r]) for r in rounds),
            signature=b"")
        if self.identity_key is not None:
            signature = self.identity_key.sign(advert_content(self.settings, advert))
            advert = dataclasses.replace(advert, signature=signature)
        return advert

    def _share(self, request: ShareRequest) -> EncryptedShares:
        setup = self._stage("a share request", lambda s: not s.adverts)
        neighbours, t = request.neighbours, self.settings.threshold
        self._check_ids(neighbours, range(self.settings.clients), "neighbours")
        if len(neighbours) > self.settings.degree:
            raise ProtocolError(f"refused: {len(neighbours)} neighbours, more than the job's {self.settings.degree}")
        # t must be a strict majority of the holders, or a server telling some holders "survived" and others
        # "dropped" about one client could collect both its seed and its mask key.
        if not (len(neighbours) + 1) / 2 < t <= len(neighbours) + 1:
            raise ProtocolError(f"refused: {len(neighbours)} neighbours and the client cannot hold a {t}-of-n sharing "
                                "with a majority threshold")
        if tuple(a.client for a in request.adverts) != neighbours:
            raise ProtocolError("the key advertisements do not match the neighbours")
        for advert in request.adverts:
            _check_advert(advert, advert.client, setup.rounds, self.settings)
        adverts = {a.client: a for a in request.adverts}
        holders = (*neighbours, self.cid)
        per_round = [(shamir.split(setup.mask_keys[r].private_bytes_raw(), t, holders),
                      shamir.split(setup.seeds[r], t, holders)) for r in setup.rounds]
        # The client holds a share of its own secrets too: it reveals that of its seed when it survives.
        setup.own_shares = b"".join(keys[self.cid] + seeds[self.cid] for keys, seeds in per_round)
        ciphertexts = []
        for v in neighbours:
            plaintext = b"".join(keys[v] + seeds[v] for keys, seeds in per_round)
            key = channel_key(setup.channel, adverts[v].channel_key, job=self.settings.job, a=self.cid, b=v)
            ciphertexts.append(seal(key, plaintext, job=self.settings.job, stage="shares", sender=self.cid,
                                    recipient=v))
        setup.adverts = adverts
        return EncryptedShares(recipients=neighbours, ciphertexts=tuple(ciphertexts))

    def _receive(self, delivery: ShareDelivery) -> SetupDone:
        setup = self._stage("a share delivery", lambda s: bool(s.adverts) and not s.ready)
        self._check_ids(delivery.senders, setup.adverts, "senders")
        if len(delivery.ciphertexts) != len(delivery.senders):
            raise ProtocolError("ShareDelivery has a ciphertext count unlike its sender count")
        if len(delivery.senders) + 1 < self.settings.threshold:
            raise ProtocolError(f"only {len(delivery.senders)} neighbours completed the setup, too few for the "
                                f"threshold {self.settings.threshold}")
        held = {}
        for sender, blob in zip(delivery.senders, delivery.ciphertexts):
            key = channel_key(setup.channel, setup.adverts[sender].channel_key, job=self.settings.job,
                              a=self.cid, b=sender)
            plaintext = unseal(key, blob, job=self.settings.job, stage="shares", sender=sender, recipient=self.cid)
            if len(plaintext) != len(setup.rounds) * _SHARES_PER_ROUND:
                raise ProtocolError(f"the shares from client {sender} have the wrong length")
            held[sender] = plaintext
        # Mask only with neighbours that completed the setup: exactly those whose shares arrived.
        setup.adverts = {v: setup.adverts[v] for v in delivery.senders}
        setup.held, setup.ready = held, True
        return SetupDone(neighbours=len(held))

    def admit(self, round: int, weight: float) -> _Setup:
        setup = self._stage("an upload", lambda s: s.ready)
        if round not in setup.rounds:
            raise ProtocolError(f"the secure-aggregation setup does not cover round {round}")
        if round in setup.uploaded or round in setup.earlier:
            raise ProtocolError(f"refused: already uploaded for round {round}, which is never uploaded for twice")
        if not abs(weight) <= self.settings.clip:  # n_k, FedAvg's weight: clipped, it would skew the mean
            raise UpdateRefused(f"this client's weight {weight:g} (its examples) exceeds the secure sum's clip "
                                f"{self.settings.clip:g}: raise [secagg] clip")
        return setup

    def upload(self, round: int, vector: np.ndarray, bound: float = 0.0, told: bytes = b"") -> MaskedUpload:
        setup = self.admit(round, float(vector[-1]))
        bound = self.settings.round_bound(bound)
        update = np.asarray(vector[:-1])
        clipped = np.count_nonzero(np.abs(update) > bound) / update.size if update.size else 0.0  # summed too
        vector = np.append(vector, np.asarray(clipped, dtype=vector.dtype))
        masked = self.settings.encoding(bound).encode(vector, stream(self.settings.seed, "secagg-rounding", round,
                                                                     self.cid))
        setup.uploaded.add(round)
        setup.told[round] = told
        size = len(vector)
        streams = Keystreams(size)
        masked += self_mask(self.settings, setup.seeds[round], round, self.cid, streams)
        index = round - setup.rounds.start
        for v, advert in setup.adverts.items():
            secret = shared_secret(setup.mask_keys[round], bytes(advert.mask_keys[index]))
            mask = pair_mask(self.settings, secret, round, self.cid, v, streams)
            if self.cid < v:
                masked += mask
            else:
                masked -= mask
        return MaskedUpload(round=round, vector=masked)

    def _sign_survivors(self, request: SurvivorsRequest) -> SurvivorsSigned:
        setup = self._stage("a survivor list", lambda s: s.ready)
        round, survivors = request.round, request.survivors
        if not self.settings.hardened or self.identity_key is None:
            raise ProtocolError("survivor lists are signed in hardened mode only")
        if round not in setup.uploaded or round in setup.signed:
            raise ProtocolError(f"refused: a survivor list for round {round}, which this client cannot sign now")
        self._check_ids(survivors, range(self.settings.clients), "survivors", itself=True)
        if self.cid not in survivors or len(survivors) < self.settings.threshold:
            raise ProtocolError(f"refused: the survivor list for round {round} leaves out this client or is "
                                f"shorter than the threshold {self.settings.threshold}")
        setup.signed[round] = survivors
        return SurvivorsSigned(round=round,
                               signature=self.identity_key.sign(survivors_content(self.settings, round, survivors,
                                                                                  setup.told.get(round, b""))))

    def _check_consistency(self, setup: _Setup, request: UnmaskRequest) -> None:
        """Hardened mode: the lists must follow from the survivor list this client signed, and every neighbour
        named a survivor must have signed that same list with the same instructions (model and encoding bound):
        a server that told one client another story cannot have its upload unmasked."""
        everyone = setup.signed.get(request.round)
        if everyone is None or request.everyone != everyone:
            raise ProtocolError(f"refused: the survivor list for round {request.round} is not the one this client "
                                "signed")
        neighbours = sorted(setup.adverts)
        if (request.survivors != tuple(v for v in neighbours if v in everyone)
                or request.dropped != tuple(v for v in neighbours if v not in everyone)):
            raise ProtocolError("refused: the survivors and dropped named do not follow from the signed list")
        if len(request.signatures) != len(request.survivors):
            raise ProtocolError("refused: the signatures do not match the survivors")
        content = survivors_content(self.settings, request.round, everyone, setup.told.get(request.round, b""))
        unsigned = [v for v, sig in zip(request.survivors, request.signatures)
                    if not signed_by(self.settings, v, sig, content)]
        if unsigned:
            raise ProtocolError(f"refused: neighbour {unsigned[0]} did not sign the survivor list of round "
                                f"{request.round} with the instructions this client was given")

    def _unmask(self, request: UnmaskRequest) -> UnmaskReply:
        setup = self._stage("an unmask request", lambda s: s.ready)
        round = request.round
        if round not in setup.uploaded:
            raise ProtocolError(f"unmask request for round {round}, in which this client uploaded nothing")
        if round in setup.answered:
            raise ProtocolError(f"refused: round {round} was already unmasked")
        survivors, dropped = request.survivors, request.dropped
        self._check_ids(survivors, setup.adverts, "survivors")
        self._check_ids(dropped, setup.adverts, "dropped")
        if set(survivors) & set(dropped):
            raise ProtocolError("refused: the request names a client both a survivor and dropped")
        if self.settings.hardened:
            self._check_consistency(setup, request)
        if len(survivors) + 1 < self.settings.threshold:
            raise ProtocolError(f"refused: {len(survivors) + 1} survivors in this neighbourhood, "
                                f"fewer than the threshold {self.settings.threshold}")
        setup.answered.add(round)
        at = (round - setup.rounds.start) * _SHARES_PER_ROUND
        key_shares = tuple(setup.held[v][at : at + shamir.SHARE_BYTES] for v in dropped)
        seed_shares = tuple(setup.held[v][at + shamir.SHARE_BYTES : at + _SHARES_PER_ROUND] for v in survivors)
        own_seed_share = setup.own_shares[at + shamir.SHARE_BYTES : at + _SHARES_PER_ROUND]
        # this round's own secrets are no longer needed
        setup.mask_keys.pop(round, None)
        setup.seeds.pop(round, None)
        return UnmaskReply(round=round, own_seed_share=own_seed_share, seed_shares=seed_shares,
                           key_shares=key_shares)

    def _stage(self, what: str, ok) -> _Setup:
        if self._setup is None or not ok(self._setup):
            raise ProtocolError(f"{what} arrived out of order in the secure-aggregation setup")
        return self._setup

    def _check_ids(self, ids: Sequence[int], allowed, what: str, itself: bool = False) -> None:
        if len(set(ids)) != len(ids) or list(ids) != sorted(ids):
            raise ProtocolError(f"{what} must be distinct and sorted")
        outside = [i for i in ids if i not in allowed or (i == self.cid and not itself)]
        if outside:
            raise ProtocolError(f"refused: {what} names client {outside[0]}, outside this client's neighbourhood")


def _table(rows) -> np.ndarray:
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 32).copy()


def _check_advert(advert: KeyAdvert, client: int, rounds: range, settings: SecAggPlusSettings) -> None:
    shape = (len(rounds), 32)
    if advert.client != client or advert.first_round != rounds.start:
        raise ProtocolError(f"key advertisement of client {advert.client} is for another client or rounds")
    if len(advert.channel_key) != 32 or advert.mask_keys.shape != shape or advert.seed_commitments.shape != shape:
        raise ProtocolError(f"key advertisement of client {advert.client} has the wrong key sizes")
    if settings.hardened and not signed_by(settings, client, advert.signature, advert_content(settings, advert)):
        raise ProtocolError(f"key advertisement of client {client} is not signed by its identity")
    for key in (advert.channel_key, *map(bytes, advert.mask_keys)):
        check_public_key(key)  # a low-order or malformed key fails here, not mid-round


# ---------------------------------------------------------------- server


def _components(members: set[int], graph: Mapping[int, tuple[int, ...]]) -> list[set[int]]:
    """The connected groups of `members` in `graph` restricted to them."""
    left, groups = set(members), []
    while left:
        group, frontier = set(), [left.pop()]
        while frontier:
            node = frontier.pop()
            group.add(node)
            fresh = [v for v in graph[node] if v in left]
            left.difference_update(fresh)
            frontier += fresh
        groups.append(group)
    return groups


@dataclass
class _Round:
    number: int
    cohort: frozenset[int]
    size: int  # entries of a masked vector: the update, n_k and the clipped fraction
    bound: float  # the update entries' encoding bound
    told: bytes  # the digest of the instructions every client was sent
    stage: str = "upload"  # then "consistency" (hardened mode), then "unmask"
    total: np.ndarray | None = None
    survivors: tuple[int, ...] = ()
    dropped: frozenset[int] = frozenset()
    requests: dict[int, UnmaskRequest] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


class SecAggPlusServer(SumServer):
    def __init__(self, settings: SecAggPlusSettings):
        self.settings = settings
        self._stage = "new"
        self._rounds = range(0)
        self._invited: frozenset[int] = frozenset()
        self._adverts: dict[int, KeyAdvert] = {}
        self._graph: dict[int, tuple[int, ...]] = {}
        self._round: _Round | None = None

    @property
    def graph(self) -> Mapping[int, tuple[int, ...]]:
        return self._graph

    # setup

    def setup(self, clients: Sequence[int], rounds: range) -> dict[int, Message]:
        self._stage, self._rounds, self._invited = "advertise", rounds, frozenset(clients)
        self._adverts, self._graph, self._round = {}, {}, None
        return {c: SetupStart(first_round=rounds.start, last_round=rounds.stop - 1) for c in sorted(clients)}

    def setup_step(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        if self._stage == "advertise":
            return self._request_shares(replies)
        if self._stage == "share":
            return self._deliver_shares(replies)
        if self._stage == "deliver":
            self._stage = "ready"  # a member that did not confirm counts as a dropout in the rounds
            return {}
        raise ProtocolError(f"no setup step is pending (stage {self._stage})")

    def participants(self, cohort: Sequence[int]) -> list[int]:
        return [c for c in cohort if c in self._graph] if self._stage == "ready" else []

    def renew(self, joined) -> bool:
        return self._stage != "ready" or bool(set(joined) - self._graph.keys())

    def _request_shares(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        for cid, advert in sorted(replies.items()):
            if cid in self._invited and isinstance(advert, KeyAdvert):
                try:
                    _check_advert(advert, cid, self._rounds, self.settings)
                except ProtocolError:
                    continue
                self._adverts[cid] = advert
        self._require(self._adverts, "advertised keys")
        degree = min(self.settings.degree, len(self._adverts) - 1)
        if degree < len(self._adverts) - 1 and degree % 2:
            degree -= 1  # a ring graph needs an even degree
        self._graph = neighbour_graph(list(self._adverts), degree, stream(self.settings.seed, "secagg-graph"))
        self._stage = "share"
        return {m: ShareRequest(neighbours=n, adverts=tuple(self._adverts[v] for v in n))
                for m, n in self._graph.items()}

    def _deliver_shares(self, replies: Mapping[int, Message]) -> dict[int, Message]:
        sent = {cid: r for cid, r in replies.items()
                if cid in self._graph and isinstance(r, EncryptedShares) and r.recipients == self._graph[cid]
                and len(r.ciphertexts) == len(r.recipients)}
        graph = {m: tuple(v for v in self._graph[m] if v in sent) for m in sent}
        # Whoever is left with fewer than t share holders (its neighbours and itself) could not be recovered
        # after a dropout: leave it out.
        while short := [m for m, n in graph.items() if len(n) + 1 < self.settings.threshold]:
            graph = {m: tuple(v for v in n if v not in short) for m, n in graph.items() if m not in short}
        self._require(graph, "shared their secrets")
        self._graph = graph
        self._stage = "deliver"
        return {m: ShareDelivery(senders=n, ciphertexts=tuple(sent[v].ciphertexts[sent[v].recipients.index(m)]
                                                              for v in n))
                for m, n in graph.items()}

    def _require(self, members, what: str) -> None:
        needed = max(self.settings.threshold, 2)
        if len(members) < needed:
            self._stage = "failed"
            raise SetupFailed(f"secure aggregation setup failed: only {len(members)} of {len(self._invited)} "
                              f"clients {what}; at least {needed} are needed (threshold {self.settings.threshold})")

    # rounds

    def open(self, round: int, cohort: Sequence[int], size: int, bound: float = 0.0, told: bytes = b"") -> None:
        if self._stage != "ready":
            raise RoundAborted(f"round {round}: the secure-aggregation setup is not complete")
        if round not in self._rounds:
            raise RoundAborted(f"round {round}: the secure-aggregation setup does not cover it")
        self._round = _Round(round, frozenset(cohort), size + 1, self.settings.round_bound(bound), told)

    def step(self, replies: Mapping[int, Message]) -> Mapping[int, Message] | SumResult:
        state = self._round
        if state is None:
            raise RoundAborted("no round is open")
        if state.stage == "upload":
            return self._collect(state, replies)
        if state.stage == "consistency":
            return self._request_unmasking(state, replies)
        self._round = None
        return self._unmask(state, replies)

    def _collect(self, state: _Round, uploads: Mapping[int, Message]) -> dict[int, Message]:
        state.total = np.zeros(state.size, dtype=np.uint32)
        survivors = []
        for cid, upload in sorted(uploads.items()):
            if cid not in state.cohort:
                state.rejected[cid] = "not in this round's cohort"
            elif cid not in self._graph:
                state.rejected[cid] = "not part of the secure aggregation (its setup did not complete)"
            elif not isinstance(upload, MaskedUpload) or upload.round != state.number:
                state.rejected[cid] = f"expected MaskedUpload for round {state.number}"
            elif upload.vector.shape != (state.size,):
                state.rejected[cid] = f"vector of {upload.vector.shape[0]} entries, expected {state.size}"
            else:
                state.total += upload.vector  # only the running sum is kept
                survivors.append(cid)
        if not survivors:
            self._round = None
            raise RoundAborted(f"round {state.number}: no client contributed to the sum")
        alive = set(survivors)
        groups = _components(alive, self._graph)
        if len(groups) > 1:
            # masks cancel within each connected group of survivors: unmasking would expose each group's sum
            self._round = None
            raise RoundAborted(f"round {state.number}: the survivors fall into {len(groups)} unconnected groups "
                               f"(the smallest of {min(map(len, groups))}), whose separate sums unmasking would expose")
        state.survivors = tuple(survivors)
        state.dropped = frozenset(v for s in survivors for v in self._graph[s] if v not in alive)
        if self.settings.hardened:
            state.stage = "consistency"
            return {s: SurvivorsRequest(round=state.number, survivors=state.survivors) for s in survivors}
        return self._request_unmasking(state, {})

    def _request_unmasking(self, state: _Round, signed: Mapping[int, Message]) -> dict[int, Message]:
        """Name survivors and dropped to each survivor; in hardened mode, with its neighbours' signatures."""
        alive = set(state.survivors)
        content = survivors_content(self.settings, state.number, state.survivors, state.told)
        signatures = {c: r.signature for c, r in signed.items()
                      if c in alive and isinstance(r, SurvivorsSigned) and r.round == state.number
                      and signed_by(self.settings, c, r.signature, content)}
        hardened = self.settings.hardened
        if hardened and (unsigned := sorted(alive - set(signatures))):
            # its neighbours would refuse to unmask: an upload is only revealed for a story all its neighbours share
            self._round = None
            raise RoundAborted(f"round {state.number}: client {unsigned[0]} uploaded but did not sign the survivor "
                               f"list and its instructions ({len(unsigned)} such); hardened mode needs every "
                               "survivor's signature")
        state.requests = {}
        for s in state.survivors:
            neighbours = tuple(v for v in self._graph[s] if v in alive)
            state.requests[s] = UnmaskRequest(
                round=state.number, survivors=neighbours,
                dropped=tuple(v for v in self._graph[s] if v in state.dropped),
                everyone=state.survivors if hardened else (),
                signatures=tuple(signatures.get(v, b"") for v in neighbours) if hardened else ())
        state.stage = "unmask"
        return dict(state.requests)

    def _unmask(self, state: _Round, replies: Mapping[int, Message]) -> SumResult:
        seed_shares: dict[int, dict[int, bytes]] = {s: {} for s in state.survivors}
        key_shares: dict[int, dict[int, bytes]] = {d: {} for d in state.dropped}
        for holder, reply in replies.items():
            request = state.requests.get(holder)
            if (request is None or not isinstance(reply, UnmaskReply) or reply.round != state.number
                    or len(reply.seed_shares) != len(request.survivors)
                    or len(reply.key_shares) != len(request.dropped)):
                continue
            seed_shares[holder][holder] = reply.own_seed_share
            for owner, share in zip(request.survivors, reply.seed_shares):
                seed_shares[owner][holder] = share
            for owner, share in zip(request.dropped, reply.key_shares):
                key_shares[owner][holder] = share
        for shares in (*seed_shares.values(), *key_shares.values()):
            for holder in [h for h, share in shares.items() if len(share) != shamir.SHARE_BYTES]:
                del shares[holder]  # malformed: as if it never came
        total, streams = state.total, Keystreams(state.size)
        index = state.number - self._rounds.start
        for s in state.survivors:
            seed = self._recover(state.number, s, seed_shares[s], "self-mask seed")
            if seed_commitment(self.settings, s, state.number, seed) != bytes(self._adverts[s].seed_commitments[index]):
                raise RoundAborted(f"round {state.number}: the shares of client {s}'s self-mask seed do not match "
                                   "its commitment (a share was altered)")
            total -= self_mask(self.settings, seed, state.number, s, streams)
        alive = set(state.survivors)
        for d in sorted(state.dropped):
            private = X25519PrivateKey.from_private_bytes(self._recover(state.number, d, key_shares[d], "mask key"))
            if public_bytes(private) != bytes(self._adverts[d].mask_keys[index]):
                raise RoundAborted(f"round {state.number}: the shares of client {d}'s mask key do not match its "
                                   "advertised key (a share was altered)")
            for s in self._graph[d]:
                if s in alive:
                    secret = self._agree(state.number, private, self._adverts[s].mask_keys[index])
                    mask = pair_mask(self.settings, secret, state.number, s, d, streams)
                    if s < d:  # s added this mask for its dropped neighbour: take it out
                        total -= mask
                    else:
                        total += mask
        encoding = self.settings.encoding(state.bound)
        decoded, contributors = encoding.decode(total), len(state.survivors)
        clipped = max(0.0, float(decoded[-1])) / contributors
        return SumResult(total=decoded[:-1], contributors=state.survivors, rejected=state.rejected,
                         encoding=Encoding(bound=state.bound, clipped=clipped,
                                           error=encoding.error_bound(contributors),
                                           following=self._following_bound(decoded[:-2], clipped, state.bound)))

    def _following_bound(self, total: np.ndarray, clipped: float, bound: float) -> float:
        """The next round's bound: BOUND_MARGIN times this sum's largest entry (no single update's entry is
        usually larger than the sum's), doubled while clients still clip; 0 (the clip) when out of range."""
        following = BOUND_MARGIN * float(np.abs(total).max()) if total.size else 0.0
        if clipped > 0:
            following = max(following, 2 * bound)
        return min(following, self.settings.clip) if following >= self.settings.clip * 2.0**-60 else 0.0

    def _agree(self, round: int, private: X25519PrivateKey, public: np.ndarray) -> bytes:
        try:
            return shared_secret(private, bytes(public))
        except ProtocolError as exc:
            raise RoundAborted(f"round {round}: {exc}") from None

    def _recover(self, round: int, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        t = self.settings.threshold
        if len(shares) < t:
            raise RoundAborted(f"round {round}: only {len(shares)} of the {t} shares needed to recover client "
                               f"{owner}'s {what} arrived (fewer than t survivors in its neighbourhood)")
        chosen = dict(sorted(shares.items())[:t])
        try:
            return shamir.combine(chosen)
        except ProtocolError as exc:
            raise RoundAborted(f"round {round}: cannot recover client {owner}'s {what}: {exc}") from None
