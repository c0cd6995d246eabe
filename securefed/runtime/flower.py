"""The Flower runtime: a ServerApp and a ClientApp on Flower's Message API that carry securefed's own messages.

Every protocol message crosses as its codec bytes in a ConfigRecord; Flower's strategies and its
SecAgg+ are not used. The server runs our `Server` over a `FlowerGrid`; a client node answers each
message in a fresh process (Flower starts one per message), so its secure-sum state is sealed into
the node's `context.state` between messages, and its model, data, ledger and key are loaded from
its own disk. Protocol stages after training need no model: they are answered without importing
torch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid as FlowerGridApi
from flwr.serverapp import ServerApp

from .. import secure_sum
from ..config import JobConfig
from ..errors import ConfigError, ProtocolError, SecurefedError
from ..interfaces import Exchange, Grid, Observer
from ..protocol import Message, PlainModel, TrainIns, decode, encode
from ..report import headline_score
from ..rundir import RunDir, write_atomic
from ..secagg.channel import seal, unseal
from .deployment import AppConfig, check_deployable, node_run_dir

RECORD = "securefed"
QUERY = "securefed"  # message type query.securefed: one securefed message
HELLO = "securefed_hello"  # message type query.securefed_hello: which client a node is
STATE_KEY = "state"  # the node's sealed secure-sum state
POLL_SECONDS = 0.2


# ---------------------------------------------------------------- server side


class FlowerGrid(Grid):
    """Carries each request to its client's node and waits, up to a timeout, for the replies."""

    def __init__(self, grid: FlowerGridApi, nodes: Mapping[int, int], timeout: float):
        self.grid = grid
        self.nodes = dict(nodes)  # client id → Flower node id
        self.timeout = timeout

    def exchange(self, requests: Mapping[int, Message]) -> Exchange:
        out = Exchange(replies={}, dropped={})
        started = time.perf_counter()
        outgoing = {}
        for cid, request in requests.items():
            if cid not in self.nodes:
                out.dropped[cid] = "its node is not connected"
                continue
            wire = encode(request)
            out.bytes_down += len(wire)
            outgoing[cid] = _message(wire, self.nodes[cid], QUERY, self.timeout)
        answers = send(self.grid, outgoing, self.timeout)
        for cid in outgoing:
            reply = answers.get(cid)
            if reply is None:
                out.dropped[cid] = f"no reply within {self.timeout:g} s"
            elif reply.has_error():
                out.dropped[cid] = _error(reply)
            elif (fields := _fields(reply, wire=bytes, seconds=float)) is None:
                out.dropped[cid] = "sent a reply that is not securefed's"
            else:
                # the nodes work side by side; a node's own figure is bounded by what the server saw
                seconds = min(max(fields["seconds"], 0.0), time.perf_counter() - started)
                out.client_seconds = max(out.client_seconds, seconds)
                out.receive(cid, fields["wire"])
        out.seconds = time.perf_counter() - started
        return out


def send(grid: FlowerGridApi, messages: Mapping[int, FlowerMessage], timeout: float) -> dict[int, FlowerMessage]:
    """Push the messages, then pull until every reply is in or `timeout` passes (Flower's own send_and_receive
    polls every 3 s)."""
    if not messages:
        return {}
    ids = list(grid.push_messages(list(messages.values())))
    pending = {mid: cid for mid, cid in zip(ids, messages) if mid}
    replies: dict[int, FlowerMessage] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        try:
            pulled = list(grid.pull_messages(list(pending)))
        except Exception:  # noqa: BLE001 - a transient failure of the SuperLink's API: ask again until the deadline
            pulled = []
        for reply in pulled:
            cid = pending.pop(reply.metadata.reply_to_message_id, None)
            if cid is not None:
                replies[cid] = reply
        if pending:
            time.sleep(POLL_SECONDS)
    return replies


def discover(grid: FlowerGridApi, clients: int, timeout: float, observer: Observer) -> dict[int, int]:
    """Ask each node that comes online which client it is, until every client is found or `timeout` passes; map
    client ids to node ids."""
    deadline = time.monotonic() + timeout
    found: dict[int, int] = {}
    asked: set[int] = set()
    while len(found) < clients:
        new = sorted(set(grid.get_node_ids()) - asked)
        asked.update(new)
        hello = {node: _message(b"", node, HELLO, timeout) for node in new}
        for node, reply in send(grid, hello, max(deadline - time.monotonic(), 30.0)).items():
            fields = _fields(reply, client=int) if reply.has_content() else None
            cid = fields["client"] if fields else -1
            if not 0 <= cid < clients:
                why = _error(reply) if reply.has_error() else f"it says client {cid}" if fields else "no client id"
                observer.notice(f"node {node} is not a client of this job ({why})")
            elif cid in found:
                observer.notice(f"nodes {found[cid]} and {node} both claim client {cid}; the second is left out")
            else:
                found[cid] = node
        if time.monotonic() > deadline:
            break
        if len(found) < clients:
            time.sleep(1.0)
    missing = sorted(set(range(clients)) - set(found))
    if missing:
        observer.notice(f"clients {missing} did not join within {timeout:g} s; they count as dropouts")
    return found


class _Log(Observer):
    """Progress as lines on the ServerApp's output (`flwr log`)."""

    def round_finished(self, record: Mapping) -> None:
        print(f"securefed: round {record['round']}: {record['contributors']}/{record['cohort']} clients, "
              f"{headline_score(record)}", flush=True)

    def notice(self, text: str) -> None:
        print(f"securefed: {text}", flush=True)


server_app = ServerApp()


@server_app.main()
def serve(grid: FlowerGridApi, context: Context) -> None:
    log = _Log()
    try:
        run_job(grid, AppConfig.from_run_config(context.run_config), log)
    except SecurefedError as exc:
        log.notice(f"error: {exc}")
        raise


def run_job(grid: FlowerGridApi, app: AppConfig, log: Observer) -> RunDir:
    from .. import job as jobs
    from ..report import write_report
    from ..tasks import task_kind

    check_deployable(app.job)
    task = jobs.load_task(app.job, task_kind(app.job).party_splits(app.labels))
    run_dir = RunDir.create(app.job, app.run_dir)
    log.notice(f"run directory {run_dir.path}; waiting for {app.job.federation.clients} clients")
    nodes = discover(grid, app.job.federation.clients, app.join_timeout, log)
    server = jobs.make_server(task, FlowerGrid(grid, nodes, app.reply_timeout), run_dir, log)
    model = server.run(PlainModel(weights=task.bundle.view.get()))
    jobs.save_model(task, model.weights, run_dir.model_dir)
    write_report(run_dir, app.job, run_dir.records())
    log.notice(f"done: {run_dir.report_file}")
    return run_dir


# ---------------------------------------------------------------- client side


@dataclass(frozen=True)
class Node:
    """One organisation's node, from its SuperNode's --node-config: which client it is and where its files are."""

    client: int
    job: str  # the fingerprint of the one job the organisation agreed to train
    data: Path  # its own partition, in the job's data format
    dir: Path  # its ledgers, secrets and made keys, one folder per job and client
    key: Path | None  # its watermark key, if it brings one

    @classmethod
    def from_node_config(cls, node_config: Mapping) -> Node:
        try:
            key = str(node_config.get("key", ""))
            return cls(int(node_config["client"]), str(node_config["job"]), Path(str(node_config["data"])),
                       Path(str(node_config["dir"])), Path(key) if key else None)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"the SuperNode's --node-config lacks client, job, data or dir ({exc})") from None

    def agree(self, job: JobConfig) -> None:
        """Refuse any job but the one this node joined for: the coordinator cannot change the privacy budget, the
        secure sum or anything else behind the organisation's back."""
        if job.fingerprint() != self.job:
            raise ConfigError(f"this node joined for job {self.job[:12]}, not {job.name} ({job.fingerprint()[:12]})")

    def run_dir(self, job: JobConfig) -> RunDir:
        return node_run_dir(job, self.dir, self.client)


client_app = ClientApp()


@client_app.query(HELLO)
def hello(msg: FlowerMessage, context: Context) -> FlowerMessage:
    node = Node.from_node_config(context.node_config)
    node.agree(AppConfig.from_run_config(context.run_config).job)
    return FlowerMessage(RecordDict({RECORD: ConfigRecord({"client": node.client})}), reply_to=msg)


@client_app.query(QUERY)
def answer(msg: FlowerMessage, context: Context) -> FlowerMessage:
    started = time.perf_counter()
    app = AppConfig.from_run_config(context.run_config)
    node = Node.from_node_config(context.node_config)
    node.agree(app.job)
    check_deployable(app.job)
    request = decode(msg.content[RECORD]["wire"])
    run = node.run_dir(app.job)
    state = NodeState(run, app.job, node.client, context.run_id)
    sum_client = secure_sum.client(secure_sum.settings(app.job), node.client)
    sum_client.restore(state.load(context))
    try:
        if isinstance(request, TrainIns):  # a node holds no dev split: it never evaluates (EvaluateIns is CKKS's)
            reply = _train(app, node, run, sum_client, request)
        else:
            reply = sum_client.reply(request)
    finally:  # what the client did (an upload's round, a revealed share) must hold even if the reply is lost
        state.save(context, sum_client.state())
    record = ConfigRecord({"wire": encode(reply), "seconds": time.perf_counter() - started})
    return FlowerMessage(RecordDict({RECORD: record}), reply_to=msg)


def _train(app: AppConfig, node: Node, run: RunDir, sum_client, request: TrainIns) -> Message:
    from .. import job as jobs
    from ..tasks import task_kind

    task = jobs.load_task(app.job, task_kind(app.job).party_splits(app.labels, node.data))
    key = jobs.watermark_key(task, run, node.client, node.key) if app.job.watermark else None
    client = jobs.make_client(task, node.client, task.train, run=run, key=key)
    client.secure_sum = sum_client
    return client.handle(request)


class NodeState:
    """The node's secure-sum state between the processes of one Flower run.

    It travels sealed (AES-256-GCM, under a key that never leaves the node's folder) in `context.state`, which the
    SuperNode holds in memory and saves only after the reply has gone. So the digest of the latest sealed state is
    also written to the node's disk, and fsynced, before any reply leaves. A state that is not the latest (a
    save that was lost, or an older one put back) is refused, and the node sits out the rest of the run rather than
    mask twice or reveal a share twice.
    """

    def __init__(self, run: RunDir, job: JobConfig, client: int, flower_run: int):
        self.key = run.secret_key("node-state")
        self.anchor = run.path / "secrets" / f"state-of-run-{flower_run}.sha256"
        self.binding = {"job": job.job_id, "stage": f"node-state/{flower_run}", "sender": client, "recipient": client}

    def load(self, context: Context) -> bytes:
        saved = context.state.get(RECORD)
        blob = saved.get(STATE_KEY) if saved is not None else None
        latest = self.anchor.read_text(encoding="ascii").strip() if self.anchor.exists() else None
        if (blob is None) != (latest is None) or (blob is not None and hashlib.sha256(blob).hexdigest() != latest):
            raise ProtocolError("this node's secure-aggregation state is not the one it last saved (lost or put "
                                "back); it sits out the rest of this run")
        return unseal(self.key, blob, **self.binding) if blob is not None else b""

    def save(self, context: Context, state: bytes) -> None:
        blob = seal(self.key, state, **self.binding)
        write_atomic(self.anchor, hashlib.sha256(blob).hexdigest().encode() + b"\n")
        context.state[RECORD] = ConfigRecord({STATE_KEY: blob})


def _message(wire: bytes, node: int, kind: str, ttl: float) -> FlowerMessage:
    content = RecordDict({RECORD: ConfigRecord({"wire": wire})})
    return FlowerMessage(content, dst_node_id=node, message_type=f"query.{kind}", ttl=max(ttl, 60.0))


def _fields(reply: FlowerMessage, **types: type) -> dict | None:
    """The named values of a reply's securefed record, of the types given; None if it lacks one."""
    try:
        record = reply.content[RECORD]
        values = {name: record[name] for name in types}
    except (KeyError, TypeError):
        return None
    if not all(isinstance(values[name], kind) and not isinstance(values[name], bool) for name, kind in types.items()):
        return None
    return values


def _error(reply: FlowerMessage) -> str:
    code, reason = reply.error.code, reply.error.reason
    if code == 5:
        return "its node stopped answering (Flower: node unavailable)"
    return f"failed on its node: {reason}"
