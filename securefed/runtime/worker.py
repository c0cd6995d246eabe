"""A node's long-lived worker: it answers its ClientApp's messages and keeps the model between them.

Flower starts a new ClientApp process for every message, and a training message would otherwise import
torch, load the model and tokenize the node's data each time. `securefed flower join` runs a worker beside
its SuperNode; the worker listens on a Unix socket in a fresh 0700 folder, whose path it writes to
`<node dir>/worker.address`. A ClientApp process that finds a live worker there hands it the message and
waits; one that finds none answers itself (node.answer, the same code). Either way the sealed secure-sum
state rides in Flower's context, exactly as before.

A frame is a 4-byte length, a JSON header, then the blobs whose sizes the header lists.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import ProtocolError
from ..protocol import DEFAULT_MAX_BYTES
from ..rundir import write_atomic
from .deployment import AppConfig
from .node import Answer, Node, answer

ADDRESS_FILE = "worker.address"
_MAX_HEADER = 1 << 24  # the header carries the job's TOML


def _send(sock: socket.socket, header: dict, *blobs: bytes) -> None:
    text = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    sock.sendall(struct.pack(">I", len(text)) + text)
    for blob in blobs:
        sock.sendall(blob)


def _receive(sock: socket.socket) -> tuple[dict, list[bytes]]:
    (size,) = struct.unpack(">I", _exactly(sock, 4))
    if size > _MAX_HEADER:
        raise ProtocolError(f"a worker frame header of {size} bytes")
    header = json.loads(_exactly(sock, size))
    sizes = header.pop("sizes")
    if not isinstance(sizes, list) or sum(sizes) > 2 * DEFAULT_MAX_BYTES:
        raise ProtocolError("a worker frame too large")
    return header, [_exactly(sock, int(n)) for n in sizes]


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Worker:
    """Serves one node's messages, one at a time, until the process ends."""

    def __init__(self, node_dir: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="securefed-worker-"))  # 0700: only this user reaches the socket
        self.path = self.folder / "socket"
        self.address = node_dir / ADDRESS_FILE
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen()
        self.served = 0  # messages answered
        write_atomic(self.address, str(self.path).encode())

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve, name="securefed-worker", daemon=True)
        thread.start()
        return thread

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            with connection:
                try:
                    self._handle(connection)
                except Exception as exc:  # noqa: BLE001 - a broken frame ends that exchange, never the worker
                    print(f"securefed worker: a ClientApp's request failed: {exc}", file=sys.stderr, flush=True)

    def _handle(self, connection: socket.socket) -> None:
        header, (wire, sealed) = _receive(connection)
        try:
            app = AppConfig.from_run_config(header["run_config"])
            node = Node.from_node_config(header["node_config"])
        except Exception as exc:  # noqa: BLE001 - a request this node cannot read: say why
            reply = Answer(None, f"{type(exc).__name__}: {exc}", None, 0.0)
        else:  # answer() reports its own failures
            reply = answer(app, node, int(header["run"]), wire, sealed if header["has_state"] else None)
            self.served += 1
        _send(connection, {"error": reply.error, "seconds": reply.seconds, "has_state": reply.state is not None},
              reply.wire or b"", reply.state or b"")

    def close(self) -> None:
        self.listener.close()
        try:
            if self.address.read_bytes() == str(self.path).encode():  # a newer worker may have taken the file
                self.address.unlink()
        except OSError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def forward(node_dir: Path, run_config: Mapping, node_config: Mapping, flower_run: int, wire: bytes,
            sealed: bytes | None) -> Answer | None:
    """The node's worker's answer, or None when no worker is running (the caller then answers itself)."""
    try:
        path = (node_dir / ADDRESS_FILE).read_text().strip()
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # a worker that has gone: its address file outlived it
        sock.close()
        return None
    with sock:
        try:
            _send(sock, {"run_config": dict(run_config), "node_config": dict(node_config), "run": flower_run,
                         "has_state": sealed is not None}, wire, sealed or b"")
            header, (reply, state) = _receive(sock)
        except (OSError, ConnectionError) as exc:
            # it may have answered and kept the new state: answering here again would be refused anyway
            raise ProtocolError(f"this node's worker stopped while answering ({exc})") from None
    return Answer(reply if header["error"] is None else None, header["error"],
                  state if header["has_state"] else None, float(header["seconds"]))


def serve_beside(node_dir: Path) -> Worker:
    """Start a worker for the node whose folder is `node_dir`, in a thread of this process, and import the
    training code beside it while the SuperNode waits for its first message."""
    os.makedirs(node_dir, exist_ok=True)
    worker = Worker(node_dir)
    worker.start()
    threading.Thread(target=_import_training, name="securefed-import", daemon=True).start()
    return worker


def _import_training() -> None:
    """torch, transformers, peft and opacus take seconds to import (peft alone 12 CPU-seconds here): a first
    training message would otherwise wait for them."""
    started = time.perf_counter()
    importlib.import_module("securefed.job")
    print(f"securefed worker: training code imported in {time.perf_counter() - started:.1f} s", file=sys.stderr,
          flush=True)
