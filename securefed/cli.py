"""The `securefed` command. The only module that prints for humans or chooses exit codes.

A user error (any SecurefedError) is one line on stderr and exit code 2; a traceback
means a bug in securefed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import load_job
from .errors import SecurefedError
from .interfaces import Observer

app = typer.Typer(
    name="securefed",
    help="Federated fine-tuning of language models, in-process or across machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
EXIT_USER_ERROR = 2


class ProgressObserver(Observer):
    """Two bars: rounds, and the local steps of the client training now."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.rounds = progress.add_task("rounds", total=None)
        self.steps = progress.add_task("local steps", total=None, visible=False)

    def round_started(self, round: int, rounds: int, cohort: Sequence[int]) -> None:
        self.progress.update(self.rounds, total=rounds, completed=round - 1,
                             description=f"round {round}/{rounds} ({len(cohort)} clients)")

    def local_progress(self, client: int, step: int, steps: int) -> None:
        self.progress.update(self.steps, total=steps, completed=step, visible=True,
                             description=f"  client {client} local steps")

    def round_finished(self, record: Mapping) -> None:
        self.progress.update(self.rounds, completed=record["round"])
        self.progress.update(self.steps, visible=False)
        accuracy = record.get("dev_accuracy")
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        self.progress.console.print(f"round {record['round']}: dev accuracy {shown}, "
                                    f"train loss {_num(record.get('train_loss'))}", markup=False)

    def notice(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{escape(text)}[/yellow]", highlight=False)


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="the job TOML")],
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default: runs/<name>)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue this run directory")] = None,
) -> None:
    """Run a federated job with every client in this process."""
    if out is not None and resume is not None:
        raise SecurefedError("give --out for a new run or --resume for an existing one, not both")
    config = load_job(job)
    from .runtime.local import execute, prepare  # torch and transformers: only once the job file is sound
    with console.status("loading data and model"):
        prepared = prepare(config, out=out, resume=resume)
    where = prepared.run_dir.path
    console.print(f"run directory: {where}", markup=False, highlight=False)
    try:
        with _progress() as progress:
            result = execute(prepared, observer=ProgressObserver(progress))
    except KeyboardInterrupt:
        console.print(f"interrupted; finished rounds are saved. Continue with: securefed run {job} --resume {where}",
                      markup=False, highlight=False)
        raise typer.Exit(130) from None
    console.print(_summary(result.records))
    if result.watermarks:
        owned = sum(v["verdict"] == "owned" for v in result.watermarks)
        keys = "the job's key files" if config.watermark.keys else prepared.run_dir.keys_dir
        console.print(f"watermarks: {owned} of {len(result.watermarks)} clients' keys verify on the final model "
                      f"(keys: {keys})", markup=False, highlight=False)
    console.print(f"done: {where / 'report.md'}", markup=False, highlight=False)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Load the run's model/ with PeftModel.from_pretrained on its base and score it on the dev split."""
    from .job import evaluate_saved
    from .rundir import RunDir

    run_ = RunDir(run_dir)
    if not run_.job_file.is_file():
        raise SecurefedError(f"{run_dir} is not a securefed run directory (no job.toml)")
    result = evaluate_saved(run_, load_job(run_.job_file))
    if as_json:
        print(json.dumps({"dev_accuracy": result.accuracy, "dev_loss": result.loss, "examples": result.examples}))
    else:
        print(f"dev accuracy {result.accuracy:.4f}, dev loss {result.loss:.4f} ({result.examples} examples)")


@app.command()
def audit(
    target: Annotated[Path, typer.Argument(help="a run directory; with --empirical, a job file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    empirical: Annotated[bool, typer.Option("--empirical", help="run JOB.toml once with canaries on one client "
                                            "and bound its ε from below (Steinke, Nasr, Jagielski 2023)")] = False,
    client: Annotated[int, typer.Option("--client", help="with --empirical: the client that holds the canaries")] = 0,
    canaries: Annotated[int, typer.Option("--canaries", help="with --empirical: how many canaries")] = 1000,
    guesses: Annotated[int | None, typer.Option("--guesses", help="with --empirical: how many canaries to guess "
                                                "about, half as in and half as out (default: a tenth)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="with --empirical: keep the audit's run here")] = None,
) -> None:
    """Check every client's privacy ledger and recompute its ε (PRV; RDP as a cross-check); or, with --empirical,
    bound ε from below with canaries in one training run."""
    if empirical:
        _empirical_audit(target, as_json, client=client, canaries=canaries, guesses=guesses, out=out)
        return
    from .privacy.audit import audit_ledgers, witnessed_entries
    from .rundir import RunDir

    run_ = RunDir(target)
    if not run_.job_file.is_file():
        raise SecurefedError(f"{target} is not a securefed run directory (no job.toml)")
    config = load_job(run_.job_file)
    rows = audit_ledgers(run_.ledger_dir, config.job_id, config.federation.clients, witnessed_entries(run_.records()))
    if as_json:
        print(json.dumps({"clients": [{**vars(r), "budget_left": r.budget_left} for r in rows], "ok": True}))
        return
    table = Table(title=f"privacy ledgers of {target}: intact")
    for name in ("client", "rounds", "steps", "q", "σ", "ε (PRV)", "ε (RDP)", "δ", "budget left"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r.client), str(r.rounds), str(r.steps), f"{r.q:.4g}", f"{r.sigma:.4f}",
                      f"{r.epsilon_prv:.4f}", f"{r.epsilon_rdp:.4f}", f"{r.delta:g}", f"{r.budget_left:.4f}")
    console = Console()
    if not console.is_terminal:  # a pipe or a file: rich assumes 80 columns and would cut the numbers short
        console = Console(width=120)
    console.print(table)


def _empirical_audit(job_file: Path, as_json: bool, **options) -> None:
    from .canary_run import run_with_canaries

    config = load_job(job_file)
    with _progress() as progress:
        result = run_with_canaries(config, observer=ProgressObserver(progress), **options)
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        claimed = "∞ (no DP)" if result.epsilon_claimed == float("inf") else f"{result.epsilon_claimed:.4f}"
        print(f"client {result.client}: {result.correct} of {result.guesses} guesses right about "
              f"{result.canaries} canaries ({result.included} included); "
              f"ε ≥ {result.epsilon_lower_bound:.4f} at {result.confidence:.0%} confidence; "
              f"the accountant claims ε = {claimed} (δ = {result.delta:g})")
    if result.refuted:
        raise SecurefedError(f"the empirical lower bound {result.epsilon_lower_bound:.4f} exceeds the claimed ε "
                             f"{result.epsilon_claimed:.4f}: this training leaks more than its accounting allows")


secagg_app = typer.Typer(help="Secure aggregation tools.", no_args_is_help=True)
app.add_typer(secagg_app, name="secagg")


@secagg_app.command("identities")
def secagg_identities(
    clients: Annotated[int, typer.Option("--clients", min=2, help="how many clients the job has")],
    out: Annotated[Path, typer.Option("--out", help="an empty folder for the key files")],
) -> None:
    """Make an Ed25519 identity per client for hardened SecAgg+ (client-<i>.key stays with client i)."""
    from .secagg.identity import generate

    generate(out, clients)
    console.print(f"wrote {clients} identities to {out}. Give each client its client-<i>.key only; every party gets "
                  "all client-<i>.pub files. In the job file:", markup=False, highlight=False)
    print(f'[secagg]\nmode = "secaggplus"\nhardened = true\nidentities = "{out}"')


watermark_app = typer.Typer(help="Ownership watermarks: make keys, verify a model.", no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("keygen")
def watermark_keygen(
    owner: Annotated[str, typer.Option("--owner", help="the owner's name, as it will appear in verdicts")],
    out: Annotated[Path, typer.Option("--out", help="the keys folder (kept apart from any model)")],
    model: Annotated[str, typer.Option("--model", help="the base model the job trains")] = "minilm",
    blocks: Annotated[int, typer.Option("--blocks", min=1, help="carrier: normalization scales of this many "
                                        "last blocks (the same for every client of a job)")] = 2,
    bits: Annotated[int, typer.Option("--bits", min=16, help="watermark bits")] = 64,
    triggers: Annotated[int, typer.Option("--triggers", min=0, help="trigger inputs (0: none)")] = 32,
) -> None:
    """Make a watermark key: an Ed25519 identity, a secret seed, and the carrier it marks."""
    from .watermark.feature import base_carrier
    from .watermark.keys import WatermarkKey, file_name, owner_name

    owner = owner_name(owner)  # before the model loads
    with console.status(f"reading the carrier of {model}"):
        carrier = base_carrier(model, blocks)
    key = WatermarkKey.generate(owner, carrier, bits=bits, triggers=triggers)
    path = out / file_name(owner)
    key.save(path)
    console.print(f"wrote {path}: owner {key.owner!r}, identity {key.fingerprint}, {key.bits} bits in "
                  f"{carrier.size} scales of {len(carrier.parameters)} layers, {key.triggers} triggers. Keep it "
                  "secret and apart from the model; name it in the job file:", markup=False, highlight=False)
    print(f'[watermark]\nkeys = ["{path}", ...]  # one per client, in client order')


@watermark_app.command("verify")
def watermark_verify(
    model: Annotated[Path, typer.Option("--model", help="a model folder: a peft adapter (a run's model/) or a "
                                        "merged model")],
    key: Annotated[Path, typer.Option("--key", help="a watermark key file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0,
                                             help="'owned' when the p-value is at most this")] = 1e-9,
) -> None:
    """Check a key's watermark in a model: matched bits and triggers, their p-values, and a verdict.
    Exits 0 when owned, 1 when not."""
    from .models.saved import load_merged
    from .watermark.feature import base_scales
    from .watermark.keys import WatermarkKey
    from .watermark.verify import verify

    wkey = WatermarkKey.load(key)
    with console.status("loading the model and its base"):
        loaded, tokenizer = load_merged(model)
        base = base_scales(wkey)
    verdict = verify(loaded, tokenizer, wkey, base, threshold=threshold)
    if as_json:
        print(json.dumps(verdict.as_dict()))
    else:
        triggers = ("no triggers" if verdict.matched_triggers is None else
                    f"triggers {verdict.matched_triggers}/{verdict.triggers} (p = {verdict.triggers_p:.3g})")
        print(f"{verdict.owner} (identity {verdict.identity}): bits {verdict.matched_bits}/{verdict.bits} "
              f"(p = {verdict.bits_p:.3g}), {triggers}")
        print(f"verdict: {'owned' if verdict.owned else 'not owned'} (p = {verdict.p_value:.3g}, threshold "
              f"{threshold:g})")
    if not verdict.owned:
        raise typer.Exit(1)


@app.command()
def merge(
    model: Annotated[Path, typer.Argument(help="a peft adapter folder (a run's model/)")],
    out: Annotated[Path, typer.Option("--out", help="an empty folder for the merged model")],
) -> None:
    """Merge an adapter into its base: one model folder that loads with from_pretrained alone."""
    from .models.saved import merge_adapter

    with console.status("merging"):
        merge_adapter(model, out)
    console.print(f"wrote {out}", markup=False, highlight=False)


def _summary(records: Sequence[Mapping]) -> Table:
    table = Table(title="rounds")
    for name in ("round", "clients", "train loss", "dev loss", "dev acc", "MB down", "MB up", "seconds"):
        table.add_column(name, justify="right")
    for r in records:
        table.add_row(str(r["round"]), f"{r['contributors']}/{r['cohort']}", _num(r["train_loss"]),
                      _num(r["dev_loss"]), _num(r["dev_accuracy"]), f"{r['bytes_down'] / 1e6:.2f}",
                      f"{r['bytes_up'] / 1e6:.2f}", f"{sum(r['seconds'].values()):.1f}")
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    try:
        app()
    except SecurefedError as exc:
        message = " ".join(str(exc).split())
        print(f"securefed: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
