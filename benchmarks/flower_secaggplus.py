"""Flower's own SecAgg+ (flwr 1.4x), one round in one process: the baseline for benchmarks/secagg.py.

The server side is Flower's `SecAggPlusWorkflow`, the client side Flower's `secaggplus_mod` around a
`ClientApp` whose fit returns a fixed float32 vector of `size` entries (normal(0, 1) clipped to ±7, well
inside Flower's clipping range 8.0) and a num_examples drawn from 50..150, so the weighting is exercised.
No training, network, Ray or SuperLink: a loopback Grid hands each Message to the ClientApp of its
destination node, each node keeping its own Context (secaggplus_mod keeps its state in context.state
between the four stages), and returns the replies with the metadata a SuperLink would give them.

Measured per round:
- seconds_per_round: wall time of the whole workflow call, every party included: the four stages
  (setup with its key generation, share keys, collect masked vectors, unmask) and the strategy's
  aggregate_fit. Flower runs its key setup every round, so there is no separate setup to exclude.
  client_seconds is the part spent inside the ClientApps (all clients together), stage_seconds the split.
- bytes_up / bytes_down: per client, the protobuf size of each Message's content (the RecordDict, as
  flwr.common.serde.recorddict_to_proto serializes it) in both directions, message metadata (~100 bytes a
  message) and transport framing excluded. bytes_down includes the FitIns Flower sends with stage 2,
  i.e. the global model (bytes_down_fit_instructions), which a plain FedAvg round sends too.
- max_error_of_the_average: the largest |aggregate - weighted mean| over the entries, the weighted mean
  being of the clients that completed the round, computed in float64; Flower quantizes to 2**22 levels
  over [-8, 8] with stochastic rounding, so this is of the order of 1e-5.

Parameters as benchmarks/secagg.py's: SecAgg+ degree k = securefed.config.default_degree(n), so Flower's
num_shares (which counts the node itself) is k + 1: all clients up to about 30, else an odd number about
6·log2(n) + 1; reconstruction_threshold = default_threshold(k), a strict majority of the k + 1 shares.

With --dropout p, a random p·n clients answer the setup and share-keys stages and then never reply, so
the server must rebuild their pairwise masks from their neighbours' shares (Flower's dead-node path).

    python benchmarks/flower_secaggplus.py [--clients 10 50] [--size 74499] [--dropout 0.3]   # JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # before flwr is imported

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # noqa: E402
from flwr.common.logger import FLOWER_LOGGER  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto  # noqa: E402
from flwr.server import ServerConfig  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.compat.legacy_context import LegacyContext  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.constant import Key as WorkflowKey  # noqa: E402
from flwr.serverapp.grid import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from securefed.config import default_degree, default_threshold  # noqa: E402

SIZE = 74_499  # benchmarks/secagg.py's d: the MiniLM LoRA r=8 trainable vector plus the weight
RUN_ID = 1
FIRST_NODE_ID = 1001  # clear of SUPERLINK_NODE_ID, the ServerApp's own node id
NUM_EXAMPLES = (50, 150)
STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")
STAGES_BEFORE_DROPOUT = {Stage.SETUP, Stage.SHARE_KEYS}  # what a dropped client still answers


class FixedClient(NumPyClient):
    """A client whose fit returns the same vector whatever it is sent: training is not measured."""

    def __init__(self, vector: np.ndarray, num_examples: int):
        self.vector = vector
        self.num_examples = num_examples

    def fit(self, parameters, config):
        return [self.vector], self.num_examples, {}


class LoopbackGrid(Grid):
    """Flower's Grid in one process: pushing a message runs its node's ClientApp at once.

    Each message crosses protobuf both ways, as on the wire: the node gets its own decoded copy (the
    workflow sends one content object to every node in the setup stage, and secaggplus_mod pops keys
    from what it receives), and the decoded size is what is counted. Nodes in `silent` answer the
    setup and share-keys stages only.
    """

    def __init__(self, app: ClientApp, contexts: dict[int, Context], silent: Iterable[int] = ()):
        self.app = app
        self.contexts = contexts
        self.silent = frozenset(silent)
        self.replies: dict[str, Message] = {}
        self.bytes_down = dict.fromkeys(contexts, 0)
        self.bytes_up = dict.fromkeys(contexts, 0)
        self.client_seconds = 0.0
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does on push
            ids.append(msg.metadata.message_id)
            self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        # Delivery is synchronous, so a reply missing now never comes: as if `timeout` had run out.
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> None:
        node = msg.metadata.dst_node_id
        if node in self.silent and _stage(msg) not in STAGES_BEFORE_DROPOUT:
            return
        wire = message_to_proto(msg)
        self.bytes_down[node] += wire.content.ByteSize()
        received = message_from_proto(wire)
        started = time.perf_counter()
        try:
            reply = self.app(received, self.contexts[node])
        except Exception as exc:  # what a SuperNode sends back when its ClientApp raises
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                            reply_to=received)
        self.client_seconds += time.perf_counter() - started
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        wire = message_to_proto(reply)
        if reply.has_content():
            self.bytes_up[node] += wire.content.ByteSize()
        self.replies[msg.metadata.message_id] = message_from_proto(wire)


def _stage(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def _timed(step: Callable, name: str, seconds: dict[str, float]) -> Callable:
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            seconds[name] = time.perf_counter() - started

    return run


def flower_secaggplus_round(clients: int, size: int, seed: int = 0, dropout: float = 0.0,
                            shares: int | None = None, threshold: int | None = None) -> dict:
    """One round of Flower's SecAgg+ among `clients` clients, each contributing a `size`-entry float32
    vector: seconds, bytes per client and the error of the weighted average (module docstring).

    `shares` is Flower's num_shares (the node itself included; default: ours, k + 1), `threshold` its
    reconstruction_threshold (default: a strict majority of the shares); `dropout` the fraction of
    clients that go silent after the share-keys stage."""
    if clients < 3:
        raise ValueError("Flower's SecAgg+ needs at least 3 clients (num_shares > 2)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout is a fraction in [0, 1)")
    degree = default_degree(clients)
    shares = degree + 1 if shares is None else shares
    threshold = default_threshold(shares - 1) if threshold is None else threshold
    # Flower's neighbourhood is shares // 2 nodes either side: an even count below n would be rounded up on
    # the server only, not in the configuration the clients get.
    if not 3 <= shares <= clients or (shares < clients and shares % 2 == 0):
        raise ValueError(f"shares must be odd and in 3..{clients}, or {clients}")
    if not 2 <= threshold < shares:
        raise ValueError(f"threshold must be in 2..{shares - 1}")

    # Messages take their run and source node from here, as in a ServerApp process.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    random.seed(seed)  # Flower shuffles the nodes into its neighbour ring with `random`
    np.random.seed(seed)  # and rounds stochastically with numpy's global generator

    rng = np.random.default_rng(seed)
    vectors = np.clip(rng.standard_normal((clients, size)), -7.0, 7.0).astype(np.float32)
    weights = rng.integers(NUM_EXAMPLES[0], NUM_EXAMPLES[1] + 1, clients)
    node_ids = [FIRST_NODE_ID + i for i in range(clients)]
    gone = {node_ids[int(i)] for i in rng.choice(clients, round(dropout * clients), replace=False)}
    fixed = {nid: FixedClient(vectors[i], int(weights[i])) for i, nid in enumerate(node_ids)}
    app = ClientApp(client_fn=lambda context: fixed[context.node_id].to_client(), mods=[secaggplus_mod])
    contexts = {nid: Context(run_id=RUN_ID, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                for nid in node_ids}
    grid = LoopbackGrid(app, contexts, silent=gone)

    # The legacy state SecAggPlusWorkflow reads, as DefaultWorkflow would leave it before round 1.
    initial = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                      min_available_clients=clients, initial_parameters=initial,
                      fit_metrics_aggregation_fn=lambda metrics: {})  # the clients report none; no warning
    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(node_id=nid, grid=grid, run_id=RUN_ID))
    context = LegacyContext(Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                    run_config={}), config=ServerConfig(num_rounds=1), strategy=strategy,
                            client_manager=manager)
    start = compat.parameters_to_arrayrecord(initial, keep_input=True)
    context.state.array_records[MAIN_PARAMS_RECORD] = start
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})

    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold)
    stage_seconds: dict[str, float] = {}
    for name in STAGES:  # the workflow calls its stages through the instance
        setattr(workflow, name, _timed(getattr(workflow, name), name.removesuffix("_stage"), stage_seconds))
    started = time.perf_counter()
    workflow(grid, context)
    seconds = time.perf_counter() - started

    result = context.state.array_records[MAIN_PARAMS_RECORD]
    if result is start:
        raise RuntimeError(f"Flower's SecAgg+ halted after {list(stage_seconds)} (threshold not met?)")
    [aggregate] = parameters_to_ndarrays(compat.arrayrecord_to_parameters(result, keep_input=True))
    stayed = [i for i, nid in enumerate(node_ids) if nid not in gone]
    expected = np.average(vectors[stayed].astype(np.float64), axis=0, weights=weights[stayed])
    fit_ins = recorddict_to_proto(compat.fitins_to_recorddict(FitIns(initial, {}), True)).ByteSize()
    return {
        "clients": clients,
        "size": size,
        "shares": shares,
        "threshold": threshold,
        "dropout": dropout,
        "contributors": len(stayed),
        "seconds_per_round": seconds,
        "client_seconds": grid.client_seconds,
        "stage_seconds": stage_seconds,
        # Means over the clients that completed the round.
        "bytes_up": float(np.mean([grid.bytes_up[node_ids[i]] for i in stayed])),
        "bytes_down": float(np.mean([grid.bytes_down[node_ids[i]] for i in stayed])),
        "bytes_down_fit_instructions": fit_ins,
        "bytes_counted": "protobuf size of each Message's content (RecordDict), both directions, without metadata",
        "max_error_of_the_average": float(np.abs(aggregate.astype(np.float64) - expected).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--shares", type=int, default=None, help="Flower's num_shares (default: ours, k + 1)")
    args = parser.parse_args(argv)
    FLOWER_LOGGER.setLevel(logging.WARNING)  # Flower logs every stage at INFO
    results = [flower_secaggplus_round(n, args.size, args.seed, args.dropout, args.shares) for n in args.clients]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
