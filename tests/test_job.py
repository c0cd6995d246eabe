"""A whole job on a tiny BERT: run directory, saved model, resume, dropouts."""

import json

import numpy as np
import pytest
import torch
from conftest import write_job
from safetensors.torch import load_file

from securefed.config import PlainSumConfig, load_job
from securefed.errors import ConfigError
from securefed.interfaces import LossTerm, Observer
from securefed.job import client_datasets, evaluate_saved, load_task, make_client
from securefed.protocol import PlainModel, TrainIns, TrainRes
from securefed.rundir import RunDir
from securefed.runtime.local import run


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing in securefed may swallow it."""


class CrashAt(Observer):
    def __init__(self, round: int, *, mid_round: bool):
        self.round, self.mid_round, self.current = round, mid_round, 0

    def round_started(self, round, rounds, cohort):
        self.current = round

    def local_progress(self, client, step, steps):
        if self.mid_round and self.current == self.round and step == 2:
            raise Crash

    def round_finished(self, record):
        if not self.mid_round and record["round"] == self.round:
            raise Crash


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, tiny_model, sst2_sample):
    return write_job(tmp_path_factory.mktemp("job"), tiny_model, *sst2_sample,
                     partition={"method": "dirichlet", "alpha": 1.0})


@pytest.fixture(scope="module")
def finished(job_file, tmp_path_factory):
    return run(load_job(job_file), out=tmp_path_factory.mktemp("runs") / "full")


def test_run_directory_holds_everything(finished):
    path = finished.run.path
    for name in ("job.toml", "metrics.jsonl", "report.md", "accuracy.png", "model/adapter_config.json",
                 "model/adapter_model.safetensors", "checkpoints/round-00003.safetensors"):
        assert (path / name).is_file(), name
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0 <= r["dev_accuracy"] <= 1 and r["train_loss"] > 0 and r["dropped"] == 0
        assert r["bytes_up"] > 3 * finished.weights.nbytes and r["bytes_down"] > 3 * finished.weights.nbytes
        assert set(r["seconds"]) == {"train", "communication", "aggregation", "evaluation"}
    assert "| 3 | 3/3 |" in (path / "report.md").read_text()


def test_saved_adapter_reloads_with_peft_and_reproduces_accuracy(finished, job_file):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config = load_job(job_file)
    reloaded = evaluate_saved(finished.run, config)
    assert reloaded["accuracy"] == pytest.approx(finished.records[-1]["dev_accuracy"], abs=0.005)

    base = AutoModelForSequenceClassification.from_pretrained(config.model.name, num_labels=2)
    model = PeftModel.from_pretrained(base, finished.run.model_dir)
    trained = [p.detach().reshape(-1) for _, p in model.named_parameters() if "lora_" in _ or "modules_to_save" in _]
    assert np.array_equal(torch.cat(trained).numpy(), finished.weights)
    saved = load_file(finished.run.model_dir / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)


def test_same_seed_same_result(job_file, finished, tmp_path):
    again = run(load_job(job_file), out=tmp_path / "again")
    assert np.array_equal(again.weights, finished.weights)
    assert [r["dev_accuracy"] for r in again.records] == [r["dev_accuracy"] for r in finished.records]


@pytest.mark.parametrize("crash", [CrashAt(1, mid_round=False), CrashAt(3, mid_round=True)],
                         ids=["after-round-1", "inside-round-3"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(job_file, finished, tmp_path, crash):
    config = load_job(job_file)
    with pytest.raises(Crash):
        run(config, out=tmp_path / "r", observer=crash)
    resumed = run(config, resume=tmp_path / "r")
    assert resumed.resumed_from == (1 if not crash.mid_round else 2)
    assert np.array_equal(resumed.weights, finished.weights)
    assert [r["round"] for r in resumed.records] == [1, 2, 3]


@pytest.mark.parametrize("stray", [json.dumps({"round": 3, "stale": True}) + "\n", '{"round": 3, "bytes_d'],
                         ids=["whole-line", "torn-line"])
def test_uncommitted_metrics_are_rolled_back_on_resume(job_file, finished, tmp_path, stray):
    config = load_job(job_file)
    with pytest.raises(Crash):
        run(config, out=tmp_path / "r", observer=CrashAt(2, mid_round=False))
    # a crash between writing round 3's metrics and committing its checkpoint leaves a stray line
    with (tmp_path / "r" / "metrics.jsonl").open("a") as fh:
        fh.write(stray)
    resumed = run(config, resume=tmp_path / "r")
    assert [r["round"] for r in resumed.records] == [1, 2, 3]
    assert not any(r.get("stale") for r in resumed.records)
    assert np.array_equal(resumed.weights, finished.weights)


def test_a_vanished_client_is_a_dropout_and_the_job_finishes(job_file, tmp_path):
    notices = []
    observer = Observer()
    observer.notice = notices.append
    vanish = lambda cid, msg: cid == 1 and isinstance(msg, TrainIns) and msg.round == 2  # noqa: E731
    result = run(load_job(job_file), out=tmp_path / "d", faults=vanish, observer=observer)
    assert [r["dropped"] for r in result.records] == [0, 1, 0]
    assert [r["contributors"] for r in result.records] == [3, 2, 3]
    assert any("client 1 dropped out" in n for n in notices)


@pytest.mark.parametrize("method", [{"method": "ia3"}, {"method": "prompt", "virtual_tokens": 4},
                                    {"method": "prefix", "virtual_tokens": 4}], ids=lambda m: m["method"])
def test_every_peft_method_trains_and_saves(tmp_path, tiny_model, sst2_sample, method):
    job = write_job(tmp_path, tiny_model, *sst2_sample, peft=method, federation={"rounds": 1})
    result = run(load_job(job), out=tmp_path / "run")
    assert result.records[-1]["dev_accuracy"] is not None
    reloaded = evaluate_saved(result.run, load_job(job))
    assert reloaded["accuracy"] == pytest.approx(result.records[-1]["dev_accuracy"], abs=0.005)


class PullToZero(LossTerm):
    """A strong L2 penalty on the trainable vector: if the client applies it, the update must shrink θ."""

    name = "pull-to-zero"

    def __init__(self, params):
        self.params = params

    def __call__(self):
        return 50.0 * sum((p * p).sum() for p in self.params)


def test_loss_terms_join_the_local_loss(job_file):
    # in clear, to read the update
    task = load_task(load_job(job_file).model_copy(update={"secagg": PlainSumConfig(mode="none", insecure=True)}))
    data = client_datasets(task)[0]
    start = task.bundle.view.get() + 0.5
    ins = TrainIns(round=1, spec=task.bundle.view.spec.digest, model=PlainModel(weights=start))

    def local_norm(loss_terms) -> float:
        client = make_client(task, 0, data)
        client.loss_terms = loss_terms
        res = client.train(ins)
        n = res.upload.vector[-1]
        return float(np.linalg.norm(start + res.upload.vector[:-1] / n))

    plain = local_norm(())
    penalised = local_norm((PullToZero(task.bundle.view.parameters),))
    assert penalised < 0.97 * plain  # Adam moves each entry at most ~lr per step: 3 steps toward 0


def test_inputs_longer_than_the_model_takes_are_refused_up_front(tmp_path, tiny_model, sst2_sample):
    job = write_job(tmp_path, tiny_model, *sst2_sample, data={"max_length": 126},
                    peft={"method": "prompt", "virtual_tokens": 4})
    with pytest.raises(ConfigError, match="data.max_length is 126 .* at most 124 tokens"):
        run(load_job(job), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_client_sends_one_round_twice_not_even_rebuilt_from_its_run_directory(job_file, finished, tmp_path):
    """Issue 17, attack 1: a server that summed round r over everyone asks for round r again (after a new setup,
    a restart of its own or as a new Flower run, each client rebuilt from its run directory), this time without
    client B, and subtracts the sums to read B's update. Every other client refuses, before training again."""
    from securefed.errors import ProtocolError

    config = load_job(job_file).model_copy(update={"secagg": PlainSumConfig(mode="none", insecure=True)})
    task = load_task(config)
    run_dir = RunDir.create(config, tmp_path / "r")
    data = client_datasets(task)[0]
    ins = TrainIns(round=1, spec=task.bundle.view.spec.digest, model=PlainModel(weights=task.bundle.view.get()))
    client = make_client(task, 0, data, run=run_dir)
    sent = client.handle(ins).upload.vector
    progress = []
    for again in (client, make_client(task, 0, data, run=run_dir)):  # the same client, then one rebuilt
        again.observer.local_progress = lambda *step: progress.append(step)
        with pytest.raises(ProtocolError, match="already sent its update for round 1"):
            again.handle(ins)
    assert progress == []  # refused before any training
    # the record is the client's own: another run of the job (its own directory) starts afresh, with the same update
    other = make_client(task, 0, data, run=RunDir.create(config, tmp_path / "other"))
    np.testing.assert_array_equal(other.handle(ins).upload.vector, sent)
    assert run_dir.sent_rounds_file(0).read_text() == "1\n"


@pytest.mark.parametrize("metrics", [{"epsilon": float("nan")}, {"ledger_entries": float("inf")},
                                     {"ledger_entries": 1e300}, {"loss": -1.0}, {"seconds": float("nan")},
                                     {"made_up": 1.0}], ids=lambda m: next(iter(m)))
def test_a_client_sending_bad_metrics_is_a_dropout_and_the_job_finishes(job_file, tmp_path, monkeypatch, metrics):
    """Issue 17, attack 5: one client's metrics (NaN, inf, a huge count, a name nobody asked for) must not end
    the job or reach its records."""
    from securefed.client import Client

    honest = Client.train

    def train(self, ins):
        res = honest(self, ins)
        return TrainRes(round=res.round, metrics={**res.metrics, **metrics}, upload=res.upload) if self.cid == 1 \
            else res

    monkeypatch.setattr(Client, "train", train)
    notices = []
    observer = Observer()
    observer.notice = notices.append
    result = run(load_job(job_file), out=tmp_path / "m", observer=observer)
    assert [r["contributors"] for r in result.records] == [2, 2, 2]
    assert any("client 1 dropped out (sent a training metric it may not" in n for n in notices), notices
    assert all("epsilon" not in r and np.isfinite(r["train_loss"]) for r in result.records)


def test_a_bug_in_a_client_stops_the_job_with_one_line_and_its_traceback_in_the_run(job_file, tmp_path, monkeypatch):
    """Issue 17, 7: a client that raises something other than securefed's own errors is a bug, not a dropout; the
    job stops, keeping the rounds it committed, and can resume once the bug is gone."""
    from securefed.client import Client
    from securefed.errors import JobFailed

    honest = Client.train

    def train(self, ins):
        if self.cid == 2 and ins.round == 2:
            raise TypeError("unsupported operand")
        return honest(self, ins)

    monkeypatch.setattr(Client, "train", train)
    config = load_job(job_file)
    with pytest.raises(JobFailed) as failed:
        run(config, out=tmp_path / "b")
    message = str(failed.value)
    assert "client 2 failed with TypeError: unsupported operand" in message and "\n" not in message
    log = (tmp_path / "b" / "errors.log").read_text()
    assert "Traceback" in log and "raise TypeError" in log
    assert [r["round"] for r in RunDir(tmp_path / "b").records()] == [1]
    monkeypatch.setattr(Client, "train", honest)
    assert run(config, resume=tmp_path / "b").resumed_from == 1


def test_a_job_whose_every_round_aborts_fails_after_writing_its_report(job_file, tmp_path):
    from securefed.errors import JobFailed

    everyone_vanishes = lambda cid, msg: isinstance(msg, TrainIns)  # noqa: E731
    with pytest.raises(JobFailed, match="every round aborted .*the one the job started from"):
        run(load_job(job_file), out=tmp_path / "a", faults=everyone_vanishes)
    assert (tmp_path / "a" / "report.md").is_file() and (tmp_path / "a" / "model").is_dir()


def test_a_client_never_sends_a_non_finite_update(job_file, tmp_path):
    """Issue 17, 6: training that ends in NaN (here: from a global model holding one) is refused at the client, as
    a dropout with its reason, before anything is sent or recorded as sent."""
    from securefed.errors import UpdateRefused

    config = load_job(job_file).model_copy(update={"secagg": PlainSumConfig(mode="none", insecure=True)})
    task = load_task(config)
    weights = task.bundle.view.get().copy()
    weights[0] = np.nan
    client = make_client(task, 0, client_datasets(task)[0], run=RunDir.create(config, tmp_path / "r"))
    with pytest.raises(UpdateRefused, match="NaN or inf"):
        client.handle(TrainIns(round=1, spec=task.bundle.view.spec.digest, model=PlainModel(weights=weights)))
    assert client.sent.rounds == set()


def test_the_server_tells_each_round_last_rounds_examples_and_a_client_refuses_a_false_count(job_file, tmp_path):
    """A client's share of the example-weighted mean is n_k over last round's Σ n_k, which the server learns anyway;
    the adapter's watermark aims by it. A count that is no count (NaN, negative) is a protocol error."""
    from securefed.errors import ProtocolError

    config = load_job(job_file).model_copy(update={"secagg": PlainSumConfig(mode="none", insecure=True)})
    result = run(config, out=tmp_path / "run")
    total = sum(len(d) for d in client_datasets(load_task(config)))
    records = result.records
    assert all(r["next_examples"] == pytest.approx(total) for r in records)  # every client takes part
    task = load_task(config)
    client = make_client(task, 0, client_datasets(task)[0], run=RunDir.create(config, tmp_path / "r"))
    weights = task.bundle.view.get()
    for count in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ProtocolError, match="not a count"):
            client.handle(TrainIns(round=1, spec=task.bundle.view.spec.digest, model=PlainModel(weights=weights),
                                   examples=count))
    assert client.sent.rounds == set()
