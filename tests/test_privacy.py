"""Privacy accounting against dp-accounting's PLD, the hash-chained ledger, and `securefed audit`."""

import json
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting import pld

from securefed.config import parse_job
from securefed.privacy.accounting import Spend, calibrate, epsilon_prv, epsilon_rdp
from securefed.privacy.audit import audit_ledgers
from securefed.privacy.ledger import Ledger, LedgerError, ledger_file
from securefed.rundir import RunDir

DELTA = 1e-5


def epsilon_pld(schedule: list[Spend], delta: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    for s in schedule:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(s.q, dp_accounting.GaussianDpEvent(s.sigma)), s.steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("q", "steps", "target"), [(16 / 6000, 240, 8.0), (32 / 2000, 300, 3.0),
                                                    (16 / 16000, 400, 1.0)])
def test_calibrated_noise_meets_the_target_and_prv_agrees_with_pld_within_one_percent(q, steps, target):
    sigma = calibrate(target, DELTA, q, steps)
    schedule = [Spend(q, sigma, steps // 4)] * 4  # the same spending, logged round by round
    prv, reference = epsilon_prv(schedule, DELTA), epsilon_pld(schedule, DELTA)
    assert prv <= target and prv > 0.97 * target  # tight: σ is not larger than it needs to be
    assert abs(prv - reference) <= 0.01 * reference
    assert epsilon_rdp(schedule, DELTA) >= prv  # RDP is the looser cross-check


@pytest.mark.parametrize("schedule", [
    [Spend(128 / 1335, 0.7898, 5)],  # SciPy: an integral inside the PRV accountant converges slowly
    [Spend(128 / 140, 20.78, 3)] * 12,  # Opacus: the RDP bound that sizes the PRV's domain peaks at its last order
])
def test_schedules_that_trouble_the_accountants_internals_stay_within_one_percent_and_print_nothing(schedule, recwarn):
    # Both from clients of the 10-client SST-2 job of benchmarks/utility.py.
    prv, reference = epsilon_prv(schedule, DELTA), epsilon_pld(schedule, DELTA)
    assert reference <= prv <= 1.01 * reference
    assert not recwarn.list


JOB = b"j" * 32


def filled(tmp_path, rounds=3, sigma=1.2, target=8.0):
    ledger = Ledger(ledger_file(tmp_path, 0), JOB, 0)
    for r in range(1, rounds + 1):
        ledger.append(r, Spend(0.01, sigma, 20), DELTA, target)
    return ledger


def test_the_ledger_reads_back_and_checks_the_budget_before_a_round(tmp_path):
    ledger = filled(tmp_path)
    again = Ledger(ledger.path, JOB, 0)
    assert [e.round for e in again.entries] == [1, 2, 3]
    assert again.entries[-1].epsilon == pytest.approx(epsilon_prv(again.schedule, DELTA))
    exceed, epsilon = again.would_exceed(Spend(0.01, 1.2, 20), DELTA, again.entries[-1].epsilon + 0.01)
    assert exceed and epsilon > again.entries[-1].epsilon
    with pytest.raises(LedgerError, match="does not follow round 3"):
        again.append(3, Spend(0.01, 1.2, 20), DELTA, 8.0)


def rewrite(path, change):
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("\n".join(lines) + "\n")


def edit_field(number, field, value):
    def change(lines):
        entry = json.loads(lines[number - 1])
        entry[field] = value
        lines[number - 1] = json.dumps(entry, sort_keys=True)
    return change


@pytest.mark.parametrize(("change", "where", "reason"), [
    (edit_field(1, "sigma", 2.0), ":2:", "hash chain is broken"),
    (edit_field(3, "sigma", 2.0), ":3:", "its entries give"),
    (edit_field(3, "steps", 2), ":3:", "its entries give"),
    (lambda lines: lines.pop(1), ":2:", "hash chain is broken"),
    (lambda lines: lines.insert(0, lines.pop(1)), ":1:", "hash chain is broken"),
    (lambda lines: lines.__setitem__(0, "{not json"), ":1:", "not a JSON entry"),
    (edit_field(2, "extra", 1), ":2:", "exactly the fields"),
])
def test_audit_names_the_file_and_line_of_any_tampering(tmp_path, change, where, reason):
    ledger = filled(tmp_path)
    rewrite(ledger.path, change)
    with pytest.raises(LedgerError, match=reason) as info:
        audit_ledgers(tmp_path, JOB, 1)
    assert f"client-0.jsonl{where}" in str(info.value)


def test_audit_refuses_a_ledger_over_budget_or_from_another_job(tmp_path):
    ledger = filled(tmp_path, rounds=3, sigma=0.5, target=100.0)
    rows = audit_ledgers(tmp_path, JOB, 1)
    spent = rows[0].epsilon_prv
    rewrite(ledger.path, lambda lines: None)
    over = tmp_path / "over"
    filled(over, rounds=3, sigma=0.5, target=spent * 0.9)  # the ledger's own target is below what it spent
    with pytest.raises(LedgerError, match=r"client-0.jsonl:\d: ε = .* exceeds the budget"):
        audit_ledgers(over, JOB, 1)
    with pytest.raises(LedgerError, match=r"client-0.jsonl:1: the hash chain is broken"):
        audit_ledgers(tmp_path, b"k" * 32, 1)


def test_securefed_audit_prints_the_table_or_one_line(tmp_path):
    job = parse_job({"name": "dp", "data": {"dataset": "sst2"},
                     "federation": {"rounds": 3, "clients": 2, "local_steps": 20, "learning_rate": 0.1}},
                    source="test", base_dir=tmp_path)
    run = RunDir.create(job, tmp_path / "run")
    command = [sys.executable, "-m", "securefed.cli", "audit", str(run.path)]
    none = subprocess.run(command, capture_output=True, text=True)
    assert none.returncode == 2 and "did not use differential privacy" in none.stderr
    for client in (0, 1):
        ledger = Ledger(ledger_file(run.ledger_dir, client), bytes.fromhex(job.fingerprint()), client)
        for r in (1, 2):
            ledger.append(r, Spend(0.01, 1.0 + client, 20), DELTA, 8.0)
    shown = subprocess.run(command + ["--json"], capture_output=True, text=True)
    assert shown.returncode == 0
    rows = json.loads(shown.stdout)["clients"]
    assert [r["client"] for r in rows] == [0, 1] and rows[0]["epsilon_prv"] > rows[1]["epsilon_prv"]
    assert all(r["epsilon_rdp"] >= r["epsilon_prv"] and r["budget_left"] > 0 for r in rows)
    rewrite(ledger_file(run.ledger_dir, 1), edit_field(1, "q", 0.001))
    broken = subprocess.run(command, capture_output=True, text=True)
    assert broken.returncode == 2 and "client-1.jsonl:2: the hash chain is broken" in broken.stderr
    assert "Traceback" not in broken.stderr
