"""CKKS summation with real TenSEAL: FedAvg under encryption, dropouts, key distribution, fuzzing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import mutated
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.errors import ProtocolError, RoundAborted, SetupFailed
from securefed.protocol import Message, PlainModel, decode, encode
from securefed.secagg.ckks import (
    CkksClient,
    CkksServer,
    CkksSettings,
    CkksSetupStart,
    CkksSum,
    CkksUpload,
)
from securefed.weighting import BY_EXAMPLES, Weighting

D = 5000  # two chunks of N/2 slots


class Federation:
    def __init__(self, n: int, signed: bool = False, weighting: Weighting = BY_EXAMPLES):
        keys = {c: Ed25519PrivateKey.generate() for c in range(n)} if signed else {}
        identities = tuple(keys[c].public_key().public_bytes_raw() for c in range(n)) if signed else ()
        self.settings = CkksSettings(job=b"ckks-job".ljust(32, b"\0"), clients=n, identities=identities,
                                     weighting=weighting)
        self.clients = {c: CkksClient(c, self.settings, keys.get(c)) for c in range(n)}
        self.server = CkksServer(self.settings)

    def exchange(self, requests, drop=frozenset()) -> dict[int, Message]:
        replies = {}
        for cid, request in requests.items():
            if cid in drop:
                continue
            try:
                replies[cid] = decode(encode(self.clients[cid].reply(decode(encode(request)))))
            except ProtocolError:
                pass
        return replies

    def setup(self, drops=((), (), ())) -> None:
        requests, stage = self.server.setup(list(self.clients), range(1, 3)), 0
        while requests:
            requests = self.server.setup_step(self.exchange(requests, set(drops[stage])))
            stage += 1

    def uploads(self, number: int, start: np.ndarray, locals_: dict[int, np.ndarray], sizes: dict[int, int]):
        """Every client opens the global model, 'trains' to its local vector and uploads n_k·Δ_k, n_k."""
        uploads = {}
        for c, local in locals_.items():
            weights = self.clients[c].open_model(PlainModel(weights=start), D)
            vector = self.settings.weighting.contribution(local - weights, sizes[c])
            uploads[c] = decode(encode(self.clients[c].upload(number, vector)))
        return uploads

    def round(self, number: int, start: np.ndarray, locals_: dict[int, np.ndarray], sizes: dict[int, int]):
        uploads = self.uploads(number, start, locals_, sizes)
        self.server.open(number, sorted(self.clients), D + 1)
        return self.server.step(uploads)


def scenario(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    start = rng.normal(0, 0.1, D).astype(np.float32)
    locals_ = {c: start + rng.normal(0, 0.01, D).astype(np.float32) for c in range(n)}
    sizes = {c: int(rng.integers(5, 500)) for c in range(n)}
    return start, locals_, sizes


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_the_opened_sum_is_fedavg_over_whoever_uploaded(rate):
    n = 10
    fed = Federation(n)
    fed.setup()
    start, locals_, sizes = scenario(n)
    gone = set(range(int(rate * n)))
    result = fed.round(1, start, {c: v for c, v in locals_.items() if c not in gone}, sizes)
    assert result.contributors == tuple(c for c in range(n) if c not in gone)
    kept = [c for c in range(n) if c not in gone]
    expected = np.average([locals_[c] for c in kept], axis=0, weights=[sizes[c] for c in kept])
    for c in (0, n - 1):  # any client opens the same model
        opened = fed.clients[c].open_model(decode(encode(result.sealed)), D)
        np.testing.assert_allclose(opened, expected, atol=1e-6)


def test_per_client_entries_open_to_the_plain_mean_of_the_contributors():
    n, per_client = 6, np.arange(D) < 700  # the watermark carrier: averaged over clients, not examples
    fed = Federation(n, weighting=Weighting(per_client))
    fed.setup()
    start, locals_, sizes = scenario(n)
    kept = [c for c in range(n) if c != 2]
    result = fed.round(1, start, {c: locals_[c] for c in kept}, sizes)
    opened = fed.clients[0].open_model(decode(encode(result.sealed)), D)
    by_examples = np.average([locals_[c] for c in kept], axis=0, weights=[sizes[c] for c in kept])
    by_clients = np.mean([locals_[c] for c in kept], axis=0)
    np.testing.assert_allclose(opened, np.where(per_client, by_clients, by_examples), atol=1e-6)
    assert np.abs(by_clients - by_examples)[per_client].max() > 1e-3  # the two means differ: the test can fail


def test_the_server_holds_no_secret_key_and_refuses_one():
    import tenseal as ts

    fed = Federation(3)
    fed.setup()
    assert fed.server.holder == 0 and not fed.server._context.is_private()
    start, locals_, sizes = scenario(3)
    result = fed.round(1, start, locals_, sizes)
    with pytest.raises(ValueError, match="secret_key"):  # the server cannot open what it summed
        ts.ckks_vector_from(fed.server._context, result.sealed.chunks[0]).decrypt()


def test_with_identities_a_server_cannot_slip_in_a_recipient_or_pose_as_the_holder():
    from securefed.secagg.ckks import ChannelAdvert, KeyRequest

    fed = Federation(3, signed=True)
    requests = fed.server.setup(list(fed.clients), range(1, 2))
    adverts = fed.exchange(requests)
    forged = ChannelAdvert(client=2, channel_key=adverts[1].channel_key, signature=adverts[1].signature)
    with pytest.raises(ProtocolError, match="not signed by its identity"):
        fed.clients[0].reply(KeyRequest(adverts=(adverts[1], forged)))
    requests = fed.server.setup_step(adverts)
    deliveries = fed.server.setup_step(fed.exchange(requests))
    posing = dataclasses.replace(deliveries[1], holder=dataclasses.replace(deliveries[1].holder, client=2))
    with pytest.raises(ProtocolError, match="not signed by its identity"):
        fed.clients[1].reply(posing)
    fed.clients[1].reply(deliveries[1])
    with pytest.raises(ProtocolError, match="out of order"):  # and no re-keying afterwards
        fed.clients[1].reply(KeyRequest(adverts=()))
    with pytest.raises(ProtocolError, match="keyed for the job already"):
        fed.clients[1].reply(CkksSetupStart())


def test_sealed_keys_are_authenticated_and_bound_to_their_recipient():
    fed = Federation(3)
    requests = fed.server.setup(list(fed.clients), range(1, 2))
    requests = fed.server.setup_step(fed.exchange(requests))
    deliveries = fed.server.setup_step(fed.exchange(requests))
    tampered = bytearray(deliveries[1].sealed_key)
    tampered[-5] ^= 1
    with pytest.raises(ProtocolError, match="failed authentication"):
        fed.clients[1].reply(dataclasses.replace(deliveries[1], sealed_key=bytes(tampered)))
    with pytest.raises(ProtocolError, match="failed authentication"):  # client 2's key handed to client 1
        fed.clients[1].reply(dataclasses.replace(deliveries[1], sealed_key=deliveries[2].sealed_key))
    fed.clients[1].reply(deliveries[1])


def test_a_client_that_missed_its_key_is_left_out_and_the_rest_sum():
    fed = Federation(4)
    fed.setup(drops=((), (), {3}))
    start, locals_, sizes = scenario(4)
    with pytest.raises(ProtocolError, match="holds no CKKS key"):
        fed.clients[3].upload(1, np.zeros(D + 1, dtype=np.float32))
    result = fed.round(1, start, {c: locals_[c] for c in range(3)}, sizes)
    assert result.contributors == (0, 1, 2)


def test_a_ciphertext_stripped_of_its_content_is_refused_before_tenseal_touches_it():
    fed = Federation(3)
    fed.setup()
    uploads = fed.uploads(1, *scenario(3))
    hollow = bytearray(uploads[1].chunks[0])
    assert hollow[4] == 0x12
    hollow[4] = 0x2A  # the ciphertext field becomes an unknown one: the shape stays valid, the content goes
    uploads[1] = CkksUpload(round=1, chunks=(bytes(hollow), uploads[1].chunks[1]))
    fed.server.open(1, range(3), D + 1)
    result = fed.server.step(uploads)  # adding it would crash the native library
    assert result.contributors == (0, 2) and "one ciphertext" in result.rejected[1]


@pytest.mark.parametrize("forge", ["thousands-of-ciphertexts", "two-ciphertexts", "oversized", "not-protobuf"])
def test_a_chunk_tenseal_would_choke_on_is_refused_from_its_wire_form(forge, monkeypatch):
    """Issue 17, attack 3: TenSEAL allocated for every ciphertext a chunk listed before checking any (145 KB listing
    many tiny ones took about 2 GiB). The chunk's protobuf is read first, and TenSEAL never sees these."""
    from securefed.secagg import ckks
    from securefed.secagg.ckks_wire import _vector_message

    fed = Federation(3)
    fed.setup()
    uploads = fed.uploads(1, *scenario(3))
    real = _vector_message()()
    real.ParseFromString(uploads[1].chunks[0])
    forged = _vector_message()(sizes=list(real.sizes), scale=real.scale)
    if forge == "thousands-of-ciphertexts":
        forged.ciphertexts.extend([real.ciphertexts[0][:16]] * 8000)  # SEAL headers alone
    elif forge == "two-ciphertexts":
        forged.ciphertexts.extend([real.ciphertexts[0]] * 2)
    else:
        forged.ciphertexts.append(real.ciphertexts[0] * 3)
    wire = b"\xff" * 64 if forge == "not-protobuf" else forged.SerializeToString()
    parsed = []
    tenseal_parse = ckks.ts.ckks_vector_from
    monkeypatch.setattr(ckks.ts, "ckks_vector_from", lambda context, data: parsed.append(data) or
                        tenseal_parse(context, data))  # the real parser, watched
    uploads[1] = CkksUpload(round=1, chunks=(wire, uploads[1].chunks[1]))
    fed.server.open(1, range(3), D + 1)
    result = fed.server.step(uploads)
    assert result.contributors == (0, 2) and 1 in result.rejected
    assert wire not in parsed and len(parsed) == 4  # clients 0 and 2, two chunks each
    with pytest.raises(ProtocolError, match="CKKS (vector|ciphertext)"):  # a client refuses it as a sealed model too
        fed.clients[0].open_model(CkksSum(round=1, size=D, contributors=(0, 2),
                                                 chunks=(wire, uploads[0].chunks[1])), D)


def test_garbage_ciphertexts_are_rejected_not_summed():
    fed = Federation(3)
    fed.setup()
    uploads = fed.uploads(1, *scenario(3))
    broken = bytearray(uploads[2].chunks[0])
    del broken[len(broken) // 2 :]
    uploads[2] = CkksUpload(round=1, chunks=(bytes(broken), uploads[2].chunks[1]))
    uploads[1] = CkksUpload(round=1, chunks=uploads[1].chunks[:1])
    fed.server.open(1, range(3), D + 1)
    result = fed.server.step(uploads)
    assert result.contributors == (0,) and set(result.rejected) == {1, 2}
    fed.server.open(2, range(3), D + 1)
    with pytest.raises(RoundAborted, match="no client contributed"):
        fed.server.step({})


def _forged_sum(fed: Federation, number: int, uploads: dict[int, CkksUpload], copies: dict[int, int], named):
    """What a server can make without the key: any integer combination of the uploads it holds."""
    import tenseal as ts

    total = None
    for cid, times in copies.items():
        for _ in range(times):
            vectors = [ts.ckks_vector_from(fed.server._context, c) for c in uploads[cid].chunks]
            total = vectors if total is None else [t + v for t, v in zip(total, vectors)]
    return CkksSum(round=number, size=D, contributors=tuple(named), chunks=tuple(t.serialize() for t in total))


def _chunks_of(fed: Federation, number: int, uploads, copies: dict[int, int]) -> list:
    return list(_forged_sum(fed, number, uploads, copies, [0, 1]).chunks)


@pytest.mark.parametrize("forge", ["one-upload", "one-upload-named-with-others", "three-copies-of-one",
                                   "a-sum-missing-one", "one-upload-twice-with-another", "last-round-sum",
                                   "first-chunk-of-one-upload", "first-chunk-from-last-round"])
def test_a_client_opens_only_a_sum_of_exactly_the_contributors_it_names(forge):
    """Issue 17, attack 4: a server returned client 1's upload (or k copies) as the sealed model, and every
    other client opened it and read client 1's model and example count. Tags from a key the server never
    holds make each sum prove whom it holds."""
    fed = Federation(4)
    fed.setup()
    start, locals_, sizes = scenario(4)
    uploads = fed.uploads(2, start, locals_, sizes)
    earlier = fed.uploads(1, start, locals_, sizes)
    fed.clients[3]._opened.clear()  # this client will be shown the forgery as round 2's first sum
    forged = {
        "one-upload": lambda: _forged_sum(fed, 2, uploads, {1: 1}, [1]),
        "one-upload-named-with-others": lambda: _forged_sum(fed, 2, uploads, {1: 1}, [0, 1, 2]),
        "three-copies-of-one": lambda: _forged_sum(fed, 2, uploads, {1: 3}, [0, 1, 2]),
        "a-sum-missing-one": lambda: _forged_sum(fed, 2, uploads, {0: 1, 1: 1}, [0, 1, 2]),
        "one-upload-twice-with-another": lambda: _forged_sum(fed, 2, uploads, {0: 1, 1: 2}, [0, 1]),
        "last-round-sum": lambda: _forged_sum(fed, 2, earlier, {0: 1, 1: 1, 2: 1}, [0, 1, 2]),
        # found by review: tags in the last chunk only let the other chunks come from anywhere
        "first-chunk-of-one-upload": lambda: dataclasses.replace(
            _forged_sum(fed, 2, uploads, {0: 1, 1: 1}, [0, 1]),
            chunks=(_chunks_of(fed, 2, uploads, {1: 1})[0], _chunks_of(fed, 2, uploads, {0: 1, 1: 1})[1])),
        "first-chunk-from-last-round": lambda: dataclasses.replace(
            _forged_sum(fed, 2, uploads, {0: 1, 1: 1}, [0, 1]),
            chunks=(_chunks_of(fed, 1, earlier, {0: 1, 1: 1})[0], _chunks_of(fed, 2, uploads, {0: 1, 1: 1})[1])),
    }[forge]()
    match = "at least two" if forge == "one-upload" else "not the sum of the . contributors it names"
    with pytest.raises(ProtocolError, match=match):
        fed.clients[3].open_model(decode(encode(forged)), D)
    fed.server.open(2, range(4), D + 1)
    honest = fed.server.step({c: uploads[c] for c in (0, 1, 2)})
    fed.clients[2].open_model(decode(encode(honest.sealed)), D)  # the same combination, named truly, opens
    if forge == "a-sum-missing-one":  # and a client opens one sum per round: no picking subsets one by one
        fed.clients[2].open_model(decode(encode(honest.sealed)), D)
        with pytest.raises(ProtocolError, match="second, different sealed sum of round 2"):
            fed.clients[2].open_model(_forged_sum(fed, 2, uploads, {0: 1, 1: 1}, [0, 1]), D)


def test_a_sealed_model_of_the_wrong_shape_is_refused():
    fed = Federation(2)
    fed.setup()
    with pytest.raises(ProtocolError, match="holds 10 weights"):
        fed.clients[0].open_model(CkksSum(round=1, size=10, contributors=(0, 1), chunks=(b"x",)), D)


def _valid_wires() -> list[bytes]:
    fed = Federation(3)
    wires = []
    requests = fed.server.setup(list(fed.clients), range(1, 2))
    while requests:
        replies = fed.exchange(requests)
        wires += [encode(m) for m in (*requests.values(), *replies.values())]
        requests = fed.server.setup_step(replies)
    start, locals_, sizes = scenario(3)
    result = fed.round(1, start, locals_, sizes)
    return wires + [encode(result.sealed), fed.clients[1].state()]


_VALID = _valid_wires()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=st.one_of(st.deferred(lambda: mutated(_VALID)), st.binary(max_size=200)))
def test_no_input_crashes_a_ckks_party(wire):
    try:  # a state a node fails to keep intact is refused too
        CkksClient(0, CkksSettings(job=bytes(32), clients=3)).restore(wire)
    except ProtocolError:
        pass
    try:
        msg = decode(wire)
    except ProtocolError:
        return
    fed = Federation(3)
    for stage in range(4):
        server_step = (lambda: fed.server.setup_step({0: msg, 1: msg})) if stage < 3 else (
            lambda: fed.server.step({1: msg}))
        for act in (lambda: fed.clients[1].reply(msg), lambda: fed.clients[1].open_model(msg, D), server_step):
            try:
                act()
            except (ProtocolError, RoundAborted, SetupFailed):
                pass
        if stage == 0:
            fed.setup()
            fed.server.open(1, range(3), D + 1)


def test_clients_rebuilt_from_their_state_before_every_message_sum_open_and_remember():
    """On Flower a node's client lives for one message: its keys and the sums it opened travel in its state."""
    fed = Federation(3, signed=True)
    states = dict.fromkeys(range(3), b"")

    def each(requests: dict) -> dict:
        replies = {}
        for cid, request in requests.items():
            client = CkksClient(cid, fed.settings, fed.clients[cid].identity_key)
            client.restore(states[cid])
            replies[cid] = decode(encode(client.reply(decode(encode(request)))))
            states[cid] = client.state()
        return replies

    requests = fed.server.setup(list(fed.clients), range(1, 3))
    while requests:
        requests = fed.server.setup_step(each(requests))
    start, locals_, sizes = scenario(3)
    uploads = {}
    for c in range(3):
        client = CkksClient(c, fed.settings, fed.clients[c].identity_key)
        client.restore(states[c])
        weights = client.open_model(PlainModel(weights=start), D)
        uploads[c] = decode(encode(client.upload(1, fed.settings.weighting.contribution(locals_[c] - weights,
                                                                                          sizes[c]))))
    fed.server.open(1, range(3), D + 1)
    result = fed.server.step(uploads)
    client = CkksClient(1, fed.settings, fed.clients[1].identity_key)
    client.restore(states[1])
    expected = np.average([locals_[c] for c in range(3)], axis=0, weights=[sizes[c] for c in range(3)])
    np.testing.assert_allclose(client.open_model(decode(encode(result.sealed)), D), expected, atol=1e-6)
    again = CkksClient(1, fed.settings, fed.clients[1].identity_key)
    again.restore(client.state())
    with pytest.raises(ProtocolError, match="second, different sealed sum"):
        again.open_model(_forged_sum(fed, 1, uploads, {0: 1, 2: 1}, [0, 2]), D)
    with pytest.raises(ProtocolError, match="keyed for the job already"):  # and no new key exchange
        again.reply(CkksSetupStart())
    for broken in (b"\x00" * 10, encode(PlainModel(weights=start))):
        with pytest.raises(ProtocolError):
            CkksClient(1, fed.settings, fed.clients[1].identity_key).restore(broken)
