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
from securefed.protocol import PlainModel, TrainIns
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
