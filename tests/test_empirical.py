"""The one-run empirical audit: the bound is sound for a mechanism that is ε-DP, and it catches a DP-SGD whose
noise was switched off."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import SST2, _sample, write_job
from scipy.stats import binom

from securefed.config import load_job
from securefed.errors import ConfigError
from securefed.privacy.dpsgd import DPSGD
from securefed.privacy.empirical import count_correct, epsilon_lower_bound, p_value

PRIVACY = {"epsilon": 0.5, "delta": 1e-5, "max_grad_norm": 1.0}


def test_all_guesses_right_bounds_epsilon_by_the_binomial_tail():
    # δ = 0: the bound is the ε at which P[Bin(k, e^ε/(1+e^ε)) = k] = 5%
    for k in (20, 100, 400):
        p = 0.05 ** (1 / k)
        assert epsilon_lower_bound(1000, k, k, 0.0) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)


def test_the_bound_sits_where_the_p_value_crosses_five_percent_and_grows_with_correct_guesses():
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in (50, 60, 70, 80, 90, 100)]
    assert bounds[0] == 0.0 and all(a < b for a, b in zip(bounds[1:], bounds[2:]))
    for v, eps in zip((60, 70, 80, 90, 100), bounds[1:]):
        assert p_value(1000, 100, v, eps, 1e-5) < 0.05 <= p_value(1000, 100, v, eps + 1e-3, 1e-5)
    # δ only weakens the bound
    assert epsilon_lower_bound(1000, 100, 90, 1e-3) < epsilon_lower_bound(1000, 100, 90, 0.0)
    assert p_value(1000, 100, 90, 1.0, 0.0) == pytest.approx(binom.sf(89, 100, 1 / (1 + math.exp(-1.0))))


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_an_epsilon_dp_mechanism_is_bounded_above_epsilon_in_at_most_five_percent_of_runs(epsilon):
    """Randomized response on each canary's bit is exactly ε-DP: the audit must not claim more, bar 5% of runs."""
    rng = np.random.default_rng(0)
    m, trials, above = 400, 400, 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < 1 / (1 + math.exp(-epsilon))
        scores = np.where(included == truthful, 1.0, -1.0) + rng.random(m) * 1e-3  # ties broken at random
        correct = count_correct(scores, included, 100)
        above += epsilon_lower_bound(m, 100, correct, 0.0) > epsilon
    assert above / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_guesses_split_into_top_and_bottom():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert count_correct(scores, np.array([1, 1, 0, 0, 0, 0], bool), 4) == 4
    assert count_correct(scores, np.array([0, 0, 1, 1, 1, 1], bool), 4) == 0
    assert count_correct(scores, np.array([1, 0, 0, 0, 0, 1], bool), 2) == 1
    with pytest.raises(ValueError):
        count_correct(scores, np.zeros(6, bool), 7)


@pytest.fixture(scope="module")
def canary_job(tmp_path_factory, sst2_sample):
    """MiniLM (random tokens look alike to a tiny random model) with few real examples on each client, so that the
    included canaries make up much of client 0's data."""
    folder = tmp_path_factory.mktemp("canary-job")
    train = _sample(SST2 / "train.tsv", folder / "train.tsv", 40)
    return load_job(write_job(folder, "minilm", train, sst2_sample[1], privacy=PRIVACY,
                              federation={"rounds": 2, "clients": 2, "local_steps": 40, "batch_size": 16,
                                          "learning_rate": 5e-3}))


def test_noise_switched_off_is_caught_with_a_bound_above_the_claimed_epsilon(canary_job, monkeypatch):
    from securefed.canary_run import run_with_canaries

    monkeypatch.setattr(DPSGD, "sigma", property(lambda self: 0.0))  # the bug: DP-SGD adds no noise
    result = run_with_canaries(canary_job, canaries=100, guesses=40)
    assert 0.45 < result.epsilon_claimed <= 0.5  # the ledger still claims the budget
    assert result.epsilon_lower_bound > result.epsilon_claimed and result.refuted
    assert 30 < result.included < 70


def test_honest_dp_sgd_is_not_refuted(canary_job):
    from securefed.canary_run import run_with_canaries

    result = run_with_canaries(canary_job, canaries=100, guesses=40)
    assert result.epsilon_lower_bound <= result.epsilon_claimed and not result.refuted


def test_bad_audit_options_are_one_line_errors(canary_job):
    from securefed.canary_run import run_with_canaries

    for options, message in [({"client": 2}, "--client 2"), ({"canaries": 1}, "--canaries"),
                             ({"canaries": 10, "guesses": 11}, "--guesses")]:
        with pytest.raises(ConfigError, match=message):
            run_with_canaries(canary_job, **options)


def test_securefed_audit_empirical_prints_the_bound_beside_the_claim(tmp_path, tiny_model, sst2_sample):
    job = write_job(tmp_path, tiny_model, *sst2_sample, privacy=PRIVACY)
    command = [sys.executable, "-m", "securefed.cli", "audit", "--empirical", str(job), "--canaries", "40", "--json"]
    done = subprocess.run(command + ["--out", str(tmp_path / "kept")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["canaries"] == 40 and shown["guesses"] == 4 and 0.45 < shown["epsilon_claimed"] <= 0.5
    assert not shown["refuted"] and (tmp_path / "kept" / "ledger" / "client-0.jsonl").is_file()
    wrong = subprocess.run(command + ["--client", "5"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--client 5" in wrong.stderr and "Traceback" not in wrong.stderr
