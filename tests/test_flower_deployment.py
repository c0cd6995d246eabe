"""The job across real Flower processes on 127.0.0.1: a SuperLink and three SuperNodes, TLS and node
authentication, hardened SecAgg+ (each node signing with its own identity key) and DP, each node's messages
answered by its `flower join` executor. Slow tier."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from conftest import write_job
from safetensors.numpy import load_file

pytest.importorskip("flwr")

from securefed.config import load_job  # noqa: E402
from securefed.protocol import TrainIns  # noqa: E402
from securefed.runtime.deployment import Loopback  # noqa: E402
from securefed.runtime.local import execute, prepare  # noqa: E402
from securefed.secagg.identity import generate  # noqa: E402

pytestmark = pytest.mark.slow
SECRET = "5eed" * 16  # one DP secret for every party, so that the in-process run can match
CLIENTS = 3
RUN_SECONDS = 1500


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model, sst2_sample):
    """A running SuperLink with TLS and node authentication, a test CA with four node keys, and a hardened job."""
    root = tmp_path_factory.mktemp("flower")
    deployment = Loopback(root)
    generate(root / "identities", CLIENTS)
    try:
        deployment.job = write_job(root, tiny_model, *sst2_sample, federation={"rounds": 2, "clients": CLIENTS},
                                   privacy={"epsilon": 8.0, "max_grad_norm": 1.0},
                                   secagg={"mode": "secaggplus", "identities": str(root / "identities")})
        deployment.serve(nodes=CLIENTS + 1)
        yield deployment
    finally:
        deployment.stop_all()


def test_a_node_with_an_unregistered_key_is_refused(federation, tmp_path):
    data = load_job(federation.job).data.train
    rogue = federation.join("rogue", federation.job, key=CLIENTS, client=0, data=data, folder=tmp_path / "rogue",
                            identity_key=federation.root / "identities" / "client-0.key")
    try:
        rogue.wait(timeout=90)
    except Exception:
        federation.stop("rogue")
        pytest.fail("a SuperNode with an unregistered key was not refused within 90 s")
    log = federation.log("rogue")
    assert rogue.returncode != 0 and "-m securefed.runtime.supernode" in log  # the SuperNode started; Flower refused it
    assert "2004" in log or "activate" in log.lower(), log[-2000:]


def test_a_flower_deployment_gives_the_in_process_result(federation, tmp_path):
    progress = []
    run_dir = federation.run_job(federation.job, RUN_SECONDS, secrets={"dp": SECRET}, on_line=progress.append)
    # `flower run` shows the ServerApp's progress as it goes, streamed from Flower's log
    assert any("3 of 3 clients joined" in line for line in progress), progress
    assert any("round 2/2: 3 clients training" in line for line in progress), progress
    prepared = prepare(load_job(federation.job), out=tmp_path / "local")
    (tmp_path / "local" / "secrets").mkdir(mode=0o700)
    (tmp_path / "local" / "secrets" / "dp").write_text(SECRET + "\n", encoding="ascii")
    reference = execute(prepared).weights
    deployed = load_file(str(run_dir / "checkpoints" / "round-00002.safetensors"))["weights"]
    np.testing.assert_allclose(deployed, reference, rtol=0, atol=1e-6)
    assert (run_dir / "model" / "adapter_config.json").is_file()
    travelled = load_job(federation.root / "app" / "job.toml").secagg  # the public keys, not the key folder
    assert travelled.hardened and travelled.identities is None and len(travelled.public_keys) == CLIENTS
    assert "hardened SecAgg+" in (run_dir / "report.md").read_text()
    for cid in range(CLIENTS):  # each organisation's ledger is on its own node
        ledgers = list((federation.root / "nodes" / f"client-{cid}").glob("*/ledger/client-*.jsonl"))
        assert [p.name for p in ledgers] == [f"client-{cid}.jsonl"]
        # every message answered in the node's own process, the model loaded once; Flower started no ClientApp
        log = federation.log(f"node-{cid}")
        assert log.count("securefed: answered") >= 1 + 2 * 2 and log.count(" loaded ") == 1, log[-3000:]
        assert "flwr-clientapp" not in log
        assert not list((federation.root / "nodes" / f"client-{cid}").glob("superexec-*.secret"))  # gone with it


def test_a_node_killed_mid_round_is_a_dropout_and_the_job_finishes(federation, tmp_path):
    config = load_job(federation.job)
    job = write_job(tmp_path, config.model.name, config.data.train, config.data.dev,
                    federation={"rounds": 3, "clients": CLIENTS}, privacy={"epsilon": 8.0, "max_grad_norm": 1.0})
    federation.securefed_cli("partition", str(job), "--out", str(tmp_path / "parts"))
    nodes = []
    for cid in range(CLIENTS):
        federation.register(cid)
        nodes.append(f"node-{cid}-killed-run")
        federation.join(nodes[-1], job, cid, cid, tmp_path / "parts" / f"client-{cid}.tsv", tmp_path / f"n{cid}")
    try:
        federation.securefed_cli("flower", "app", str(job), "--out", str(tmp_path / "app"), "--run-dir",
                                 str(tmp_path / "run"), "--reply-timeout", "300")
        run = federation.run(tmp_path / "app", RUN_SECONDS)
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + RUN_SECONDS
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # round 1 committed: round 2 is on
            if run.poll() is not None:
                pytest.fail(f"the run ended before round 1 finished: {run.stdout.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("round 1 did not finish in time")
            time.sleep(0.5)
        os.killpg(federation.processes[nodes[2]].pid, signal.SIGKILL)
        federation.finish(run, RUN_SECONDS + 60)
    finally:
        for name in nodes:
            federation.stop(name)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    # killed within a second of round 1's commit, node 2 has next to no chance to upload for round 2
    assert records[0]["contributors"] == 3 and records[1]["contributors"] in (2, 3)
    assert records[2]["contributors"] == 2 and records[1]["dropped"] + records[2]["dropped"] >= 1


def test_a_signed_ckks_job_on_flower_leaves_each_node_the_in_process_model(federation, tmp_path):
    """CKKS with a signed key exchange on real Flower processes (TLS, node authentication): the server never
    holds the model in clear; each node opens the last sum and keeps the model the in-process run writes."""
    config = load_job(federation.job)
    job = write_job(tmp_path, config.model.name, config.data.train, config.data.dev,
                    federation={"rounds": 2, "clients": CLIENTS}, privacy={"epsilon": 8.0, "max_grad_norm": 1.0},
                    secagg={"mode": "ckks", "identities": str(federation.root / "identities")})
    deployment = Loopback(tmp_path / "flower")
    try:
        run_dir = deployment.run_job(job, RUN_SECONDS, secrets={"dp": SECRET})
    finally:
        deployment.stop_all()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["contributors"] for r in records] == [CLIENTS, CLIENTS] and not any("aborted" in r for r in records)
    assert not (run_dir / "model").exists()
    prepared = prepare(load_job(job), out=tmp_path / "local")
    (tmp_path / "local" / "secrets").mkdir(mode=0o700)
    (tmp_path / "local" / "secrets" / "dp").write_text(SECRET + "\n", encoding="ascii")
    execute(prepared)
    reference = load_file(str(tmp_path / "local" / "model" / "adapter_model.safetensors"))
    for cid in range(CLIENTS):
        [kept] = (tmp_path / "flower" / "nodes" / f"client-{cid}").glob("*/model/adapter_model.safetensors")
        kept = load_file(str(kept))
        for name in reference:  # CKKS decrypts with noise of about 1e-8
            np.testing.assert_allclose(kept[name], reference[name], rtol=0, atol=1e-5)


def test_fedkseed_on_flower_takes_in_a_late_node_and_gives_the_in_process_history(federation, tmp_path):
    """FedKSeed with DP-ZO through hardened SecAgg+ on real Flower processes: the K-vector each way, each node's
    replica on its own disk, and the history (so the model) of the in-process run, bit for bit. Client 2's node
    starts only once round 1 has: the server finds it before a later round, runs the setup again, catches it up
    if it missed more than the last round, and it trains."""
    config = load_job(federation.job)
    seeds, rounds = 64, 8  # a node took 50 s to come online here (round 5), a round about 12 s
    job = write_job(tmp_path, config.model.name, config.data.train, config.data.dev, peft=None,
                    algorithm={"name": "fedkseed", "seeds": seeds, "perturbation": 1e-3},
                    federation={"rounds": rounds, "clients": CLIENTS, "local_steps": 4, "learning_rate": 1e-3},
                    secagg={"mode": "secaggplus", "clip": 2.0**24, "identities": str(federation.root / "identities")},
                    privacy={"epsilon": 8.0, "max_grad_norm": 2.0})
    pinned = {"dp": SECRET, "fedkseed": SECRET}
    deployment = Loopback(tmp_path / "flower")
    progress = []
    try:
        run_dir = deployment.run_job(job, RUN_SECONDS, secrets=pinned, on_line=progress.append, late=(2,))
    finally:
        deployment.stop_all()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [joined] = [int(line.rsplit(" ", 1)[1]) for line in progress if "clients [2] joined before round" in line]
    assert 2 <= joined <= rounds, progress  # how soon its node came online is up to the machine
    assert [r["contributors"] for r in records] == [CLIENTS - 1] * (joined - 1) + [CLIENTS] * (rounds - joined + 1)
    assert records[joined - 1]["setup"]["dropped"] == 0  # the setup again, with all three
    if joined > 2:  # the rounds before the one whose update its TrainIns carries
        assert records[joined - 1]["catch_up"]["caught_up"] == 1
    # the last round's scalars and hardened SecAgg+'s signed lists (766 B a client measured), not the model (4 MB)
    assert seeds * 4 < records[-1]["bytes_down"] / CLIENTS < seeds * 4 + 2000
    prepared = prepare(load_job(job), out=tmp_path / "local")
    (tmp_path / "local" / "secrets").mkdir(mode=0o700)
    for name, secret in pinned.items():
        (tmp_path / "local" / "secrets" / name).write_text(secret + "\n", encoding="ascii")
    reference = execute(prepared, faults=lambda cid, msg: cid == 2 and isinstance(msg, TrainIns) and msg.round < joined)
    last = f"round-{rounds:05d}.safetensors"
    deployed = load_file(str(run_dir / "checkpoints" / last))
    local = load_file(str(reference.run.path / "checkpoints" / last))
    assert set(deployed) == set(local)
    for name in local:
        np.testing.assert_array_equal(deployed[name], local[name])
    assert (run_dir / "model" / "config.json").is_file()  # a whole model: the server replays the history
    for cid in range(CLIENTS):  # the rounds taken before the last, on each node's own disk
        [replica] = (tmp_path / "flower" / "nodes" / f"client-{cid}").glob("*/secrets/replica-client-*")
        assert replica.stat().st_size == seeds * 4 * (rounds - 1)
