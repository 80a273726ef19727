"""`kdlab.evaluate` on a student exported by `kdlab.train`: the same test metrics, and every eval metric logged."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from kdlab.evaluate import evaluate
from kdlab.train import run
from tests.conftest import CONF_DIR, TINY


def test_evaluate_reproduces_the_runs_test_metrics(tiny_cfg, tmp_path, cache_dir):
    cfg = tiny_cfg("loss=rkl")
    trained = run(cfg)
    domains = list(cfg.data.splits.domains)

    # the new metrics, in every run's metrics.json under stable names
    for split in ("val", "test"):
        assert 0.0 <= trained[f"{split}/ece"] <= 1.0
        assert trained[f"{split}/grammar/true_kl"] >= 0.0
        assert 0.0 <= trained[f"{split}/grammar/valid_fraction"] <= 1.0
        for key in ("rouge1", "rouge2", "rougeL", *(f"{d}/rougeL" for d in domains)):
            assert 0.0 <= trained[f"{split}/{key}"] <= 1.0, key
    for key in ("teacher_ece", "grammar/teacher_true_kl", "grammar/teacher_valid_fraction", "teacher_rougeL"):
        assert f"test/{key}" in trained, key

    overrides = [o for o in TINY if not o.startswith("module.")]  # the data, models and device of the run
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ecfg = compose("evaluate", overrides=[*overrides, f"student={cfg.paths.output_dir}/student"])
    with open_dict(ecfg):
        ecfg.paths.output_dir = str(tmp_path / "eval")
        ecfg.paths.cache_dir = str(cache_dir)
    scored = evaluate(ecfg)

    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == pytest.approx(scored)
    test_keys = [k for k in trained if k.startswith("test/")]
    assert len(test_keys) > 40
    # deterministic metrics, sampled ones included (the sampling generator is seeded per batch)
    assert {k: scored[k] for k in test_keys} == pytest.approx({k: trained[k] for k in test_keys}, rel=1e-6, abs=1e-7)
    shared_val = [k for k in trained if k.startswith("val/")]
    assert {k: scored[k] for k in shared_val} == pytest.approx({k: trained[k] for k in shared_val}, rel=1e-6, abs=1e-7)

    # the samples table of each pass, with the teacher's and the student's generations
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"val", "test"}
    test_rows = [r for r in rows if r["split"] == "test"]
    assert sorted(r["domain"] for r in test_rows) == sorted(domains * 2)
    assert all(
        r["prompt"] and r["reference"] and r["teacher"] is not None and r["student_sample"] is not None
        for r in test_rows
    )
