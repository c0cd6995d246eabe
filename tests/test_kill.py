"""A private job killed (SIGKILL) at several points, then resumed: no round is spent twice, no budget exceeded."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_job

from securefed.config import load_job
from securefed.privacy.audit import audit_ledgers, witnessed_entries
from securefed.privacy.ledger import Ledger, ledger_file
from securefed.rundir import RunDir
from securefed.sent import SentRounds

PRIVACY = {"epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0}
ROUNDS, CLIENTS = 3, 3


def _entries(run, client: int) -> int:
    path = ledger_file(run / "ledger", client)
    return len(path.read_text().splitlines()) if path.exists() else 0


# Each point is a state of the run directory seen from outside; the process is killed as soon as it is seen,
# so it may have gone a little further, which is as good a crash point as any.
POINTS = {
    "first-client-spent-round-2": lambda run: _entries(run, 0) >= 2,
    "every-client-spent-round-2": lambda run: all(_entries(run, c) >= 2 for c in range(CLIENTS)),
    "round-2-committed": lambda run: (run / "checkpoints" / "round-00002.safetensors").exists(),
}


def _securefed(*args, cwd):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "securefed.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


ALGORITHMS = {  # DP-SGD on a LoRA adapter, and DP-ZO on every parameter (FedKSeed)
    "fedavg": {},
    "fedkseed": {"peft": None, "algorithm": {"name": "fedkseed", "seeds": 64},
                 "federation": {"rounds": ROUNDS, "clients": CLIENTS, "local_steps": 25, "learning_rate": 1e-3}},
}


CASES = [(point, "fedavg") for point in sorted(POINTS)] + [("every-client-spent-round-2", "fedkseed")]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "algorithm"), CASES)
def test_sigkill_then_resume_keeps_every_ledger_to_one_entry_per_round(tmp_path, tiny_model, sst2_sample, point,
                                                                       algorithm):
    sections = {"federation": {"rounds": ROUNDS, "clients": CLIENTS, "local_steps": 25}, **ALGORITHMS[algorithm]}
    job = write_job(tmp_path, tiny_model, *sst2_sample, privacy=PRIVACY, **sections)
    run = tmp_path / "run"
    proc = _securefed("run", str(job), "--out", str(run), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (run.exists() and POINTS[point](run)):
            assert proc.poll() is None, f"the job ended before {point}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"{point} was not reached in 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    config = load_job(job)
    before = [len(Ledger(ledger_file(run / "ledger", c), config.job_id, c).entries) for c in range(CLIENTS)]
    assert all(1 <= n <= ROUNDS for n in before)
    sent = [SentRounds(RunDir(run).sent_rounds_file(c)).rounds for c in range(CLIENTS)]
    committed = {int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("round-*.safetensors")}

    resumed = _securefed("run", str(job), "--resume", str(run), cwd=tmp_path)
    try:
        _, err = resumed.communicate(timeout=600)
    finally:
        resumed.kill()
    assert resumed.returncode == 0, err
    records = RunDir(run).records()
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    for r in records:  # a round cut short runs again without the clients whose update had left: none sends twice
        again = CLIENTS if r["round"] in committed else sum(r["round"] not in rounds for rounds in sent)
        assert r["contributors"] == again or (again < 2 and r["contributors"] == 0), (r, sent)  # 2: the threshold
    rows = audit_ledgers(run / "ledger", config.job_id, CLIENTS, witnessed_entries(records))
    assert [r.rounds for r in rows] == [ROUNDS] * CLIENTS  # each round spent once, whatever was cut short
    assert all(r.epsilon_prv <= PRIVACY["epsilon"] for r in rows)
    for client in range(CLIENTS):
        rounds = [e.round for e in Ledger(ledger_file(run / "ledger", client), config.job_id, client).entries]
        assert rounds == list(range(1, ROUNDS + 1))
