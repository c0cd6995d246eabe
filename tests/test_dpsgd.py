"""DP-SGD inside whole jobs: the budget holds, the ledgers audit, crashes neither re-spend nor exceed it."""

import numpy as np
import pytest
import torch
from conftest import write_job

from securefed.config import load_job
from securefed.errors import ConfigError, ModelError
from securefed.privacy.accounting import Spend
from securefed.privacy.audit import audit_ledgers
from securefed.privacy.ledger import Ledger, ledger_file
from securefed.runtime.local import prepare, run
from securefed.secagg.secaggplus import UnmaskRequest

PRIVACY = {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}


class Crash(BaseException):
    """The process dying: not an Exception, so nothing in securefed may swallow it."""


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, tiny_model, sst2_sample):
    return write_job(tmp_path_factory.mktemp("dp"), tiny_model, *sst2_sample, privacy=PRIVACY)


@pytest.fixture(scope="module")
def finished(job_file, tmp_path_factory):
    return run(load_job(job_file), out=tmp_path_factory.mktemp("dp-runs") / "full")


def job_id(job_file) -> bytes:
    return bytes.fromhex(load_job(job_file).fingerprint())


def test_every_client_spends_exactly_its_plan_and_the_ledgers_audit(job_file, finished):
    rows = audit_ledgers(finished.run.ledger_dir, job_id(job_file), 3)
    assert [r.rounds for r in rows] == [3, 3, 3] and all(r.steps == 9 for r in rows)
    assert all(2.9 < r.epsilon_prv <= 3.0 < r.epsilon_rdp for r in rows)  # σ calibrated to the budget
    epsilons = [r["epsilon"] for r in finished.records]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 3.0
    assert all(r["contributors"] == 3 for r in finished.records)
    secret = finished.run.path / "secrets" / "dp"
    assert secret.stat().st_mode & 0o077 == 0  # the clients' sampling and noise seed: not for the server


def test_a_ledger_cut_short_no_longer_matches_what_the_server_saw(job_file, finished, tmp_path):
    import shutil

    from securefed.privacy.audit import witnessed_entries
    from securefed.privacy.ledger import LedgerError

    seen = witnessed_entries(finished.records)
    assert seen == {0: 3, 1: 3, 2: 3}
    copy = shutil.copytree(finished.run.ledger_dir, tmp_path / "ledger")
    audit_ledgers(copy, job_id(job_file), 3, seen)  # intact
    path = copy / "client-1.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # the last round's entry removed
    assert [r.rounds for r in audit_ledgers(copy, job_id(job_file), 3)] == [3, 2, 3]  # the chain alone: still valid
    with pytest.raises(LedgerError, match=r"client-1.jsonl: holds 2 entries, but the server saw it reach 3"):
        audit_ledgers(copy, job_id(job_file), 3, seen)


def test_dp_changes_the_update_the_noise_is_not_the_job_seed(job_file, finished, tiny_model, sst2_sample, tmp_path):
    plain = run(load_job(write_job(tmp_path, tiny_model, *sst2_sample)), out=tmp_path / "plain")
    assert not np.allclose(plain.weights, finished.weights)
    other = run(load_job(job_file), out=tmp_path / "again")  # a new run draws a new secret: other noise
    assert not np.array_equal(other.weights, finished.weights)


@pytest.mark.parametrize("point", ["inside-training", "after-clients-spent"])
def test_a_crash_then_resume_spends_and_sends_nothing_twice(job_file, tmp_path, point):
    config = load_job(job_file)
    out = tmp_path / "r"

    def crash(cid, msg):
        if point == "inside-training" and cid == 1 and getattr(msg, "round", 0) == 2 and not isinstance(
                msg, UnmaskRequest):
            raise Crash  # client 0 has trained and spent round 2, client 1 has not
        if point == "after-clients-spent" and isinstance(msg, UnmaskRequest) and msg.round == 2:
            raise Crash  # every client has spent round 2; the server has not committed it
        return False

    with pytest.raises(Crash):
        run(config, out=out, faults=crash)
    spent = [len(Ledger(ledger_file(out / "ledger", c), job_id(job_file), c).entries) for c in range(3)]
    assert spent == ([2, 1, 1] if point == "inside-training" else [2, 2, 2])
    resumed = run(config, resume=out)
    uninterrupted = run(config, out=tmp_path / "u")  # its own secret: compare spending, not weights
    rows = audit_ledgers(out / "ledger", job_id(job_file), 3)
    assert [r.rounds for r in rows] == [3, 3, 3] and all(r.epsilon_prv <= 3.0 for r in rows)
    # a client whose round-2 update had left sits that round out: it never sends one round twice
    assert [r["contributors"] for r in resumed.records] == ([3, 2, 3] if point == "inside-training" else [3, 0, 3])
    assert resumed.records[-1]["epsilon"] == pytest.approx(uninterrupted.records[-1]["epsilon"], abs=1e-3)


def test_a_client_whose_budget_is_spent_declines_as_a_dropout(job_file, tmp_path):
    from securefed.job import client_datasets
    from securefed.privacy.accounting import calibrate
    from securefed.runtime.local import execute

    prepared = prepare(load_job(job_file), out=tmp_path / "r")
    examples = len(client_datasets(prepared.task)[0])
    q = 8 / examples
    # something else already spent client 0's whole budget (another job on the same data, say)
    ledger = Ledger(ledger_file(prepared.run_dir.ledger_dir, 0), job_id(job_file), 0)
    ledger.append(1, Spend(q, calibrate(3.0, 1e-5, q, 9), 9), 1e-5, 3.0)
    result = execute(prepared)
    assert [r["contributors"] for r in result.records] == [2, 2, 2]
    rows = audit_ledgers(prepared.run_dir.ledger_dir, job_id(job_file), 3)
    assert rows[0].rounds == 1 and all(r.epsilon_prv <= 3.0 for r in rows)


def test_peft_methods_without_per_example_gradients_are_refused_up_front(tmp_path, tiny_model, sst2_sample):
    job = write_job(tmp_path, tiny_model, *sst2_sample, peft={"method": "ia3"}, privacy=PRIVACY)
    with pytest.raises(ModelError, match="per-example gradients.*ia3_l"):
        prepare(load_job(job), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_grouping_by_length_is_refused_with_dp(tmp_path, tiny_model, sst2_sample):
    job = write_job(tmp_path, tiny_model, *sst2_sample, privacy=PRIVACY, federation={"group_by_length": True})
    with pytest.raises(ConfigError, match="federation.group_by_length: DP-SGD samples"):
        load_job(job)


@pytest.mark.parametrize("private", [True, False], ids=["dp-sgd", "plain"])
def test_a_batch_run_as_micro_batches_takes_the_same_step(tmp_path, tiny_model, sst2_sample, monkeypatch, private):
    import securefed.client
    from securefed.job import client_datasets, make_client

    config = load_job(write_job(tmp_path, tiny_model, *sst2_sample, federation={"batch_size": 32},
                                **({"privacy": PRIVACY} if private else {})))
    config = config.model_copy(update={"model": config.model.model_copy(update={"dropout": 0.0})})
    prepared = prepare(config, out=tmp_path / "run")
    task = prepared.task
    assert all(m.p == 0.0 for m in task.bundle.model.modules() if isinstance(m, torch.nn.Dropout))
    client = make_client(task, 0, client_datasets(task)[0], run=prepared.run_dir)
    start = task.bundle.view.get()
    steps = {}
    for budget in (10**6, 64):
        monkeypatch.setattr(securefed.client, "_STEP_TOKENS", budget)
        task.bundle.view.set(start)
        client._train_locally(1)
        steps[budget] = task.bundle.view.get() - start
    assert len(client._micro_batches(np.arange(32))) > 1  # the small budget did split the batches
    assert np.abs(steps[64]).max() > 1e-3
    np.testing.assert_allclose(steps[64], steps[10**6], atol=1e-5)


def test_the_base_model_keeps_its_own_dropout_unless_the_job_sets_it(tmp_path, tiny_model, sst2_sample):
    config = load_job(write_job(tmp_path, tiny_model, *sst2_sample))
    rates = {m.p for m in prepare(config, out=tmp_path / "run").task.bundle.model.modules()
             if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.1}  # the tiny BERT's own hidden and attention dropout


def test_sgd_steps_down_the_mean_gradient_of_the_batch(tmp_path, tiny_model, sst2_sample):
    from securefed.job import client_datasets, make_client

    config = load_job(write_job(tmp_path, tiny_model, *sst2_sample, federation={
        "local_steps": 1, "optimizer": "sgd", "momentum": 0.0, "learning_rate": 0.5}))
    config = config.model_copy(update={"model": config.model.model_copy(update={"dropout": 0.0})})
    task = prepare(config, out=tmp_path / "run").task
    client = make_client(task, 0, client_datasets(task)[0])
    view, model = task.bundle.view, task.bundle.model
    start = view.get()
    model.train()
    model(**task.collator.batch(client.data, client._batches(1)[0])).loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in view.parameters]).numpy()
    model.zero_grad(set_to_none=True)
    client._train_locally(1)
    np.testing.assert_allclose(view.get() - start, -0.5 * gradient, atol=1e-6)
