"""SecAgg+: pairwise masks over a k-regular graph, dropouts recovered from t-of-k+1 Shamir shares."""

from __future__ import annotations

from ..secagg.secaggplus import SecAggPlusClient, SecAggPlusServer, SecAggPlusSettings
from .base import SecureSum


class SecAggPlus(SecureSum):

    @property
    def settings(self) -> SecAggPlusSettings:
        config = self.config
        return SecAggPlusSettings(job=self.job, clients=config.federation.clients, rounds=config.federation.rounds,
                                  degree=config.secagg_degree, threshold=config.secagg_threshold,
                                  clip=config.secagg.clip, seed=config.federation.seed, identities=self.identities)

    def server(self) -> SecAggPlusServer:
        return SecAggPlusServer(self.settings)

    def client(self, cid, identity_key=None) -> SecAggPlusClient:
        return SecAggPlusClient(cid, self.settings, identity_key)

    @classmethod
    def describe(cls, config, setup: str) -> str:
        mode = "hardened SecAgg+ (signed keys and survivor lists)" if config.secagg.hardened else "SecAgg+"
        return (f"{config.algorithm.name_shown} over {mode} ({config.secagg_degree} neighbours per client, threshold "
                f"{config.secagg_threshold}): the server saw only the sum of the updates, never one "
                f"update.{setup}")
