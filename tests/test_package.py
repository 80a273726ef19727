"""kdlab as an installed package: a wheel built from the repository composes and runs from anywhere.

The wheel is installed (``pip install --no-deps --no-index``) into a fresh virtual environment
whose only other packages are this environment's dependencies, reached through a ``.pth`` line
(which does not run this environment's editable-install hook): ``import kdlab`` there is the wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding the kdlab wheel, the wheel's file names)."""
    tmp = tmp_path_factory.mktemp("package")
    # built from a copy of what a source distribution holds: setuptools writes build/ beside the sources
    source = tmp / "source"
    shutil.copytree(ROOT / "kdlab", source / "kdlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("kdlab-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, zipfile.ZipFile(wheel).namelist()


def run_elsewhere(python, args, cwd, entry="kdlab.train", **env):
    return subprocess.run(
        [str(python), "-m", entry, *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **env},
    )


def test_the_wheel_ships_every_config(installed):
    _, names = installed
    shipped = {n.removeprefix("kdlab/") for n in names if n.endswith(".yaml")}
    in_repository = {str(p.relative_to(ROOT / "kdlab")) for p in (ROOT / "kdlab" / "conf").rglob("*.yaml")}
    assert in_repository and shipped == in_repository


def test_the_installed_package_is_the_wheel_not_this_checkout(installed, tmp_path):
    python, _ = installed
    where = subprocess.run([str(python), "-c", "import kdlab; print(kdlab.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout


def test_help_and_the_composed_config_from_another_directory(installed, tmp_path):
    python, _ = installed
    helped = run_elsewhere(python, ["--help"], tmp_path)
    assert helped.returncode == 0 and "loss: ce, fkl, gold, jsd, minillm" in helped.stdout, helped.stderr[-2000:]
    job = run_elsewhere(python, ["--cfg", "job", "loss=rlkd", "loss.base=tvd"], tmp_path)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "_target_: kdlab.losses.rlkd.RankingKD" in job.stdout and "chunk_size: auto" in job.stdout
    # a user's own option beside the shipped ones (--config-dir), extending the shared loss settings
    mine = tmp_path / "my_conf" / "loss" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("defaults:\n  - /loss_common/divergence@_here_\n  - _self_\ndivergence:\n  _target_: kdlab.losses.divergences.total_variation\n  _partial_: true\n")
    own = run_elsewhere(python, ["--config-dir", str(mine.parents[1]), "--cfg", "job", "loss=mine"], tmp_path)
    assert own.returncode == 0 and "kdlab.losses.divergences.total_variation" in own.stdout and "temperature: 1.0" in own.stdout, own.stderr[-2000:]


def test_a_two_step_run_from_another_directory(installed, tmp_path):
    python, _ = installed
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    overrides = [*tiny, "loss=rlkd", "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_elsewhere(python, overrides, tmp_path, KDLAB_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "student" / "config.json").is_file()


@pytest.mark.parametrize(
    "entry, args, message",
    [
        ("kdlab.train", ["module.lr=-1"], "module.lr=-1 must be a finite number > 0"),
        ("kdlab.evaluate", ["student=/nonexistent"], "student folder '/nonexistent' does not exist"),
        ("kdlab.generate", ["model=smollm2", "prompts=/nonexistent.jsonl", "out=answers.jsonl"], "prompts file '/nonexistent.jsonl' does not exist"),
    ],
)
def test_every_entry_point_shows_a_user_error_alone(installed, tmp_path, entry, args, message):
    python, _ = installed
    result = run_elsewhere(python, [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, entry=entry)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and message in out and "Traceback" not in out, out[-2000:]
