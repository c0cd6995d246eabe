"""DP-SGD on a client with Opacus: Poisson sampling, per-example clipping, Gaussian noise, and the ledger.

σ is calibrated once, before training, from the planned schedule: the rounds in which this client may
take part × local steps, at q = batch / n_k, by the PRV accountant. Before each round the ledger is
asked whether the round fits the budget; after it, the spend is appended and fsynced, and the released
vector is kept, so that a round run again after a crash sends the same release instead of spending
again. Sampling and noise draw from a 256-bit secret that stays with the clients (never the job seed, which
the server knows); the noise is a keystream's (noise.py), not a torch generator's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from ..config import JobConfig
from ..errors import ModelError, SecurefedError
from ..interfaces import TrainingWrapper
from ..rundir import RunDir
from ..seeding import stream
from .accounting import Spend, calibrate
from .ledger import Ledger, ledger_file
from .noise import GaussianNoise

# Opacus's hooks run on frozen inputs; torch warns about it on every backward pass, to no purpose here.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class BudgetSpent(SecurefedError):
    """The round would take the client past its privacy budget: it declines, as a dropout."""


@dataclass(frozen=True)
class DPSettings:
    epsilon: float
    delta: float
    max_grad_norm: float
    batch_size: int  # expected batch size under Poisson sampling
    steps: int  # local steps per round
    secret: bytes  # 256 bits: keys sampling and noise; held by the clients only


def private_module(model: torch.nn.Module, probe: dict[str, torch.Tensor],
                   loss: Callable[[torch.nn.Module, dict], torch.Tensor]) -> GradSampleModule:
    """Per-example gradients for every trainable parameter, or a clear error naming one that Opacus cannot give.

    `probe` is a small batch: one forward and backward pass on it shows whether each trainable parameter
    gets a gradient per example, before any client trains.
    """
    try:
        # Losses are summed over examples: a step's batch may run as several micro-batches of
        # similar length, and DPOptimizer divides by the expected batch size.
        module = GradSampleModule(model, strict=True, loss_reduction="sum")
    except (NotImplementedError, ValueError) as exc:
        raise ModelError(f"DP-SGD cannot run on this model: {exc}".splitlines()[0]) from None
    examples = len(probe["input_ids"])
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    failure = None
    with torch.random.fork_rng(devices=[]):
        try:
            loss(module, probe).backward()
            failure = next((name for name, p in named
                            if getattr(p, "grad_sample", None) is None or p.grad_sample.shape[0] != examples), None)
        except (RuntimeError, ValueError) as exc:
            failure = f"{named[0][0]} ({str(exc).splitlines()[0]})"
        finally:
            module.zero_grad(set_to_none=True)
            for _, p in named:
                p.grad_sample = None
    if failure:
        raise ModelError(f"DP-SGD needs per-example gradients, which Opacus cannot compute for {failure}: "
                         "use LoRA or prefix tuning with privacy")
    return module


class _PoissonBatchOptimizer(DPOptimizer):
    """DP-SGD on the mean over the expected batch size, however many micro-batches the batch ran as, with the
    client's keyed noise.

    Opacus's own "mean" reduction would divide again by the number of backward passes.
    """

    def __init__(self, *args, noise: GaussianNoise, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = noise

    def add_noise(self) -> None:
        """Opacus's, drawing from the keystream rather than a torch generator."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            draws = torch.from_numpy(self.noise.normal(p.summed_grad.numel())).to(p.summed_grad.dtype)
            p.grad = (p.summed_grad + std * draws.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        for p in self.params:
            p.grad /= self.expected_batch_size


class DPSGD(TrainingWrapper):
    @classmethod
    def prepare(cls, model, probe, loss) -> GradSampleModule:
        return private_module(model, probe, loss)

    @classmethod
    def for_client(cls, config: JobConfig, prepared: GradSampleModule, cid: int, examples: int, rounds: int,
                   run: RunDir) -> DPSGD:
        privacy, fed = config.privacy, config.federation
        settings = DPSettings(epsilon=privacy.epsilon, delta=privacy.delta, max_grad_norm=privacy.max_grad_norm,
                              batch_size=min(fed.batch_size, examples), steps=fed.local_steps,
                              secret=run.secret_key("dp"))
        ledger = Ledger(ledger_file(run.ledger_dir, cid), config.job_id, cid)
        return cls(cid, examples, rounds, settings, prepared, ledger, run.ledger_dir / f"client-{cid}.release.npz")

    def __init__(self, cid: int, examples: int, rounds: int, settings: DPSettings, module: GradSampleModule,
                 ledger: Ledger, releases: Path):
        self.cid = cid
        self.settings = settings
        self.module = module
        self.ledger = ledger
        self.releases = releases  # this client's last released vector
        self.q = min(1.0, settings.batch_size / examples)
        self.spend_per_round = None if rounds == 0 else Spend(self.q, calibrate(
            settings.epsilon, settings.delta, self.q, rounds * settings.steps), settings.steps)

    @property
    def sigma(self) -> float:
        return self.spend_per_round.sigma if self.spend_per_round else float("inf")

    def replay(self, round: int, start: bytes) -> np.ndarray | None:
        last = self.ledger.entries[-1].round if self.ledger.entries else 0
        if last < round or not self.releases.exists():
            return None
        with np.load(self.releases) as saved:
            if int(saved["round"]) == round and bytes(saved["input"]) == start:
                return saved["vector"].astype(np.float32)
        raise BudgetSpent(f"round {round} was already spent on another model; it is not spent twice")

    def admit(self, round: int) -> None:
        if self.spend_per_round is None:
            raise BudgetSpent("this client was not planned to train")
        exceed, epsilon = self.ledger.would_exceed(self.spend_per_round, self.settings.delta, self.settings.epsilon)
        if exceed:
            raise BudgetSpent(f"round {round} would take ε to {epsilon:.3f}, past the budget "
                              f"{self.settings.epsilon}: declined")

    def batches(self, round: int, examples: int, steps: int) -> list[np.ndarray]:
        rng = stream(int.from_bytes(self.settings.secret, "big"), "poisson", round, self.cid)
        return [np.flatnonzero(rng.random(examples) < self.q) for _ in range(steps)]

    def wrap(self, model, optimizer, round: int):
        return self.module, _PoissonBatchOptimizer(
            optimizer, noise_multiplier=self.sigma, max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.settings.batch_size, loss_reduction="sum", noise=self.noise(round))

    def noise(self, round: int) -> GaussianNoise:
        """The round's noise stream, keyed by the clients' secret."""
        return GaussianNoise(self.settings.secret, type(self).__name__, round, self.cid)

    def loss_scale(self, part: int, batch: int) -> float:
        return float(part)  # the sum over the part's examples: Opacus wants per-example sums

    def empty_step(self, optimizer) -> None:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def unrecorded(self):
        """Opacus's hooks off for a loss term's pass: it reads no example, so it has no per-example gradients
        (and, run without dropout, records no activations for the backward hook to find)."""
        self.module.disable_hooks()
        try:
            yield
        finally:
            self.module.enable_hooks()

    def commit(self, round: int, start: bytes, vector: np.ndarray) -> dict[str, float]:
        tmp = self.releases.with_suffix(".tmp.npz")
        self.releases.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, round=round, input=np.frombuffer(start, dtype=np.uint8), vector=vector)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.releases)
        entry = self.ledger.append(round, self.spend_per_round, self.settings.delta, self.settings.epsilon)
        # the server records how long each ledger has grown: a ledger cut short later no longer matches
        return {"epsilon": entry.epsilon, "ledger_entries": float(len(self.ledger.entries))}

