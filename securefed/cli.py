"""The `securefed` command. The only module that prints for humans or chooses exit codes.

A user error (any SecurefedError) is one line on stderr and exit code 2; a traceback
means a bug in securefed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
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
from .report import dev_metrics, headline_score

app = typer.Typer(
    name="securefed",
    help="Federated fine-tuning of language models, in-process or across machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # a long path or command stays on one line


def say(text: str) -> None:
    """One plain line to the user: no rich markup, no highlighting."""
    console.print(text, markup=False, highlight=False)


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
        self.progress.console.print(f"round {record['round']}: {headline_score(record)}, "
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
    say(f"run directory: {where}")
    try:
        with _progress() as progress:
            result = execute(prepared, observer=ProgressObserver(progress))
    except KeyboardInterrupt:
        say(f"interrupted; finished rounds are saved. Continue with: securefed run {job} --resume {where}")
        raise typer.Exit(130) from None
    console.print(_summary(result.records))
    if result.watermarks:
        owned = sum(v["verdict"] == "owned" for v in result.watermarks)
        keys = "the job's key files" if config.watermark.keys else prepared.run_dir.keys_dir
        say(f"watermarks: {owned} of {len(result.watermarks)} clients' keys verify on the final model "
            f"(keys: {keys})")
    say(f"done: {where / 'report.md'}")


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
        print(json.dumps({**{f"dev_{k}": v for k, v in result.metrics.items()}, "examples": result.examples}))
    else:
        scores = ", ".join(f"dev {k.replace('_', '-')} {v:.4f}" for k, v in reversed(result.metrics.items()))
        print(f"{scores} ({result.examples} examples)")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a generation job's run directory")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="an instruction (repeat for more)")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="JSONL: one instruction per line, with the job's "
                                              "instruction field and optionally its context field")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, max=4096,
                                                       help="default: the job's task.max_new_tokens")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per answer")] = False,
) -> None:
    """Answer instructions with the run's model (its adapter on its base), greedily, in the job's prompt template."""
    from .data.instructions import instruction_source, load_prompts
    from .job import answer_saved
    from .rundir import RunDir

    run_ = RunDir(run_dir)
    if not run_.job_file.is_file():
        raise SecurefedError(f"{run_dir} is not a securefed run directory (no job.toml)")
    config = load_job(run_.job_file)
    instructions, contexts = list(prompt or []), [""] * len(prompt or [])
    if file is not None:
        asked, given = load_prompts(instruction_source(config.data), file)
        instructions, contexts = instructions + asked, contexts + given
    if not instructions:
        raise SecurefedError("give at least one --prompt or a --file of instructions")
    with console.status(f"answering {len(instructions)} instruction(s)"):
        answers = answer_saved(run_, config, instructions, contexts, max_new_tokens)
    for instruction, answer in zip(instructions, answers):
        if as_json:
            print(json.dumps({"instruction": instruction, "answer": answer}, ensure_ascii=False))
        else:
            print(f"> {instruction}\n{answer}\n")


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
    """Make an Ed25519 identity per client: hardened SecAgg+, or CKKS with a signed key exchange."""
    from .secagg.identity import generate

    generate(out, clients)
    say(f"wrote {clients} identities to {out}. Give each client its client-<i>.key only (on Flower: `flower join "
        "--identity`); every party gets all client-<i>.pub files. In the job file:")
    print(f'[secagg]\nmode = "secaggplus"\nidentities = "{out}"')


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
    targets: Annotated[str | None, typer.Option("--targets", help="the job's LoRA target modules, comma-separated "
                                                "(their ΔW carries the bits again); 'none' for a job without LoRA; "
                                                "default: peft's default for the model")] = None,
) -> None:
    """Make a watermark key: an Ed25519 identity, a secret seed, and the carriers it marks."""
    from .watermark.feature import base_carrier
    from .watermark.keys import WatermarkKey, file_name, owner_name

    owner = owner_name(owner)  # before the model loads
    with console.status(f"reading the carrier of {model}"):
        modules = None if targets is None else [t.strip() for t in targets.split(",")
                                                if t.strip() and t.strip().lower() != "none"]
        carrier = base_carrier(model, blocks, modules)
    key = WatermarkKey.generate(owner, carrier, bits=bits, triggers=triggers)
    path = out / file_name(owner)
    key.save(path)
    say(f"wrote {path}: owner {key.owner!r}, identity {key.fingerprint}, {key.bits} bits in "
        f"{carrier.size} scales of {len(carrier.parameters)} layers and again in {len(carrier.weights)} adapted "
        f"weights, {key.triggers} triggers. Keep it "
        "secret and apart from the model; name it in the job file:")
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
    from .watermark.keys import WatermarkKey
    from .watermark.reference import Reference
    from .watermark.verify import verify

    wkey = WatermarkKey.load(key)
    with console.status("loading the model and its base"):
        loaded, tokenizer = load_merged(model)
        reference = Reference.load(wkey)
    with console.status("aligning the model to its base and reading the key's bits"):
        verdict = verify(loaded, tokenizer, wkey, reference, threshold=threshold)
    if as_json:
        print(json.dumps(verdict.as_dict()))
    else:
        triggers = ("no triggers" if verdict.matched_triggers is None else
                    f"triggers {verdict.matched_triggers}/{verdict.triggers} (p = {verdict.triggers_p:.3g})")
        adapter = ("" if verdict.adapter_bits is None else
                   f"adapter bits {verdict.adapter_bits}/{verdict.bits} (p = {verdict.adapter_p:.3g}), ")
        print(f"{verdict.owner} (identity {verdict.identity}): scale bits {verdict.matched_bits}/{verdict.bits} "
              f"(p = {verdict.bits_p:.3g}), {adapter}{triggers}")
        print(f"alignment: {verdict.aligned or 'none (no anatomy for this model family)'}")
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
    say(f"wrote {out}")


@app.command()
def partition(
    job: Annotated[Path, typer.Argument(help="the job TOML")],
    out: Annotated[Path, typer.Option("--out", help="a folder for client-<i> files")],
) -> None:
    """Write each client's share of the job's training data as its own file, in the job's data format (what each
    organisation would hold when the job runs across machines)."""
    from .data.partition import write_partitions

    paths = write_partitions(load_job(job), out)
    say(f"wrote {len(paths)} partitions to {out}")


flower_app = typer.Typer(help="Run a job across machines on Flower (SuperLink and SuperNodes, TLS and node "
                         "authentication). Needs the extra: pip install 'securefed[flower]'.", no_args_is_help=True)
app.add_typer(flower_app, name="flower")
SuperLinkOption = Annotated[str, typer.Option("--superlink", help="the SuperLink's HOST:PORT")]
CaOption = Annotated[Path | None, typer.Option("--ca", help="the CA certificate that signed the SuperLink's")]
InsecureOption = Annotated[bool, typer.Option("--insecure", help="plain HTTP, no node authentication: for a "
                                              "closed test network only")]


def _tls(ca: Path | None, insecure: bool) -> Path | None:
    if insecure == (ca is not None):
        raise SecurefedError("give --ca (TLS, the default) or --insecure, not both or neither")
    return ca


@flower_app.command("certs")
def flower_certs(
    out: Annotated[Path, typer.Option("--out", help="an empty folder for the certificates and keys")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="node authentication key pairs to make")] = 3,
    host: Annotated[list[str] | None, typer.Option("--host", help="a name or address the SuperLink is reached "
                                                   "at (repeat; default 127.0.0.1 and localhost)")] = None,
) -> None:
    """Make a test CA, a SuperLink certificate and node authentication keys (EC P-384)."""
    from .runtime.deployment import make_certificates

    certs = make_certificates(out, nodes, host or ["127.0.0.1", "localhost"])
    say(f"wrote {certs.ca}, the SuperLink's server.pem and server.key, and node-<i>.key/.pub for "
        f"{nodes} nodes. Give node i its node-<i>.key; register each node-<i>.pub with "
        "`securefed flower register`.")


@flower_app.command("app")
def flower_app_folder(
    job: Annotated[Path, typer.Argument(help="the job TOML")],
    out: Annotated[Path, typer.Option("--out", help="an empty folder for the Flower App")],
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="where the server writes the run (default: "
                                                 "runs/<name>, on the SuperLink's machine)")] = None,
    reply_timeout: Annotated[float, typer.Option("--reply-timeout", min=1.0, help="seconds a node may take per "
                                                 "message before it counts as dropped")] = 900.0,
    join_timeout: Annotated[float, typer.Option("--join-timeout", min=1.0, help="seconds to wait for the "
                                                "clients' nodes")] = 300.0,
) -> None:
    """Write a Flower App that runs JOB: securefed's ServerApp and ClientApp, with the job in its run config."""
    from .runtime.deployment import check_deployable, write_app
    from .tasks import task_kind

    config = load_job(job)
    check_deployable(config)
    where = run_dir or config.output.dir or Path("runs") / config.name
    written = write_app(config, task_kind(config).label_order(), out, where, reply_timeout=reply_timeout,
                        join_timeout=join_timeout)
    say(f"wrote {written} and {out / 'job.toml'} (give it to every organisation: `flower join --job` "
        f"pins it); the server will write its run to {where.resolve()}. Start it with "
        f"`securefed flower run {out} --superlink HOST:PORT --ca CA`.")
    if getattr(config.secagg, "hardened", True) is False:
        say("note: plain SecAgg+ holds only against a server that follows the protocol; one that lies about "
            "dropouts can unmask a client. Against a server you do not trust, make identities with `securefed "
            "secagg identities` and name them in the job (docs/security.md).")


@flower_app.command("serve")
def flower_serve(
    certs: Annotated[Path | None, typer.Option("--certs", help="the folder `flower certs` wrote (ca.crt, "
                                               "server.pem, server.key)")] = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8000,
    database: Annotated[Path | None, typer.Option("--database", help="SQLite file for the SuperLink's state "
                                                  "(default: in memory)")] = None,
    insecure: InsecureOption = False,
) -> None:
    """Start a SuperLink: TLS and node authentication on (register nodes with `flower register`)."""
    from .runtime.deployment import Certificates, flower_env, superlink_command

    if insecure == (certs is not None):
        raise SecurefedError("give --certs (TLS, the default) or --insecure, not both or neither")
    command = superlink_command(Certificates(certs) if certs else None, host, port, database)
    _exec(command, flower_env())


@flower_app.command("register")
def flower_register(
    public_key: Annotated[Path, typer.Argument(help="a node's public key (node-<i>.pub)")],
    superlink: SuperLinkOption,
    ca: CaOption = None,
) -> None:
    """Allow a node's key on the SuperLink (its node authentication)."""
    from .runtime.deployment import FlowerCli

    if ca is None:
        raise SecurefedError("give --ca, the CA certificate that signed the SuperLink's")
    cli = FlowerCli(superlink, ca)
    try:
        say(cli.register(public_key))
    finally:
        cli.close()


@flower_app.command("join")
def flower_join(
    superlink: SuperLinkOption,
    job: Annotated[Path, typer.Option("--job", help="the job this organisation agrees to train (the job.toml "
                                      "`flower app` wrote); the node refuses any other")],
    client: Annotated[int, typer.Option("--client", min=0, help="this organisation's client id in the job")],
    data: Annotated[Path, typer.Option("--data", help="this organisation's training data, in the job's format")],
    auth_key: Annotated[Path | None, typer.Option("--auth-key", help="this node's private key (node-<i>.key), "
                                                  "registered on the SuperLink")] = None,
    ca: CaOption = None,
    key: Annotated[Path | None, typer.Option("--key", help="this organisation's watermark key (default: one is "
                                             "made in --dir)")] = None,
    identity_key: Annotated[Path | None, typer.Option("--identity", help="this organisation's identity "
                                                      "(client-<i>.key), when the job's secure sum is signed")] = None,
    node_dir: Annotated[Path, typer.Option("--dir", help="where this node keeps its ledgers, secrets and "
                                           "keys")] = Path("securefed-node"),
    port: Annotated[int, typer.Option("--port", help="the SuperNode's local port (one per node on a "
                                      "machine)")] = 9094,
    insecure: InsecureOption = False,
    keep_loaded: Annotated[bool, typer.Option("--worker/--no-worker", help="answer every message in this "
                                              "process, the model and data loaded once (default), or let Flower "
                                              "start a ClientApp process per message")] = True,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for this node's "
                                                "training (default: torch's, all cores); with several nodes on "
                                                "one machine give each cores/nodes")] = None,
) -> None:
    """Start a SuperNode for one organisation: its data, ledger and key stay on this machine."""
    from .runtime.deployment import check_deployable, flower_env, supernode_command
    from .tasks import task_kind

    ca = _tls(ca, insecure)
    agreed = load_job(job)
    check_deployable(agreed)
    if client >= agreed.federation.clients:
        raise SecurefedError(f"--client {client}: the job has clients 0 to {agreed.federation.clients - 1}")
    examples = task_kind(agreed).check_partition(data)
    if key is not None and not key.is_file():
        raise SecurefedError(f"{key}: key file not found")
    from .runtime.node import Node

    Node(client, "", data, node_dir, key, identity_key).identity_key(agreed)  # the right identity, or say so now
    node_dir.mkdir(parents=True, exist_ok=True)
    say(f"client {client} of {agreed.name} ({agreed.fingerprint()[:12]}), {examples} examples")
    config = {"client": client, "job": agreed.fingerprint(), "data": str(data.resolve()),
              "dir": str(node_dir.resolve())}
    if key is not None:
        config["key"] = str(key.resolve())
    if identity_key is not None:
        config["identity"] = str(identity_key.resolve())
    if threads is not None:  # each ClientApp process reads it when torch loads
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if not keep_loaded:
        _exec(supernode_command(superlink, ca, auth_key, config, port), flower_env())
    if threads is not None:  # torch may be loaded here already
        import torch

        torch.set_num_threads(threads)
    from .runtime.executor import Executor, make_secret, prepare_training
    from .runtime.flower import client_app

    secret = make_secret(node_dir, port)
    executor = Executor(f"127.0.0.1:{port}", secret, client_app, config)
    prepare_training()
    try:  # the executor starts once the SuperNode has been started and its signals are passed on
        code = _supervise(supernode_command(superlink, ca, auth_key, config, port, secret), flower_env(),
                          then=executor.start)
    finally:
        executor.stop()
        secret.unlink(missing_ok=True)
    raise typer.Exit(code)


@flower_app.command("run")
def flower_run(
    app_dir: Annotated[Path, typer.Argument(help="the folder `flower app` wrote")],
    superlink: SuperLinkOption,
    ca: CaOption = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="seconds to wait for the run")] = 86400.0,
    insecure: InsecureOption = False,
) -> None:
    """Start the App's run on the SuperLink and wait for it; exit non-zero unless it completes."""
    from .runtime.deployment import FlowerCli

    if not (app_dir / "pyproject.toml").is_file():
        raise SecurefedError(f"{app_dir} is not a Flower App folder (no pyproject.toml)")
    cli = FlowerCli(superlink, _tls(ca, insecure))
    try:
        run_id = cli.start(app_dir)
        say(f"run {run_id} started; waiting (the server's log: flwr log {run_id})")
        try:
            with console.status(f"run {run_id}"):
                status = cli.watch(run_id, timeout, say)
        except KeyboardInterrupt:
            say(f"stopped waiting; run {run_id} goes on (`flwr stop {run_id}` stops it)")
            raise typer.Exit(130) from None
        say(f"run {run_id}: {status}")
    finally:
        cli.close()


@flower_app.command("demo")
def flower_demo(
    job: Annotated[Path, typer.Argument(help="the job TOML")],
    out: Annotated[Path, typer.Option("--out", help="an empty folder for everything: certificates, each node's "
                                      "folder, logs, and the run in run/")],
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="seconds to wait for the run")] = 86400.0,
) -> None:
    """Run JOB across real Flower processes on this machine: a SuperLink and one SuperNode per client on
    127.0.0.1, with TLS and node authentication, each client holding only its share of the data."""
    from .rundir import RunDir
    from .runtime.deployment import Loopback, check_deployable, require_empty

    config = load_job(job)
    check_deployable(config)
    require_empty(out, "the demo")
    deployment = Loopback(out.resolve())
    try:
        with console.status(f"{config.federation.clients} SuperNodes on 127.0.0.1 running {job} "
                            f"(logs in {out / 'logs'})"):
            run_dir = deployment.run_job(job.resolve(), timeout, on_line=say)
    finally:
        deployment.stop_all()
    console.print(_summary(RunDir(run_dir).records()))
    say(f"done: {run_dir / 'report.md'}")


def _exec(command: list[str], env: dict[str, str]) -> None:
    """Become the Flower process, so that its signals and exit code are the command's own."""
    say(" ".join(command))
    sys.stderr.flush()
    os.execve(command[0], command, env)


def _supervise(command: list[str], env: dict[str, str], then: Callable[[], object] | None = None) -> int:
    """Run a Flower process as a child, passing on the signals that stop it, and call `then` once it runs; the
    exit code is the command's (128 + the signal's number if a signal ended it)."""
    import signal
    import subprocess

    say(" ".join(command))
    child = subprocess.Popen(command, env=env)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: child.send_signal(number))
    if then is not None:
        then()
    while True:
        try:
            code = child.wait()
            return 128 - code if code < 0 else code
        except KeyboardInterrupt:  # the terminal sent SIGINT to the child too: wait for it to stop
            continue


def _summary(records: Sequence[Mapping]) -> Table:
    table = Table(title="rounds")
    scores = list(dev_metrics(records[0])) if records else []
    for name in ("round", "clients", "train loss", *(f"dev {s.replace('_', '-')}" for s in scores), "MB down",
                 "MB up", "seconds"):
        table.add_column(name, justify="right")
    for r in records:
        table.add_row(str(r["round"]), f"{r['contributors']}/{r['cohort']}", _num(r["train_loss"]),
                      *(_num(v) for v in dev_metrics(r).values()), f"{r['bytes_down'] / 1e6:.2f}",
                      f"{r['bytes_up'] / 1e6:.2f}", f"{sum(r['seconds'].values()):.1f}")
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    import click

    try:
        code = app(prog_name="securefed", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as a usage error
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.UsageError as exc:  # a bad option or argument: one line, not click's box
        path = exc.ctx.command_path if exc.ctx else "securefed"
        command = path.partition(" ")[2]
        _fail(f"{command + ': ' if command else ''}{exc.format_message()} (see {path} --help)")
    except click.ClickException as exc:
        _fail(exc.format_message())
    except click.Abort:
        print("securefed: aborted", file=sys.stderr)
        sys.exit(130)
    except SecurefedError as exc:
        _fail(str(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    print(f"securefed: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
