"""No silent wrong results: every run that cannot do what was asked fails, clearly and early."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import BertConfig, BertLMHeadModel

import kdlab.train
from kdlab.cache import MANIFEST, data_fingerprint
from kdlab.losses.base import LossOutput, Needs
from kdlab.module import DistillModule
from kdlab.preflight import check_trained
from kdlab.train import run
from kdlab.warm_start import load_cached, load_or_train
from tests.conftest import CONF_DIR, TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_models(monkeypatch):
    """Fails the test if a model is built: a preflight error must come before any expensive work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad setting was reported")

    monkeypatch.setattr(kdlab.train, "build_model", refuse)


# -- 1, 2, 6: settings that cannot work are refused before any model is built ----------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=0", r"trainer.max_steps=0 trains nothing"),
        ("module.min_lr_ratio=-1", r"module.min_lr_ratio=-1.* gradient ascent"),
        ("module.lr=1e6", r"module.lr=1000000.0 is above 1"),
        ("module.lr=-1", r"module.lr=-1 must be a finite number > 0"),
        ("module.betas=[0.9]", r"module.betas=\[0.9\] must be two numbers"),
        ("trainer.val_check_interval=0", r"trainer.val_check_interval=0 is invalid"),
        ("model.student_training.max_steps=0", r"model.student_training.max_steps=0 trains nothing"),
        ("model.teacher_training.min_lr_ratio=-1", r"model.teacher_training.min_lr_ratio=-1"),
    ],
)
def test_bad_settings_stop_before_models_are_built(tiny_cfg, no_models, override, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_cfg(override))


def test_batch_larger_than_the_training_set_stops_before_models(tiny_cfg, no_models):
    with pytest.raises(ValueError, match=r"data.batch_size=1000 is larger than the training set \(200 records\)"):
        run(tiny_cfg("data.batch_size=1000"))


@pytest.mark.parametrize("value, message", [("", "cache path is empty"), ("FILE", "is a file; point it at a folder")])
def test_cache_path_is_checked_before_the_teacher_trains(tiny_cfg, no_models, tmp_path, value, message):
    cfg = tiny_cfg()
    if value == "FILE":
        value = tmp_path / "a_file"
        value.write_text("")
    cfg.paths.cache_dir = str(value)
    with pytest.raises((ValueError, NotADirectoryError), match=message):
        run(cfg)


def test_a_run_that_took_no_step_is_never_exported():
    trainer = type("T", (), {"global_step": 0})()
    with pytest.raises(RuntimeError, match="took no optimiser step"):
        check_trained(trainer, torch.nn.Linear(2, 2))


# -- 3: nothing non-finite is ever exported or cached ----------------------------------------------
class NaNAfter:
    """A test loss: cross-entropy for ``steps`` calls, then NaN (a diverging run)."""

    needs = Needs(teacher=False)

    def __init__(self, steps: int = 3, chunk_size=None, fused_head=False):  # kdlab/conf/loss/ce.yaml's settings, unused
        self.steps, self.calls = steps, 0

    def __call__(self, batch):
        self.calls += 1
        logits = batch.student_logits.flatten(0, 1).float()
        loss = torch.nn.functional.cross_entropy(logits, batch.labels.flatten(), ignore_index=-100)
        return LossOutput(loss=loss * (float("nan") if self.calls > self.steps else 1.0), logs={})


def test_a_nan_loss_stops_the_run_naming_step_and_domains_and_exports_nothing(tiny_cfg):
    cfg = tiny_cfg("loss=ce", f"loss._target_={__name__}.NaNAfter", "+loss.steps=4")
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 4 \(batch domains: \[.*'add'.*\]\).*Lower module.lr"):
        run(cfg)
    out = Path(cfg.paths.output_dir)
    assert not (out / "metrics.json").exists() and not (out / "student").exists()
    assert (out / "checkpoints" / "best.ckpt").is_file()  # the last good student (validated at step 3) is kept


class InfGradient(NaNAfter):
    """A test loss whose value stays finite while, after ``steps`` calls, its gradient is inf."""

    def __call__(self, batch):
        self.calls += 1
        logits = batch.student_logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        if self.calls > self.steps:
            loss = loss + _InfGradient.apply(logits)
        return LossOutput(loss=loss, logs={})


class _InfGradient(torch.autograd.Function):
    """0 in the forward pass, an infinite gradient in the backward pass (an overflow in backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def test_a_non_finite_gradient_stops_the_run_before_the_step(tiny_cfg):
    cfg = tiny_cfg("loss=ce", f"loss._target_={__name__}.InfGradient", "+loss.steps=4")
    with pytest.raises(FloatingPointError, match=r"the gradient is not finite at step 4"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()


def test_diverged_weights_are_refused():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weights are not finite.*weight"):
        check_trained(type("T", (), {"global_step": 5})(), model)
    with pytest.raises(FloatingPointError, match=r"final metrics are not finite \(test/ppl\)"):
        check_trained(type("T", (), {"global_step": 5})(), torch.nn.Linear(2, 2), {"test/ppl": float("nan"), "val/ppl": 2.0})


def test_a_diverging_teacher_training_is_never_cached(tiny_cfg, tmp_path, monkeypatch):
    import kdlab.warm_start

    monkeypatch.setattr(kdlab.warm_start, "CrossEntropy", lambda: NaNAfter(steps=2))
    cfg = tiny_cfg()
    tok = instantiate(cfg.model.tokenizer)
    dm = instantiate(cfg.data, tokenizer=tok)
    model = instantiate(cfg.model.teacher, tokenizer=tok)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 2"):
        load_or_train(model, cfg.model.teacher_training, "key", str(tmp_path), tok, dm)
    assert not any((tmp_path / "teachers").glob("key*")) if (tmp_path / "teachers").exists() else True


# -- 4: a student that reads future tokens ---------------------------------------------------------
def test_a_bert_student_is_refused_before_training(tmp_path):
    from examples.tiny_pair import build, tokenizer

    teacher, _ = build("gpt2", tmp_path / "pair")
    tok = tokenizer("gpt2")
    bert = BertLMHeadModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q:", "response": f" {i}"}) + "\n" for i in range(20)))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=hf", f"model.teacher.path={teacher}", f"model.student.path={tmp_path / 'bert'}", "data=files", f"data.train={data}", "logger=csv"])
    cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"student .*bert' is not causal"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- 7, 8: the cache verifies its entries and keys on the data itself ------------------------------
def test_a_corrupted_cache_entry_is_retrained_not_loaded(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg("model.teacher_training.max_steps=3")
    tok = instantiate(cfg.model.tokenizer)
    dm = instantiate(cfg.data, tokenizer=tok)
    load_or_train(instantiate(cfg.model.teacher, tokenizer=tok), cfg.model.teacher_training, "k", str(tmp_path), tok, dm)
    entry = tmp_path / "teachers" / "k"
    assert json.loads((entry / MANIFEST).read_text())["checksums"]
    weights = entry / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-64:] = b"\xff" * 64  # flip the last weights' bytes: loads, but as garbage (NaN/inf)
    weights.write_bytes(bytes(blob))
    with caplog.at_level("WARNING"):
        again = load_or_train(instantiate(cfg.model.teacher, tokenizer=tok), cfg.model.teacher_training, "k", str(tmp_path), tok, dm)
    assert "do not match the checksums" in caplog.text and "building it again" in caplog.text
    assert all(torch.isfinite(p).all() for p in again.parameters())
    caplog.clear()
    reloaded = load_cached(entry, "teacher")  # the retrained entry is valid again
    assert reloaded is not None and "not used" not in caplog.text
    for a, b in zip(again.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_the_cache_key_changes_with_the_data_behind_an_unchanged_config(tiny_cfg, monkeypatch):
    from kdlab.data import suite

    cfg = tiny_cfg()
    tok = instantiate(cfg.model.tokenizer)
    before = data_fingerprint(instantiate(cfg.data, tokenizer=tok))
    assert before == data_fingerprint(instantiate(cfg.data, tokenizer=tok))
    original = suite.build_suite

    def changed_generator(*args, **kwargs):  # a new data generator, same config
        splits = original(*args, **kwargs)
        ex = splits["train"][0]
        splits["train"][0] = type(ex)(ex.domain, ex.prompt, ex.answer + " " + ex.answer.split()[0])
        return splits

    monkeypatch.setattr(suite, "build_suite", changed_generator)
    assert data_fingerprint(instantiate(cfg.data, tokenizer=tok)) != before


def test_the_cache_key_changes_with_the_tokenizer_behind_an_unchanged_config(tiny_cfg, monkeypatch):
    import kdlab.build as build

    keys = []
    monkeypatch.setattr(build, "load_or_train", lambda model, training, key, *a, **k: keys.append(key) or model)
    cfg = tiny_cfg()
    for extra in ([], ["zebra"]):  # a token the data never uses: same tokenised data, a larger embedding
        tok = instantiate(cfg.model.tokenizer)
        tok.add_tokens(extra)
        build.build_model(cfg, "teacher", tok, instantiate(cfg.data, tokenizer=tok))
    assert len(keys) == 2 and keys[0] != keys[1]


def _cache_keys(monkeypatch, role, cfgs):
    """The cache key build_model gives the CE-trained ``role`` under each config (the training itself mocked)."""
    import kdlab.build as build

    keys = []
    monkeypatch.setattr(build, "load_or_train", lambda model, training, key, *a, **k: keys.append(key) or model)
    for cfg in cfgs:
        tok = instantiate(cfg.model.tokenizer)
        build.build_model(cfg, role, tok, instantiate(cfg.data, tokenizer=tok))
    return keys


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_the_held_out_sizes_leave_the_cache_key_of_a_ce_trained_model_unchanged(tiny_cfg, monkeypatch, role):
    """The default teacher and the warm start train on the training records alone (no validation): the
    held-out sizes are no part of their weights, while a setting that changes the training still changes the key."""
    same = _cache_keys(monkeypatch, role, [tiny_cfg(), tiny_cfg("data.splits.n_val=8"), tiny_cfg("data.splits.n_test=16")])
    assert len(same) == 3 and len(set(same)) == 1
    changed = _cache_keys(monkeypatch, role, [tiny_cfg("data.splits.seed=1"), tiny_cfg(f"model.{role}_training.lr=0.01")])
    assert len(set(changed)) == 2 and same[0] not in changed


def test_file_data_the_cache_key_holds_the_training_records_not_the_held_out_files(monkeypatch, tmp_path, cache_dir):
    def jsonl(name, answers):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": "copy a b =", "response": a}) + "\n" for a in answers))
        return path

    train, val, test, other_test = jsonl("train.jsonl", ["a b", "b a", "a a"]), jsonl("val.jsonl", ["c"]), jsonl("test.jsonl", ["d"]), jsonl("t2.jsonl", ["e"])

    def files_cfg(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=["data=files", f"data.train={train}", f"data.val={val}", f"data.test={test}", *overrides])
        cfg.paths.cache_dir = str(cache_dir)
        return cfg

    keys = _cache_keys(monkeypatch, "student", [files_cfg(), files_cfg(f"data.test={other_test}"), files_cfg("data.eval_batch_size=3")])
    assert len(set(keys)) == 1
    jsonl("train.jsonl", ["a b", "b a", "b b"])  # one training answer edited: other weights
    assert _cache_keys(monkeypatch, "student", [files_cfg()])[0] != keys[0]


# -- 9: unique run folders -------------------------------------------------------------------------
def test_run_folders_carry_the_process_id():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith(f"-{os.getpid()}") and cfg.hydra.sweep.dir.endswith(f"-{os.getpid()}")


# -- 10, 11: interrupted runs and failing sweep jobs say so ----------------------------------------
class TouchOnTrainStart(L.Callback):
    """Writes ``path`` when training starts, so a test knows when to send its signal."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            Path(self.path).write_text("training")


def _start(args, cache_dir, tmp_path):
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    marker = tmp_path / "started"
    cmd = [sys.executable, "-m", "kdlab.train", *args, *TINY, "trainer.max_steps=100000", "trainer.val_check_interval=100000",
           "+callbacks.marker._target_=tests.test_silent_failures.TouchOnTrainStart", f"+callbacks.marker.path={marker}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    return proc


@pytest.mark.slow
def test_sigterm_of_a_run_and_of_a_sweep_exits_non_zero_and_says_what_finished(tmp_path, cache_dir):
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # SIGUSR1: a pre-emption warning, handled alike
        (tmp_path / "started").unlink(missing_ok=True)
        proc = _start([f"hydra.run.dir={tmp_path / sig.name}"], cache_dir, tmp_path)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        assert "interrupted by SIGTERM at step" in stderr and "nothing was exported" in stderr and "resume=auto" in stderr
        assert not (tmp_path / sig.name / "metrics.json").exists()
        assert (tmp_path / sig.name / "checkpoints" / "last.ckpt").is_file()  # saved on the way out, for resume=auto

    (tmp_path / "started").unlink()
    proc = _start(["-m", "loss=ce,fkl", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cache_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "job 0 interrupted, finished jobs: none; later jobs did not run" in stderr
    assert not (tmp_path / "sweep" / "1").exists()


@pytest.mark.slow
def test_a_failing_sweep_job_is_listed_with_its_error_and_the_others_finish(tmp_path, cache_dir):
    env = {**os.environ, "KDLAB_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdlab.train", "-m", "module.min_lr_ratio=-1,0.1", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]  # the sweep did not succeed as a whole
    log = (tmp_path / "sweep" / "0" / "train.log").read_text()
    # a user error: kdlab's message alone, no traceback (kdlab/errors.py)
    assert "module.min_lr_ratio=-1" in log and "gradient ascent" in log and "Traceback" not in log
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert rows["0"]["status"].startswith("failed: module.min_lr_ratio=-1")
    assert float(rows["1"]["test/exact_match"]) >= 0.0 and not rows["1"]["status"]  # the next job ran and finished
    assert "failed: module.min_lr_ratio=-1" in result.stdout and "1 job(s) failed" in result.stderr


@pytest.mark.slow
def test_a_user_error_shows_the_message_alone_with_its_own_exit_status(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdlab.train", *TINY, "module.lr=-1", "+loss.k=3", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "module.lr=-1 must be a finite number > 0" in out and "KDLAB_TRACEBACK=1" in out
    assert "Traceback" not in out and "Error executing job" not in out
    unknown = subprocess.run([*cmd[:-3], "+loss.k=3", f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert unknown.returncode == 2 and "loss.k is not a setting of TokenKD (loss); remove it" in unknown.stdout + unknown.stderr
    traced = subprocess.run(cmd, cwd=ROOT, env={**env, "KDLAB_TRACEBACK": "1"}, capture_output=True, text=True, timeout=600)
    assert traced.returncode == 1 and "Traceback" in traced.stderr

def test_a_run_folder_that_cannot_be_created_stops_first(tiny_cfg, no_models, tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = tiny_cfg()
    cfg.paths.output_dir = str(tmp_path / "a_file" / "run")
    with pytest.raises(PermissionError, match=r"the run folder .* cannot be created \(Not a directory\); set hydra.run.dir"):
        run(cfg)


# -- the second round (interruptions, export, accumulation) -----------------------------------------
def test_val_check_interval_counts_optimiser_steps_under_accumulation(tiny_cfg, monkeypatch):
    import kdlab.train as train

    validations, original = [], DistillModule.on_validation_epoch_end
    monkeypatch.setattr(DistillModule, "on_validation_epoch_end", lambda self: validations.append(self.global_step) or original(self))
    train.run(tiny_cfg("trainer.accumulate_grad_batches=2", "data.batch_size=8", "trainer.max_steps=6", "trainer.val_check_interval=3"))
    assert validations[:2] == [3, 6]  # after 3 and 6 optimiser steps, not after 3 micro-batches


def test_sigterm_during_the_final_evaluation_fails_the_run_and_exports_nothing(tiny_cfg, monkeypatch, tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import kdlab.train as train

    def interrupted(*args, **kwargs):
        raise SIGTERMException()

    monkeypatch.setattr(train, "final_metrics", interrupted)
    cfg = tiny_cfg("trainer.max_steps=3")
    with pytest.raises(train.RunInterrupted, match=r"during the final evaluation \(training finished at step 3\).*resume=auto"):
        train.run(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()


def test_a_full_disk_during_the_export_leaves_no_metrics_json(tiny_cfg, monkeypatch):
    from transformers import PreTrainedModel

    import kdlab.train as train

    original = PreTrainedModel.save_pretrained

    def full_disk(self, folder, *args, **kwargs):  # only the export fills the disk (the cached models still save)
        if Path(folder).name == "student":
            raise OSError(28, "No space left on device")
        return original(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    cfg = tiny_cfg("trainer.max_steps=3")
    with pytest.raises(OSError, match="No space left"):
        train.run(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()  # a sweep's summary lists the job as failed


def test_ctrl_c_saves_where_it_stopped_and_says_how_to_continue(tiny_cfg, monkeypatch):
    import kdlab.train as train

    original = DistillModule.training_step

    def pressed_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DistillModule, "training_step", pressed_at_step_2)
    cfg = tiny_cfg("trainer.max_steps=6", "trainer.val_check_interval=6")
    with pytest.raises(train.RunInterrupted, match=r"interrupted by Ctrl-C at step 2 of 6; saved .*last.ckpt: continue with resume=auto") as stop:
        train.run(cfg)
    assert stop.value.status == 130 and (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_a_job_that_failed_after_its_metrics_is_listed_as_failed(tmp_path):
    from kdlab.summary import FAILED, collect

    for job, files in {"0": {"metrics.json": '{"test/loss": 1.0}'}, "1": {"metrics.json": '{"test/loss": 2.0}', FAILED: "OSError: No space left"}}.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        for name, text in files.items():
            (tmp_path / job / name).write_text(text)
    rows = {r["job"]: r for r in collect(tmp_path)}
    assert rows["0"]["test/loss"] == 1.0 and "status" not in rows["0"]
    assert rows["1"]["status"] == "failed: OSError: No space left" and "test/loss" not in rows["1"]


def test_a_sweep_job_that_left_neither_metrics_nor_its_failure_fails_the_sweep(tmp_path, capsys):
    """failed.txt may be unwritable (a full disk): at the multirun's end a job without metrics.json failed."""
    from omegaconf import OmegaConf

    from kdlab.summary import SweepSummary

    for job in ("0", "1"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
    (tmp_path / "0" / "metrics.json").write_text('{"test/loss": 1.0}')
    with pytest.raises(SystemExit) as stop:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "1 job(s) failed or did not finish" in err
    assert "job 1 (seed=1): did not finish: no metrics.json and no failed.txt" in err and "job 0" not in err
    (tmp_path / "1" / "metrics.json").write_text('{"test/loss": 2.0}')
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))  # all finished: no exit
