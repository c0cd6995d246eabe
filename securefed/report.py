"""report.md and its plots, written from a run directory's metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import JobConfig
from .rundir import RunDir
from .sums import sum_kind

EPSILON_PLOT = "epsilon.png"
_DEV = "dev_"


def dev_metrics(record: Mapping) -> dict[str, float | None]:
    """A round's scores on the dev split by name: "loss" first, then the task's own (metrics.jsonl sorts its keys,
    so the order is rebuilt here); the headline is the last."""
    scores = {key[len(_DEV):]: value for key, value in record.items() if key.startswith(_DEV)}
    return {name: scores[name] for name in sorted(scores, key=lambda name: name != "loss")}


def headline(records: Sequence[Mapping]) -> str:
    """The task's own score (accuracy, rouge_l): the last dev metric."""
    return list(dev_metrics(records[0]))[-1] if records and dev_metrics(records[0]) else "loss"


def headline_score(record: Mapping) -> str:
    """"dev accuracy 0.8123" (or the task's own score); "-" before any evaluation."""
    scores = dev_metrics(record)
    name, value = list(scores.items())[-1] if scores else ("loss", None)
    return f"dev {name.replace('_', '-')} {'-' if value is None else f'{value:.4f}'}"


def write_report(run: RunDir, job: JobConfig, records: Sequence[dict], watermarks: Sequence[dict] = ()) -> None:
    """`watermarks`: each client's key checked against the final model (the `as_dict` of a verdict)."""
    name = headline(records)
    label = f"dev {name.replace('_', '-')}"
    plot = f"{name}.png"
    plotted = _plot(run, records, _DEV + name, label, plot)
    fed = job.federation
    done = [r for r in records if r.get(_DEV + name) is not None]
    final = done[-1][_DEV + name] if done else None
    scores = list(dev_metrics(records[0])) if records else ["loss"]
    lines = [
        f"# Run report: {job.name}",
        "",
        f"- Model: `{job.model.name}`, {_trained(job)}",
        f"- Data: {job.data.dataset or job.data.train}, partition {job.partition.method}"
        + (f" (alpha={job.partition.alpha})" if job.partition.method == "dirichlet" else ""),
        f"- Federation: {fed.clients} clients, {fed.cohort_size} per round, {fed.rounds} rounds of "
        f"{fed.local_steps} local steps (batch {fed.batch_size}, learning rate {fed.learning_rate}), seed {fed.seed}",
        _aggregation(job, records),
        _privacy(job, records),
        f"- Rounds completed: {len(records)} of {fed.rounds}",
        f"- Final {label}: {final:.4f}" if final is not None else f"- Final {label}: not evaluated",
        "",
    ]
    lines += _watermarks(watermarks)
    if plotted:
        lines += [f"![{label} per round]({plot})", ""]
    if _plot(run, records, "epsilon", "ε spent (PRV, largest over clients)", EPSILON_PLOT):
        lines += [f"![privacy spent per round]({EPSILON_PLOT})", ""]
    columns = ["round", "clients", "dropped", "train loss", *(f"dev {s.replace('_', '-')}" for s in scores),
               "KB down", "KB up", "seconds"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for r in records:
        seconds = sum(r["seconds"].values())
        cells = [str(r["round"]), f"{r['contributors']}/{r['cohort']}", str(r["dropped"]), _fmt(r["train_loss"]),
                 *(_fmt(r.get(_DEV + s)) for s in scores), f"{r['bytes_down'] / 1024:.1f}",
                 f"{r['bytes_up'] / 1024:.1f}", f"{seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    run.report_file.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _trained(job: JobConfig) -> str:
    if job.peft is not None:
        return f"{job.peft.method} adapter by FedAvg"
    algorithm = job.algorithm
    return (f"every parameter by {algorithm.name_shown} (K = {algorithm.seeds:,} seeds, perturbation "
            f"{algorithm.perturbation:g}): "
            "zeroth-order steps, one scalar per seed up and down")


def _aggregation(job: JobConfig, records: Sequence[dict]) -> str:
    setup = next((r["setup"] for r in records if "setup" in r), None)
    cost = (f" Setup: {setup['bytes_up'] / 1024:.1f} KB up, {setup['bytes_down'] / 1024:.1f} KB down, "
            f"{setup['seconds']:.2f} s." if setup else "")
    line = f"- Aggregation: {sum_kind(job).describe(job, cost)}"
    encodings = [(r["round"], r["encoding"]) for r in records if "encoding" in r]
    if encodings:
        worst = max((e.get("relative_error") or 0.0, n) for n, e in encodings)
        clipped = max(e["clipped"] for _, e in encodings)
        line += (f" Fixed-point encoding: largest rounding error {worst[0]:.1e} of the sum's largest entry (round "
                 f"{worst[1]}); at most {clipped:.2%} of the entries clipped in a round.")
    return line


def _privacy(job: JobConfig, records: Sequence[dict]) -> str:
    if job.privacy is None:
        return "- Privacy: no differential privacy: the released model can reveal individual training examples."
    p = job.privacy
    spent = max((r["epsilon"] for r in records if "epsilon" in r), default=None)
    shown = f"{spent:.4f}" if spent is not None else "nothing yet"
    return (f"- Privacy: {p.mechanism.upper()} on every client, budget ε = {p.epsilon}, δ = {p.delta}, clipping "
            f"{p.max_grad_norm}; "
            f"the most any client spent (PRV): {shown}. `securefed audit` checks the ledgers in `ledger/`.")


def _watermarks(verdicts: Sequence[dict]) -> list[str]:
    if not verdicts:
        return []
    lines = ["Each client's watermark key, checked against the final model (`securefed watermark verify` does the same "
             "from a key file):", "",
             "| client | owner | identity | scale bits | p | adapter bits | p | triggers | p | verdict |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for cid, v in enumerate(verdicts):
        triggers = "-" if v["matched_triggers"] is None else f"{v['matched_triggers']}/{v['triggers']}"
        p_triggers = "-" if v["triggers_p"] is None else f"{v['triggers_p']:.2g}"
        adapter = "-" if v["adapter_bits"] is None else f"{v['adapter_bits']}/{v['bits']}"
        p_adapter = "-" if v["adapter_p"] is None else f"{v['adapter_p']:.2g}"
        lines.append(f"| {cid} | {v['owner']} | `{v['identity']}` | {v['matched_bits']}/{v['bits']} | "
                     f"{v['bits_p']:.2g} | {adapter} | {p_adapter} | {triggers} | {p_triggers} | {v['verdict']} |")
    return lines + [""]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _plot(run: RunDir, records: Sequence[dict], key: str, label: str, name: str) -> bool:
    points = [(r["round"], r[key]) for r in records if r.get(key) is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*points), marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.set_title(f"{label[0].upper()}{label[1:]} per round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.path / name)
    plt.close(fig)
    return True
