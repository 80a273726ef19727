"""Throughput is logged for every run and lands in metrics.json; train_only=true is one switch."""

import csv
from pathlib import Path

import pytest

from kdlab.train import run


def test_every_run_logs_tokens_per_second_and_step_time(tiny_cfg):
    cfg = tiny_cfg()
    metrics = run(cfg)
    assert metrics["train/tokens_per_sec"] > 0 and metrics["train/step_time"] > 0
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/tokens_per_sec")]
    assert len(logged) >= 5 and all(float(r["train/step_time"]) > 0 for r in logged)  # log_every_n_steps=1


def test_train_only_is_one_switch(tiny_cfg):
    cfg = tiny_cfg("train_only=true")
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert not [k for k in metrics if k.startswith(("val/", "test/"))]
    assert metrics["train/tokens_per_sec"] > 0 and "train/loss" in metrics
    assert not (out / "checkpoints").exists() and not (out / "samples.jsonl").exists()
    assert (out / "student" / "config.json").is_file()
    with pytest.raises(ValueError, match="train_only=true has no validation, and DDK"):
        run(tiny_cfg("train_only=true", "data/mixing=ddk"))
