"""Watermark keys: an owner's Ed25519 identity, a secret seed, and the carrier the key marks.

The owner's bits are b = SHAKE-256(seed ‖ owner public key), expanded to B bits; the secret projection W
comes from the seed alone. A thief who picks a seed to fit a stolen model gets bits from the hash, not
bits of his choosing, so a forged key matches a model no better than chance (2^-B for all B bits).

A key is one JSON file, readable by its owner only, signed by the owner's identity: an edited key
(another owner name, other bits) is refused rather than trusted. Keys live in a keys folder, never
beside the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import WatermarkError

FORMAT = "securefed-watermark-key/1"
SUFFIX = ".wmkey"


@dataclass(frozen=True)
class Carrier:
    """Where the bits live: the scales of named normalization layers of one base model and, for a key made for a
    LoRA job, the weights the adapter changes (their effective change ΔW carries the bits again)."""

    model: str  # the registry name or local path the key was made for
    model_type: str
    blocks: int  # the normalization layers of this many last blocks
    parameters: tuple[tuple[str, int], ...]  # the scales' names in the base model, and their sizes
    base: str  # SHA-256 of the base model's values of those scales (float32): a different base is refused
    weights: tuple[tuple[str, int, int], ...] = ()  # adapted weights: name in the base model, rows, columns
    weights_base: str = ""  # SHA-256 of the base model's values of those weights

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parameters)

    @staticmethod
    def digest(values: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class WatermarkKey:
    owner: str
    private: bytes  # Ed25519, 32 bytes
    seed: bytes  # 32 secret bytes
    bits: int
    carrier: Carrier
    triggers: int  # how many trigger inputs the key derives (0: none)
    trigger_length: int  # words per trigger input

    @classmethod
    def generate(cls, owner: str, carrier: Carrier, *, bits: int = 64, triggers: int = 32,
                 trigger_length: int = 4) -> WatermarkKey:
        owner = owner_name(owner)
        if not 16 <= bits <= carrier.size:
            raise WatermarkError(f"bits must be between 16 and the carrier's {carrier.size} scales, not {bits}")
        if triggers < 0 or trigger_length < 1:
            raise WatermarkError("triggers must be ≥ 0 and trigger_length ≥ 1")
        return cls(owner, Ed25519PrivateKey.generate().private_bytes_raw(), os.urandom(32), bits, carrier,
                   triggers, trigger_length)

    @property
    def public(self) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes_raw()

    @property
    def fingerprint(self) -> str:
        """A short name for the owner's identity: the first 8 bytes of SHA-256 of the public key."""
        return hashlib.sha256(self.public).hexdigest()[:16]

    def message(self) -> np.ndarray:
        """The B bits as ±1: SHAKE-256(seed ‖ public key), so no one picks them."""
        raw = hashlib.shake_256(b"securefed/watermark/bits" + self.seed + self.public).digest(-(-self.bits // 8))
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: self.bits]
        return bits.astype(np.float32) * 2 - 1

    def delta_projection(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each adapted weight, U (rows × B) and V (columns × B): bit j reads Σ_w u_jᵀ·ΔW_w·v_j. Gaussian
        directions from the seed, each bit's rank-one matrices of total Frobenius norm one: for a model that never
        saw the key, u_j ↦ −u_j is as likely, so each projection's sign is a fair coin."""
        rng, count = self.rng("delta-projection"), len(self.carrier.weights)
        pairs = []
        for _, rows, columns in self.carrier.weights:
            u, v = rng.standard_normal((rows, self.bits)), rng.standard_normal((columns, self.bits))
            u, v = u / np.linalg.norm(u, axis=0), v / np.linalg.norm(v, axis=0)
            pairs.append(((u / count**0.25).astype(np.float32), (v / count**0.25).astype(np.float32)))
        return pairs

    def projection(self) -> np.ndarray:
        """W: carrier size × B, orthonormal columns from the seed (a Gaussian matrix's QR factor). Orthogonal
        columns let the owner set each bit without disturbing the others; for a model that never saw the key,
        the projections' signs are still independent fair coins."""
        q, _ = np.linalg.qr(self.rng("projection").standard_normal((self.carrier.size, self.bits)))
        return q.astype(np.float32)

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator for one purpose, seeded with 256 bits of the secret seed."""
        digest = hashlib.sha256(f"securefed/watermark/{purpose}".encode() + self.seed).digest()
        return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest, "little")))

    # ------------------------------------------------------------ files

    def _statement(self) -> dict:
        """Everything the owner signs: all but the private key."""
        return {"format": FORMAT, "owner": self.owner, "public_key": self.public.hex(), "seed": self.seed.hex(),
                "bits": self.bits, "triggers": self.triggers, "trigger_length": self.trigger_length,
                "carrier": _carrier_statement(self.carrier)}

    def save(self, path: Path) -> None:
        """Write the key, readable by its owner only; never over an existing file."""
        statement = self._statement()
        content = _canonical(statement)
        signature = Ed25519PrivateKey.from_private_bytes(self.private).sign(content)
        document = {**statement, "private_key": self.private.hex(), "signature": signature.hex()}
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise WatermarkError(f"{path}: a key exists already; keys are never overwritten") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(document, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> WatermarkKey:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WatermarkError(f"{path}: key file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WatermarkError(f"{path}: not a watermark key ({str(exc).splitlines()[0]})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise WatermarkError(f"{path}: not a watermark key (expected format {FORMAT})")
        try:
            key = cls._parse(document)
            signature = bytes.fromhex(document["signature"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WatermarkError(f"{path}: malformed watermark key ({type(exc).__name__}: {exc})") from None
        if set(document) != set(key._statement()) | {"private_key", "signature"}:
            raise WatermarkError(f"{path}: malformed watermark key (unexpected fields)")
        if key.public.hex() != document["public_key"]:
            raise WatermarkError(f"{path}: the private key does not belong to the key's public key")
        try:
            Ed25519PublicKey.from_public_bytes(key.public).verify(signature, _canonical(key._statement()))
        except InvalidSignature:
            raise WatermarkError(f"{path}: the key has been altered (its owner's signature does not verify)") from None
        return key

    @classmethod
    def _parse(cls, d: dict) -> WatermarkKey:
        c = d["carrier"]
        parameters = tuple((str(name), _count(size)) for name, size in c["parameters"])
        weights = tuple((str(name), _count(rows), _count(columns)) for name, rows, columns in c.get("weights", ()))
        carrier = Carrier(str(c["model"]), str(c["model_type"]), _count(c["blocks"]), parameters, str(c["base"]),
                          weights, str(c.get("weights_base", "")))
        private, seed = bytes.fromhex(d["private_key"]), bytes.fromhex(d["seed"])
        if len(private) != 32 or len(seed) != 32 or not parameters:
            raise ValueError("private key, seed and carrier must be 32 bytes, 32 bytes and non-empty")
        key = cls(str(d["owner"]), private, seed, _count(d["bits"]), carrier, _count(d["triggers"], 0),
                  _count(d["trigger_length"]))
        if key.bits > carrier.size:
            raise ValueError(f"{key.bits} bits exceed the carrier's {carrier.size} scales")
        return key


def owner_name(owner: str) -> str:
    """The owner's name as keys record it; a blank one is refused."""
    if not owner.strip():
        raise WatermarkError("a watermark key needs an owner name")
    return owner.strip()


def file_name(owner: str) -> str:
    """`Org C` → `org-c.wmkey`."""
    slug = re.sub(r"[^a-z0-9]+", "-", owner.lower()).strip("-") or "owner"
    return slug + SUFFIX


def _carrier_statement(carrier: Carrier) -> dict:
    """The carrier as signed; a key without adapted weights signs no such fields (keys made before them verify)."""
    statement = {**asdict(carrier), "parameters": [list(p) for p in carrier.parameters],
                 "weights": [list(w) for w in carrier.weights]}
    if not carrier.weights:
        del statement["weights"], statement["weights_base"]
    return statement


def _canonical(statement: dict) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _count(value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 1 << 24:
        raise ValueError(f"{value!r} is not a count")
    return value
