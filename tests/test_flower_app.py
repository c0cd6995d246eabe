"""securefed's Flower App driven through Flower's own Message, Context and Error types in one process.

A loopback grid stands in for the SuperLink: it hands each message to the ClientApp handler of its
node, with that node's Context, whose state persists as a SuperNode keeps it. The real processes,
TLS and node authentication are the slow tier's (test_flower_deployment.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_causal, write_job
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import IPAddress, SubjectAlternativeName, load_pem_x509_certificate

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from securefed.config import dump_toml, load_job  # noqa: E402
from securefed.data.datasets import label_names, load_labelled, load_splits  # noqa: E402
from securefed.data.partition import partition, write_partitions  # noqa: E402
from securefed.errors import ConfigError, DataError, ProtocolError  # noqa: E402
from securefed.interfaces import Observer  # noqa: E402
from securefed.privacy.ledger import Ledger, ledger_file  # noqa: E402
from securefed.protocol import SeedHistory, SeedUpdate, TrainIns, decode, encode  # noqa: E402
from securefed.runtime import flower  # noqa: E402
from securefed.runtime.deployment import AppConfig, check_deployable, deployed_job, make_certificates  # noqa: E402
from securefed.runtime.local import execute, prepare  # noqa: E402
from securefed.runtime.node import Node, NodeState  # noqa: E402
from securefed.secagg.identity import generate, private_file  # noqa: E402
from securefed.secagg.secaggplus import SetupStart  # noqa: E402
from securefed.tasks import task_kind  # noqa: E402

SECRET = "0123456789abcdef" * 4

# Flower sets these in each of its processes; Message() reads them.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LoopbackGrid:
    """Flower's Grid API in one process. `before(node, request)` runs before a node handles a request and may
    return False: the node then never answers."""

    def __init__(self, contexts: dict[int, Context], before=None):
        self.contexts = contexts
        self.before = before
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grid does when it pushes
            ids.append(msg.object_id)
            node = msg.metadata.dst_node_id
            hello = msg.metadata.message_type == f"query.{flower.HELLO}"
            if not hello and self.before and self.before(node, decode(msg.content[flower.RECORD]["wire"])) is False:
                continue
            try:
                self.replies[msg.object_id] = (flower.hello if hello else flower.answer)(msg, self.contexts[node])
            except Exception as exc:  # what Flower sends back when a ClientApp raises
                self.replies[msg.object_id] = Message(Error(code=2, reason=f"{type(exc).__name__}:{exc}"),
                                                      reply_to=msg)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


class Notes(Observer):
    def __init__(self):
        self.lines = []

    def notice(self, text: str) -> None:
        self.lines.append(text)


def pin_secrets(run: Path) -> None:
    """One DP secret, and one secret for FedKSeed's steps, for every party: the in-process run can then match."""
    (run / "secrets").mkdir(mode=0o700)
    for name in ("dp", "fedkseed"):
        (run / "secrets" / name).write_text(SECRET + "\n", encoding="ascii")


def deploy(folder, job, identities=None):
    """Each client's partition of `job` in its own file, and a node context per client, each with the DP secret
    (and its own identity key from the `identities` folder)."""
    config = load_job(job)
    parts = write_partitions(config, folder / "parts")
    labels = task_kind(config).label_order()
    app = AppConfig(deployed_job(config), labels, folder / "run", reply_timeout=3.0, join_timeout=5.0)
    contexts = {}
    for cid, path in enumerate(parts):
        node = Node(cid, config.fingerprint(), path, folder / f"node-{cid}", None)
        run = node.run_dir(config)
        pin_secrets(run.path)  # the in-process run's too
        node_config = {"client": cid, "job": node.job, "data": str(path), "dir": str(node.dir)}
        if identities:
            node_config["identity"] = str(private_file(identities, cid))
        contexts[1000 + cid] = Context(run_id=1, node_id=1000 + cid, state=RecordDict(), run_config=app.run_config(),
                                       node_config=node_config)
    return job, app, contexts


def in_process(job, folder, node_keys=()):
    """The same job run in this process, with the nodes' DP secret and watermark keys."""
    prepared = prepare(load_job(job), out=folder)
    pin_secrets(folder)
    for key in node_keys:
        prepared.run_dir.keys_dir.mkdir(exist_ok=True)
        shutil.copy(key, prepared.run_dir.keys_dir / key.name)
    return prepared, execute(prepared)


@pytest.fixture
def deployed(tmp_path, tiny_model, sst2_sample):
    """A private SecAgg+ job, each client's partition in its own file, and three nodes' contexts."""
    return deploy(tmp_path, write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 2},
                                      privacy={"epsilon": 8.0, "max_grad_norm": 1.0}))


def test_the_flower_app_trains_exactly_as_the_in_process_runtime(deployed, tmp_path):
    job, app, contexts = deployed
    run = flower.run_job(LoopbackGrid(contexts), app, Notes())
    local, reference = in_process(job, tmp_path / "local")
    reference = reference.weights
    _, model = run.last_checkpoint(reference.size, local.task.bundle.view.spec.digest)
    np.testing.assert_allclose(model.weights, reference, rtol=0, atol=1e-6)
    records = run.records()
    assert [r["contributors"] for r in records] == [3, 3]
    assert all(r["bytes_up"] > 0 for r in records)
    for node, context in contexts.items():
        cid = node - 1000
        ledgers = list((tmp_path / f"node-{cid}").glob("*/ledger/client-*.jsonl"))  # on the node's own disk
        assert [p.name for p in ledgers] == [f"client-{cid}.jsonl"]
        sealed = context.state[flower.RECORD][flower.STATE_KEY]  # its SecAgg+ state, which the SuperNode holds
        with pytest.raises(ProtocolError):
            decode(sealed)
        plain = NodeState(Node.from_node_config(context.node_config).run_dir(load_job(job)), load_job(job), cid,
                          context.run_id).open(sealed)
        assert decode(plain).uploaded == (1, 2) and decode(plain).answered == (1, 2)


def test_fedkseed_on_flower_keeps_each_replica_on_its_node_and_catches_up_a_node_that_missed_rounds(
        tmp_path, tiny_model, sst2_sample):
    """Each message may reach a node in a fresh process (here each reloads the task, so the weights are rebuilt
    from the replica on the node's disk). Node 2 misses rounds 1 and 2, then takes them from a catch-up: the
    model is the in-process run's, bit for bit."""
    job = write_job(tmp_path, tiny_model, *sst2_sample, peft=None,
                    algorithm={"name": "fedkseed", "seeds": 64, "perturbation": 1e-3},
                    federation={"rounds": 4, "local_steps": 4, "learning_rate": 1e-3},
                    secagg={"mode": "secaggplus", "clip": 2.0**24}, privacy={"epsilon": 8.0, "max_grad_norm": 2.0})
    job, app, contexts = deploy(tmp_path, job)
    absent = lambda cid, msg: cid == 2 and isinstance(msg, TrainIns) and msg.round in (1, 2)  # noqa: E731
    run = flower.run_job(LoopbackGrid(contexts, lambda node, msg: not absent(node - 1000, msg)), app, Notes())
    records = run.records()
    assert [r["contributors"] for r in records] == [2, 2, 3, 3]
    assert records[2]["catch_up"]["caught_up"] == 1 and "catch_up" not in records[3]
    prepared = prepare(load_job(job), out=tmp_path / "local")
    pin_secrets(tmp_path / "local")
    reference = execute(prepared, faults=absent)
    assert [r["contributors"] for r in reference.records] == [2, 2, 3, 3]
    spec = prepared.task.bundle.view.spec.digest
    _, history = run.last_checkpoint(0, spec)
    np.testing.assert_array_equal(history.scalars, reference.run.last_checkpoint(0, spec)[1].scalars)
    assert (run.model_dir / "config.json").is_file()  # the server replays the history: the whole model, in clear
    for cid in range(3):  # each node's replica: rounds 1 to 3, on its own disk
        [file] = (tmp_path / f"node-{cid}").glob("*/secrets/replica-client-*")
        assert file.name == f"replica-client-{cid}" and file.stat().st_size == 3 * 64 * 4
        np.testing.assert_array_equal(np.fromfile(file, "<f4").reshape(3, 64), history.scalars[:3])


class ServerDied(BaseException):
    """The ServerApp's process ending: not an Exception, so nothing in securefed may swallow it."""


@pytest.mark.slow  # whole multi-round jobs; the default tier's time budget
def test_a_flower_server_that_dies_between_rounds_resumes_and_ends_with_the_uninterrupted_model(
        tmp_path, tiny_model, sst2_sample):
    """FedKSeed, SecAgg+ and DP-ZO on Flower: the ServerApp dies as it sends round 3. Run again (a new Flower run,
    so every node's context starts empty), it goes on from its checkpoint of round 2, catches every node up and
    ends with the model of a run that never stopped, bit for bit; no ledger passes its budget."""
    job = write_job(tmp_path, tiny_model, *sst2_sample, peft=None,
                    algorithm={"name": "fedkseed", "seeds": 64, "perturbation": 1e-3},
                    federation={"rounds": 4, "local_steps": 4, "learning_rate": 1e-3},
                    secagg={"mode": "secaggplus", "clip": 2.0**24}, privacy={"epsilon": 8.0, "max_grad_norm": 2.0})
    job, app, contexts = deploy(tmp_path, job)

    def die(node, msg):
        if isinstance(msg, TrainIns) and msg.round == 3:
            raise ServerDied

    with pytest.raises(ServerDied):
        flower.run_job(LoopbackGrid(contexts, die), app, Notes())
    again = {node: Context(run_id=2, node_id=node, state=RecordDict(), run_config=c.run_config,
                           node_config=c.node_config) for node, c in contexts.items()}
    notes = Notes()
    run = flower.run_job(LoopbackGrid(again), app, notes)
    assert any("resuming after round 2 of 4" in line for line in notes.lines), notes.lines
    records = run.records()
    assert [r["round"] for r in records] == [1, 2, 3, 4] and [r["contributors"] for r in records] == [3] * 4
    assert records[2]["catch_up"]["caught_up"] == 3  # the new server knows nothing of what the nodes hold
    prepared = prepare(load_job(job), out=tmp_path / "local")
    pin_secrets(tmp_path / "local")
    reference = execute(prepared)
    spec = prepared.task.bundle.view.spec.digest
    np.testing.assert_array_equal(run.last_checkpoint(0, spec)[1].scalars,
                                  reference.run.last_checkpoint(0, spec)[1].scalars)
    config = load_job(job)
    for cid in range(3):  # each node's ledger: its chain checks, one entry a round, within the budget
        [folder] = (tmp_path / f"node-{cid}").glob("*/ledger")
        entries = Ledger(ledger_file(folder, cid), config.job_id, cid).entries
        assert [e.round for e in entries] == [1, 2, 3, 4] and entries[-1].epsilon <= 8.0


class LateGrid(LoopbackGrid):
    """Node `late` is offline (not in get_node_ids, as Flower lists only ONLINE nodes) until node `trigger` is
    sent round `round`'s TrainIns: it comes online during that round."""

    def __init__(self, contexts, late: int, trigger: int, round: int):
        super().__init__(contexts, self._watch)
        self.late, self.trigger, self.round, self.online = late, trigger, round, False

    def _watch(self, node, msg):
        if node == self.trigger and isinstance(msg, TrainIns) and msg.round == self.round:
            self.online = True
        return node != self.late or self.online

    def get_node_ids(self):
        return [n for n in self.contexts if n != self.late or self.online]


@pytest.mark.slow  # whole multi-round jobs; the default tier's time budget
def test_fedkseed_on_flower_takes_in_a_node_that_starts_late(tmp_path, tiny_model, sst2_sample):
    """Node 2 is offline before round 1 (so out of the SecAgg+ setup) and comes online during round 2. Before
    round 3 the server finds it, runs the setup again for rounds 3..4, catches it up, and it trains: the history
    is the in-process run's in which client 2 misses rounds 1 and 2, bit for bit."""
    import dataclasses

    job = write_job(tmp_path, tiny_model, *sst2_sample, peft=None,
                    algorithm={"name": "fedkseed", "seeds": 64, "perturbation": 1e-3},
                    federation={"rounds": 4, "local_steps": 4, "learning_rate": 1e-3},
                    secagg={"mode": "secaggplus", "clip": 2.0**24}, privacy={"epsilon": 8.0, "max_grad_norm": 2.0})
    job, app, contexts = deploy(tmp_path, job)
    notes = Notes()
    run = flower.run_job(LateGrid(contexts, late=1002, trigger=1000, round=2),
                         dataclasses.replace(app, join_timeout=1.0), notes)
    records = run.records()
    assert [r["contributors"] for r in records] == [2, 2, 3, 3]
    assert any("clients [2] did not join within 1 s" in line for line in notes.lines)
    assert any("clients [2] joined before round 3" in line for line in notes.lines)
    assert "setup" in records[0] and "setup" in records[2] and records[2]["setup"]["dropped"] == 0
    assert records[2]["catch_up"]["caught_up"] == 1
    absent = lambda cid, msg: cid == 2 and isinstance(msg, TrainIns) and msg.round in (1, 2)  # noqa: E731
    prepared = prepare(load_job(job), out=tmp_path / "local")
    pin_secrets(tmp_path / "local")
    reference = execute(prepared, faults=absent)
    spec = prepared.task.bundle.view.spec.digest
    _, history = run.last_checkpoint(0, spec)
    np.testing.assert_array_equal(history.scalars, reference.run.last_checkpoint(0, spec)[1].scalars)
    [file] = (tmp_path / "node-2").glob("*/secrets/replica-client-*")
    np.testing.assert_array_equal(np.fromfile(file, "<f4").reshape(3, 64), history.scalars[:3])
    context = contexts[1002]
    state = decode(NodeState(Node.from_node_config(context.node_config).run_dir(load_job(job)), load_job(job), 2,
                             context.run_id).open(context.state[flower.RECORD][flower.STATE_KEY]))
    assert (state.first_round, state.uploaded, state.answered) == (3, (3, 4), (3, 4))


def test_a_late_node_joins_a_fedavg_job_under_secaggplus(deployed):
    """FedAvg: the late node gets the global model in round 2's TrainIns after a new setup, and trains."""
    import dataclasses

    _, app, contexts = deployed
    notes = Notes()
    run = flower.run_job(LateGrid(contexts, late=1002, trigger=1000, round=1),
                         dataclasses.replace(app, join_timeout=1.0), notes)
    assert [r["contributors"] for r in run.records()] == [2, 3]
    assert any("clients [2] joined before round 2" in line for line in notes.lines)


def test_a_client_left_out_of_a_new_setup_is_not_asked_to_train_and_spends_nothing(deployed):
    """A late node makes the server run SecAgg+'s setup again; client 1 misses it and still holds the first one. It
    could train, spend ε and have its upload refused every round: it is not asked to train at all."""
    import dataclasses

    job, app, contexts = deployed
    grid = LateGrid(contexts, late=1002, trigger=1000, round=1)
    watch = grid.before
    grid.before = lambda node, msg: watch(node, msg) and not (node == 1001 and isinstance(msg, SetupStart)
                                                              and msg.first_round == 2)
    run = flower.run_job(grid, dataclasses.replace(app, join_timeout=1.0), Notes())
    assert [r["contributors"] for r in run.records()] == [2, 2]  # round 1: clients 0, 1; round 2: clients 0, 2
    config = load_job(job)
    spent = {}
    for cid in range(3):
        [folder] = (Path(contexts[1000 + cid].node_config["dir"])).glob("*/ledger")
        spent[cid] = [e.round for e in Ledger(ledger_file(folder, cid), config.job_id, cid).entries]
    assert spent == {0: [1, 2], 1: [1], 2: [2]}


def test_a_hardened_job_runs_on_flower_with_each_identity_key_on_its_own_node(tmp_path, tiny_model, sst2_sample):
    """Issue 17, attack 2: hardened SecAgg+ on Flower. The job that travels holds the public keys only; each node
    signs with its own client-<i>.key; the result is the in-process run's, which holds every key."""
    ids = tmp_path / "ids"
    generate(ids, 3)
    job = write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 2},
                    privacy={"epsilon": 8.0, "max_grad_norm": 1.0},
                    secagg={"mode": "secaggplus", "identities": str(ids)})
    job, app, contexts = deploy(tmp_path, job, ids)
    travelling = AppConfig.from_run_config(app.run_config()).job
    assert travelling.secagg.hardened and travelling.secagg.identities is None
    assert travelling.secagg.public_keys == load_job(job).secagg.public_keys
    assert travelling.fingerprint() == load_job(job).fingerprint()  # what each organisation agreed to
    run = flower.run_job(LoopbackGrid(contexts), app, Notes())
    local, reference = in_process(job, tmp_path / "local")
    _, model = run.last_checkpoint(reference.weights.size, local.task.bundle.view.spec.digest)
    np.testing.assert_allclose(model.weights, reference.weights, rtol=0, atol=1e-6)
    assert [r["contributors"] for r in run.records()] == [3, 3]
    wrong = Node(1, "", Path("x"), tmp_path, None, private_file(ids, 0))
    with pytest.raises(ConfigError, match="not client 1's identity"):
        wrong.identity_key(travelling)
    with pytest.raises(ConfigError, match="start this node with --identity client-1.key"):
        Node(1, "", Path("x"), tmp_path, None).identity_key(travelling)


def test_a_signed_ckks_job_runs_on_flower_and_the_final_model_stays_with_the_nodes(tmp_path, tiny_model, sst2_sample):
    """Issue 17: CKKS with a signed key exchange on Flower. Each node keeps the CKKS secret key sealed in its
    state between messages; the server never holds the model in clear, not even at the end: each node opens the
    last sum and keeps the model in its own folder, as the in-process run's clients open it."""
    from safetensors.numpy import load_file

    ids = tmp_path / "ids"
    generate(ids, 3)
    job = write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 2},
                    privacy={"epsilon": 8.0, "max_grad_norm": 1.0}, secagg={"mode": "ckks", "identities": str(ids)})
    job, app, contexts = deploy(tmp_path, job, ids)
    notes = Notes()
    run = flower.run_job(LoopbackGrid(contexts), app, notes)
    records = run.records()
    assert [r["contributors"] for r in records] == [3, 3] and not any("aborted" in r for r in records)
    assert all(r["dev_accuracy"] is None for r in records)  # opened by a node, which holds no dev split to score
    assert not run.model_dir.exists()  # the server never had the model in clear
    assert any("the final model stays with the clients: 3 of 3 nodes" in line for line in notes.lines)
    local, _ = in_process(job, tmp_path / "local")
    reference = load_file(str(local.run_dir.model_dir / "adapter_model.safetensors"))
    for cid, context in ((node - 1000, c) for node, c in contexts.items()):
        node_run = Node.from_node_config(context.node_config).run_dir(load_job(job))
        kept = load_file(str(node_run.model_dir / "adapter_model.safetensors"))
        assert kept.keys() == reference.keys()
        for name in kept:  # CKKS decrypts with noise of about 1e-8, and round 2 trained from such a model
            np.testing.assert_allclose(kept[name], reference[name], rtol=0, atol=1e-5)
        sealed = context.state[flower.RECORD][flower.STATE_KEY]
        assert b"CKKS" not in sealed and len(sealed) > 100_000  # the secret key, sealed
        state = decode(NodeState(node_run, load_job(job), cid, context.run_id).open(sealed))
        assert len(state.context) > 100_000 and state.opened_rounds  # the key, and the sums it opened


def test_a_long_lived_node_loads_its_model_when_asked_which_client_it_is(deployed, monkeypatch):
    """Under `flower join`'s executor the model loads during the secure sum's setup, not in round 1; a process that
    answers one message (Flower's own isolation) loads nothing then; a load that fails waits for training to say so."""
    import threading

    from securefed.runtime import node as node_module

    _, app, contexts = deployed
    monkeypatch.setattr(node_module, "_loaded", {})
    hello = Message(RecordDict(), dst_node_id=1000, message_type=f"query.{flower.HELLO}")
    hello.metadata.__dict__["_message_id"] = hello.object_id

    def hello_and_wait(context):
        flower.hello(hello, context)
        for thread in threading.enumerate():
            if thread.name == "securefed-warm":
                thread.join()

    hello_and_wait(contexts[1000])
    assert node_module._loaded == {}  # not long-lived: nothing loaded
    monkeypatch.setattr(node_module, "_long_lived", threading.Event())
    node_module.keep_loaded()
    hello_and_wait(contexts[1000])
    [(key, task)] = node_module._loaded.items()
    assert key[2] == str(Path(contexts[1000].node_config["data"]).resolve()) and len(task.train) > 0
    broken = Context(run_id=1, node_id=1001, state=RecordDict(), run_config=contexts[1001].run_config,
                     node_config={**contexts[1001].node_config, "data": "/nonexistent/part.tsv"})
    hello_and_wait(broken)  # answered: the failed load is not the hello's concern
    with pytest.raises(DataError):
        node_module._task(app, Node.from_node_config(broken.node_config))


def test_a_node_that_stops_answering_mid_job_is_a_dropout(deployed):
    _, app, contexts = deployed
    trained = {}

    def vanish_after_round_1(node, request):
        if isinstance(request, TrainIns):
            trained[node] = request.round
        return not (node == 1002 and trained.get(node) == 2)

    notes = Notes()
    run = flower.run_job(LoopbackGrid(contexts, vanish_after_round_1), app, notes)
    assert [(r["contributors"], r["dropped"]) for r in run.records()] == [(3, 0), (2, 1)]
    assert any("client 2 dropped out (no reply within 3 s)" in line for line in notes.lines)


def test_a_tampered_node_state_is_refused_and_the_node_drops_out(deployed):
    _, app, contexts = deployed

    def tamper_before_training(node, request):
        if node == 1001 and isinstance(request, TrainIns) and request.round == 1:
            record = contexts[node].state[flower.RECORD]
            sealed = bytearray(record[flower.STATE_KEY])
            sealed[-1] ^= 1
            record[flower.STATE_KEY] = bytes(sealed)

    notes = Notes()
    run = flower.run_job(LoopbackGrid(contexts, tamper_before_training), app, notes)
    assert [r["contributors"] for r in run.records()] == [2, 2]
    assert any("client 1 dropped out" in line and "not the one it last saved" in line for line in notes.lines)


def test_an_older_node_state_put_back_is_refused(deployed):
    """A state save that Flower lost, or an old state replayed: the node must not mask round 1 again."""
    _, app, contexts = deployed
    kept = {}

    def roll_back_after_round_1(node, request):
        record = contexts[node].state.get(flower.RECORD)
        if node == 1000 and isinstance(request, TrainIns):
            if request.round == 1:
                kept["before"] = record[flower.STATE_KEY]
            else:
                record[flower.STATE_KEY] = kept["before"]  # the state from before round 1's upload

    notes = Notes()
    run = flower.run_job(LoopbackGrid(contexts, roll_back_after_round_1), app, notes)
    assert [r["contributors"] for r in run.records()] == [3, 2]
    assert any("client 0 dropped out" in line and "not the one it last saved" in line for line in notes.lines)


def test_the_grid_makes_a_dropout_of_every_reply_it_cannot_use():
    from flwr.app import ConfigRecord

    from securefed.protocol import PlainModel, encode

    replies = {
        1: lambda m: Message(RecordDict({flower.RECORD: ConfigRecord({"wire": encode(PlainModel(
            weights=np.ones(2, np.float32))), "seconds": 0.5})}), reply_to=m),
        2: lambda m: Message(RecordDict({flower.RECORD: ConfigRecord({"wire": b"SFD junk", "seconds": 0.1})}),
                             reply_to=m),
        3: lambda m: Message(RecordDict({flower.RECORD: ConfigRecord({"wire": "text"})}), reply_to=m),
        4: lambda m: Message(Error(code=5, reason="missed heartbeats"), reply_to=m),
        5: None,  # never answers
    }

    class Grid:
        answered = {}

        def push_messages(self, messages):
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id
                if replies[msg.metadata.dst_node_id]:
                    self.answered[msg.object_id] = replies[msg.metadata.dst_node_id](msg)
            return [m.object_id for m in messages]

        def pull_messages(self, ids):
            return [self.answered.pop(i) for i in list(ids) if i in self.answered]

    grid = flower.FlowerGrid(Grid(), {cid: cid for cid in replies}, timeout=0.5)
    out = grid.exchange({cid: PlainModel(weights=np.zeros(3, np.float32)) for cid in (*replies, 6)})
    assert list(out.replies) == [1] and out.client_seconds == 0.5
    assert out.dropped[2].startswith("sent a malformed reply")
    assert out.dropped[3] == "sent a reply that is not securefed's"
    assert "stopped answering" in out.dropped[4]
    assert out.dropped[5] == "no reply within 0.5 s"
    assert out.dropped[6] == "its node is not connected"


def test_nodes_that_are_not_the_jobs_clients_are_left_out(deployed, tmp_path, tiny_model, sst2_sample):
    _, app, contexts = deployed
    contexts[1003] = Context(run_id=1, node_id=1003, state=RecordDict(), run_config=app.run_config(),
                             node_config={**contexts[1002].node_config})  # a second claim on client 2
    contexts[1004] = Context(run_id=1, node_id=1004, state=RecordDict(), run_config=app.run_config(),
                             node_config={**contexts[1002].node_config, "client": 7})
    (tmp_path / "other").mkdir()
    other = load_job(write_job(tmp_path / "other", tiny_model, *sst2_sample, federation={"rounds": 9}))
    contexts[1005] = Context(run_id=1, node_id=1005, state=RecordDict(), run_config=app.run_config(),
                             node_config={**contexts[1001].node_config, "job": other.fingerprint()})
    notes = Notes()
    nodes = flower.discover(LoopbackGrid(contexts), 3, 1.0, notes)
    assert nodes == {0: 1000, 1: 1001, 2: 1002}
    assert any("both claim client 2" in line for line in notes.lines)
    assert any("node 1004 is not a client of this job (it says client 7)" in line for line in notes.lines)
    assert any("node 1005 is not a client of this job" in line and "joined for job" in line for line in notes.lines)


def test_jobs_flower_cannot_run_yet_are_refused_up_front(tmp_path, tiny_model, sst2_sample):
    cases = {"brings its own key": {"watermark": {"keys": [str(tmp_path / "a.wmkey")] * 3}}}
    for number, (expected, sections) in enumerate(cases.items()):
        folder = tmp_path / str(number)
        folder.mkdir()
        with pytest.raises(ConfigError, match=expected):
            check_deployable(load_job(write_job(folder, tiny_model, *sst2_sample, **sections)))
    with pytest.raises(ConfigError, match="the Flower run config is not a securefed app's"):
        AppConfig.from_run_config({"job": "name = 'x'"})


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "headerless"])
def test_written_partitions_read_back_as_the_in_process_clients_data(tmp_path, sst2_sample, fmt):
    train, dev = sst2_sample
    data = {"train": str(train), "dev": str(dev), "text_field": "sentence"}
    if fmt != "tsv":
        rows = [line.split("\t") for line in train.read_text().splitlines()]
        dev_rows = [line.split("\t") for line in dev.read_text().splitlines()]
        train, dev = tmp_path / f"train.{fmt}", tmp_path / f"dev.{fmt}"
        _write_rows(train, rows, fmt)
        _write_rows(dev, dev_rows, fmt)
        data = {"train": str(train), "dev": str(dev), "text_field": "sentence"}
        if fmt == "headerless":
            data |= {"format": "csv", "header": False, "columns": ["sentence", "label"]}
    job = write_job(tmp_path, tmp_path, train, dev, data=data, partition={"method": "dirichlet", "alpha": 0.5})
    config = load_job(job)
    splits = load_splits(config.data)
    paths = write_partitions(config, tmp_path / "parts")
    expected = partition(splits.train, 3, config.partition, config.federation.seed)
    for path, rows in zip(paths, expected):
        mine = load_labelled(config.data, path, splits.label_names, "partition")
        assert mine.texts == [splits.train.texts[i] for i in rows]
        np.testing.assert_array_equal(mine.labels, splits.train.labels[rows])


def _write_rows(path, rows, fmt):
    import csv
    import json

    if fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(rows[0], r))) + "\n" for r in rows[1:]), encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows[1:] if fmt == "headerless" else rows)


def test_the_test_ca_signs_a_server_certificate_and_node_keys_flower_can_read(tmp_path):
    certs = make_certificates(tmp_path / "certs", 2, ["127.0.0.1", "superlink.example"])
    ca = load_pem_x509_certificate(certs.ca.read_bytes())
    server = load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(IPAddress)] == ["127.0.0.1"]
    assert "superlink.example" in names.get_values_for_type(__import__("cryptography").x509.DNSName)
    for i in range(2):
        private = serialization.load_ssh_private_key(certs.node_key(i).read_bytes(), None)
        public = serialization.load_ssh_public_key(certs.node_public(i).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public.public_numbers() == private.public_key().public_numbers()
        assert certs.node_key(i).stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="not an empty folder"):
        make_certificates(tmp_path / "certs", 1, ["127.0.0.1"])


def test_partitions_keep_quotes_and_refuse_what_tsv_cannot_carry(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(dump_toml({"name": "ag", "data": {"dataset": "ag_news"}, "federation": {
        "rounds": 1, "clients": 4, "local_steps": 1, "batch_size": 8, "learning_rate": 0.01}}), encoding="utf-8")
    config = load_job(job)
    splits = load_splits(config.data)
    paths = write_partitions(config, tmp_path / "parts")
    labels = label_names(config.data)
    assert labels == splits.label_names  # the deployed order is the in-process one
    quoted = 0
    for path, rows in zip(paths, partition(splits.train, 4, config.partition, config.federation.seed)):
        mine = load_labelled(config.data, path, labels, "partition")
        assert mine.texts == [splits.train.texts[i] for i in rows]
        quoted += sum('"' in text for text in mine.texts)
    assert quoted > 100  # AG News has quotes: they travel as plain text
    from securefed.data.loaders import write_table

    with pytest.raises(DataError, match="row 2 holds a tab"):
        write_table({"text": ["fine", "a\tb"], "label": ["1", "2"]}, [0, 1], tmp_path / "bad.tsv", "tsv")


@pytest.mark.slow  # a second whole job; the default tier's time budget
def test_a_generation_job_on_flower_trains_exactly_as_in_process(tmp_path, instruction_sample):
    """A causal LM with DP-SGD, SecAgg+ and each node's own watermark bits (its key made on the node): the same
    adapter and carrier scales as in-process."""
    llama = tiny_causal(tmp_path / "llama", "llama")
    train, dev = instruction_sample
    job = write_job(tmp_path, llama, train, dev, task={"kind": "generation", "max_new_tokens": 4},
                    data={"text_field": "text"}, federation={"rounds": 2, "local_steps": 2, "batch_size": 4},
                    privacy={"epsilon": 8.0}, watermark={"bits": 16, "blocks": 1, "triggers": 0})
    job, app, contexts = deploy(tmp_path, job)
    run = flower.run_job(LoopbackGrid(contexts), app, Notes())
    keys = sorted(tmp_path.glob("node-*/*/keys/client-*.wmkey"))
    assert len(keys) == 3  # each node made its own key
    local, reference = in_process(job, tmp_path / "local", keys)
    _, model = run.last_checkpoint(reference.weights.size, local.task.bundle.view.spec.digest)
    np.testing.assert_allclose(model.weights, reference.weights, rtol=0, atol=1e-6)
    assert [r["contributors"] for r in run.records()] == [3, 3]
    assert all(r["dev_rouge_l"] is not None for r in run.records())


def _digest(job):
    from securefed.job import load_task

    return load_task(load_job(job)).bundle.view.spec.digest


STAND_IN_FLWR = '''#!{python}
"""Plays `flwr` for FlowerCli.watch: `log` prints the run's lines (or fails at once), `ls` answers from a
script of statuses, one per call."""
import json, sys
from pathlib import Path
here = Path(__file__).parent
if sys.argv[1] == "log":
    if (here / "log-fails").exists():
        sys.exit(1)
    print("INFO: starting")
    print("INFO: securefed: 3 of 3 clients joined", flush=True)
    print("INFO: securefed: round 1/1: 3 clients training", flush=True)
elif sys.argv[1] == "ls":
    statuses = json.loads((here / "statuses").read_text())
    status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
    (here / "statuses").write_text(json.dumps(statuses))
    (here / "asked").open("a").write("ls\\n")
    print(json.dumps({{"runs": [{{"status": status, "status-details": "the ServerApp raised"}}]}}))
'''


@pytest.mark.parametrize("log_fails", [False, True])
def test_watching_a_run_passes_its_progress_on_and_says_how_it_ended(tmp_path, monkeypatch, log_fails):
    import sys

    from securefed.errors import SecurefedError
    from securefed.runtime import deployment

    flwr = tmp_path / "flwr"
    flwr.write_text(STAND_IN_FLWR.format(python=sys.executable))
    flwr.chmod(0o755)
    if log_fails:
        (tmp_path / "log-fails").touch()
    monkeypatch.setattr(deployment, "flower_command", lambda name: str(flwr))
    cli = deployment.FlowerCli("127.0.0.1:1", None)
    try:
        (tmp_path / "statuses").write_text('["running", "running", "finished:completed"]')
        lines: list[str] = []
        assert cli.watch(7, 120.0, lines.append) == "finished:completed"
        if log_fails:  # no progress, but the status is still asked until the run ends
            assert lines == []
        else:
            assert lines == ["3 of 3 clients joined", "round 1/1: 3 clients training"]
        assert (tmp_path / "asked").read_text().count("ls") == 3
        (tmp_path / "statuses").write_text('["finished:failed"]')
        with pytest.raises(SecurefedError, match="run 7 finished:failed: the ServerApp raised"):
            cli.watch(7, 120.0, lines.append)
        (tmp_path / "statuses").write_text('["running"]')
        with pytest.raises(SecurefedError, match="did not finish within 3 s"):
            cli.watch(7, 3.0, lines.append)
    finally:
        cli.close()


def test_the_supernode_launcher_shortens_only_the_sleeps_of_flowers_node_loop(monkeypatch):
    import time

    from flwr.supernode import start_client_internal

    from securefed.runtime.supernode import IDLE_POLL, shorten_sleeps

    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert shorten_sleeps(start_client_internal)  # this Flower's loop still sleeps through its global `time`
    start_client_internal.time.sleep(3)  # the idle wait between pulls
    start_client_internal.time.sleep(0.1)
    assert slept == [IDLE_POLL, 0.1]
    assert start_client_internal.time.monotonic is time.monotonic  # the rest of the clock is the real one
    assert time.sleep is not start_client_internal.time.sleep  # the module `time` itself is untouched
    assert not shorten_sleeps(start_client_internal)  # once only


def test_a_node_answers_one_message_at_a_time_for_a_job(tmp_path):
    """Flower's per-message processes may overlap; the node's state, sent record and ledger are read then written,
    so a second message waits for the first to finish."""
    import threading

    from securefed.rundir import RunDir
    from securefed.runtime.node import exclusive

    run = RunDir(tmp_path)
    order, inside = [], threading.Event()

    def second():
        inside.wait()
        with exclusive(run):
            order.append("second")

    other = threading.Thread(target=second)
    other.start()
    with exclusive(run):
        inside.set()
        other.join(timeout=0.5)
        assert other.is_alive()  # still waiting for the lock
        order.append("first")
    other.join(timeout=10)
    assert order == ["first", "second"]


def test_a_secure_sum_stage_is_answered_in_a_new_process_without_torch(deployed):
    """Under Flower's subprocess isolation a node answers each message in a new process: SecAgg+'s stages need no
    model, so they must not pay for importing torch; and such a process decodes FedKSeed's messages before it has
    loaded any algorithm."""
    job, app, contexts = deployed
    fedkseed = [encode(TrainIns(round=2, spec=bytes(32), model=SeedUpdate(round=1, parent=bytes(32),
                                                                          scalars=np.ones(4, np.float32)))),
                encode(SeedHistory(first=1, parent=bytes(32), scalars=np.ones((2, 4), np.float32)))]
    script = f"""
import sys
from securefed.protocol import decode, encode
for wire in {fedkseed!r}:
    decode(wire)
from securefed.runtime.deployment import AppConfig
from securefed.runtime.node import Node, answer
from securefed.secagg.secaggplus import KeyAdvert, SetupStart
reply = answer(AppConfig.from_run_config({app.run_config()!r}), Node.from_node_config({contexts[1000].node_config!r}),
               1, encode(SetupStart(first_round=1, last_round=2)), None)
assert reply.error is None, reply.error
assert isinstance(decode(reply.wire), KeyAdvert)
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
