"""What every secure-sum mechanism gives a job: the settings all parties derive, its two state machines, and
what it means for the run (its report line, whether it runs on Flower and resumes).

Nothing here imports torch: a deployed client answers a protocol stage without loading a model.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config import JobConfig
from ..interfaces import SumClient, SumServer
from ..weighting import BY_EXAMPLES, Weighting


class SecureSum(ABC):
    """One job's secure sum. A subclass is one `[secagg] mode`, registered in sums/__init__.py."""

    def __init__(self, config: JobConfig, weighting: Weighting = BY_EXAMPLES):
        self.config = config
        self.weighting = weighting
        self.identities = tuple(bytes.fromhex(k) for k in getattr(config.secagg, "public_keys", None) or ())
        self.job = hashlib.sha256(config.job_id + b"".join(self.identities)).digest()  # binds the identities too

    @abstractmethod
    def server(self) -> SumServer:
        """The server's state machine."""

    @abstractmethod
    def client(self, cid: int, identity_key: Ed25519PrivateKey | None = None) -> SumClient:
        """Client `cid`'s state machine."""

    @classmethod
    def refuses_flower(cls, config: JobConfig) -> str | None:
        """Why this job's sum cannot run on Flower yet, or None."""
        return None

    @classmethod
    def refuses_resume(cls, config: JobConfig) -> str | None:
        """Why a run of this job cannot be resumed, or None."""
        return None

    def check_model(self, size: int) -> None:
        """Raise a ConfigError if a model of `size` trainable values cannot go through this sum."""
        return None

    @classmethod
    @abstractmethod
    def describe(cls, config: JobConfig, setup: str) -> str:
        """The report's line on how the updates were added (`setup`: what the setup cost, or "")."""
