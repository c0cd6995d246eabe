"""The algorithm seam, beside the task seam: what a client computes from the model it holds and uploads, how the
server applies the sum, and what it sends back. The secure sum, the ledger, the runtimes and the CLI serve every
algorithm alike; an algorithm is a module here and a line in algorithms/__init__.py."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..client import Client
from ..config import JobConfig
from ..protocol import Message
from ..server import Server


class Algorithm(ABC):
    """One job's algorithm, made once per process from the job and its initial trainable weights."""

    def __init__(self, config: JobConfig, spec: bytes, initial: np.ndarray):
        self.config = config
        self.spec = spec

    @abstractmethod
    def initial(self, weights: np.ndarray) -> Message:
        """The server's global state before round 1."""

    @abstractmethod
    def client(self, *args, example_losses, run, **kwargs) -> Client:
        """A client: Client's arguments, the task's loss per example, and the run directory its secrets live in
        (None: none)."""

    @abstractmethod
    def server(self, *args, **kwargs) -> Server:
        """The server (Server's arguments)."""
