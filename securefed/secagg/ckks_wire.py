"""A CKKS vector's wire form, read with protobuf before TenSEAL parses it.

TenSEAL serializes a CKKSVector as its `CKKSVectorProto` (tenseal/proto/tensors.proto: repeated `sizes`, repeated
`ciphertexts`, `scale`). Its parser allocates for every ciphertext the message lists before any check can run, so
a chunk of a few hundred KB that lists thousands of tiny ciphertexts made it allocate gigabytes (issue 17,
attack 3). This job's vectors are one ciphertext each, no larger than its two uncompressed polynomials: anything
else is refused here, where it costs only the bytes already received.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..errors import ProtocolError

_FIELD = descriptor_pb2.FieldDescriptorProto


@cache
def _vector_message() -> type:
    """CKKSVectorProto, declared as TenSEAL's proto file declares it (field numbers and types)."""
    file = descriptor_pb2.FileDescriptorProto(name="securefed/tenseal_tensors.proto", package="securefed.tenseal",
                                              syntax="proto3")
    vector = file.message_type.add(name="CKKSVectorProto")
    vector.field.add(name="sizes", number=1, type=_FIELD.TYPE_UINT32, label=_FIELD.LABEL_REPEATED)
    vector.field.add(name="ciphertexts", number=2, type=_FIELD.TYPE_BYTES, label=_FIELD.LABEL_REPEATED)
    vector.field.add(name="scale", number=3, type=_FIELD.TYPE_DOUBLE, label=_FIELD.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("securefed.tenseal.CKKSVectorProto"))


def check_vector_wire(data: bytes, slots: int, max_ciphertext: int) -> None:
    """Refuse, before TenSEAL, a serialized vector that is not one ciphertext of `slots` slots and at most
    `max_ciphertext` bytes."""
    vector = _vector_message()()
    try:
        vector.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"not a CKKS vector ({exc})") from None
    if list(vector.sizes) != [slots] or len(vector.ciphertexts) != 1:
        raise ProtocolError(f"a CKKS vector must hold one ciphertext of {slots} slots; this one lists "
                            f"{len(vector.ciphertexts)} ciphertexts and sizes {list(vector.sizes)[:4]}")
    if len(vector.ciphertexts[0]) > max_ciphertext:
        raise ProtocolError(f"a CKKS ciphertext of {len(vector.ciphertexts[0])} bytes, more than this job's "
                            f"{max_ciphertext}")
