"""What one organisation's node does with one securefed message, whichever process runs it.

The node's executor (executor.py) runs every message in one long-lived process and so keeps the loaded model
and tokenized data between messages; a ClientApp process Flower starts per message (`--no-worker`) loads them
each time. Nothing here imports flwr: the Flower types stay in flower.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config import JobConfig
from ..errors import ConfigError, DataError, ProtocolError, SecurefedError
from ..protocol import decode, encode
from ..rundir import RunDir, write_atomic
from ..secagg import identity
from ..secagg.channel import seal, unseal
from ..sums import secure_sum
from .deployment import AppConfig, check_deployable, node_run_dir


@dataclass(frozen=True)
class Node:
    """One organisation's node, from its SuperNode's --node-config: which client it is and where its files are."""

    client: int
    job: str  # the fingerprint of the one job the organisation agreed to train
    data: Path  # its own partition, in the job's data format
    dir: Path  # its ledgers, secrets and made keys, one folder per job and client
    key: Path | None  # its watermark key, if it brings one
    identity: Path | None = None  # its Ed25519 identity (client-<i>.key), when the job's secure sum is signed

    @classmethod
    def from_node_config(cls, node_config: Mapping) -> Node:
        try:
            key, identity = (str(node_config.get(name, "")) for name in ("key", "identity"))
            return cls(int(node_config["client"]), str(node_config["job"]), Path(str(node_config["data"])),
                       Path(str(node_config["dir"])), Path(key) if key else None, Path(identity) if identity else None)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"the SuperNode's --node-config lacks client, job, data or dir ({exc})") from None

    def agree(self, job: JobConfig) -> None:
        """Refuse any job but the one this node joined for: the coordinator cannot change the privacy budget, the
        secure sum or anything else behind the organisation's back."""
        if job.fingerprint() != self.job:
            raise ConfigError(f"this node joined for job {self.job[:12]}, not {job.name} ({job.fingerprint()[:12]})")

    def run_dir(self, job: JobConfig) -> RunDir:
        return node_run_dir(job, self.dir, self.client)

    def identity_key(self, job: JobConfig) -> Ed25519PrivateKey | None:
        """The organisation's identity key, checked against the job's public key for this client."""
        publics = getattr(job.secagg, "public_keys", None)
        if not publics:
            return None
        if self.identity is None:
            raise ConfigError(f"{job.name} signs its secure sum: start this node with --identity "
                              f"client-{self.client}.key")
        return identity.load_key(self.identity, bytes.fromhex(publics[self.client]), self.client)


class NodeState:
    """The node's secure-sum state between the messages of one Flower run.

    It travels sealed (AES-256-GCM, under a key that never leaves the node's folder) in the ClientApp's
    `context.state`, which the SuperNode holds in memory and saves only after the reply has gone. So the digest of
    the latest sealed state is also written to the node's disk, and fsynced, before any reply leaves. A state that
    is not the latest (a save that was lost, or an older one put back) is refused, and the node sits out the rest
    of the run rather than mask twice or reveal a share twice.
    """

    def __init__(self, run: RunDir, job: JobConfig, client: int, flower_run: int):
        self.key = run.secret_key("node-state")
        self.anchor = run.private_file(f"state-of-run-{flower_run}.sha256")
        self.binding = {"job": job.job_id, "stage": f"node-state/{flower_run}", "sender": client, "recipient": client}

    def open(self, sealed: bytes | None) -> bytes:
        latest = self.anchor.read_text(encoding="ascii").strip() if self.anchor.exists() else None
        found = hashlib.sha256(sealed).hexdigest() if sealed is not None else None
        if found != latest:
            raise ProtocolError("this node's secure-aggregation state is not the one it last saved (lost or put "
                                "back); it sits out the rest of this run")
        return unseal(self.key, sealed, **self.binding) if sealed is not None else b""

    def seal(self, state: bytes) -> bytes:
        sealed = seal(self.key, state, **self.binding)
        write_atomic(self.anchor, hashlib.sha256(sealed).hexdigest().encode() + b"\n")
        return sealed


@dataclass(frozen=True)
class Answer:
    """A node's answer to one message: the reply's wire bytes, or why it failed; and the sealed state to keep
    (None: the state could not be opened, so nothing new is kept)."""

    wire: bytes | None
    error: str | None
    state: bytes | None
    seconds: float


def answer(app: AppConfig, node: Node, flower_run: int, wire: bytes, sealed: bytes | None) -> Answer:
    started = time.perf_counter()
    state = None
    try:
        node.agree(app.job)
        check_deployable(app.job)
        request = decode(wire)
        run = node.run_dir(app.job)
        with exclusive(run):
            keeper = NodeState(run, app.job, node.client, flower_run)
            sum_client = secure_sum(app.job).client(node.client, node.identity_key(app.job))
            sum_client.restore(keeper.open(sealed))
            try:
                if isinstance(request, sum_client.answers):  # the secure sum's own stages: no model, no torch
                    reply = sum_client.reply(request)
                else:
                    reply = _client(app, node, run, sum_client).handle(request)
            finally:  # what the client did (an upload's round, a revealed share) must hold even if the reply is lost
                state = keeper.seal(sum_client.state())
        return Answer(encode(reply), None, state, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - the reason travels to the server, which counts the node out
        if not isinstance(exc, SecurefedError):  # a bug, not bad input: its traceback stays in the node's log
            traceback.print_exc(file=sys.stderr)
        return Answer(None, f"{type(exc).__name__}: {exc}", state, time.perf_counter() - started)


@contextmanager
def exclusive(run: RunDir):
    """One message at a time for this node and job. Flower's own subprocess isolation (`--no-worker`) may start the
    next message's process before the last one has finished, and the sealed state, the record of the rounds sent
    and the ledger are each read and then written: run side by side, one would undo the other."""
    with open(run.private_file("node.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


# The task a node last loaded: the model, its tokenized partition, Opacus's wrapper. The executor keeps it
# between messages, as the in-process runtime keeps its one task.
_loaded: dict[tuple, object] = {}
loading = threading.RLock()  # one load (or import of the training code) at a time
_long_lived = threading.Event()  # set by the executor: this process answers the node's later messages too


def keep_loaded() -> None:
    _long_lived.set()


def warm(app: AppConfig, node: Node) -> None:
    """Start loading the task in the background when this process will answer the node's training messages too,
    so that the model loads during the secure sum's setup rather than in round 1. A failure is left for the
    training message to report."""
    if _long_lived.is_set():
        threading.Thread(target=lambda: _task(app, node, quiet=True), name="securefed-warm", daemon=True).start()


def _task(app: AppConfig, node: Node, quiet: bool = False):
    with loading:
        try:
            return _load(app, node)
        except Exception as exc:
            if not quiet:
                raise
            print(f"securefed: loading ahead failed ({type(exc).__name__}: {exc}); the first training message "
                  "will say why", file=sys.stderr, flush=True)
            return None


def _load(app: AppConfig, node: Node):
    from .. import job as jobs
    from ..tasks import task_kind

    try:
        stat = node.data.stat()
    except OSError as exc:
        raise DataError(f"{node.data}: this node's data cannot be read ({exc.strerror})") from None
    key = (app.job.fingerprint(), tuple(app.labels), str(node.data.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _loaded:
        _loaded.clear()
        started = time.perf_counter()
        _loaded[key] = task = jobs.load_task(app.job, task_kind(app.job).party_splits(app.labels, node.data))
        print(f"securefed: client {node.client} loaded {app.job.model.name} and {len(task.train)} examples in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return _loaded[key]


def _client(app: AppConfig, node: Node, run: RunDir, sum_client):
    """The node's client: it trains, opens a sealed model without scoring it (a node holds no dev split), and keeps
    a final model only clients can open in its own folder."""
    from .. import job as jobs

    task = _task(app, node)
    key = jobs.watermark_key(task, run, node.client, node.key) if app.job.watermark else None
    return jobs.make_client(task, node.client, task.train, run=run, key=key, sum_client=sum_client,
                            keep=lambda weights: jobs.save_model(task, weights, run.model_dir))
