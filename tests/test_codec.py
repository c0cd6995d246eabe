import struct
from typing import Annotated

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.errors import ProtocolError
from securefed.protocol import Array, MaxLen, Message, PlainModel, TrainIns, TrainRes, decode, encode, message
from securefed.secagg.plaintext import PlainUpload


@message(13)
class Ins(Message):
    """A message shaped like a typical instruction: an int, a short bytes field and a float32 vector."""

    round: int
    spec: Annotated[bytes, MaxLen(32)]
    weights: Annotated[np.ndarray, Array(("float32",))]


@message(15)
class Everything(Message):
    """A test message with a field of every kind."""

    count: int
    ratio: float
    flag: bool
    label: Annotated[str, MaxLen(64)]
    blob: Annotated[bytes, MaxLen(64)]
    ids: tuple[int, ...]
    metrics: dict[str, float]
    grid: Annotated[np.ndarray, Array(("float32", "uint32"), ndim=2)]
    inner: Message


def sample(**changes) -> Everything:
    fields = dict(count=-3, ratio=0.25, flag=True, label="héllo", blob=b"\x00\xff", ids=(1, 2, 3),
                  metrics={"loss": 0.5, "seconds": 1.0}, grid=np.arange(6, dtype=np.float32).reshape(2, 3),
                  inner=Ins(round=1, spec=b"s" * 32, weights=np.ones(4, dtype=np.float32)))
    fields.update(changes)
    return Everything(**fields)


def test_round_trip_keeps_every_value():
    msg = sample()
    back = decode(encode(msg))
    assert isinstance(back, Everything)
    assert encode(back) == encode(msg)
    assert back.label == "héllo" and back.ids == (1, 2, 3) and back.metrics == {"loss": 0.5, "seconds": 1.0}
    assert back.grid.dtype == np.float32 and back.grid.shape == (2, 3)
    assert isinstance(back.inner, Ins) and np.array_equal(back.inner.weights, np.ones(4))


def test_payload_overhead_is_small():
    weights = np.zeros(74_498, dtype=np.float32)
    # field names travel once per message: round, spec, model, bound, examples and the weights' header, 132 bytes
    assert len(encode(TrainIns(round=1, spec=b"s" * 32, model=PlainModel(weights=weights)))) <= weights.nbytes + 160


def test_expect_restricts_the_message_type():
    wire = encode(PlainUpload(round=1, vector=np.zeros(3, dtype=np.float32)))
    with pytest.raises(ProtocolError, match="unexpected message, wanted TrainIns"):
        decode(wire, TrainIns)


def rebuild(fields: list[tuple[str, int, bytes]], tag: int = 13) -> bytes:
    """Hand-assemble a message from (name, kind, payload) triples."""
    out = b"SFD" + struct.pack("<BHH", 1, tag, len(fields))
    for name, kind, payload in fields:
        out += struct.pack("<B", len(name)) + name.encode() + struct.pack("<B", kind) + payload
    return out


ROUND = ("round", 1, struct.pack("<q", 1))
SPEC = ("spec", 5, struct.pack("<I", 32) + b"s" * 32)


def weights(dtype_code=1, ndim=1, dims=(2,), data=b"\x00" * 8):
    return ("weights", 6, struct.pack("<BB", dtype_code, ndim) + struct.pack(f"<{ndim}I", *dims) + data)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (rebuild([ROUND, SPEC, weights()]), None),
        (rebuild([ROUND, SPEC]), "missing field 'weights'"),
        (rebuild([ROUND, SPEC, weights(), ("extra", 1, b"\x00" * 8)]), "unknown field 'extra'"),
        (rebuild([ROUND, ROUND, SPEC, weights()]), "duplicate field 'round'"),
        (rebuild([("round", 2, struct.pack("<d", 1.0)), SPEC, weights()]), "field 'round' has kind 2"),
        (rebuild([ROUND, SPEC, weights(dtype_code=3, data=b"\x00" * 16)]), "dtype int64 not allowed"),
        (rebuild([ROUND, SPEC, weights(dtype_code=99)]), "dtype code 99 not allowed"),
        (rebuild([ROUND, SPEC, weights(ndim=2, dims=(1, 2))]), "2 dimensions, expected 1"),
        (rebuild([ROUND, SPEC, weights(dims=(2**31,))]), "needs 8589934592 bytes"),
        (rebuild([ROUND, SPEC, weights(data=struct.pack("<2f", 1.0, float("nan")))]), "NaN or infinity"),
        (rebuild([ROUND, ("spec", 5, struct.pack("<I", 33) + b"s" * 33), weights()]), "length 33 exceeds 32"),
        (rebuild([ROUND, SPEC, weights()]) + b"\x00", "1 trailing bytes"),
        (rebuild([ROUND, SPEC, weights()])[:-1], "needs 8 bytes, only 7 remain"),
        (rebuild([ROUND, SPEC])[:30], "truncated in field 'spec'"),
        (rebuild([ROUND, SPEC, weights()], tag=999), "unknown message tag 999"),
        (b"XYZ" + rebuild([ROUND, SPEC, weights()])[3:], "bad magic"),
        (b"SFD\x07" + rebuild([ROUND, SPEC, weights()])[4:], "protocol version 7"),
    ],
)
def test_strict_decoding(wire, reason):
    if reason is None:
        assert isinstance(decode(wire), Ins)
        return
    with pytest.raises(ProtocolError) as info:
        decode(wire)
    assert reason in str(info.value)


def test_size_limit_is_checked_before_parsing():
    wire = encode(Ins(round=1, spec=b"s" * 32, weights=np.zeros(1000, dtype=np.float32)))
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000"):
        decode(wire, max_bytes=1000)


def test_size_limit_counts_bytes_of_any_buffer():
    wire = encode(Ins(round=1, spec=b"s" * 32, weights=np.zeros(1000, dtype=np.float32)))
    padded = wire + b"\x00" * (-len(wire) % 8)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(memoryview(np.frombuffer(padded, dtype=np.int64)), max_bytes=len(wire) - 1)


@message(14)
class Cube(Message):
    cube: Annotated[np.ndarray, Array(("float32",), ndim=3)]


def test_huge_claimed_shapes_do_not_wrap_around():
    wire = encode(Cube(cube=np.zeros((1, 1, 1), dtype=np.float32)))
    wire = wire.replace(struct.pack("<3I", 1, 1, 1), struct.pack("<3I", 2**22, 2**21, 2**21))  # 2**64 elements
    with pytest.raises(ProtocolError, match="needs"):
        decode(wire)


def test_nesting_is_bounded():
    msg = TrainRes(round=1, metrics={}, upload=PlainUpload(round=1, vector=np.zeros(1, dtype=np.float32)))
    for _ in range(5):
        msg = TrainRes(round=1, metrics={}, upload=msg)
    with pytest.raises(ProtocolError, match="nested deeper"):
        decode(encode(msg))


def test_encoding_refuses_values_the_peer_would_refuse():
    with pytest.raises(ProtocolError, match="NaN"):
        encode(Ins(round=1, spec=b"s", weights=np.array([1.0, np.nan], dtype=np.float32)))
    with pytest.raises(ProtocolError, match="Ins.round"):
        encode(Ins(round=2**64, spec=b"s", weights=np.zeros(3, dtype=np.float32)))
    with pytest.raises(ProtocolError, match="entries exceed"):
        encode(TrainRes(round=1, metrics={f"m{i}": 0.0 for i in range(300)},
                        upload=PlainUpload(round=1, vector=np.zeros(1, np.float32))))
    with pytest.raises(ProtocolError, match="expected float32"):
        encode(Ins(round=1, spec=b"s", weights=np.zeros(3, dtype=np.float64)))
    with pytest.raises(ProtocolError, match="33 bytes exceed 32"):
        encode(Ins(round=1, spec=b"s" * 33, weights=np.zeros(3, dtype=np.float32)))


def decode_cleanly(data: bytes) -> None:
    """Decoding either yields a message that re-encodes to the same bytes, or raises ProtocolError."""
    try:
        msg = decode(data)
    except ProtocolError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert encode(msg) == data


VALID = [encode(sample()), encode(Ins(round=7, spec=b"k" * 32, weights=np.linspace(0, 1, 9, dtype=np.float32))),
         encode(TrainRes(round=2, metrics={"loss": 1.5}, upload=PlainUpload(round=2, vector=np.ones(3, np.float32))))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data):
    decode_cleanly(data)
    decode_cleanly(b"SFD\x01" + data)


@settings(max_examples=600, deadline=None)
@given(which=st.sampled_from(range(len(VALID))), data=st.data())
def test_mutated_messages_never_crash_the_decoder(which, data):
    wire = bytearray(VALID[which])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(wire) - 1, 0)))
        if action == "flip" and wire:
            wire[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del wire[pos:]
        elif action == "insert":
            wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and wire:
            del wire[pos]
    decode_cleanly(bytes(wire))


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=100, deadline=None)
@given(
    round=st.integers(-(2**63), 2**63 - 1),
    spec=st.binary(max_size=32),
    values=st.lists(finite, max_size=50),
)
def test_generated_messages_round_trip(round, spec, values):
    msg = Ins(round=round, spec=spec, weights=np.array(values, dtype=np.float32))
    back = decode(encode(msg))
    assert back.round == round and back.spec == spec
    assert np.array_equal(back.weights, msg.weights)


@message(12)
class Lists(Message):
    blobs: Annotated[tuple[bytes, ...], MaxLen(3, item=4)]
    models: tuple[PlainModel, ...]


def test_tuples_of_bytes_and_of_messages_round_trip_within_their_bounds():
    msg = Lists(blobs=(b"ab", b"", b"wxyz"), models=(PlainModel(weights=np.ones(2, np.float32)),) * 2)
    back = decode(encode(msg))
    assert back.blobs == msg.blobs and len(back.models) == 2 and np.array_equal(back.models[1].weights, [1, 1])
    with pytest.raises(ProtocolError, match="4 entries exceed 3"):
        encode(Lists(blobs=(b"",) * 4, models=()))
    with pytest.raises(ProtocolError, match="an entry of 5 bytes exceeds 4"):
        encode(Lists(blobs=(b"abcde",), models=()))
    with pytest.raises(ProtocolError, match="not allowed here"):
        encode(Lists(blobs=(), models=(PlainUpload(round=1, vector=np.zeros(1, np.float32)),)))
    wire = encode(Lists(blobs=(b"ab",), models=()))
    with pytest.raises(ProtocolError, match="truncated in field 'blobs'"):
        decode(wire[: wire.index(b"ab") + 1])
    many = wire.replace(struct.pack("<I", 1) + struct.pack("<I", 2), struct.pack("<I", 2**31) + struct.pack("<I", 2))
    with pytest.raises(ProtocolError, match="entries exceed 3"):
        decode(many)


def test_decoding_a_nested_message_takes_at_most_twice_its_size():
    """Issue 17, 6: each level of nesting used to copy the whole inner message twice (about 8x at depth 3)."""
    import tracemalloc

    msg = PlainUpload(round=1, vector=np.ones(2_000_000, dtype=np.float32))
    for _ in range(2):
        msg = TrainRes(round=1, metrics={"loss": 1.0}, upload=msg)
    wire = encode(msg)
    tracemalloc.start()
    try:
        decoded = decode(wire)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * len(wire), peak / len(wire)
    np.testing.assert_array_equal(decoded.upload.upload.vector, msg.upload.upload.vector)
    from_buffer = decode(bytearray(wire))  # a mutable buffer is read from a snapshot of it
    np.testing.assert_array_equal(from_buffer.upload.upload.vector, msg.upload.upload.vector)
