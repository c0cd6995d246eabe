"""Which secure sum a job uses: its settings, and its client and server state machines.

Kept apart from job.py, which loads models, so that a deployed client answers a protocol
stage without importing torch.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .config import CkksConfig, JobConfig, SecAggPlusConfig
from .interfaces import SumClient, SumServer
from .secagg import identity
from .secagg.ckks import CkksClient, CkksServer, CkksSettings
from .secagg.plaintext import PlainSumClient, PlainSumServer
from .secagg.secaggplus import SecAggPlusClient, SecAggPlusServer, SecAggPlusSettings
from .weighting import BY_EXAMPLES, Weighting

Settings = SecAggPlusSettings | CkksSettings | None  # None: the plaintext sum


def settings(config: JobConfig, weighting: Weighting = BY_EXAMPLES) -> Settings:
    if isinstance(config.secagg, SecAggPlusConfig):
        return secaggplus_settings(config)
    if isinstance(config.secagg, CkksConfig):
        identities, job = _identities(config)
        return CkksSettings(job=job, clients=config.federation.clients, identities=identities, weighting=weighting)
    return None


def secaggplus_settings(config: JobConfig) -> SecAggPlusSettings:
    """The SecAgg+ parameters every party derives from the job; the job id binds the identities too."""
    secagg, clients = config.secagg, config.federation.clients
    identities, job = _identities(config)
    return SecAggPlusSettings(job=job, clients=clients, rounds=config.federation.rounds,
                              degree=config.secagg_degree, threshold=config.secagg_threshold, clip=secagg.clip,
                              seed=config.federation.seed, identities=identities)


def _identities(config: JobConfig) -> tuple[tuple[bytes, ...], bytes]:
    """The job's listed identities, if any, and the job id, which binds them too."""
    folder = getattr(config.secagg, "identities", None)
    identities = identity.load_publics(folder, config.federation.clients) if folder else ()
    return identities, hashlib.sha256(config.job_id + b"".join(identities)).digest()


def server(settings: Settings) -> SumServer:
    if isinstance(settings, SecAggPlusSettings):
        return SecAggPlusServer(settings)
    if isinstance(settings, CkksSettings):
        return CkksServer(settings)
    return PlainSumServer()


def client(settings: Settings, cid: int, identity_key: Ed25519PrivateKey | None = None) -> SumClient:
    if isinstance(settings, SecAggPlusSettings):
        return SecAggPlusClient(cid, settings, identity_key)
    if isinstance(settings, CkksSettings):
        return CkksClient(cid, settings, identity_key)
    return PlainSumClient()
