"""Flower's own SuperNode, polling its SuperLink more often when idle.

flwr 1.41–1.42's SuperNode loop sleeps 3 s whenever the SuperLink has no message for it, and 0.5 s between
looks for a finished reply; both are hard-coded. A securefed round sends each node two or three messages, each
after the server has heard from every node, so those sleeps were most of a Flower round's overhead (measured
6.3–6.9 s a quickstart round). `flower join` runs the SuperNode through this module, which caps the sleeps of
that one loop at IDLE_POLL seconds; every other part is Flower's, unchanged. Run as
`python -m securefed.runtime.supernode ARGS`, with flower-supernode's arguments.
"""

from __future__ import annotations

import sys
import time
import types

IDLE_POLL = 0.25  # seconds; a node then asks its SuperLink for work four times a second when idle


def shorten_sleeps(module: types.ModuleType, limit: float = IDLE_POLL) -> bool:
    """Cap the sleeps of `module` (which uses `time.sleep` through its global `time`) at `limit` seconds. False,
    and nothing changed, when the module is not built that way (another Flower version)."""
    if getattr(module, "time", None) is not time:
        return False
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, limit))
    module.time = clock
    return True


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if not shorten_sleeps(start_client_internal):
        print("securefed: this Flower's SuperNode keeps its own polling interval", file=sys.stderr, flush=True)
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
