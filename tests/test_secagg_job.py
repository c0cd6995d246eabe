"""Secure aggregation inside whole jobs: the same model as in clear, hardened mode, dropouts, the CLI."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import write_job

from securefed.config import load_job
from securefed.protocol import TrainIns
from securefed.runtime.local import run
from securefed.secagg.secaggplus import UnmaskRequest


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_model, sst2_sample):
    folder = tmp_path_factory.mktemp("secagg-jobs")
    identities = folder / "ids"
    subprocess.run([sys.executable, "-m", "securefed.cli", "secagg", "identities", "--clients", "4", "--out",
                    str(identities)], check=True, capture_output=True)
    made = {}
    for name, secagg in [("plain", {"mode": "none", "insecure": True}), ("masked", {"mode": "secaggplus"}),
                         ("ckks", {"mode": "ckks"}),
                         ("hardened", {"mode": "secaggplus", "hardened": True, "identities": str(identities)})]:
        sub = folder / name
        sub.mkdir()
        made[name] = write_job(sub, tiny_model, *sst2_sample, secagg=secagg,
                               federation={"clients": 4, "rounds": 2})
    return made


def test_secure_sums_train_the_same_model_as_plaintext_fedavg(jobs, tmp_path):
    plain = run(load_job(jobs["plain"]), out=tmp_path / "plain")
    masked = run(load_job(jobs["masked"]), out=tmp_path / "masked")
    hardened = run(load_job(jobs["hardened"]), out=tmp_path / "hardened")
    # both secure modes sum exactly the same encoded updates; fixed-point rounding is all that separates them
    # from the float sum
    assert np.array_equal(masked.weights, hardened.weights)
    np.testing.assert_allclose(masked.weights, plain.weights, atol=1e-4)
    first = masked.records[0]
    assert first["setup"]["bytes_up"] > 0 and first["setup"]["dropped"] == 0
    assert "SecAgg+" in (tmp_path / "masked" / "report.md").read_text()
    assert "Insecure" in (tmp_path / "plain" / "report.md").read_text()


def test_ckks_jobs_train_fedavg_while_the_server_sees_only_ciphertexts(jobs, tmp_path):
    from safetensors.numpy import load_file

    plain = run(load_job(jobs["plain"]), out=tmp_path / "plain")
    sealed = run(load_job(jobs["ckks"]), out=tmp_path / "ckks")
    np.testing.assert_allclose(sealed.weights, plain.weights, atol=1e-4)
    # a client evaluated the model, and the server's checkpoints hold only the sealed sum
    for mine, theirs in zip(sealed.records, plain.records):
        assert mine["dev_accuracy"] == pytest.approx(theirs["dev_accuracy"], abs=0.02)
    checkpoint = load_file(tmp_path / "ckks" / "checkpoints" / "round-00002.safetensors")
    assert "sealed" in checkpoint and "weights" not in checkpoint
    assert "CKKS" in (tmp_path / "ckks" / "report.md").read_text()
    resumed = subprocess.run([sys.executable, "-m", "securefed.cli", "run", str(jobs["ckks"]), "--resume",
                              str(tmp_path / "ckks")], capture_output=True, text=True)
    assert resumed.returncode == 2 and "cannot resume" in resumed.stderr and "Traceback" not in resumed.stderr


def test_a_sealed_sum_no_client_can_open_is_not_taken_as_the_model(jobs, tmp_path, monkeypatch):
    from securefed.secagg.ckks import CkksClient

    honest = CkksClient.upload

    def poisoned(self, round, vector, *rest):  # client 3 claims a negative number of examples in round 1
        if self.cid == 3 and round == 1:
            vector = np.append(vector[:-1], np.float32(-1e6))
        return honest(self, round, vector, *rest)

    monkeypatch.setattr(CkksClient, "upload", poisoned)
    result = run(load_job(jobs["ckks"]), out=tmp_path / "run")
    first, second = result.records
    assert first["aborted"] == "no client could open the sealed sum" and first["contributors"] == 0
    assert "aborted" not in second and second["dev_accuracy"] is not None and (tmp_path / "run" / "model").is_dir()


def test_a_client_vanishing_before_unmasking_is_recovered(jobs, tmp_path):
    vanish = lambda cid, msg: cid == 2 and isinstance(msg, UnmaskRequest) and msg.round == 1  # noqa: E731
    result = run(load_job(jobs["hardened"]), out=tmp_path / "run", faults=vanish)
    first = result.records[0]
    assert first["contributors"] == 4 and first["dropped"] == 1 and "aborted" not in first


def test_too_many_dropouts_abort_the_round_and_the_job_goes_on(jobs, tmp_path):
    # t = 3 of 4 holders: with two clients gone in round 1, no neighbourhood keeps 3 survivors
    vanish = lambda cid, msg: cid in (0, 1) and isinstance(msg, TrainIns) and msg.round == 1  # noqa: E731
    result = run(load_job(jobs["masked"]), out=tmp_path / "run", faults=vanish)
    assert "fewer than t survivors" in result.records[0]["aborted"]
    assert "aborted" not in result.records[1] and result.records[1]["contributors"] == 4


def test_a_missing_identity_file_is_one_line_and_nothing_is_written(jobs, tmp_path):
    config = load_job(jobs["hardened"])
    (config.secagg.identities / "client-3.key").rename(tmp_path / "moved.key")
    try:
        done = subprocess.run([sys.executable, "-m", "securefed.cli", "run", str(jobs["hardened"]), "--out",
                               str(tmp_path / "run")], capture_output=True, text=True)
    finally:
        (tmp_path / "moved.key").rename(config.secagg.identities / "client-3.key")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("client-3.key: identity file not found (make them with "
                                                         "`securefed secagg identities`)")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
