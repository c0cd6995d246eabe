"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field of p = 2^521 − 1.

The field is larger than any 32-byte secret, so a secret is one field element. A share
is the polynomial's value at x = holder id + 1, written as 66 big-endian bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from ..errors import ProtocolError

PRIME = 2**521 - 1  # a Mersenne prime
SHARE_BYTES = 66
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Shares of `secret` for each holder id; any `threshold` of them recover it, fewer reveal nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} needs between 1 and {len(holders)} holders")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x = _x(holder)
        y = 0
        for c in reversed(coefficients):  # Horner's rule
            y = (y * x + c) % PRIME
        shares[holder] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret behind `shares` (holder id → share), by Lagrange interpolation at 0.

    Given fewer than the threshold, or a tampered share, the result is a wrong secret:
    callers check it against a commitment.
    """
    points = []
    for holder, share in shares.items():
        if len(share) != SHARE_BYTES:
            raise ProtocolError(f"a share is {len(share)} bytes, expected {SHARE_BYTES}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise ProtocolError("a share is not a field element")
        points.append((_x(holder), y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ProtocolError("the shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _x(holder: int) -> int:
    if not 0 <= holder < PRIME - 1:
        raise ValueError(f"holder id {holder} is out of range")
    return holder + 1
