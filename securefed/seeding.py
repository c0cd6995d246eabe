"""Named, independent random streams derived from the job seed.

Every random choice in a run draws from a stream named by its purpose and position
(for example "batches", round 3, client 2), never from a shared global generator. A
resumed run therefore makes exactly the choices an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _words(seed: int, names: tuple[int | str, ...]) -> list[int]:
    words = [seed]
    for name in names:
        if isinstance(name, str):
            words.append(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
        else:
            words.append(int(name))
    return words


def stream(seed: int, *names: int | str) -> np.random.Generator:
    """A numpy generator for the stream `names` of the job seed."""
    return np.random.default_rng(np.random.SeedSequence(_words(seed, names)))


def stream_seed(seed: int, *names: int | str) -> int:
    """A 63-bit integer seed for libraries that take one (torch)."""
    state = np.random.SeedSequence(_words(seed, names)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def stream_words(seed: int, *names: int | str) -> list[int]:
    """The words that name a stream, to extend with more (a numpy bit generator takes them as its seed)."""
    return _words(seed, names)
