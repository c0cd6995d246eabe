"""The private example on real data: DP-SGD, SecAgg+ and every client's watermark at once (slow tier)."""

import hashlib
from pathlib import Path

import pytest

from securefed.config import load_job
from securefed.models.saved import load_merged
from securefed.runtime.local import execute, prepare
from securefed.watermark.keys import SUFFIX, WatermarkKey
from securefed.watermark.reference import Reference
from securefed.watermark.verify import verify

PRIVATE = Path(__file__).resolve().parents[1] / "examples" / "sst2-lora-private.toml"


def _pinned(label: str, size: int) -> bytes:
    return hashlib.shake_256(f"test_private_example/{label}".encode()).digest(size)


@pytest.mark.slow
def test_every_client_owns_the_private_model_and_a_fresh_key_does_not(tmp_path):
    # The run's own secrets (the DP noise, the keys) are pinned: with fresh ones the accuracy moves by points
    # (0.7775 and 0.7397 were seen), and a test must give one answer. Another CPU may still round differently.
    job = load_job(PRIVATE)
    prepared = prepare(job, out=tmp_path / "run")
    run = prepared.run_dir
    run.private_file("dp").write_text(_pinned("dp", 32).hex() + "\n", encoding="ascii")
    run.keys_dir.mkdir(parents=True, exist_ok=True)
    for c in range(job.federation.clients):
        WatermarkKey(f"client {c}", _pinned(f"private {c}", 32), _pinned(f"seed {c}", 32), job.watermark.bits,
                     prepared.task.carrier, job.watermark.triggers, 4).save(run.keys_dir / f"client-{c}{SUFFIX}")
    result = execute(prepared)
    assert result.records[-1]["dev_accuracy"] >= 0.72  # 0.7936 with these secrets; the initial model's 0.4128
    assert max(r["epsilon"] for r in result.records) <= job.privacy.epsilon
    model, tokenizer = load_merged(result.run.model_dir)
    keys = [WatermarkKey.load(result.run.keys_dir / f"client-{c}{SUFFIX}") for c in range(job.federation.clients)]
    base = Reference.load(keys[0])
    for key in keys:
        verdict = verify(model, tokenizer, key, base)
        assert verdict.owned and verdict.bits_p <= 1e-12, verdict
    fresh = WatermarkKey.generate("a stranger", keys[0].carrier, bits=64, triggers=0)
    assert not verify(model, tokenizer, fresh, base).owned
