"""SecAgg+ with real primitives: exact sums, dropouts at every stage, refusals, tampering, fuzzing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import mutated
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from securefed.errors import ProtocolError, RoundAborted, SetupFailed
from securefed.protocol import Message, decode, encode
from securefed.secagg import shamir
from securefed.secagg.encoding import FixedPoint
from securefed.secagg.secaggplus import (
    MaskedUpload,
    SecAggPlusClient,
    SecAggPlusServer,
    SecAggPlusSettings,
    SetupStart,
    ShareRequest,
    SurvivorsRequest,
    UnmaskRequest,
)
from securefed.seeding import stream

SIZE = 257


def make_settings(n: int, degree: int | None = None, threshold: int | None = None) -> SecAggPlusSettings:
    degree = n - 1 if degree is None else degree
    return SecAggPlusSettings(job=b"job-id".ljust(32, b"\0"), clients=n, rounds=3, degree=degree,
                              threshold=threshold or (degree + 1) // 2 + 1, clip=100.0, seed=11)


class Federation:
    """Server and clients talking only through the codec; `drop` picks who vanishes at each stage."""

    def __init__(self, settings: SecAggPlusSettings, rounds: range = range(1, 4), keys=None):
        self.settings = settings
        self.clients = {c: SecAggPlusClient(c, settings, keys[c] if keys else None) for c in range(settings.clients)}
        self.server = SecAggPlusServer(settings)
        self.rounds = rounds

    def exchange(self, requests, drop=frozenset(), tamper=None) -> dict[int, Message]:
        replies = {}
        for cid, request in requests.items():
            if cid in drop:
                continue
            wire = encode(request)
            if tamper:
                wire = tamper(cid, wire)
            try:
                replies[cid] = decode(encode(self.client(cid).reply(decode(wire))))
            except ProtocolError:
                pass  # a refusing client is a dropout
        return replies

    def client(self, cid: int) -> SecAggPlusClient:
        return self.clients[cid]

    def setup(self, drops: tuple = ((), (), ())) -> None:
        requests = self.server.setup(list(self.clients), self.rounds)
        stage = 0
        while requests:
            requests = self.server.setup_step(self.exchange(requests, set(drops[stage])))
            stage += 1

    def round(self, number: int, vectors: dict[int, np.ndarray], drop_upload=(), drop_unmask=(), drop_sign=()):
        self.server.open(number, sorted(self.clients), SIZE)
        uploads = {c: decode(encode(self.client(c).upload(number, v))) for c, v in vectors.items()
                   if c not in drop_upload}
        step = self.server.step(uploads)
        while isinstance(step, dict):
            signing = any(isinstance(m, SurvivorsRequest) for m in step.values())
            step = self.server.step(self.exchange(step, set(drop_sign if signing else drop_unmask)))
        return step


class Reborn(Federation):
    """Each client is rebuilt from its saved state before every message, as a deployed (Flower) client is."""

    def client(self, cid: int) -> SecAggPlusClient:
        old = self.clients[cid]
        self.clients[cid] = SecAggPlusClient(cid, self.settings, old.identity_key)
        self.clients[cid].restore(old.state())
        return self.clients[cid]


def vectors(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(0, 10, SIZE).astype(np.float32) for c in range(n)}


def encoded_sum(settings: SecAggPlusSettings, number: int, xs: dict[int, np.ndarray], members) -> np.ndarray:
    """The plaintext sum of the encoded vectors, with the same stochastic rounding the clients use."""
    enc = settings.encoding(settings.clip)
    total = np.zeros(SIZE + 1, dtype=np.uint32)
    for c in members:
        clipped = float((np.abs(xs[c][:-1]) > settings.clip).mean())
        total += enc.encode(np.append(xs[c], clipped), stream(settings.seed, "secagg-rounding", number, c))
    return enc.decode(total)[:-1]


# ---------------------------------------------------------------- building blocks


def test_shamir_any_t_shares_recover_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [0, 4, 7, 9, 12])
    for chosen in ([0, 4, 7], [4, 9, 12], [0, 7, 12]):
        assert shamir.combine({h: shares[h] for h in chosen}) == secret
    with pytest.raises(ProtocolError):  # two shares interpolate to a random field element
        assert shamir.combine({h: shares[h] for h in (0, 4)}) != secret


def test_fixed_point_sum_decodes_to_the_float_sum():
    enc = FixedPoint(50.0, parties=20, tail=(5000.0,))  # the last entry in a range of its own, as n_k is
    rng = np.random.default_rng(3)
    xs = rng.uniform(-50, 50, (20, 1000))
    xs[:, -1] *= 100
    total = np.zeros(1000, dtype=np.uint32)
    for x in xs:
        total += enc.encode(x, rng)
    error = np.abs(enc.decode(total) - xs.sum(0))
    assert error[:-1].max() <= enc.error_bound(20) and error[-1] <= 20 / enc.tail_scale[0]
    assert enc.decode(enc.encode(np.array([1e9, -1e9, 1e9]), rng)) == pytest.approx([50.0, -50.0, 5000.0],
                                                                                    abs=1 / enc.tail_scale[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fixed_point_refuses_what_it_cannot_carry_instead_of_mapping_it_silently(bad):
    """Issue 17, 6: NaN used to become 0 and inf the clip, spoiling the sum without a word."""
    from securefed.errors import UpdateRefused

    with pytest.raises(UpdateRefused, match="NaN or inf"):
        FixedPoint(50.0, parties=2).encode(np.array([1.0, bad]), np.random.default_rng(0))


def test_a_client_whose_weight_exceeds_the_clip_refuses_to_upload(ready):
    """Issue 17, 6: n_k above the clip used to be clipped, skewing FedAvg's mean without a word."""
    from securefed.errors import UpdateRefused

    vector = np.zeros(SIZE, dtype=np.float32)
    vector[-1] = 2 * ready.settings.clip
    with pytest.raises(UpdateRefused, match="exceeds the secure sum's clip"):
        ready.clients[0].admit(2, vector[-1])  # asked before training: a DP client spends nothing on it
    with pytest.raises(UpdateRefused, match="exceeds the secure sum's clip"):
        ready.clients[0].upload(2, vector)
    ready.clients[0].upload(2, np.ones(SIZE, dtype=np.float32))  # refused, not spent: the round is still open


# ---------------------------------------------------------------- exact sums and dropouts


@pytest.mark.parametrize(("n", "degree"), [(5, None), (12, 6)])
def test_sum_equals_the_plaintext_sum_of_encoded_vectors(n, degree):
    fed = Federation(make_settings(n, degree))
    fed.setup()
    for number in fed.rounds:
        xs = vectors(n, number)
        result = fed.round(number, xs)
        assert result.contributors == tuple(range(n))
        np.testing.assert_array_equal(result.total, encoded_sum(fed.settings, number, xs, range(n)))
        exact = sum(x.astype(np.float64) for x in xs.values())
        assert np.abs(result.total - exact).max() < result.encoding.error


STAGES = ["advertise", "share", "deliver", "upload", "unmask"]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_every_stage_keep_the_sum_exact(stage, rate):
    n = 20
    fed = Federation(make_settings(n, degree=12, threshold=7))  # 6 gone still leave 7 holders everywhere
    gone = {int(c) for c in np.random.default_rng(len(stage)).choice(n, int(rate * n), replace=False)}
    setup_drops = tuple(gone if stage == s else () for s in STAGES[:3])
    fed.setup(setup_drops)
    members = set(fed.server.graph)
    assert members == set(range(n)) - (gone if stage in ("advertise", "share") else set())
    xs = vectors(n)
    number = 2
    result = fed.round(number, {c: xs[c] for c in members},
                       drop_upload=gone if stage in ("deliver", "upload") else (),
                       drop_unmask=gone if stage == "unmask" else ())
    # a client gone at delivery or upload is not in the sum; one gone at unmask already is
    summed = members - gone if stage in ("deliver", "upload") else members
    assert set(result.contributors) == summed
    np.testing.assert_array_equal(result.total, encoded_sum(fed.settings, number, xs, sorted(summed)))


def test_too_few_survivors_abort_the_round_and_the_next_round_works():
    n = 10
    fed = Federation(make_settings(n, degree=9, threshold=6))
    fed.setup()
    xs = vectors(n)
    with pytest.raises(RoundAborted, match="fewer than t survivors"):
        fed.round(1, xs, drop_upload={0, 1, 2, 3, 4})  # 5 survivors < t = 6: every client refuses
    result = fed.round(2, xs, drop_upload={0, 1, 2})
    np.testing.assert_array_equal(result.total, encoded_sum(fed.settings, 2, xs, range(3, n)))


def test_setup_with_too_few_clients_fails_clearly():
    fed = Federation(make_settings(5, threshold=3))
    with pytest.raises(SetupFailed, match="only 2 of 5 clients advertised keys; at least 3 are needed"):
        fed.setup(({0, 1, 2}, (), ()))


def test_survivors_in_unconnected_groups_abort_before_anything_is_revealed():
    import itertools

    from securefed.secagg.secaggplus import _components

    fed = Federation(make_settings(12, degree=4, threshold=3))
    fed.setup()
    graph = fed.server.graph
    gone = next(set(c) for c in itertools.combinations(range(12), 4)
                if len(_components(set(range(12)) - set(c), graph)) > 1)
    xs = vectors(12)
    fed.server.open(1, range(12), SIZE)
    uploads = {c: fed.clients[c].upload(1, xs[c]) for c in range(12) if c not in gone}
    with pytest.raises(RoundAborted, match="unconnected groups"):
        fed.server.step(uploads)


# ---------------------------------------------------------------- a curious or malicious server


def unmask(survivors, dropped, round=1, everyone=(), signatures=()) -> UnmaskRequest:
    return UnmaskRequest(round=round, survivors=survivors, dropped=dropped, everyone=everyone, signatures=signatures)


def test_clients_refuse_a_threshold_that_is_not_a_majority_of_the_holders():
    fed = Federation(make_settings(4, threshold=2))  # k=3: two disjoint pairs of holders could each reach t
    with pytest.raises(SetupFailed, match="only 0 of 4 clients shared their secrets"):
        fed.setup()


def test_a_low_order_key_leaves_its_client_out_instead_of_crashing_the_server():
    fed = Federation(make_settings(5))
    adverts = fed.exchange(fed.server.setup(list(fed.clients), fed.rounds))
    adverts[3] = dataclasses.replace(adverts[3], mask_keys=np.zeros_like(adverts[3].mask_keys))
    requests = fed.server.setup_step(adverts)
    assert set(requests) == {0, 1, 2, 4} and 3 not in fed.server.graph[0]


def test_a_setup_past_the_jobs_last_round_is_refused():
    with pytest.raises(ProtocolError, match="names rounds 1..4"):
        SecAggPlusClient(0, make_settings(3)).reply(SetupStart(first_round=1, last_round=4))


@pytest.fixture
def ready():
    fed = Federation(make_settings(6, threshold=4))
    fed.setup()
    fed.server.open(1, range(6), SIZE)
    for c in range(6):
        fed.clients[c].upload(1, vectors(6)[c])
    return fed


def test_a_client_refuses_to_reveal_both_shares_of_one_client(ready):
    with pytest.raises(ProtocolError, match="both a survivor and dropped"):
        ready.clients[0].reply(unmask(survivors=(1, 2, 3), dropped=(3,)))


@pytest.mark.parametrize(("survivors", "dropped", "reason"), [
    ((1, 2, 9), (), "outside this client's neighbourhood"),
    ((0, 1, 2), (), "outside this client's neighbourhood"),  # itself
    ((1,), (2, 3, 4, 5), "fewer than the threshold"),
    ((2, 1), (), "distinct and sorted"),
])
def test_a_client_refuses_malformed_unmask_requests(ready, survivors, dropped, reason):
    with pytest.raises(ProtocolError, match=reason):
        ready.clients[0].reply(unmask(survivors=survivors, dropped=dropped))


def test_a_client_answers_one_unmask_request_per_round(ready):
    ready.clients[0].reply(unmask(survivors=(1, 2, 3, 4, 5), dropped=()))
    with pytest.raises(ProtocolError, match="already unmasked"):  # asking again, now calling 5 dropped
        ready.clients[0].reply(unmask(survivors=(1, 2, 3, 4), dropped=(5,)))


def test_a_client_never_masks_twice_with_the_same_round_keys(ready):
    with pytest.raises(ProtocolError, match="already uploaded for round"):
        ready.clients[0].upload(1, vectors(6)[0])


def test_tampered_or_misrouted_share_ciphertexts_fail_authentication():
    fed = Federation(make_settings(4))
    requests = fed.server.setup(list(fed.clients), fed.rounds)
    requests = fed.server.setup_step(fed.exchange(requests))
    deliveries = fed.server.setup_step(fed.exchange(requests))
    delivery = deliveries[0]
    flipped = bytearray(delivery.ciphertexts[0])
    flipped[20] ^= 1
    with pytest.raises(ProtocolError, match="failed authentication"):
        fed.clients[0].reply(dataclasses.replace(delivery, ciphertexts=(bytes(flipped), *delivery.ciphertexts[1:])))
    # client 1's ciphertexts handed to client 0 under the same senders: wrong pair, wrong key and associated data
    with pytest.raises(ProtocolError, match="failed authentication"):
        fed.clients[0].reply(dataclasses.replace(delivery, ciphertexts=deliveries[1].ciphertexts))


def test_an_altered_revealed_share_is_detected():
    fed = Federation(make_settings(5, threshold=5))
    fed.setup()
    xs = vectors(5)
    fed.server.open(1, range(5), SIZE)
    requests = fed.server.step({c: fed.clients[c].upload(1, xs[c]) for c in range(5)})
    replies = fed.exchange(requests)
    bad = bytearray(replies[2].seed_shares[0])
    bad[-1] ^= 1
    replies[2] = dataclasses.replace(replies[2], seed_shares=(bytes(bad), *replies[2].seed_shares[1:]))
    with pytest.raises(RoundAborted, match="do not match its commitment|cannot recover"):
        fed.server.step(replies)


def test_a_masked_upload_alone_looks_uniform():
    """A chi-square test on the top byte of each masked entry; the encoding alone fails the same test."""
    n, size = 4, 40_000
    settings = dataclasses.replace(make_settings(n), clip=1.0)
    fed = Federation(settings)
    fed.setup()
    zeros = np.zeros(size, dtype=np.float32)
    masked = fed.clients[0].upload(1, zeros).vector
    assert masked.dtype == np.uint32
    counts = np.bincount(masked >> 24, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
    plain = settings.encoding(1.0).encode(zeros, np.random.default_rng(0))
    assert stats.chisquare(np.bincount(plain >> 24, minlength=256)).pvalue < 1e-6


def test_the_server_keeps_only_the_running_sum(ready):
    xs = vectors(6)
    uploads = {c: MaskedUpload(round=1, vector=np.full(SIZE + 1, c + 1, dtype=np.uint32)) for c in range(6)}
    ready.server.step(uploads)  # SIZE entries, and the clipped fraction
    arrays = [v for v in vars(ready.server._round).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and np.array_equal(arrays[0], np.full(SIZE + 1, 21, dtype=np.uint32))
    del xs


# ---------------------------------------------------------------- fuzzing every decoder and party

def _valid_wires() -> list[bytes]:
    """Every message of a plain and of a hardened setup and round, as sent."""
    wires = []
    for fed in (Federation(make_settings(4)), hardened(4)[0]):
        requests = fed.server.setup(list(fed.clients), fed.rounds)
        while requests:
            replies = fed.exchange(requests)
            wires += [encode(m) for m in (*requests.values(), *replies.values())]
            requests = fed.server.setup_step(replies)
        fed.server.open(1, range(4), 8)
        step = {c: fed.clients[c].upload(1, np.ones(8, dtype=np.float32)) for c in range(4)}
        wires += [encode(m) for m in step.values()]
        while isinstance(step := fed.server.step(step), dict):
            step = fed.exchange(wires_of := step)
            wires += [encode(m) for m in (*wires_of.values(), *step.values())]
    return wires


PARTY_ERRORS = (ProtocolError, RoundAborted, SetupFailed)


class Injecting(Federation):
    """At exchange number `at`, client 2 is handed `msg` as its request and client 1's reply is replaced by it."""

    def __init__(self, msg: Message, at: int, hardened_mode: bool):
        if hardened_mode:
            fed, keys = hardened(4)
            super().__init__(fed.settings, keys=keys)
        else:
            super().__init__(make_settings(4))
        self.msg, self.at, self.count = msg, at, 0

    def exchange(self, requests, drop=frozenset(), tamper=None):
        if self.count == self.at:
            requests = {**requests, 2: self.msg}
        replies = super().exchange(requests, drop, tamper)
        if self.count == self.at:
            replies[1] = self.msg
        self.count += 1
        return replies


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=st.one_of(st.deferred(lambda: mutated(_VALID)), st.binary(max_size=200)))
def test_no_input_crashes_a_decoder_or_a_party(wire):
    try:
        msg = decode(wire)
    except ProtocolError:
        return
    assert encode(decode(encode(msg))) == encode(msg)
    for hardened_mode, at in [(False, 0), (False, 1), (False, 2), (False, 3), (True, 1), (True, 3), (True, 4)]:
        # setup exchanges 0-2, then the unmasking (plain) or the consistency check and the unmasking (hardened)
        fed = Injecting(msg, at, hardened_mode)
        try:
            fed.setup()
            fed.round(1, {c: np.zeros(SIZE, dtype=np.float32) for c in range(4)})
        except PARTY_ERRORS:
            pass
    for c in (0, 3):  # a party's own state machine, with a stray message at the upload stage
        try:
            fed.server.step({c: msg})
        except PARTY_ERRORS:
            pass


# ---------------------------------------------------------------- hardened mode


def hardened(n: int, threshold: int | None = None) -> tuple[Federation, dict]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {c: Ed25519PrivateKey.generate() for c in range(n)}
    publics = tuple(keys[c].public_key().public_bytes_raw() for c in range(n))
    settings = dataclasses.replace(make_settings(n, threshold=threshold or (2 * (n - 1)) // 3 + 1),
                                   identities=publics)
    return Federation(settings, keys=keys), keys


@pytest.mark.parametrize(("drop_upload", "drop_sign", "drop_unmask"), [((), (), ()), ({2}, (), ()), ((), {4}, ()),
                                                                      ((), (), {5}), ({1}, {3}, ())])
def test_hardened_sums_stay_exact_with_dropouts_at_every_stage(drop_upload, drop_sign, drop_unmask):
    """Except one: a client that uploaded and did not sign aborts the round, since its neighbours reveal shares
    only for a story every survivor among them signed (its instructions included)."""
    fed, _ = hardened(9)
    fed.setup()
    xs = vectors(9)
    if drop_sign:
        with pytest.raises(RoundAborted, match="did not sign the survivor list"):
            fed.round(1, xs, drop_upload=drop_upload, drop_sign=drop_sign, drop_unmask=drop_unmask)
        return
    result = fed.round(1, xs, drop_upload=drop_upload, drop_sign=drop_sign, drop_unmask=drop_unmask)
    summed = sorted(set(range(9)) - set(drop_upload))
    assert result.contributors == tuple(summed)
    np.testing.assert_array_equal(result.total, encoded_sum(fed.settings, 1, xs, summed))


def test_hardened_adverts_must_carry_the_listed_identitys_signature():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    fed, _ = hardened(5)
    adverts = fed.exchange(fed.server.setup(list(fed.clients), fed.rounds))
    forged = dataclasses.replace(adverts[2], signature=Ed25519PrivateKey.generate().sign(b"x"))
    assert 2 not in fed.server.setup_step({**adverts, 2: forged})  # the server leaves it out
    with pytest.raises(ProtocolError, match="not signed by its identity"):  # and a client refuses it
        fed.clients[0].reply(ShareRequest(neighbours=(1, 2), adverts=(adverts[1], forged)))


def test_hardened_clients_refuse_a_survivor_list_they_did_not_sign():
    fed, keys = hardened(7)
    fed.setup()
    fed.server.open(1, range(7), SIZE)
    uploads = {c: fed.clients[c].upload(1, vectors(7)[c]) for c in range(7)}
    signing = fed.server.step(uploads)
    signed = fed.exchange(signing)
    requests = fed.server.step(signed)
    request = requests[0]
    # The server tells client 0 that client 6 dropped out, while the others signed that it survived.
    lying = dataclasses.replace(request, everyone=(0, 1, 2, 3, 4, 5), survivors=(1, 2, 3, 4, 5), dropped=(6,),
                                signatures=request.signatures[:5])
    with pytest.raises(ProtocolError, match="not the one this client signed"):
        fed.clients[0].reply(lying)
    too_few = dataclasses.replace(request, signatures=(b"",) * len(request.survivors))
    with pytest.raises(ProtocolError, match="did not sign the survivor list"):
        fed.clients[0].reply(too_few)
    fed.clients[0].reply(request)  # the honest request is answered
    with pytest.raises(ProtocolError, match="cannot sign now"):  # and nobody signs twice for one round
        fed.clients[1].reply(SurvivorsRequest(round=1, survivors=(1, 2, 3, 4, 5)))
    del keys


def test_a_plain_client_signs_nothing():
    fed = Federation(make_settings(4))
    fed.setup()
    fed.clients[0].upload(1, np.zeros(SIZE, dtype=np.float32))
    with pytest.raises(ProtocolError, match="hardened mode only"):
        fed.clients[0].reply(SurvivorsRequest(round=1, survivors=(0, 1, 2, 3)))


_VALID = _valid_wires()


# ---------------------------------------------------------------- one process per message


@pytest.mark.parametrize("hardened_mode", [False, True])
def test_clients_rebuilt_from_their_state_before_every_message_sum_exactly(hardened_mode):
    n = 7
    keys = {c: Ed25519PrivateKey.generate() for c in range(n)} if hardened_mode else None
    settings = make_settings(n, threshold=5 if hardened_mode else None)
    if keys:
        settings = dataclasses.replace(settings, identities=tuple(keys[c].public_key().public_bytes_raw()
                                                                  for c in range(n)))
    fed = Reborn(settings, keys=keys)
    fed.setup()
    for number, dropped in ((1, {2}), (2, set()), (3, {0})):
        xs = vectors(n, number)
        result = fed.round(number, xs, drop_upload=dropped)
        summed = sorted(set(range(n)) - dropped)
        assert result.contributors == tuple(summed)
        np.testing.assert_array_equal(result.total, encoded_sum(fed.settings, number, xs, summed))


def test_a_rebuilt_client_still_refuses_what_it_already_did(ready):
    fed = Reborn(ready.settings)
    fed.clients = ready.clients
    cid = 0
    with pytest.raises(ProtocolError, match="already uploaded for round"):
        fed.client(cid).upload(1, np.zeros(SIZE, dtype=np.float32))
    neighbours = sorted(fed.client(cid)._setup.adverts)
    request = UnmaskRequest(round=1, survivors=tuple(neighbours), dropped=(), everyone=(), signatures=())
    fed.client(cid).reply(request)
    with pytest.raises(ProtocolError, match="already unmasked"):
        fed.client(cid).reply(request)
    assert 1 not in fed.client(cid)._setup.mask_keys  # the round's secrets are gone for good


def test_a_damaged_state_is_refused_not_trusted(ready):
    from securefed.secagg.secaggplus import ClientState

    state = ready.clients[0].state()
    with pytest.raises(ProtocolError):
        SecAggPlusClient(0, ready.settings).restore(state[:-5])
    saved = decode(state, ClientState)
    for damage in ({"seeds": saved.seeds[:-1]}, {"held": saved.held[:-1]}, {"signed": (b"x",)}):
        with pytest.raises(ProtocolError, match="inconsistent"):
            SecAggPlusClient(0, ready.settings).restore(encode(dataclasses.replace(saved, **damage)))


@pytest.mark.parametrize("kind", [Federation, Reborn], ids=["in-memory", "rebuilt-each-message"])
def test_a_server_that_restarts_the_setup_gets_no_second_upload_for_a_round(kind):
    """Issue 17, attack 1: sum round 1 over everyone, run a fresh setup, run round 1 again without client 1 and
    subtract. Every client refuses to upload for round 1 again; the new setup still serves the other rounds."""
    from securefed.interfaces import SumResult

    fed = kind(make_settings(4))
    fed.setup()
    xs = vectors(4)
    assert fed.round(1, xs).contributors == (0, 1, 2, 3)
    fed.server = SecAggPlusServer(fed.settings)  # the server restarts, and sets up afresh
    fed.setup()
    for cid in (0, 2, 3):
        with pytest.raises(ProtocolError, match="already uploaded for round 1"):
            fed.client(cid).upload(1, xs[cid])
    result = fed.round(2, xs)
    assert isinstance(result, SumResult) and result.contributors == (0, 1, 2, 3)
    np.testing.assert_array_equal(result.total, encoded_sum(fed.settings, 2, xs, range(4)))
    fed.server = SecAggPlusServer(fed.settings)
    fed.setup()  # and again: what was uploaded under any earlier setup is still refused
    with pytest.raises(ProtocolError, match="already uploaded for round 2"):
        fed.client(0).upload(2, xs[0])


@pytest.mark.parametrize("hardened_mode", [False, True])
def test_a_server_telling_a_sparse_graph_split_stories_gets_a_clients_secrets_only_in_plain_mode(hardened_mode):
    """Issue 17, attack 2. With k < n−1 a server tells B's share holders "B survived" and the holders of each of
    B's neighbours' shares "that neighbour dropped": it then holds t shares of B's self-mask seed and of every
    mask key B shares, and can strip B's upload bare, without asking anyone for both secrets of one client. A
    plain client cannot see it (the limit docs/security.md states); in hardened mode the lists must be signed,
    and the same server gathers too few shares of B's seed."""
    n, k, victim = 12, 4, 0
    keys = {c: Ed25519PrivateKey.generate() for c in range(n)} if hardened_mode else None
    settings = make_settings(n, degree=k, threshold=3)
    if hardened_mode:
        settings = dataclasses.replace(settings, identities=tuple(keys[c].public_key().public_bytes_raw()
                                                                  for c in range(n)))
    fed = Federation(settings, keys=keys)
    fed.setup()
    graph = fed.server.graph
    around = set(graph[victim])
    assert len(around) == k < n - 1
    for c in range(n):
        fed.clients[c].upload(1, vectors(n)[c])
    # each client is shown the story that serves the attack: B survived, B's neighbours (but itself) dropped
    told = {w: tuple(sorted(set(range(n)) - around | {w})) for w in range(n)}
    signed: dict[int, bytes] = {}
    if hardened_mode:
        for w in range(n):  # every client signs the one list it is shown
            signed[w] = fed.clients[w].reply(SurvivorsRequest(round=1, survivors=told[w])).signature
    seed_shares, key_shares, reasons = 0, dict.fromkeys(around, 0), set()
    for w in range(n):
        survivors = tuple(v for v in graph[w] if v in told[w])
        dropped = tuple(v for v in graph[w] if v not in told[w])
        signatures = tuple(signed[v] if told[v] == told[w] else b"" for v in survivors) if hardened_mode else ()
        request = UnmaskRequest(round=1, survivors=survivors, dropped=dropped,
                                everyone=told[w] if hardened_mode else (), signatures=signatures)
        try:
            reply = fed.clients[w].reply(decode(encode(request)))
        except ProtocolError as exc:  # for a reason of the protocol, not a malformed request
            reasons.add("signatures" if "did not sign the survivor list" in str(exc) else "threshold")
            assert "did not sign the survivor list" in str(exc) or "fewer than the threshold" in str(exc), exc
            continue
        seed_shares += (w == victim) + sum(v == victim for v in survivors)
        for v, _share in zip(dropped, reply.key_shares):
            if v in key_shares:
                key_shares[v] += 1
    stripped = seed_shares >= settings.threshold and min(key_shares.values()) >= settings.threshold
    assert stripped is not hardened_mode, (seed_shares, key_shares)
    assert ("signatures" in reasons) is hardened_mode  # hardened clients refuse because the stories differ


def _small_updates(n: int, seed: int) -> dict[int, np.ndarray]:
    """Updates of about 1e-5 per entry from clients of 50 to 500 examples: [n_k·Δ_k, n_k]."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in range(n):
        examples = float(rng.integers(50, 500))
        out[c] = np.append(examples * rng.normal(0, 1e-5, SIZE - 1), examples)
    return out


@pytest.mark.parametrize("n", [10, 50])
def test_the_server_tightens_the_encoding_bound_from_the_last_sum_to_1e_6_relative_error(n):
    """Issue 17: the job-wide clip (65,536) left 2% relative error on FedAvg when updates were about 1e-5. The
    server now sets each round's bound from the last sum; the error it reports bounds the real one."""
    fed = Federation(dataclasses.replace(make_settings(n, degree=min(n - 1, 10)), clip=65536.0))
    fed.setup()
    bound, errors = 0.0, []
    for number in (1, 2, 3):
        xs = _small_updates(n, number)
        fed.server.open(number, sorted(fed.clients), SIZE, bound)
        uploads = {c: decode(encode(fed.clients[c].upload(number, xs[c], bound))) for c in range(n)}
        step = fed.server.step(uploads)
        while isinstance(step, dict):
            step = fed.server.step(fed.exchange(step))
        exact = sum(xs.values())
        error = np.abs(step.total - exact)
        assert error[:-1].max() <= step.encoding.error and step.encoding.clipped == 0
        assert error[-1] <= 1e-6 * exact[-1]  # Σ n_k, in the clip's own range
        errors.append(error[:-1].max() / np.abs(exact[:-1]).max())
        bound = step.encoding.following
    assert errors[0] > 1e-3  # the clip's range: what the issue measured
    assert max(errors[1:]) <= 1e-6, errors


def test_a_bound_that_clips_is_seen_in_the_sum_and_widened_and_a_wild_one_is_refused(ready):
    n = len(ready.clients)
    xs = vectors(n)  # entries of about 10
    with pytest.raises(ProtocolError, match="encoding bound"):
        ready.clients[0].upload(2, xs[0], float("nan"))
    with pytest.raises(ProtocolError, match="encoding bound"):
        ready.clients[0].upload(2, xs[0], 2 * ready.settings.clip)
    ready.server.open(2, sorted(ready.clients), SIZE, 1.0)  # a server choosing a bound far too tight
    step = ready.server.step({c: ready.clients[c].upload(2, xs[c], 1.0) for c in range(n)})
    while isinstance(step, dict):
        step = ready.server.step(ready.exchange(step))
    share = np.mean([(np.abs(x[:-1]) > 1.0).mean() for x in xs.values()])
    assert step.encoding.clipped == pytest.approx(share, abs=1e-6) and share > 0.5  # summed, not any one's
    assert step.encoding.following >= 2.0  # the next round widens


@pytest.mark.parametrize("hardened_mode", [False, True])
def test_a_server_telling_one_client_another_bound_reads_it_only_in_plain_mode(hardened_mode):
    """Found by review: a server that sends victim B a tiny encoding bound and everyone else the clip decodes the
    sum at B's scale, where the others' terms shrink to nothing: B's update, alone. The same holds for a different
    model sent to B. Hardened clients sign the instructions they were given with the survivor list, and reveal
    shares only when every survivor neighbour signed the same: B's neighbours refuse."""
    n, victim, tiny = 10, 3, 1e-2
    keys = {c: Ed25519PrivateKey.generate() for c in range(n)} if hardened_mode else None
    settings = dataclasses.replace(make_settings(n, threshold=6), clip=65536.0)
    if hardened_mode:
        settings = dataclasses.replace(settings, identities=tuple(keys[c].public_key().public_bytes_raw()
                                                                  for c in range(n)))
    fed = Federation(settings, keys=keys)
    fed.setup()
    xs = _small_updates(n, 1)
    told = {c: bytes(32) if c != victim else b"\x01" * 32 for c in range(n)}  # B was sent other instructions
    bound = {c: tiny if c == victim else 0.0 for c in range(n)}
    uploads = {c: fed.clients[c].upload(1, xs[c], bound[c], told[c]) for c in range(n)}
    fed.server.open(1, range(n), SIZE, tiny, bytes(32))  # it decodes at B's scale
    step = fed.server.step(uploads)
    if not hardened_mode:
        while isinstance(step, dict):
            step = fed.server.step(fed.exchange(step))
        read, truth = step.total[:-1], np.clip(xs[victim][:-1], -tiny, tiny)
        assert np.abs(read - truth).max() < 1e-3 * np.abs(truth).max()  # the documented limit of plain mode
        return
    signed = fed.exchange(step)  # every client signs the full list, B with its own instructions
    assert set(signed) == set(range(n))
    with pytest.raises(RoundAborted, match=f"client {victim} uploaded but did not sign"):
        fed.server.step(signed)  # an honest server stops here; a lying one asks B's neighbours anyway:
    everyone = tuple(range(n))
    refusals = 0
    for w in fed.server.graph[victim]:
        survivors = tuple(v for v in fed.server.graph[w])
        request = UnmaskRequest(round=1, survivors=survivors, dropped=(), everyone=everyone,
                                signatures=tuple(signed[v].signature for v in survivors))
        with pytest.raises(ProtocolError, match=f"neighbour {victim} did not sign"):
            fed.clients[w].reply(request)
        refusals += 1
    assert refusals == len(fed.server.graph[victim])  # no share of B's seed leaves any holder
