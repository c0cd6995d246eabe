"""No secure sum: the server sees every update. Only for a job that says `insecure = true`."""

from __future__ import annotations

from ..secagg.plaintext import PlainSumClient, PlainSumServer
from .base import SecureSum


class PlainSum(SecureSum):

    def server(self) -> PlainSumServer:
        return PlainSumServer()

    def client(self, cid, identity_key=None) -> PlainSumClient:
        return PlainSumClient()

    @classmethod
    def describe(cls, config, setup: str) -> str:
        return (f'plaintext {config.algorithm.name_shown} (`secagg.mode = "none"`, `insecure = true`). **Insecure: '
                "the server saw every client's update.**")
