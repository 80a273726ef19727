"""bench.gpu_real, the GPU script of the real tier, composes on a machine without a GPU (its runs need one)."""

import subprocess
import sys
from pathlib import Path

from bench.gpu_real import RUNS, compose

ROOT = Path(__file__).resolve().parents[1]


def test_every_gpu_run_composes_with_the_real_experiment(tmp_path):
    for name in RUNS:
        cfg = compose(200, tmp_path, name)
        assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.model.teacher.dtype) == ("gpu", "bf16-mixed", "bfloat16")
        assert (cfg.data.batch_size, cfg.data.max_length, cfg.trainer.max_steps) == (16, 256, 200)
        assert cfg.model.student._target_ == "kdlab.models.pruned" and cfg.data._target_.endswith("CorpusDataModule")
        assert cfg.model.teacher.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # the package's file, resolved
    assert compose(200, tmp_path, "fkl-cached").teacher_cache.k == 32


def test_without_a_gpu_the_script_says_so_and_runs_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.gpu_real", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr
    assert not any(tmp_path.iterdir())
