"""Ed25519 identities for hardened SecAgg+ and signed CKKS: key files, signing and verification.

A job's identities live in one folder: `client-<i>.pub` (every client's public key, hex) for
everyone, and `client-<i>.key` (the private key, hex) on the machine that runs client i.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError


def public_file(folder: Path, client: int) -> Path:
    return folder / f"client-{client}.pub"


def private_file(folder: Path, client: int) -> Path:
    return folder / f"client-{client}.key"


def generate(folder: Path, clients: int) -> list[bytes]:
    """Write a key pair per client into `folder`; refuses to overwrite an existing identity."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [p for c in range(clients) for p in (public_file(folder, c), private_file(folder, c)) if p.exists()]
    if taken:
        raise ConfigError(f"{taken[0]}: an identity exists already; choose an empty folder")
    publics = []
    for c in range(clients):
        key = Ed25519PrivateKey.generate()
        private = private_file(folder, c)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key.private_bytes_raw().hex() + "\n")
        public = key.public_key().public_bytes_raw()
        public_file(folder, c).write_text(public.hex() + "\n", encoding="ascii")
        publics.append(public)
    return publics


def load_publics(folder: Path, clients: int) -> tuple[bytes, ...]:
    return tuple(_read_key(public_file(folder, c)) for c in range(clients))


def load_private(folder: Path, client: int, public: bytes) -> Ed25519PrivateKey:
    return load_key(private_file(folder, client), public, client)


def load_key(path: Path, public: bytes, client: int) -> Ed25519PrivateKey:
    """Client `client`'s private key from `path`, refused unless it matches the job's public key for the client."""
    key = Ed25519PrivateKey.from_private_bytes(_read_key(path))
    if key.public_key().public_bytes_raw() != public:
        raise ConfigError(f"{path}: not client {client}'s identity (its public key is not the job's)")
    return key


def verify(public: bytes, signature: bytes, content: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, content)
    except (InvalidSignature, ValueError):
        return False
    return True


def _read_key(path: Path) -> bytes:
    try:
        raw = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        raise ConfigError(f"{path}: identity file not found (make them with `securefed secagg identities`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a hex-encoded key ({exc})") from None
    if len(raw) != 32:
        raise ConfigError(f"{path}: an Ed25519 key is 32 bytes, this one is {len(raw)}")
    return raw
