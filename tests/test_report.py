"""kdlab.report on a hand-made sweep folder (fast), and the notebook on a real tiny sweep (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.report import best_groups, group_table, history, jobs, latest_sweep, main, report, wandb_records
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _job(sweep: Path, name: str, overrides: list[str], metrics: dict | None, csv: str | None = None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if csv is not None:
        (job / "csv").mkdir()
        (job / "csv" / "metrics.csv").write_text(csv)


def _metrics(em: float, ppl: float) -> dict:
    return {
        "test/exact_match": em,
        "test/ppl": ppl,
        "test/a/exact_match": em,
        "test/a/ppl": ppl,
        "test/teacher_exact_match": 0.9,
        "test/teacher_ppl": 2.0,
        "test/a/teacher_exact_match": 0.9,
        "test/a/teacher_ppl": 2.0,
        "test/top1_agreement": 0.5,
    }


# step 4 holds the final validation and the test of the best checkpoint: not part of the curve
CSV = """step,train/loss,val/loss,val/a/loss,val/exact_match,data/weight/a,data/weight/b,test/ppl
0,2.0,,,,0.5,0.5,
1,1.5,,,,,,
1,,1.2,1.2,0.1,,,
3,1.0,,,,0.7,0.3,
3,,0.9,0.9,0.3,,,
4,,0.95,0.95,0.2,,,
4,,,,,,,3.0
"""


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "2026-01-01" / "10-00-00"
    shared = ["trainer.max_steps=5"]  # shared by every job: not part of the group's name
    _job(sweep, "0", ["loss=ce", "seed=0", *shared], _metrics(0.2, 4.0), CSV)
    _job(sweep, "1", ["loss=ce", "seed=1", *shared], _metrics(0.4, 6.0), CSV)
    _job(sweep, "2", ["loss=fkl", "seed=0", *shared], _metrics(0.5, 3.0))
    _job(sweep, "3", ["loss=rkl", "seed=0", *shared], None)  # failed: listed, no values
    return sweep


def test_report_builds_the_tidy_table_the_group_table_and_the_pngs(sweep, tmp_path):
    all_jobs = jobs([sweep])
    assert list(all_jobs["group"]) == ["loss=ce", "loss=ce", "loss=fkl", "loss=rkl"]
    assert list(all_jobs["seed"]) == [0, 1, 0, 0] and all_jobs["status"].iloc[3].startswith("no metrics.json")

    df = report([sweep], tmp_path / "out")
    assert set(df.columns) == {"sweep", "job", "group", "seed", "model", "metric", "value"}
    assert len(df) == 3 * 9  # three finished jobs x nine values; the teacher's are rows of their own
    teacher = df[df["model"] == "teacher"]
    assert set(teacher["group"]) == {"teacher"} and set(teacher["metric"]) == {
        "test/exact_match",
        "test/ppl",
        "test/a/exact_match",
        "test/a/ppl",
    }

    table = group_table(df)
    assert list(table.index) == ["loss=ce", "loss=fkl", "teacher"]
    assert table.loc["loss=ce", ("test/exact_match", "mean")] == pytest.approx(0.3)
    assert table.loc["loss=ce", ("test/exact_match", "std")] == pytest.approx(
        0.02**0.5
    )  # sample std (ddof=1) of 0.2, 0.4
    assert table.loc["loss=ce", ("test/exact_match", "count")] == 2
    assert table.loc["teacher", ("test/ppl", "mean")] == pytest.approx(2.0)
    assert group_table(df, as_text=True).loc["loss=ce", "test/ppl"] == "5 ± 1.4 (2)"
    one_seed = group_table(df[df["seed"] == 0], as_text=True)  # no std anywhere
    assert one_seed.loc["loss=ce", "test/ppl"] == "4 (1)" and one_seed.loc["teacher", "test/ppl"] == "2"
    assert "test/top1_agreement" in one_seed and "test/rougeL" not in one_seed
    assert best_groups(df)["test/exact_match"] == "loss=fkl" and best_groups(df)["test/ppl"] == "loss=fkl"

    out = tmp_path / "out"
    assert sorted(Path(f).name for f in df.attrs["figures"]) == sorted(
        ["final_metrics.png", "per_domain.png", "learning_curves.png", "domain_curves.png", "ddk_weights.png"]
    )
    for name in df.attrs["figures"]:
        assert Path(name).stat().st_size > 5000  # a real image, not an empty canvas
    assert (out / "report.csv").is_file() and (out / "groups.csv").is_file()


def test_history_keeps_the_training_curve_only(sweep):
    h = history(sweep / "0")
    assert list(h["step"]) == [0, 1, 3]  # step 4 (validation + test of the best checkpoint) dropped
    assert list(h["val/loss"].dropna()) == [1.2, 0.9] and list(h["data/weight/a"].dropna()) == [0.5, 0.7]
    assert history(sweep / "2") is None


def test_command_and_latest_sweep(sweep, tmp_path, capsys, monkeypatch):
    main([str(sweep), "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert "loss=fkl" in printed and "final_metrics.png" in printed
    monkeypatch.chdir(tmp_path)
    older = tmp_path / "outputs" / "sweeps" / "2025-12-31" / "23-00-00"
    _job(older, "0", ["loss=ce"], _metrics(0.1, 5.0))
    assert latest_sweep() == sweep
    with pytest.raises(FileNotFoundError, match="kdlab.train -m"):
        latest_sweep("/")  # no outputs/sweeps at or above /


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_a_tiny_sweep(tmp_path, cache_dir):
    """The README's main command, shrunk (default logger: offline W&B), then the notebook on it."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("logger=")]
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdlab.train", "-m", "loss=ce,fkl", "seed=0,1", *tiny, f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/rougeL" in result.stdout  # the sweep summary shows the new metrics

    # learning curves come from the offline W&B run files, which also hold the full resolved config
    # and the samples tables of every validation and of the test
    h = history(sweep / "0")
    assert h is not None and h["val/loss"].notna().sum() == 2
    (run_file,) = (sweep / "0").glob("wandb/offline-run-*/run-*.wandb")
    config = {
        u.key for r in wandb_records(run_file) if r.WhichOneof("record_type") == "config" for u in r.config.update
    }
    assert {"model", "loss", "data", "trainer", "eval", "seed"} <= config
    tables = run_file.parent / "files" / "media" / "table"
    assert (
        len(list((tables / "val").glob("samples_*.table.json"))) == 3
    )  # two validations in fit, one of the best checkpoint
    assert list((tables / "test").glob("samples_*.table.json"))

    nb = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    os.environ["KDLAB_SWEEP"] = str(sweep)  # the kernel inherits the environment
    try:
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
        ).execute()
    finally:
        del os.environ["KDLAB_SWEEP"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "loss=fkl" in text and "test/grammar/true_kl" in text and "teacher" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # final, per-domain, two kinds of curves
    for name in ("final_metrics", "per_domain", "learning_curves", "domain_curves"):
        assert (sweep / "report" / f"{name}.png").is_file()
