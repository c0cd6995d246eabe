"""FedAvg through the real server, grid, codec and plaintext sum, against a numpy reference."""

from pathlib import Path

import numpy as np

from securefed.config import parse_job
from securefed.protocol import PlainModel, TrainIns, TrainRes
from securefed.rundir import RunDir
from securefed.runtime.local import LocalGrid
from securefed.secagg.plaintext import PlainSumClient, PlainSumServer
from securefed.server import Schedule, Server

D = 50
SPEC = b"x" * 32


class ScriptedClient:
    """Trains to a fixed local vector: its update is n_k·(local − global), plus n_k, into the sum."""

    def __init__(self, examples: int, local: np.ndarray, fail_in_round: int | None = None):
        self.examples, self.local, self.fail_in_round = examples, local, fail_in_round
        self.secure_sum = PlainSumClient()

    def handle(self, msg: TrainIns) -> TrainRes:
        if msg.round == self.fail_in_round:
            raise OSError(28, "No space left on device")
        vector = np.append(self.examples * (self.local - msg.model.weights), self.examples).astype(np.float32)
        return TrainRes(round=msg.round, metrics={"loss": 1.0}, upload=self.secure_sum.upload(msg.round, vector))


def make_server(tmp_path: Path, clients: dict, rounds: int = 1, cohort: int | None = None, faults=None) -> Server:
    job = parse_job({"name": "fedavg", "data": {"dataset": "sst2"},
                     "federation": {"rounds": rounds, "clients": len(clients), "local_steps": 1,
                                    "learning_rate": 0.1}}, source="test", base_dir=tmp_path)
    run = RunDir.create(job, tmp_path / "run")
    schedule = Schedule(rounds=rounds, clients=len(clients), cohort_size=cohort or len(clients), seed=0)
    return Server(schedule, SPEC, D, PlainSumServer(), LocalGrid(clients, faults), run)


def round_of(server: Server, number: int, weights: np.ndarray) -> tuple[np.ndarray, dict]:
    model, record = server.round(number, PlainModel(weights=weights))
    return model.weights, record


def test_one_round_equals_the_weighted_average(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [10, 250, 3, 77]
    locals_ = [rng.standard_normal(D).astype(np.float32) for _ in sizes]
    server = make_server(tmp_path, {i: ScriptedClient(n, v) for i, (n, v) in enumerate(zip(sizes, locals_))})
    start = rng.standard_normal(D).astype(np.float32)
    weights, record = round_of(server, 1, start)
    np.testing.assert_allclose(weights, np.average(locals_, axis=0, weights=sizes), rtol=1e-5, atol=1e-5)
    assert record["contributors"] == 4 and record["dropped"] == 0
    assert record["bytes_up"] > 4 * (D + 1) * 4 and record["bytes_down"] > 4 * D * 4


def test_a_client_that_claims_fewer_than_no_examples_cannot_amplify_the_others(tmp_path):
    """The sum hides each n_k: a client that sends −(the others' counts) + ε would divide the others' updates by ε.
    Every honest client holds an example, so a total below one per contributor aborts the round."""
    rng = np.random.default_rng(3)
    locals_ = [rng.standard_normal(D).astype(np.float32) for _ in range(3)]
    clients = {i: ScriptedClient(100, v) for i, v in enumerate(locals_)}
    clients[2].examples = -199.5  # the sum's count: 0.5, so the others' pull ×400
    server = make_server(tmp_path, clients)
    start = np.zeros(D, np.float32)
    weights, record = round_of(server, 1, start)
    assert "less than one each" in record["aborted"] and np.array_equal(weights, start)


def test_crashed_and_vanished_clients_are_dropouts_and_the_average_skips_them(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [5, 6, 7, 8]
    locals_ = [rng.standard_normal(D).astype(np.float32) for _ in sizes]
    clients = {i: ScriptedClient(n, v, fail_in_round=1 if i == 0 else None)
               for i, (n, v) in enumerate(zip(sizes, locals_))}
    server = make_server(tmp_path, clients, faults=lambda cid, msg: cid == 3)
    weights, record = round_of(server, 1, np.zeros(D, dtype=np.float32))
    np.testing.assert_allclose(weights, np.average(locals_[1:3], axis=0, weights=sizes[1:3]), rtol=1e-5, atol=1e-5)
    assert record["contributors"] == 2 and record["dropped"] == 2


def test_a_client_whose_update_is_not_finite_is_dropped(tmp_path):
    clients = {0: ScriptedClient(5, np.ones(D, dtype=np.float32)), 1: ScriptedClient(5, np.full(D, np.nan, np.float32))}
    notices = []
    server = make_server(tmp_path, clients)
    server.observer.notice = notices.append
    weights, record = round_of(server, 1, np.zeros(D, dtype=np.float32))
    assert np.array_equal(weights, np.ones(D, dtype=np.float32))
    assert record["dropped"] == 1 and any("client 1" in n and "NaN" in n for n in notices)


def test_a_round_with_no_survivors_aborts_and_keeps_the_model(tmp_path):
    clients = {i: ScriptedClient(5, np.ones(D, dtype=np.float32)) for i in range(3)}
    notices = []
    server = make_server(tmp_path, clients, faults=lambda cid, msg: True)
    server.observer.notice = notices.append
    start = np.full(D, 2.0, dtype=np.float32)
    weights, record = round_of(server, 1, start)
    assert np.array_equal(weights, start)
    assert "no client contributed" in record["aborted"]
    assert any("aborted" in n for n in notices)


def test_cohorts_are_seeded_subsets(tmp_path):
    schedule = Schedule(rounds=10, clients=20, cohort_size=5, seed=3)
    cohorts = [schedule.cohort(r) for r in range(1, 11)]
    assert all(len(set(c)) == 5 and all(0 <= x < 20 for x in c) for c in cohorts)
    assert cohorts == [Schedule(rounds=10, clients=20, cohort_size=5, seed=3).cohort(r) for r in range(1, 11)]
    assert len({tuple(c) for c in cohorts}) > 1


def test_rounds_are_committed_to_the_run_directory(tmp_path):
    rounds = 3
    clients = {i: ScriptedClient(4, np.full(D, float(i), dtype=np.float32)) for i in range(2)}
    server = make_server(tmp_path, clients, rounds=rounds)
    final = server.run(PlainModel(weights=np.zeros(D, dtype=np.float32)))
    assert [r["round"] for r in server.run_dir.records()] == list(range(1, rounds + 1))
    last, model = server.run_dir.last_checkpoint(D, SPEC)
    assert last == rounds and np.array_equal(model.weights, final.weights)
