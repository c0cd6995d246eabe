"""The quickstart job on real data: the accuracy the README promises (slow tier)."""

from pathlib import Path

import pytest

from securefed.config import load_job
from securefed.job import evaluate_saved
from securefed.runtime.local import run

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"


@pytest.mark.slow
def test_quickstart_reaches_80_percent_and_the_saved_model_agrees(tmp_path):
    job = load_job(QUICKSTART)
    result = run(job, out=tmp_path / "run")
    final = result.records[-1]["dev_accuracy"]
    assert final >= 0.80
    assert evaluate_saved(result.run, job)["accuracy"] == pytest.approx(final, abs=0.005)
