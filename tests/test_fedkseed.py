"""FedKSeed: zeroth-order steps along shared seeds, a K-vector each way through the secure sum, replicas that every
party replays alike, DP-ZO; and the attacks: a server that lies about the history, replays a round or forges a
catch-up, a client that sends huge scalars."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_job

from securefed import job as jobs
from securefed.algorithms.fedkseed import SeedClient, SeedHistory, SeedUpdate
from securefed.algorithms.replica import Replica, WeightStore
from securefed.algorithms.seeds import CHUNK, SeedPool, genesis
from securefed.config import PrivacyConfig, load_job
from securefed.errors import ConfigError, ProtocolError, UpdateRefused
from securefed.privacy.audit import audit_ledgers, witnessed_entries
from securefed.privacy.dpzo import DPZO
from securefed.protocol import TrainIns
from securefed.rundir import RunDir
from securefed.runtime import local
from securefed.runtime.local import prepare, run
from securefed.seeding import stream

SEEDS = 64


def fedkseed_job(folder, model, sample, **sections):
    sections = {"peft": None, "algorithm": {"name": "fedkseed", "seeds": SEEDS, "perturbation": 1e-3},
                "federation": {"rounds": 3, "clients": 3, "local_steps": 4, "learning_rate": 1e-3},
                "secagg": {"mode": "secaggplus", "clip": 2.0**24}, **sections}
    return write_job(folder, model, *sample, **sections)


def replay(task, history: np.ndarray) -> np.ndarray:
    """The weights a history gives, replayed here from the initial model with a pool of our own."""
    config = task.config
    pool = SeedPool(config.federation.seed, config.algorithm.seeds, task.bundle.view.size)
    weights = torch.from_numpy(jobs.load_task(config).bundle.view.get())
    for round, row in enumerate(history, start=1):
        pool.replay(weights, row, config.federation.learning_rate_at(round))
    return weights.numpy()


# ---------------------------------------------------------------- the seed pool


def test_every_party_draws_the_same_perturbation_from_a_seed_and_seeds_differ():
    size = CHUNK * 2 + 12345  # across chunk boundaries
    a, b = SeedPool(7, 16, size), SeedPool(7, 16, size)
    z = [torch.zeros(size) for _ in range(3)]
    a.axpy(z[0], 5, 1.0)
    b.axpy(z[1], 5, 1.0)
    a.axpy(z[2], 6, 1.0)
    assert torch.equal(z[0], z[1])
    assert set(z[0].unique().tolist()) == {-1.0, 1.0} and abs(float(z[0].mean())) < 0.01  # Rademacher
    assert abs(float(torch.corrcoef(torch.stack([z[0], z[2]]))[0, 1])) < 0.01
    other_job = torch.zeros(size)
    SeedPool(8, 16, size).axpy(other_job, 5, 1.0)
    assert not torch.equal(z[0], other_job)


REPLAY = """
import hashlib, sys, torch
from securefed.algorithms.seeds import SeedPool, CHUNK
pool = SeedPool(11, 64, CHUNK + 4099)
weights = torch.full((CHUNK + 4099,), 0.1)
for seed, scale in ((3, 1e-3), (63, -2.5e-4), (17, 7e-5)):
    pool.axpy(weights, seed, scale)
print(hashlib.sha256(weights.numpy().tobytes()).hexdigest())
"""


def test_every_cpu_replays_the_same_weights_bit_for_bit():
    """z is drawn from bits by exact arithmetic: torch's own Gaussian differs between its AVX2 and default
    kernels, ours may not."""
    digests = {subprocess.run([sys.executable, "-c", REPLAY], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                              capture_output=True, text=True, check=True).stdout for capability in ("default", "avx2")}
    assert len(digests) == 1, digests


def test_the_two_point_scalar_is_the_directional_derivative(tmp_path, tiny_model, sst2_sample):
    """(L(w+εz) − L(w−εz)) / 2ε against autograd's ∇L·z, on the tiny model."""
    task = jobs.load_task(load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample)))
    model, view = task.bundle.model, task.bundle.view
    model.eval()
    batch = task.collator.batch(task.train, np.arange(8))
    pool = SeedPool(0, 4, view.size)
    z = torch.zeros(view.size)
    pool.axpy(z, 3, 1.0)
    model.zero_grad()
    task.kind.loss(model, batch).backward()
    exact = float(torch.cat([p.grad.reshape(-1) for p in view.parameters]) @ z)
    with torch.no_grad():
        pool.axpy(view.buffer, 3, 1e-3)
        plus = float(task.kind.example_losses(model, batch).double().mean())
        pool.axpy(view.buffer, 3, -2e-3)
        minus = float(task.kind.example_losses(model, batch).double().mean())
    assert (plus - minus) / 2e-3 == pytest.approx(exact, rel=0.02)


def test_pro_favours_seeds_whose_past_scalars_were_large():
    pool = SeedPool(0, 8, 10)
    assert np.allclose(pool.probabilities(np.zeros((0, 8))), 1 / 8)
    history = np.zeros((2, 8))
    history[:, 3] = 5.0
    p = pool.probabilities(history)
    assert p.argmax() == 3 and p.min() > 0 and p.sum() == pytest.approx(1)


# ---------------------------------------------------------------- whole jobs


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, tiny_model, sst2_sample):
    folder = tmp_path_factory.mktemp("fedkseed")
    config = load_job(fedkseed_job(folder, tiny_model, sst2_sample))
    return config, run(config, out=folder / "run")


def test_a_job_sends_a_k_vector_each_way_and_every_replica_replays_to_the_servers_model(secure_run):
    config, result = secure_run
    records = result.records
    assert [r["contributors"] for r in records] == [3, 3, 3]
    for r in records[1:]:  # rounds 2 and 3 send round 1's and 2's scalars; round 1 sends none
        assert SEEDS * 4 < r["bytes_down"] / 3 < SEEDS * 4 + 400
    for r in records:
        assert SEEDS * 4 < r["bytes_up"] / 3 < SEEDS * 4 + 1500  # the masked K-vector and the unmasking
        assert "catch_up" not in r and r["encoding"]["clipped"] == 0
    last = RunDir(result.run.path).last_checkpoint(0, jobs.load_task(config).bundle.view.spec.digest)
    history = last[1].scalars
    assert history.shape == (3, SEEDS) and np.count_nonzero(history) > 0
    task = jobs.load_task(config)
    assert np.array_equal(result.weights, replay(task, history))  # bit-exact, from the scalars alone
    assert not np.array_equal(result.weights, task.bundle.view.get())
    saved = jobs.evaluate_saved(result.run, config)  # a whole model, loaded as a user would
    assert saved.metrics["accuracy"] == pytest.approx(records[-1]["dev_accuracy"])


def test_a_resumed_job_rebuilds_the_same_model_bit_exactly(secure_run, tmp_path):
    config, result = secure_run
    copy = tmp_path / "run"
    shutil.copytree(result.run.path, copy)
    (copy / "checkpoints" / "round-00003.safetensors").unlink()
    for c in range(3):  # as if the job stopped before any client sent its round 3
        (copy / "secrets" / f"sent-rounds-client-{c}").unlink(missing_ok=True)
    resumed = run(config, resume=copy)
    assert resumed.resumed_from == 2
    assert np.array_equal(resumed.weights, result.weights)
    # the fresh clients of the resumed process took the missing round from a catch-up, counted apart
    assert resumed.records[2]["catch_up"]["caught_up"] == 3


def test_a_client_that_missed_rounds_catches_up_and_trains_again(tmp_path, tiny_model, sst2_sample):
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample, federation={"rounds": 4, "clients": 3}))
    absent = lambda cid, msg: cid == 2 and isinstance(msg, TrainIns) and msg.round in (1, 2)  # noqa: E731
    result = run(config, out=tmp_path / "run", faults=absent)
    records = result.records
    assert [r["contributors"] for r in records] == [2, 2, 3, 3]
    assert records[2]["catch_up"] == {"clients": 1, "caught_up": 1, "bytes_down": records[2]["catch_up"]
                                      ["bytes_down"], "bytes_up": records[2]["catch_up"]["bytes_up"]}
    assert SEEDS * 4 < records[2]["catch_up"]["bytes_down"] < SEEDS * 4 + 400  # round 1's scalars
    assert SEEDS * 4 < records[2]["bytes_down"] / 3 < SEEDS * 4 + 400  # the round's own bytes exclude it


# ---------------------------------------------------------------- a lying server


@pytest.fixture()
def party(tmp_path, tiny_model, sst2_sample):
    """One client of a FedKSeed job, and a history of two rounds that the honest server would hold."""
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample, secagg={"mode": "none", "insecure": True}))
    prepared = prepare(config, out=tmp_path / "run")
    task = prepared.task
    client = jobs.make_client(task, 0, jobs.client_datasets(task)[0], run=prepared.run_dir)
    rows = stream(0, "test").standard_normal((2, SEEDS)).astype(np.float32)
    return task, client, rows


def ins(task, round, update):
    return TrainIns(round=round, spec=task.bundle.view.spec.digest, model=update)


def test_a_client_refuses_a_history_that_changes_what_it_was_told(party):
    task, client, rows = party
    origin = client.replica.heads[0]
    client._start(ins(task, 1, SeedUpdate(round=0, parent=origin, scalars=np.zeros(0, np.float32))))
    client._start(ins(task, 2, SeedUpdate(round=1, parent=origin, scalars=rows[0])))
    told = client.replica.head
    forged = rows[0].copy()
    forged[0] += 1.0  # the server told this client one round 1 and now names another
    lie = Replica(client.replica.store, SEEDS)
    lie.take(1, origin, forged[None])
    with pytest.raises(ProtocolError, match="does not follow"):
        client._start(ins(task, 3, SeedUpdate(round=2, parent=lie.head, scalars=rows[1])))
    with pytest.raises(ProtocolError, match="differs"):
        client.handle(SeedHistory(first=1, parent=origin, scalars=np.stack([forged, rows[1]])))
    assert client.replica.round == 1 and client.replica.head == told  # nothing taken from the lies


def test_a_client_refuses_a_replayed_skipped_or_malformed_round(party):
    task, client, rows = party
    origin = client.replica.heads[0]
    client._start(ins(task, 2, SeedUpdate(round=1, parent=origin, scalars=rows[0])))
    with pytest.raises(ProtocolError, match="round 1's scalars with round 3"):
        client._start(ins(task, 3, SeedUpdate(round=1, parent=origin, scalars=rows[0])))  # round 1 again
    client._start(ins(task, 2, SeedUpdate(round=1, parent=origin, scalars=rows[0])))  # sent again: the same replica
    client.handle(SeedHistory(first=1, parent=origin, scalars=rows))
    with pytest.raises(ProtocolError, match="holds round 2, past"):
        client._start(ins(task, 2, SeedUpdate(round=1, parent=origin, scalars=rows[0])))  # an old round replayed
    with pytest.raises(ProtocolError, match="catch-up"):
        client._start(ins(task, 5, SeedUpdate(round=4, parent=origin, scalars=rows[1])))  # round 3 skipped
    head = client.replica.head
    for bad in (np.full(SEEDS, np.nan, np.float32), np.zeros(SEEDS + 1, np.float32)):
        with pytest.raises(ProtocolError, match="finite rows"):
            client._start(ins(task, 4, SeedUpdate(round=3, parent=head, scalars=bad)))
    with pytest.raises(ProtocolError, match="SeedUpdate"):
        client.handle(ins(task, 3, SeedHistory(first=1, parent=origin, scalars=rows)))


def test_hardened_secagg_stops_a_server_that_tells_clients_different_rounds(tmp_path, tiny_model, sst2_sample):
    """SecAgg+'s consistency check signs what each client was told: a round in which one client was sent a forged
    last round aborts, and that client, told two histories, refuses the server's from then on."""
    identities = tmp_path / "ids"
    subprocess.run([sys.executable, "-m", "securefed.cli", "secagg", "identities", "--clients", "4", "--out",
                    str(identities)], check=True, capture_output=True)
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample, federation={"clients": 4, "rounds": 3},
                                   secagg={"mode": "secaggplus", "clip": 2.0**24, "identities": str(identities)}))
    prepared = prepare(config, out=tmp_path / "run")
    original = local.LocalGrid.exchange

    def lying(self, requests):
        forged = {}
        for cid, msg in requests.items():
            if isinstance(msg, TrainIns) and msg.round == 2 and cid == 0:
                scalars = msg.model.scalars + 1.0
                msg = TrainIns(round=2, spec=msg.spec, model=SeedUpdate(round=1, parent=msg.model.parent,
                                                                        scalars=scalars), bound=msg.bound,
                               examples=msg.examples)
            forged[cid] = msg
        return original(self, forged)

    local.LocalGrid.exchange = lying
    try:
        result = local.execute(prepared)
    finally:
        local.LocalGrid.exchange = original
    forged, after = result.records[1:]
    assert forged["contributors"] == 0 and "client 0 uploaded but did not sign" in forged["aborted"]
    assert after["contributors"] == 3 and after["dropped"] == 1


# ---------------------------------------------------------------- a malicious client


ATTACKS = {  # what client 0 puts into the secure sum in place of its update, through the honest encoder
    # every seed at the clip: more seeds than all the round's steps could touch
    "every seed": lambda vector, others: np.append(np.full(SEEDS, 2.0**24), vector[-1]),
    # a negative count, so that Σ n_k is about 1 and every honest scalar is amplified thousands of times
    "negative count": lambda vector, others: np.append(vector[:-1], 1.0 - others),
    # the same, a little less greedy: Σ n_k = 3, one per contributor
    "negative count, one each": lambda vector, others: np.append(vector[:-1] * 0, 3.0 - others),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_poisoning_client_is_refused_by_the_sums_plausibility(tmp_path, tiny_model, sst2_sample, monkeypatch,
                                                                attack):
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample, federation={"rounds": 2}))
    original = SeedClient._contribution

    def poisoned(self):
        vector = original(self)
        others = float(sum(len(d) for i, d in enumerate(jobs.client_datasets(jobs.load_task(config))) if i != 0))
        return ATTACKS[attack](vector, others).astype(np.float32) if self.cid == 0 and self._round == 1 else vector

    monkeypatch.setattr(SeedClient, "_contribution", poisoned)
    monkeypatch.setattr(SeedClient, "_round", 0, raising=False)
    train = SeedClient._train_locally

    def remember(self, round, share=None):
        self._round = round
        return train(self, round, share)

    monkeypatch.setattr(SeedClient, "_train_locally", remember)
    result = run(config, out=tmp_path / "run")
    poisoned_round, after = result.records
    assert after["contributors"] == 3 and "aborted" not in after
    history = RunDir(result.run.path).last_checkpoint(0, jobs.load_task(config).bundle.view.spec.digest)[1].scalars
    if attack == "negative count, one each":  # passes for a sum honest clients could send: bounded as theirs are
        assert poisoned_round["contributors"] == 3
        assert np.abs(history[0]).max() <= 4 * 100.0 * 1.001 and np.count_nonzero(history[0]) <= 3 * 4
    else:
        assert poisoned_round["contributors"] == 0 and "aborted" in poisoned_round, poisoned_round
        assert not history[0].any() and history[1].any()  # the poisoned round left the model as it was


def test_a_client_never_sends_a_non_finite_update(party, monkeypatch):
    task, client, rows = party

    def diverged(round, share=None):
        client._scalars = np.full(SEEDS, np.nan)
        return [1.0]

    monkeypatch.setattr(client, "_train_locally", diverged)
    origin = client.replica.heads[0]
    with pytest.raises(UpdateRefused, match="NaN"):
        client.handle(ins(task, 1, SeedUpdate(round=0, parent=origin, scalars=np.zeros(0, np.float32))))


# ---------------------------------------------------------------- DP-ZO


def test_dp_zo_bounds_any_one_examples_pull_on_a_step(party, tmp_path):
    task, client, rows = party
    private = task.config.model_copy(update={"privacy": PrivacyConfig(mechanism="dp-zo", epsilon=8.0,
                                                                         max_grad_norm=0.5)})
    wrapper = DPZO.for_client(private, None, 0, 100, 3, RunDir(tmp_path / "run"))
    differences = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    outlier = torch.cat([differences, torch.tensor([1e9], dtype=torch.float64)])
    base = wrapper.noisy_mean(differences, wrapper.noise(1))
    pulled = wrapper.noisy_mean(outlier, wrapper.noise(1))
    assert pulled - base == pytest.approx(0.5 / wrapper.settings.batch_size)  # C over the expected batch, no more
    assert wrapper.noisy_mean(differences, wrapper.noise(2)) != base  # noise, fresh each round


def test_a_dp_zo_step_releases_the_clipped_noisy_mean_it_claims(tmp_path, tiny_model, sst2_sample):
    """One private step recomputed from the client's own streams: Poisson batch, clip, noise, expected batch."""
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample, privacy={"epsilon": 8.0, "max_grad_norm": 0.5},
                                   federation={"local_steps": 1, "batch_size": 16}))
    prepared = prepare(config, out=tmp_path / "run")
    task = prepared.task
    client = jobs.make_client(task, 0, jobs.client_datasets(task)[0], run=prepared.run_dir)
    client._start(ins(task, 1, SeedUpdate(round=0, parent=client.replica.heads[0], scalars=np.zeros(0, np.float32))))
    start = task.bundle.view.get()
    client._train_locally(1)
    (seed,) = np.flatnonzero(client._scalars)
    wrapper, view = client.wrapper, task.bundle.view
    (indices,) = wrapper.batches(1, client.examples, 1)
    view.set(start)
    with torch.no_grad():
        client.pool.axpy(view.buffer, int(seed), 1e-3)
        plus = client._losses(indices)
        client.pool.axpy(view.buffer, int(seed), -2e-3)
        minus = client._losses(indices)
    clipped = float(((plus - minus) / 2e-3).clamp(-0.5, 0.5).sum())
    noise = float(wrapper.noise(1).normal(1)[0]) * wrapper.sigma * 0.5
    assert abs(noise) > 1e-3 and wrapper.sigma > 0.3
    assert client._scalars[seed] == pytest.approx((clipped + noise) / 16, rel=1e-6)


def test_a_dp_zo_job_keeps_its_ledger_within_the_budget(tmp_path, tiny_model, sst2_sample):
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample,
                                   privacy={"epsilon": 4.0, "max_grad_norm": 2.0},
                                   federation={"rounds": 2, "batch_size": 16}))
    assert config.privacy.mechanism == "dp-zo"
    result = run(config, out=tmp_path / "run")
    assert [r["contributors"] for r in result.records] == [3, 3]
    rows = audit_ledgers(result.run.ledger_dir, config.job_id, 3, witnessed_entries(result.records))
    assert [r.rounds for r in rows] == [2, 2, 2]
    assert all(0 < r.epsilon_prv <= 4.0 for r in rows)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("change", "needle"), [
    ({"algorithm": {"name": "fedkseed", "seeds": 2**21}}, "algorithm.seeds: 2097152 is outside"),
    ({"algorithm": {"name": "fedkseed", "perturbation": 0.0}}, "algorithm.perturbation: ε must be positive"),
    ({"algorithm": {"name": "fedkseed", "perturbation": -1e-3}}, "algorithm.perturbation: ε must be positive"),
    ({"peft": {"method": "lora"}}, "peft: fedkseed tunes every parameter"),
    ({"privacy": {"epsilon": 8.0, "mechanism": "dp-sgd"}}, "privacy.mechanism: dp-sgd does not fit"),
    ({"secagg": {"mode": "ckks"}}, "secagg: fedkseed runs through secaggplus"),
    ({"watermark": {"bits": 64}}, "watermark: fedkseed cannot write a watermark"),
    ({"federation": {"optimizer": "sgd"}}, "federation.optimizer: fedkseed takes plain zeroth-order steps"),
])
def test_bad_fedkseed_jobs_are_one_line(tmp_path, tiny_model, sst2_sample, change, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample, **change))


def test_a_model_past_the_replica_budget_is_refused_before_anything_is_written(tmp_path, tiny_model, sst2_sample):
    config = load_job(fedkseed_job(tmp_path, tiny_model, sst2_sample,
                                   algorithm={"name": "fedkseed", "seeds": SEEDS, "max_replica_bytes": 1000}))
    with pytest.raises(ConfigError, match="max_replica_bytes: the model's replica takes"):
        prepare(config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_weight_store_rebuilds_any_round_from_the_initial_model(tmp_path):
    pool = SeedPool(3, 8, 1000)
    store = WeightStore(pool, np.zeros(1000, np.float32), genesis(b"s" * 32, 8), lambda r: 0.1, tmp_path)
    rows = stream(1, "rows").standard_normal((5, 8)).astype(np.float32)
    a, b = Replica(store, 8), Replica(store, 8)
    a.take(1, a.heads[0], rows)
    first, again = np.empty(1000, np.float32), np.empty(1000, np.float32)
    a.load(first)
    b.take(1, b.heads[0], rows[:2])
    b.load(again)
    b.take(3, b.heads[2], rows[2:])
    for path in store.folder.glob("*.f32"):  # everything but the initial model lost: rebuilt from the scalars
        if path.name != f"{store.origin.hex()}.f32":
            path.unlink()
    b.load(again)
    assert np.array_equal(again, first) and len(list(store.folder.glob("*.f32"))) == 2
    dead = tmp_path / "replicas-of-a-killed-process"
    dead.mkdir()
    (dead / "lock").touch()  # its lock died with it
    other = WeightStore(pool, np.zeros(1000, np.float32), genesis(b"s" * 32, 8), lambda r: 0.1, tmp_path)
    assert store.folder.exists() and not dead.exists()  # a live store's folder is no orphan; a dead one's is
    folder = store.folder
    del store, a, b, other
    import gc

    gc.collect()
    assert not folder.exists()  # the weight files go with the store


def test_a_clients_replica_outlives_its_process_and_a_round_cut_short_on_disk_is_not_taken(party):
    """A node may answer each message in a fresh process, or restart: its client takes up the replica its disk
    holds, and rebuilds the same weights from the initial model."""
    task, client, rows = party
    origin, file = client.replica.heads[0], client.replica.file
    assert file is not None and file.parent.name == "secrets"  # the client's own, never the server's
    client.handle(SeedHistory(first=1, parent=origin, scalars=rows))
    held = np.empty(task.bundle.view.size, np.float32)
    client.replica.load(held)
    with file.open("ab") as fh:  # killed while writing round 3
        fh.write(b"\x01" * 10)
    fresh = WeightStore(client.pool, task.bundle.view.get(), origin, task.config.federation.learning_rate_at,
                        file.parent.parent / "other-process")
    again = Replica(fresh, SEEDS, file)
    assert again.round == 2 and again.head == client.replica.head and file.stat().st_size == 2 * SEEDS * 4
    rebuilt = np.empty_like(held)
    again.load(rebuilt)
    assert np.array_equal(rebuilt, held)
    again.take(3, again.head, rows[:1])
    assert Replica(fresh, SEEDS, file).round == 3  # appended after the cut
    file.write_bytes(np.full((1, SEEDS), np.nan, "<f4").tobytes())
    with pytest.raises(ProtocolError, match="replica is damaged"):
        Replica(fresh, SEEDS, file)


def test_the_seeds_a_client_steps_along_come_from_its_secret_not_the_job_seed(party, tmp_path):
    """The job seed is the server's too: seeds drawn from it would tell the server which client sent each entry of
    a sparse sum, and so undo the secure sum."""
    task, client, rows = party
    data = jobs.client_datasets(task)[0]
    chosen = []
    for name in ("a", "b"):
        other = jobs.make_client(task, 0, data, run=RunDir.create(task.config, tmp_path / name))
        other._start(ins(task, 1, SeedUpdate(round=0, parent=other.replica.heads[0],
                                             scalars=np.zeros(0, np.float32))))
        other._train_locally(1)
        chosen.append(set(np.flatnonzero(other._scalars)))
    assert chosen[0] != chosen[1]
