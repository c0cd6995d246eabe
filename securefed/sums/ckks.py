"""CKKS (TenSEAL): the server adds ciphertexts and never sees an update or the model in clear."""

from __future__ import annotations

from ..errors import ConfigError
from ..protocol import DEFAULT_MAX_BYTES
from ..secagg.ckks import CkksClient, CkksServer, CkksSettings, payload_sizes
from .base import SecureSum

CHUNK_BYTES = 140_000  # a serialized ciphertext of N/2 slots, about 131 KB, with room to spare


class Ckks(SecureSum):

    @property
    def settings(self) -> CkksSettings:
        return CkksSettings(job=self.job, clients=self.config.federation.clients, identities=self.identities,
                            weighting=self.weighting)

    @classmethod
    def refuses_resume(cls, config) -> str | None:
        return ("a CKKS run's key lived only with its clients for that run, so its sealed checkpoints cannot be "
                "opened again; start the job anew")

    def server(self) -> CkksServer:
        return CkksServer(self.settings)

    def client(self, cid, identity_key=None) -> CkksClient:
        return CkksClient(cid, self.settings, identity_key)

    def check_model(self, size: int) -> None:
        if len(payload_sizes(size)) * CHUNK_BYTES > DEFAULT_MAX_BYTES:
            raise ConfigError(f"secagg: the model has {size:,} trainable values; its CKKS ciphertexts would exceed "
                              "the 256 MiB message limit (about 7.6 million values)")

    @classmethod
    def describe(cls, config, setup: str) -> str:
        return ("FedAvg under CKKS (TenSEAL, N=8192): the server added ciphertexts and never saw an update or the "
                f"model in clear; a client evaluated each round. The server together with any one client could "
                f"decrypt.{setup}")
