"""The README's main command, shrunk: a real `python -m kdlab.train -m` sweep in a subprocess."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow


def test_sweep_prints_and_saves_the_comparison_table_and_logs_to_wandb_offline(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("logger=")]  # keep the default logger: W&B, offline
    cmd = [sys.executable, "-m", "kdlab.train", "-m", "loss=ce,fkl", *tiny, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    assert "Sweep summary" in result.stdout and "loss=ce" in result.stdout and "teacher" in result.stdout
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["loss=ce", "loss=fkl", "(reference)"]
    for row in rows:
        assert 0.0 <= float(row["test/exact_match"]) <= 1.0 and float(row["test/ppl"]) >= 1.0

    for job in ("0", "1"):
        runs = list((sweep_dir / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, f"job {job}: one offline W&B run expected"
        # The offline run is a protobuf record log (uploaded later by `wandb sync`): it must hold
        # the resolved config and the final metrics.
        data = runs[0].read_bytes()
        assert b"kdlab.losses.divergences" in data and b"test/exact_match" in data and b"val/copy/ppl" in data
        assert (sweep_dir / job / "student" / "config.json").is_file()
