"""The Flower runtime: a ServerApp and a ClientApp on Flower's Message API that carry securefed's own messages.

Every protocol message crosses as its codec bytes in a ConfigRecord; Flower's strategies and its
SecAgg+ are not used. The server runs our `Server` over a `FlowerGrid`. The ClientApp runs in the node's
long-lived executor (executor.py, which keeps the model loaded), or in a process Flower starts per message
under `flower join --no-worker`; either way it answers with node.py. The node's secure-sum state is
sealed into its `context.state` between messages; its data, ledger and key stay on its own disk.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid as FlowerGridApi
from flwr.serverapp import ServerApp

from ..errors import SecurefedError
from ..interfaces import Exchange, Grid, Observer
from ..protocol import FinalIns, FinalRes, Message, PlainModel, encode
from ..report import headline_score
from ..rundir import RunDir, RunDirError
from ..sums import sum_kind
from .deployment import AppConfig, check_deployable
from .node import Node, warm
from .node import answer as node_answer

RECORD = "securefed"
QUERY = "securefed"  # message type query.securefed: one securefed message
HELLO = "securefed_hello"  # message type query.securefed_hello: which client a node is
STATE_KEY = "state"  # the node's sealed secure-sum state
POLL_SECONDS = 0.2


# ---------------------------------------------------------------- server side


class FlowerGrid(Grid):
    """Carries each request to its client's node and waits, up to a timeout, for the replies."""

    def __init__(self, grid: FlowerGridApi, nodes: Mapping[int, int], timeout: float, clients: int = 0,
                 observer: Observer | None = None, asked: set[int] | None = None):
        self.grid = grid
        self.nodes = dict(nodes)  # client id → Flower node id
        self.timeout = timeout
        self.clients, self.observer = clients, observer or Observer()
        self.asked = set(asked or ())  # the nodes that already said which client they are, or that they are none

    def joined(self) -> set[int]:
        """Ask the nodes that came online since which client they are: a node that starts late joins the rounds
        still to come."""
        if len(self.nodes) >= self.clients:
            return set()
        before = set(self.nodes)
        self.nodes = discover(self.grid, self.clients, 0.0, self.observer, found=self.nodes, asked=self.asked,
                              hello_timeout=min(self.timeout, 30.0))
        return set(self.nodes) - before

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


def discover(grid: FlowerGridApi, clients: int, timeout: float, observer: Observer, *,
             found: Mapping[int, int] | None = None, asked: set[int] | None = None,
             hello_timeout: float = 30.0) -> dict[int, int]:
    """Ask each node that comes online which client it is, until every client is found or `timeout` passes; map
    client ids to node ids. `found` and `asked` carry an earlier call's (a later look for late nodes)."""
    deadline = time.monotonic() + timeout
    found = dict(found or {})
    asked = set() if asked is None else asked
    while len(found) < clients:
        new = sorted(set(grid.get_node_ids()) - asked - set(found.values()))
        hello = {node: _message(b"", node, HELLO, timeout) for node in new}
        for node, reply in send(grid, hello, max(deadline - time.monotonic(), hello_timeout)).items():
            asked.add(node)  # a node that did not answer in time is asked again next time
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
    if missing and timeout > 0:
        observer.notice(f"clients {missing} did not join within {timeout:g} s; they count as dropouts")
    return found


class _Log(Observer):
    """Progress as lines on the ServerApp's output (`flwr log`; `securefed flower run` shows them)."""

    def round_started(self, round: int, rounds: int, cohort) -> None:
        print(f"securefed: round {round}/{rounds}: {len(cohort)} clients training", flush=True)

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
    from ..tasks import task_kind
    from .lifecycle import conduct

    check_deployable(app.job)
    # a run directory of this job already: the server restarted (or the App was run again), so it goes on from the
    # last round it committed, as `securefed run --resume` does
    resuming = (app.run_dir / "job.toml").exists()
    if resuming and (why := sum_kind(app.job).refuses_resume(app.job)):
        raise RunDirError(f"cannot resume {app.run_dir}: {why}")
    task = jobs.load_task(app.job, task_kind(app.job).party_splits(app.labels))
    run_dir = RunDir.for_job(app.job, app.run_dir)
    log.notice(f"run directory {run_dir.path}; waiting for {app.job.federation.clients} clients")
    asked: set[int] = set()
    nodes = discover(grid, app.job.federation.clients, app.join_timeout, log, asked=asked)
    log.notice(f"{len(nodes)} of {app.job.federation.clients} clients joined")
    flower_grid = FlowerGrid(grid, nodes, app.reply_timeout, app.job.federation.clients, log, asked)
    conduct(task, run_dir, flower_grid, log, resuming=resuming,  # the watermark keys stay on the nodes
            open_model=lambda model: _final_model(flower_grid, model, task, log))
    log.notice(f"done: {run_dir.report_file}")
    return run_dir


def _final_model(grid: FlowerGrid, model: Message, task, log: Observer):
    """The final weights if they are in clear; a sealed model (CKKS) the nodes open and keep in their own
    folders instead, since the server cannot, and no node sends it back in clear."""
    if isinstance(model, PlainModel):
        return model.weights
    final = FinalIns(round=task.config.federation.rounds, spec=task.bundle.view.spec.digest, model=model)
    exchange = grid.exchange(dict.fromkeys(grid.nodes, final))
    digests = {cid: r.digest for cid, r in exchange.replies.items() if isinstance(r, FinalRes)}
    if not digests:
        raise SecurefedError("no client could open the final model")
    if len(set(digests.values())) > 1:
        raise SecurefedError("the clients opened different final models")
    log.notice(f"the final model stays with the clients: {len(digests)} of {len(grid.nodes)} nodes kept it in "
               f"their folders (SHA-256 {next(iter(digests.values())).hex()[:16]})")
    return None


# ---------------------------------------------------------------- client side


client_app = ClientApp()


@client_app.query(HELLO)
def hello(msg: FlowerMessage, context: Context) -> FlowerMessage:
    node = Node.from_node_config(context.node_config)
    app = AppConfig.from_run_config(context.run_config)
    node.agree(app.job)
    warm(app, node)
    return FlowerMessage(RecordDict({RECORD: ConfigRecord({"client": node.client})}), reply_to=msg)


@client_app.query(QUERY)
def answer(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Answer one securefed message, keeping the node's sealed state in the context."""
    saved = context.state.get(RECORD)
    sealed = saved.get(STATE_KEY) if saved is not None else None
    node = Node.from_node_config(context.node_config)
    reply = node_answer(AppConfig.from_run_config(context.run_config), node, context.run_id,
                        msg.content[RECORD]["wire"], sealed)
    if reply.state is not None:
        context.state[RECORD] = ConfigRecord({STATE_KEY: reply.state})
    if reply.error is not None:
        raise NodeFailed(reply.error)
    return FlowerMessage(RecordDict({RECORD: ConfigRecord({"wire": reply.wire, "seconds": reply.seconds})}),
                         reply_to=msg)


class NodeFailed(SecurefedError):
    """The node could not answer; Flower carries the reason to the server as the reply's error."""


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
