"""The real SmolLM2-135M-Instruct from its wheel: a short private generation job, then its answers (slow tier)."""

import json

import pytest
from conftest import write_job
from test_cli import securefed

pytestmark = pytest.mark.slow


def test_a_private_watermarked_generation_job_on_smollm2(tmp_path, instruction_sample):
    write_job(tmp_path, "smollm2", *instruction_sample,
              task={"kind": "generation", "max_new_tokens": 24},
              peft={"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
              data={"max_length": 128, "eval_batch_size": 8},
              federation={"rounds": 2, "clients": 2, "local_steps": 2, "batch_size": 4, "learning_rate": 1e-4},
              privacy={"epsilon": 8.0}, watermark={"bits": 64, "triggers": 0})
    done = securefed("run", "job.toml", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["contributors"] for r in records] == [2, 2]
    assert 0 < records[-1]["epsilon"] <= 8.0 and 0 < records[-1]["dev_rouge_l"] <= 1
    assert securefed("audit", "run", cwd=tmp_path).returncode == 0
    for cid in range(2):
        verdict = securefed("watermark", "verify", "--model", "run/model", "--key", f"run/keys/client-{cid}.wmkey",
                            "--json", cwd=tmp_path)
        assert json.loads(verdict.stdout)["verdict"] == "owned", verdict.stdout
    # a lightly tuned adapter on an instruct model still answers from what the base knows
    answer = securefed("generate", "run", "--prompt", "What is the capital of France?", "--json", cwd=tmp_path)
    assert "Paris" in json.loads(answer.stdout)["answer"]
