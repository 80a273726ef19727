"""Exact resume: a run killed after its first checkpoint and resumed ends as if it had never stopped."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from kdlab.train import run
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


class KillAt(L.Callback):
    """SIGKILLs its own process at training step ``KDLAB_TEST_KILL_AT`` (unset: does nothing), like a node lost."""

    def on_train_batch_start(self, trainer, *args):
        at = os.environ.get("KDLAB_TEST_KILL_AT")
        if at and trainer.global_step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


class TermInValidationAt(L.Callback):
    """Sends SIGTERM to its own process during the validation at step ``KDLAB_TEST_TERM_AT`` (pre-emption)."""

    def on_validation_batch_start(self, trainer, *args):
        at = os.environ.get("KDLAB_TEST_TERM_AT")
        if at and trainer.global_step == int(at) and trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGTERM)


RUN = [*TINY, "trainer.max_steps=9", "+callbacks.kill._target_=tests.test_resume.KillAt", "+callbacks.term._target_=tests.test_resume.TermInValidationAt"]


def start(out, cache_dir, overrides, kill_at=None, term_at=None):
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    env.pop("KDLAB_TEST_KILL_AT", None)
    env.pop("KDLAB_TEST_TERM_AT", None)
    if kill_at is not None:
        env["KDLAB_TEST_KILL_AT"] = str(kill_at)
    if term_at is not None:
        env["KDLAB_TEST_TERM_AT"] = str(term_at)
    cmd = [sys.executable, "-m", "kdlab.train", *RUN, *overrides, f"hydra.run.dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["data/mixing=ddk"], ["loss=minillm", "loss.rollout.mini_batch_size=4"]], ids=["ddk", "minillm"])
def test_killed_after_the_first_checkpoint_and_resumed_gives_the_uninterrupted_metrics(tmp_path, cache_dir, overrides):
    whole = start(tmp_path / "whole", cache_dir, overrides)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = start(tmp_path / "run", cache_dir, overrides, kill_at=4)  # checkpoints at step 3 (validation), killed at 4
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = start(tmp_path / "run", cache_dir, [*overrides, "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr or "Resuming" in resumed.stdout
    timing = ("train/tokens_per_sec", "train/step_time")  # wall-clock measurements, not results
    expected = {k: v for k, v in json.loads((tmp_path / "whole" / "metrics.json").read_text()).items() if k not in timing}
    got = {k: v for k, v in json.loads((tmp_path / "run" / "metrics.json").read_text()).items() if k not in timing}
    assert got.keys() == expected.keys()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # logger=csv: the rows logged before the kill are kept, and the test metrics joined the header
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert {0, 1, 2}.issubset(steps) and any(r.get("test/loss") for r in rows)


@pytest.mark.slow
def test_sigterm_during_a_validation_then_resume_gives_the_uninterrupted_metrics(tmp_path, cache_dir):
    whole = start(tmp_path / "whole", cache_dir, ["data/mixing=ddk", "data.eval_batch_size=4"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = start(tmp_path / "run", cache_dir, ["data/mixing=ddk", "data.eval_batch_size=4"], term_at=6)  # validations of 5 batches at steps 3, 6, 9
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "during the validation at step 6; kept" in stopped.stderr and not (tmp_path / "run" / "metrics.json").exists()
    resumed = start(tmp_path / "run", cache_dir, ["data/mixing=ddk", "data.eval_batch_size=4", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    timing = ("train/tokens_per_sec", "train/step_time")
    expected = {k: v for k, v in json.loads((tmp_path / "whole" / "metrics.json").read_text()).items() if k not in timing}
    got = {k: v for k, v in json.loads((tmp_path / "run" / "metrics.json").read_text()).items() if k not in timing}
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_resuming_with_another_config_names_the_keys_and_a_used_folder_needs_resume(tiny_cfg, tmp_path):
    first = tiny_cfg("trainer.max_steps=3", "logger=wandb")
    first.paths.output_dir = str(tmp_path / "run")
    run(first)
    run_id = (tmp_path / "run" / "kdlab" / "wandb_id").read_text()

    def again(*overrides):
        cfg = tiny_cfg("trainer.max_steps=3", "logger=wandb", *overrides)
        cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    with pytest.raises(ValueError, match=r"started with another config; differing keys: loss\.divergence\._target_"):
        run(again("loss=rkl", "resume=auto"))
    with pytest.raises(FileExistsError, match=r"already holds a run .*continue it with resume=auto"):
        run(again())
    run(again("resume=auto"))  # the same config continues (here: already finished) in the same W&B run
    assert (tmp_path / "run" / "kdlab" / "wandb_id").read_text() == run_id
    assert len({p.name.split("-")[-1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")}) == 1
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope.ckpt is not a checkpoint file"):
        run(again(f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def test_ckpt_path_is_checked_against_its_run_and_its_format_before_any_model(tiny_cfg, tmp_path, monkeypatch):
    first = tiny_cfg("trainer.max_steps=3")
    first.paths.output_dir = str(tmp_path / "run")
    run(first)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    monkeypatch.setattr("kdlab.train.build_model", lambda *a: pytest.fail("a model was built before the refusal"))

    def elsewhere(*overrides):
        cfg = tiny_cfg("trainer.max_steps=3", *overrides)
        cfg.paths.output_dir = str(tmp_path / "other")
        return cfg

    with pytest.raises(ValueError, match=r"ckpt_path: the run that wrote .*last.ckpt was started with another config; differing keys: loss\.divergence\._target_"):
        run(elsewhere("loss=tvd", f"ckpt_path={ckpt}"))
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.ckpt is not a PyTorch checkpoint"):
        run(elsewhere(f"ckpt_path={tmp_path / 'notes.ckpt'}"))


def test_a_moved_run_folder_resumes(tiny_cfg, tmp_path):
    first = tiny_cfg("trainer.max_steps=3")
    first.paths.output_dir = str(tmp_path / "run")
    run(first)
    (tmp_path / "run").rename(tmp_path / "moved")
    again = tiny_cfg("trainer.max_steps=3", "resume=auto")
    again.paths.output_dir = str(tmp_path / "moved")
    assert run(again)  # the checkpoint folder and the trainer's root moved with it: no config difference


def test_the_best_checkpoint_record_moves_with_the_run_folder(tmp_path, recwarn):
    import torch

    from kdlab.callbacks.checkpoint import RunCheckpoint

    old, new = tmp_path / "run" / "checkpoints", tmp_path / "moved" / "checkpoints"
    callback = RunCheckpoint(dirpath=str(new), filename="best", monitor="val/loss", save_last=True)
    callback.load_state_dict({
        "dirpath": str(old), "best_model_score": torch.tensor(1.25), "best_model_path": str(old / "best.ckpt"),
        "kth_best_model_path": str(old / "best.ckpt"), "kth_value": torch.tensor(1.25),
        "best_k_models": {str(old / "best.ckpt"): torch.tensor(1.25)}, "last_model_path": str(old / "last.ckpt"),
    })
    assert callback.best_model_score == 1.25  # Lightning alone would forget it: the next validation would be "best"
    assert callback.best_model_path == str(new / "best.ckpt") and callback.last_model_path == str(new / "last.ckpt")
    assert list(callback.best_k_models) == [str(new / "best.ckpt")]
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_a_run_folder_saved_with_resolved_paths_still_resumes(tiny_cfg, tmp_path):
    """Earlier kdlab versions saved the config with its paths resolved (the checkpoint folder, the trainer's root)."""
    from omegaconf import OmegaConf

    from kdlab.resume import IGNORED

    first = tiny_cfg("trainer.max_steps=3")
    first.paths.output_dir = str(tmp_path / "run")
    run(first)
    old_layout = {k: v for k, v in OmegaConf.to_container(first, resolve=True).items() if k not in IGNORED}
    (tmp_path / "run" / "kdlab" / "config.yaml").write_text(OmegaConf.to_yaml(old_layout))
    assert str(tmp_path / "run") in old_layout["callbacks"]["model_checkpoint"]["dirpath"]
    again = tiny_cfg("trainer.max_steps=3", "resume=auto")
    again.paths.output_dir = str(tmp_path / "run")
    assert run(again)


# -- checkpoints are written atomically; a damaged one is refused by resume=auto -------------------------
def _full_disk_at(step, written):
    """torch.save that records where it writes and, for the checkpoint of ``step``, writes a part of it and fails as a full disk does."""
    import errno

    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj:
            written.append(getattr(f, "name", f))
            if obj["global_step"] == step:
                f.write(b"PK\x03\x04" + b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    return save


def test_a_checkpoint_write_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import torch

    from kdlab.callbacks.checkpoint import AtomicCheckpointIO
    from kdlab.resume import is_checkpoint

    path, written = tmp_path / "checkpoints" / "last.ckpt", []
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "save", _full_disk_at(6, written))
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 6, "w": torch.zeros(2)}, path)
    assert written == [str(path.with_name(f".last.ckpt.tmp-{os.getpid()}"))]  # beside its target, then renamed over it
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"] and is_checkpoint(path)  # no temporary file left
    assert torch.load(path, weights_only=False)["global_step"] == 3


def test_a_full_disk_at_a_checkpoint_during_training_keeps_the_previous_ones(tiny_cfg, monkeypatch):
    import torch

    written = []
    monkeypatch.setattr(torch, "save", _full_disk_at(6, written))
    cfg = tiny_cfg("trainer.max_steps=6", "trainer.val_check_interval=3")
    with pytest.raises(OSError, match="No space left"):
        run(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    # the run's checkpoints went through the atomic writer (Lightning's own copies a buffer onto the path)
    assert written and all(isinstance(w, str) and Path(w).parent == folder and Path(w).name.startswith((".best.ckpt.tmp-", ".last.ckpt.tmp-")) for w in written)
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(folder / name, weights_only=False)["global_step"] == 3  # the validation before the full disk


def test_resume_auto_refuses_a_damaged_last_checkpoint_naming_it_and_the_fix(tiny_cfg, tmp_path, monkeypatch):
    first = tiny_cfg("trainer.max_steps=3")
    first.paths.output_dir = str(tmp_path / "run")
    run(first)
    last, best = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "run" / "checkpoints" / "best.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short, as by a full disk or a kill
    monkeypatch.setattr("kdlab.train.build_model", lambda *a: pytest.fail("a model was built before the refusal"))
    again = tiny_cfg("trainer.max_steps=3", "resume=auto")
    again.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"resume=auto: {last} is damaged, not a complete PyTorch checkpoint.*ckpt_path= \(here: {best}\)"):
        run(again)
    best.unlink()
    with pytest.raises(ValueError, match=r"last.ckpt is damaged.*delete it to start the run again"):
        run(again)
