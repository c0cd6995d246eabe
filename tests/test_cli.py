"""The securefed command as a user meets it: exit codes, one-line errors, nothing written on failure."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import tiny_causal, write_job


def securefed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "securefed.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("securefed: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_malformed_toml(tmp_path):
    (tmp_path / "job.toml").write_text("name = \n[federation\n", encoding="utf-8")
    assert_user_error(securefed("run", "job.toml", cwd=tmp_path), "job.toml", "invalid TOML")


def test_missing_job_file(tmp_path):
    assert_user_error(securefed("run", "nope.toml", cwd=tmp_path), "nope.toml", "not found")


def test_missing_data_file_writes_nothing(tmp_path, tiny_model, sst2_sample):
    write_job(tmp_path, tiny_model, tmp_path / "absent.tsv", sst2_sample[1])
    assert_user_error(securefed("run", "job.toml", cwd=tmp_path), "absent.tsv", "data file not found")
    assert not (tmp_path / "runs").exists()


def test_unknown_model(tmp_path, sst2_sample):
    path = write_job(tmp_path, Path("x"), *sst2_sample)
    path.write_text(path.read_text().replace('name = "x"', 'name = "gpt-17"'), encoding="utf-8")
    assert_user_error(securefed("run", "job.toml", cwd=tmp_path), "unknown model 'gpt-17'", "minilm")


def test_out_and_resume_together_and_resuming_nothing(tmp_path, tiny_model, sst2_sample):
    write_job(tmp_path, tiny_model, *sst2_sample)
    assert_user_error(securefed("run", "job.toml", "--out", "a", "--resume", "b", cwd=tmp_path), "not both")
    assert_user_error(securefed("run", "job.toml", "--resume", "b", cwd=tmp_path), "not a securefed run directory")


def test_run_then_refuse_to_overwrite_then_resume_a_different_job(tmp_path, tiny_model, sst2_sample):
    write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 1})
    done = securefed("run", "job.toml", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "round 1: dev accuracy" in done.stderr and "run directory:" in done.stderr
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()

    assert_user_error(securefed("run", "job.toml", "--out", "run", cwd=tmp_path), "already exists", "--resume")

    evaluated = securefed("evaluate", "run", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0 and '"dev_accuracy"' in evaluated.stdout

    write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 1, "learning_rate": 0.5})
    assert_user_error(securefed("run", "job.toml", "--resume", "run", cwd=tmp_path),
                      "federation.learning_rate: 0.01 in the run, 0.5 now")


def test_default_run_directories_never_collide(tmp_path, tiny_model, sst2_sample):
    write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 1, "local_steps": 1})
    for _ in range(2):
        assert securefed("run", "job.toml", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny", "tiny-2"]


@pytest.mark.parametrize(("args", "needle"), [(["run"], "Missing argument 'JOB'"),
                                               (["run", "job.toml", "--nope"], "No such option '--nope'"),
                                               (["flower", "join", "--threads", "0"], "'--threads': 0")])
def test_a_usage_error_is_one_line_naming_the_command(tmp_path, args, needle):
    command = " ".join(args[:2 if args[0] == "flower" else 1])
    result = securefed(*args, cwd=tmp_path)
    assert_user_error(result, f"error: {command}: ", needle, f"(see securefed {command} --help)")


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_help(tmp_path, args):
    result = securefed(*args, cwd=tmp_path)
    assert result.returncode == 0 and "Usage" in result.stdout


def test_ctrl_c_says_how_to_resume_and_resume_finishes(tmp_path, tiny_model, sst2_sample):
    write_job(tmp_path, tiny_model, *sst2_sample, federation={"rounds": 10, "local_steps": 10})
    # A shell that starts pytest in the background makes it, and so the child, ignore SIGINT; a user's Ctrl-C is
    # not ignored, so the child gets the default handling back.
    proc = subprocess.Popen([sys.executable, "-m", "securefed.cli", "run", "job.toml", "--out", "run"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "120"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in proc.stderr:  # bounded: the job ends by itself after 10 short rounds
            seen.append(line)
            if line.startswith("round 1: dev accuracy"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(seen) + rest
    assert "--resume run" in rest and "Traceback" not in rest
    finished = securefed("run", "job.toml", "--resume", "run", cwd=tmp_path)
    assert finished.returncode == 0 and "resuming after round" in finished.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize("example", ["dolly-smollm2.toml", "quickstart.toml"])
def test_flower_app_writes_each_task_kinds_app(tmp_path, example):
    """A generation job has no labels to fix; a classification job's come from its dev split."""
    import tomllib

    from securefed.runtime.deployment import AppConfig

    root = Path(__file__).resolve().parents[1]
    result = securefed("flower", "app", str(root / "examples" / example), "--out", "app", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    app = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text(encoding="utf-8"))
    config = AppConfig.from_run_config(app["tool"]["flwr"]["app"]["config"])
    assert config.labels == ([] if example.startswith("dolly") else ["0", "1"])  # SST-2's labels
    assert (tmp_path / "app" / "job.toml").read_text(encoding="utf-8") == config.job.to_toml()


def test_flower_join_reads_a_generation_clients_instructions(tmp_path, instruction_sample, monkeypatch):
    """A generation client's data is checked as instructions; a file lacking the response field is refused in one
    line before anything starts."""
    from typer.testing import CliRunner

    from securefed import cli
    from securefed.runtime import node

    train, dev = instruction_sample
    write_job(tmp_path, tiny_causal(tmp_path / "llama", "llama"), train, dev,
              task={"kind": "generation", "max_new_tokens": 4})
    started = []
    monkeypatch.setattr(cli, "_supervise", lambda command, env, then: started.append(command) or 0)
    monkeypatch.setattr(node, "_long_lived", threading.Event())
    join = ["flower", "join", "--superlink", "127.0.0.1:1", "--insecure", "--job", "job.toml", "--client", "0",
            "--dir", "node"]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, [*join, "--data", str(train)])
    assert result.exit_code == 0 and len(started) == 1, result.output
    assert "96 examples" in result.output
    (tmp_path / "bad.jsonl").write_text('{"instruction": "Say hi", "context": ""}\n', encoding="utf-8")
    assert_user_error(securefed(*join, "--data", "bad.jsonl", cwd=tmp_path), "bad.jsonl", "response")


def test_flower_and_partition_commands_refuse_bad_input_in_one_line(tmp_path, tiny_model, sst2_sample):
    write_job(tmp_path, tiny_model, *sst2_sample, watermark={"keys": [str(tmp_path / "a.wmkey")] * 3})
    assert_user_error(securefed("flower", "app", "job.toml", "--out", "app", cwd=tmp_path), "watermark.keys",
                      "flower join --key")
    assert not (tmp_path / "app").exists()
    assert_user_error(securefed("flower", "serve", cwd=tmp_path), "--certs", "--insecure")
    assert_user_error(securefed("flower", "serve", "--certs", "nocerts", cwd=tmp_path), "ca.crt", "not found")
    join = ("flower", "join", "--superlink", "127.0.0.1:1", "--ca", "ca.crt", "--auth-key", "node.key")
    assert_user_error(securefed(*join, "--job", "job.toml", "--client", "0", "--data", "x.tsv", cwd=tmp_path),
                      "watermark.keys")
    (tmp_path / "ok").mkdir()
    write_job(tmp_path / "ok", tiny_model, *sst2_sample)
    assert_user_error(securefed(*join, "--job", "ok/job.toml", "--client", "3", "--data", "x.tsv", cwd=tmp_path),
                      "clients 0 to 2")
    assert_user_error(securefed(*join, "--job", "ok/job.toml", "--client", "0", "--data", "absent.tsv",
                                cwd=tmp_path), "absent.tsv", "not found")
    from securefed.secagg.identity import generate

    generate(tmp_path / "ids", 3)  # a signed job: each node must bring its own identity, and the right one
    (tmp_path / "signed").mkdir()
    write_job(tmp_path / "signed", tiny_model, *sst2_sample, secagg={"mode": "secaggplus", "identities": "../ids"})
    signed = (*join, "--job", "signed/job.toml", "--client", "0", "--data", str(sst2_sample[0]))
    assert_user_error(securefed(*signed, cwd=tmp_path), "--identity client-0.key")
    assert_user_error(securefed(*signed, "--identity", "ids/client-1.key", cwd=tmp_path), "not client 0's identity")
    assert_user_error(securefed("flower", "run", "nothing", "--superlink", "127.0.0.1:1", "--ca", "ca.crt",
                                cwd=tmp_path), "not a Flower App")
    assert_user_error(securefed("partition", "nope.toml", "--out", "parts", cwd=tmp_path), "nope.toml", "not found")
    assert not (tmp_path / "parts").exists()


def test_flower_join_gives_the_node_and_its_clientapp_processes_their_share_of_the_cores(tmp_path, tiny_model,
                                                                                        sst2_sample, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from securefed import cli
    from securefed.runtime import node

    write_job(tmp_path, tiny_model, *sst2_sample)
    started, threads = {}, []

    def supervise(command, env, then):
        secret = Path(command[command.index("--superexec-auth-secret-file") + 1])
        started.update(command=command, env=env, secret=secret, mode=secret.stat().st_mode & 0o777, then=then)
        return 0

    monkeypatch.setattr(cli, "_supervise", supervise)
    monkeypatch.setattr(node, "_long_lived", threading.Event())  # the executor marks its process long-lived
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # not for this test process
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # set first, so that teardown restores what was there
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    join = ["flower", "join", "--superlink", "127.0.0.1:1", "--insecure", "--job", str(tmp_path / "job.toml"),
            "--client", "0", "--data", str(sst2_sample[0]), "--dir", str(tmp_path / "node")]
    result = CliRunner().invoke(cli.app, [*join, "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert threads == [1]  # the executor, in this process
    assert started["env"]["OMP_NUM_THREADS"] == started["env"]["MKL_NUM_THREADS"] == "1"  # each ClientApp process
    assert started["command"][1:3] == ["-m", "securefed.runtime.supernode"]  # Flower's SuperNode, polling faster
    # the SuperNode leaves its tasks to this process's executor, which alone holds the secret, and only while it runs
    assert started["command"][started["command"].index("--isolation") + 1] == "process"
    assert started["mode"] == 0o600 and not started["secret"].exists()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS")
    started.clear()
    assert CliRunner().invoke(cli.app, join).exit_code == 0
    assert threads == [1] and "OMP_NUM_THREADS" not in started["env"]  # by default torch picks
    assert CliRunner().invoke(cli.app, [*join, "--threads", "0"]).exit_code == 2
