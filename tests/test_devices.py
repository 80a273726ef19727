"""More devices and more jobs, one override each: trainer=ddp, launcher=local|slurm, hparams_search=optuna."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kdlab.train import run
from tests.conftest import CONF_DIR, TINY

ROOT = Path(__file__).resolve().parents[1]


def compose_with_hydra(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_trainer_ddp_composes_on_the_default_trainer():
    cfg = compose_with_hydra("trainer=ddp")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == "auto"
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.max_steps == 600  # the rest of the default


def test_trainer_fsdp_composes_and_refuses_a_machine_without_gpus(tiny_cfg, monkeypatch):
    from hydra.utils import instantiate

    import kdlab.train

    cfg = compose_with_hydra("trainer=fsdp")
    assert cfg.trainer.strategy._target_ == "kdlab.distributed.fsdp_strategy" and cfg.trainer.devices == "auto"
    if not __import__("torch").cuda.is_available():
        monkeypatch.setattr(kdlab.train, "build_model", lambda *a, **k: pytest.fail("models built before the FSDP check"))
        with pytest.raises(ValueError, match="trainer=fsdp needs GPUs"):
            run(tiny_cfg("trainer=fsdp"))
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"


def test_launchers_and_the_optuna_sweeper_compose():
    local = compose_with_hydra("launcher=local")
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2
    slurm = compose_with_hydra("launcher=slurm", "hydra.launcher.partition=gpu")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.partition == "gpu"
    optuna = compose_with_hydra("hparams_search=optuna", "loss=jsd")
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper") and optuna.optimized_metric == "val/loss"
    assert set(optuna.hydra.sweeper.params) == {"loss.temperature", "module.lr"}


@pytest.mark.slow
def test_a_joblib_sweep_runs_two_jobs_in_parallel_and_prints_the_table(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdlab.train", "-m", "launcher=local", "loss=ce,fkl", *TINY, f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib" in result.stdout + result.stderr and "Sweep summary" in result.stdout
    with open(sweep / "summary.csv") as f:
        assert [r["overrides"] for r in csv.DictReader(f)] == ["loss=ce", "loss=fkl", "(reference)"]


@pytest.mark.slow
def test_two_process_ddp_reaches_the_metrics_of_one_process_with_the_same_global_batch(tiny_cfg, tmp_path, cache_dir):
    # the same teacher and the same student init in both (their CE training batch is not the per-device one)
    same = ["model.teacher_training.batch_size=16", "model.student_training.batch_size=16", "data.splits.n_train=200"]
    single = run(tiny_cfg("data.batch_size=32", *same))
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(out), str(cache_dir), "data.batch_size=16", *same],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    keys = [k for k in single if k.startswith("test/") and "teacher" not in k]
    assert len(keys) > 20
    assert {k: ddp[k] for k in keys} == pytest.approx({k: single[k] for k in keys}, rel=1e-4, abs=1e-5)

    # the logged training loss is the step's, averaged over the ranks (not rank 0's share)
    def train_losses(run_dir):
        with open(Path(run_dir) / "csv" / "metrics.csv") as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    single_losses, ddp_losses = train_losses(tiny_cfg().paths.output_dir), train_losses(out)
    assert single_losses and ddp_losses.keys() == single_losses.keys()
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4, abs=1e-5)
