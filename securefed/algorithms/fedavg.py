"""FedAvg on the PEFT adapter: the global weights go down, each client's weighted update goes up."""

from __future__ import annotations

import numpy as np

from ..client import Client
from ..protocol import Message, PlainModel
from ..server import Server
from .base import Algorithm


class FedAvg(Algorithm):
    def initial(self, weights: np.ndarray) -> Message:
        return PlainModel(weights=weights)

    def client(self, *args, example_losses=None, run=None, **kwargs) -> Client:
        return Client(*args, **kwargs)

    def server(self, *args, **kwargs) -> Server:
        return Server(*args, **kwargs)
