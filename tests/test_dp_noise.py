"""DP noise comes from the clients' 256-bit secret through a keystream: every bit of the key counts, and a DP-SGD
step adds exactly that stream's draws, not a torch generator's."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from scipy import stats

from securefed.privacy.dpsgd import DPSGD, DPSettings
from securefed.privacy.ledger import Ledger
from securefed.privacy.noise import GaussianNoise
from securefed.rundir import RunDir, RunDirError

KEY = bytes(range(32))


def test_the_stream_is_standard_normal():
    draws = GaussianNoise(KEY, "test", 1, 0).normal(200_000)
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert np.isfinite(draws).all()


def test_every_bit_of_the_key_and_every_name_gives_another_stream():
    base = GaussianNoise(KEY, "test", 1, 0).normal(8)
    flipped = [bytes([KEY[0] ^ 0x80]) + KEY[1:], KEY[:-1] + bytes([KEY[-1] ^ 1]), KEY[:15] + b"\xff" + KEY[16:]]
    others = [GaussianNoise(key, "test", 1, 0) for key in flipped]
    others += [GaussianNoise(KEY, "other", 1, 0), GaussianNoise(KEY, "test", 2, 0), GaussianNoise(KEY, "test", 1, 1)]
    assert all(not np.allclose(base, other.normal(8)) for other in others)
    # what it replaces: a torch generator keeps 32 bits of its seed, so 2^32 guesses find any noise it drew
    draw = [torch.randn(4, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7 + 2**32)]
    assert torch.equal(*draw)


def test_a_stream_continues_across_calls_and_refuses_a_short_key():
    stream = GaussianNoise(KEY, "test", 1, 0)
    assert np.array_equal(np.concatenate([stream.normal(4), stream.normal(6)]),
                          GaussianNoise(KEY, "test", 1, 0).normal(10))
    with pytest.raises(ValueError, match="not 32"):
        GaussianNoise(KEY[:8], "test", 1, 0)


def test_a_dp_sgd_step_adds_exactly_the_clients_keystream(tmp_path):
    """An empty Poisson batch releases noise alone: the step's move is σC/B times the keyed draws."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    settings = DPSettings(epsilon=3.0, delta=1e-5, max_grad_norm=0.5, batch_size=4, steps=2, secret=KEY)
    wrapper = DPSGD(1, 100, 3, settings, GradSampleModule(model, loss_reduction="sum"),
                    Ledger(tmp_path / "client-1.jsonl", b"job", 1), tmp_path / "release.npz")
    start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    _, optimizer = wrapper.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), round=2)
    wrapper.empty_step(optimizer)
    wrapper.empty_step(optimizer)
    moved = start - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    stream = GaussianNoise(KEY, "DPSGD", 2, 1)  # round 2's, client 1's: drawn parameter by parameter, each step
    steps = [np.concatenate([stream.normal(p.numel()) for p in model.parameters()]) for _ in range(2)]
    expected = (steps[0] + steps[1]) * wrapper.sigma * 0.5 / 4
    assert wrapper.sigma > 0.3
    assert np.allclose(moved.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_a_run_folder_with_a_short_dp_secret_is_refused_in_one_line(tmp_path):
    run = RunDir(tmp_path)
    run.private_file("dp").write_text("0123456789abcdef\n", encoding="ascii")
    with pytest.raises(RunDirError, match="not a 256-bit key"):
        run.secret_key("dp")
