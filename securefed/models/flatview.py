"""The trainable parameters as one float32 vector.

Every trainable tensor is re-pointed into one contiguous buffer, so reading or writing
the whole trainable state is a single memcpy and the frozen base is never copied. The
spec (names, shapes, model type) is hashed so that two parties can check they mean the
same vector before exchanging one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError


@dataclass(frozen=True)
class ViewSpec:
    model_type: str
    adapter: str  # canonical JSON of the PEFT settings
    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.entries)

    @property
    def digest(self) -> bytes:
        content = {"model_type": self.model_type, "adapter": self.adapter, "dtype": "float32",
                   "entries": [[name, list(shape)] for name, shape in self.entries]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()


class FlatView:
    def __init__(self, model: torch.nn.Module, *, model_type: str, adapter: str):
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ModelError("the model has no trainable parameters")
        self.spec = ViewSpec(model_type, adapter, tuple((name, tuple(p.shape)) for name, p in params))
        self.parameters = [p for _, p in params]
        self.buffer = torch.empty(self.spec.size, dtype=torch.float32)
        offset = 0
        for p in self.parameters:
            n = p.numel()
            self.buffer[offset : offset + n].copy_(p.detach().reshape(-1).to(torch.float32))
            p.data = self.buffer[offset : offset + n].view(p.shape)
            offset += n
        self._array = self.buffer.numpy()  # shares memory with the buffer

    @property
    def size(self) -> int:
        return self.spec.size

    def numpy(self) -> np.ndarray:
        """The trainable state itself, as an array that shares the model's memory."""
        return self._array

    def get(self) -> np.ndarray:
        """A copy of the current trainable state."""
        return self._array.copy()

    def set(self, vector: np.ndarray) -> None:
        if vector.shape != self._array.shape or vector.dtype != np.float32:
            raise ModelError(f"vector of shape {vector.shape} and dtype {vector.dtype} does not fit a "
                             f"trainable view of {self.size} float32 values")
        np.copyto(self._array, vector)
