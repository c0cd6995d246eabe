"""One job's life, whichever runtime carries its messages: where it starts (round 1, or after the run's last
committed round), its rounds over the runtime's grid, and its end (the final model opened, saved, checked against
the watermark keys at hand, and reported)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import job as jobs
from ..errors import ClientBug, JobFailed, SecurefedError
from ..interfaces import Grid, Observer
from ..protocol import Message, PlainModel
from ..report import write_report
from ..rundir import RunDir
from ..watermark.keys import WatermarkKey

ERRORS = "errors.log"  # the tracebacks of bugs that stopped the job, in its run directory


@dataclass(frozen=True)
class RunResult:
    run: RunDir
    weights: np.ndarray | None  # None: the final model stayed with the clients (a sealed one, on Flower)
    records: list[dict]
    resumed_from: int
    watermarks: list[dict] = field(default_factory=list)  # each key at hand checked against the final model


def conduct(task: jobs.Task, run: RunDir, grid: Grid, observer: Observer, *, resuming: bool = False,
            open_model: Callable[[Message], np.ndarray | None] | None = None,
            keys: Sequence[WatermarkKey] = ()) -> RunResult:
    """Run the job's remaining rounds over `grid`, then write the model and the report. `open_model` reads the
    final model (a sealed one: only a client can), or has the clients keep it and returns None; by default it must
    be in clear."""
    server = jobs.make_server(task, grid, run, observer)
    model, start = task.algorithm.initial(task.bundle.view.get()), 1
    if resuming:
        last = run.last_checkpoint(task.bundle.view.size, task.bundle.view.spec.digest)
        if last is not None:
            done, model = last
            start = done + 1
            observer.notice(f"resuming after round {done} of {task.config.federation.rounds}")
        run.rollback_metrics(start - 1)
    try:
        model = server.run(model, start)
    except ClientBug as bug:  # its committed rounds stay, and the job resumes once the bug is fixed
        with (run.path / ERRORS).open("a", encoding="utf-8") as log:
            log.write(bug.details + "\n")
        raise JobFailed(f"{bug} (a bug, not a dropout; the traceback is in {run.path / ERRORS})") from None
    weights = server.weights(model)
    if weights is None:
        weights = (open_model or _in_clear)(model)
    if weights is not None:
        jobs.save_model(task, weights, run.model_dir)
    records = run.records()
    verdicts = [jobs.verify_key(task, weights, key).as_dict() for key in keys] if weights is not None else []
    write_report(run, task.config, records, verdicts)
    if records and all("aborted" in r for r in records):  # a resumed round may abort; a whole job should not
        raise JobFailed(f"every round aborted (round {records[-1]['round']}: {records[-1]['aborted']}); the model "
                        f"in {run.model_dir} is the one the job started from")
    return RunResult(run, weights, records, start - 1, verdicts)


def _in_clear(model: Message) -> np.ndarray:
    if not isinstance(model, PlainModel):
        raise SecurefedError(f"the final model is a {type(model).__name__}, which only a client can open")
    return model.weights
