"""The in-process runtime: every client lives in this process and every message crosses the codec.

Messages are encoded, counted and decoded on the way down and up, exactly as a network
runtime would carry them. A client that raises, or that the fault hook removes, is a
dropout for that exchange, and the job carries on, as long as what it raised is a SecurefedError or an OSError
(the machine, not the code); anything else is a bug, which stops the job (ClientBug).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import job as jobs
from ..client import Client
from ..config import JobConfig
from ..data import EncodedDataset
from ..errors import ClientBug, ProtocolError, RunDirError, SecurefedError
from ..interfaces import Exchange, Grid, Observer
from ..protocol import Message, decode, encode
from ..rundir import RunDir
from ..sums import sum_kind
from .lifecycle import RunResult, conduct

# Decides, per delivered request, whether that client vanishes instead of answering.
FaultHook = Callable[[int, Message], bool]


class LocalGrid(Grid):
    def __init__(self, clients: Mapping[int, Client], faults: FaultHook | None = None):
        self.clients = dict(clients)
        self.faults = faults

    def exchange(self, requests: Mapping[int, Message]) -> Exchange:
        out = Exchange(replies={}, dropped={})
        started = time.perf_counter()
        for cid, request in requests.items():
            wire = encode(request)
            out.bytes_down += len(wire)
            delivered = decode(wire)
            if self.faults is not None and self.faults(cid, delivered):
                out.dropped[cid] = "vanished (injected fault)"
                continue
            computing = time.perf_counter()
            try:
                wire = encode(self.clients[cid].handle(delivered))
            except (SecurefedError, OSError) as exc:  # a refusal, a bad message, a failing disk: a dropout
                out.dropped[cid] = f"failed: {exc if isinstance(exc, SecurefedError) else repr(exc)}"
                continue
            except Exception as exc:  # a bug is never passed off as a dropout
                raise ClientBug(cid, exc) from exc
            finally:
                out.client_seconds += time.perf_counter() - computing
            out.receive(cid, wire)
        out.seconds = time.perf_counter() - started
        return out


@dataclass(frozen=True)
class PreparedRun:
    """Data and model loaded, run directory opened: everything that can fail on bad input has been tried."""

    config: JobConfig
    task: jobs.Task
    run_dir: RunDir
    resuming: bool


def prepare(config: JobConfig, *, out: Path | None = None, resume: Path | None = None) -> PreparedRun:
    if resume and (why := sum_kind(config).refuses_resume(config)):
        raise RunDirError(f"cannot resume {resume}: {why}")
    run_dir = RunDir.resume(resume, config) if resume else None
    task = jobs.load_task(config)  # before creating anything: bad data or a bad model fails with nothing written
    task.identity_keys = jobs.identity_keys(config)
    return PreparedRun(config, task, run_dir or RunDir.create(config, out), resuming=resume is not None)


def execute(prepared: PreparedRun, *, observer: Observer | None = None, faults: FaultHook | None = None,
            datasets: Sequence[EncodedDataset] | None = None) -> RunResult:
    """Run the job's remaining rounds, then write the model and the report.

    `datasets` replaces the clients' partitions of the job's data (the empirical audit adds canaries).
    """
    config, task, run_dir = prepared.config, prepared.task, prepared.run_dir
    observer = observer or Observer()
    keys = jobs.watermark_keys(task, run_dir) if config.watermark else None
    clients = {cid: jobs.make_client(task, cid, data, observer, run_dir, keys[cid] if keys else None)
               for cid, data in enumerate(datasets if datasets is not None else jobs.client_datasets(task))}
    return conduct(task, run_dir, LocalGrid(clients, faults), observer, resuming=prepared.resuming,
                   open_model=lambda model: _open(model, clients, task), keys=keys or ())


def _open(model: Message, clients: Mapping[int, Client], task: jobs.Task) -> np.ndarray:
    """The final weights: the clients write the model, since a sealed one only they can open."""
    for client in clients.values():
        try:
            return client.open(model, task.bundle.view.spec.digest, task.config.federation.rounds)
        except ProtocolError:
            continue
    raise SecurefedError("no client could open the final model")


def run(config: JobConfig, *, out: Path | None = None, resume: Path | None = None, observer: Observer | None = None,
        faults: FaultHook | None = None) -> RunResult:
    """Run a whole job in this process; with `resume`, continue that run directory after its last committed round."""
    return execute(prepare(config, out=out, resume=resume), observer=observer, faults=faults)
