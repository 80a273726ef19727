"""The bad-input table (docs/long-runs-and-failures.md): each user error stops before any model is built, naming cause and fix."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf.errors import MissingMandatoryValue

import kdlab.train
from kdlab.train import run
from tests.conftest import CONF_DIR


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(kdlab.train, "build_model", refuse)


@pytest.mark.parametrize("group", ["model", "loss", "data", "trainer", "logger", "experiment", "launcher", "hparams_search"])
def test_an_unknown_option_in_any_group_lists_the_valid_ones(group):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(MissingConfigException, match=rf"Could not find '{group}/nope'[\s\S]*Available options"):
            compose("train", overrides=[f"{group}=nope"])


def test_an_unknown_key_says_how_to_add_one():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match=r"Could not override 'loss.nope'[\s\S]*\+loss.nope=1"):
            compose("train", overrides=["loss.nope=1"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=jsd", "loss.divergence.beta=1.5"], r"beta must be in \[0, 1\]"),
        (["loss=skl", "loss.divergence.alpha=1.5"], r"skl alpha must be in \[0, 1\)"),
        (["loss=fkl", "loss.temperature=-1"], r"loss.temperature must be > 0"),
        (["loss=rlkd", "loss.k=0"], r"loss.k must be >= 1"),
        (["loss=rlkd", "loss.k=200000"], r"loss.k=200000: each position ranks up to 2k values.*Set loss.k <= 256"),
        (["loss=minillm", "loss.rollout.teacher_mix=2"], r"invalid rollout setting\(s\) teacher_mix=2"),
        (["loss=fkl", "+loss.k=3"], r"unexpected keyword argument 'k'"),
        (["loss=minillm", "+loss.fused_head=true"], r"unexpected keyword argument 'fused_head'"),
        (["data.batch_size=0"], r"data.batch_size and data.eval_batch_size must be >= 1"),
        (["eval.temperature=0"], r"eval.temperature must be > 0"),
        (["data.splits.n_train=0"], r"the training split is empty"),
        (["data/mixing=static"], r"Missing mandatory value: data.mixing"),
        (["module.warmup_steps=50", "trainer.max_steps=20"], r"module.warmup_steps=50 is above trainer.max_steps=20: the learning rate would peak at 40%.*module.warmup_steps=2"),
        (["model.student_training.warmup_steps=20"], r"model.student_training.warmup_steps=20 is above its max_steps=10"),
        (["data/mixing=ddk", "trainer.val_check_interval=6"], r"data/mixing=ddk reweights the domains at each validation.*val_check_interval=6 is not below trainer.max_steps=6"),
        (["trainer.precision=16-mixed"], r"trainer.precision=16-mixed is float16, which needs a GPU.*bf16-mixed or 32-true"),
        (["trainer.gradient_clip_val=-1"], r"trainer.gradient_clip_val=-1 must be a number >= 0"),
        (["+data.max_new_tokens=0"], r"data.max_new_tokens=0 must be >= 1"),
        (["data.mixing={}"], r"data.mixing is empty: name each domain's weight, e.g. data.mixing='\{add: 2, ...\}'"),
        (["data/mixing=static", "data.mixing={add: 4, nope: 1}"], r"data.mixing names unknown domain\(s\) \['nope'\]"),
    ],
)
def test_out_of_range_parameters_stop_before_models(tiny_cfg, no_models, overrides, message):
    from kdlab.errors import user_message

    with pytest.raises((InstantiationException, ValueError, MissingMandatoryValue), match=message) as stop:
        run(tiny_cfg(*overrides))
    assert user_message(stop.value) is not None  # a user error: its message alone, exit status 2


def test_sequences_longer_than_the_models_positions_stop_before_any_training(tiny_cfg, monkeypatch):
    monkeypatch.setattr("kdlab.warm_start.load_or_train", lambda *a, **k: pytest.fail("a model trained before the refusal"))
    monkeypatch.setattr("kdlab.build.load_or_train", lambda *a, **k: pytest.fail("a model trained before the refusal"))
    cfg = tiny_cfg("model.teacher.config.max_position_embeddings=8")
    with pytest.raises(ValueError, match=r"needs \d+ positions, and the teacher has 8 \(its config's position limit\).*data.max_length"):
        run(cfg)


def test_a_cluster_option_without_its_plugin_says_how_to_install_it(monkeypatch):
    import importlib.util

    from kdlab.errors import missing_plugin

    assert missing_plugin(["launcher=local", "loss=fkl"]) is None  # installed by the test command's [dev] extra
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "joblib" in name else real(name, *a))
    assert "launcher=local needs a Hydra plugin" in missing_plugin(["-m", "launcher=local"]) and "[cluster]" in missing_plugin(["launcher=local"])
    assert missing_plugin(["hparams_search=optuna"]) is None


def test_a_run_folder_without_room_for_its_checkpoints_stops_before_training(tiny_cfg, monkeypatch):
    import shutil
    from collections import namedtuple

    from kdlab.errors import NotEnoughSpace, user_message

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr("kdlab.train.DistillModule", lambda *a, **k: pytest.fail("training was set up despite the full disk"))
    with pytest.raises(NotEnoughSpace, match=r"has 0 MiB free, and this run writes about .* MiB.*hydra.run.dir") as stop:
        run(tiny_cfg())
    assert user_message(stop.value) == str(stop.value)  # shown as kdlab's message, exit status 2


def test_an_unknown_setting_of_a_loss_is_named_as_a_setting(tiny_cfg, no_models):
    from kdlab.errors import user_message

    with pytest.raises(InstantiationException) as stop:
        run(tiny_cfg("loss=minillm", "+loss.fused_head=true"))
    assert user_message(stop.value) == "loss.fused_head is not a setting of MiniLLM (loss); remove it or check its spelling"


# -- a user error is one kdlab raises: the same types raised inside a library are crashes ---------------
def torch_fails(*args, **kwargs):
    """A config target whose call fails inside torch, with a ValueError of torch's own (mismatched batch sizes)."""
    torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as err:
        return err
    pytest.fail("nothing was raised")


def test_a_user_error_is_one_kdlab_raises_and_the_same_type_from_torch_is_a_crash(tiny_cfg, no_models):
    import logging

    from kdlab.errors import PACKAGE, stop_for_user_error, user_message

    log = logging.getLogger(__name__)
    ours, torchs = _raised(lambda: run(tiny_cfg("module.lr=-1"))), _raised(torch_fails)
    assert isinstance(ours, ValueError) and isinstance(torchs, ValueError)
    assert user_message(ours) == str(ours) and user_message(torchs) is None
    with pytest.raises(SystemExit) as stop:
        stop_for_user_error(ours, log)
    assert stop.value.code == 2
    assert stop_for_user_error(torchs, log) is None  # the entry point re-raises it: its traceback, exit status 1
    # raised while Hydra builds a config node: judged by its cause, raised in torch
    wrapped = _raised(lambda: run(tiny_cfg("model.tokenizer._target_=tests.test_bad_input.torch_fails")))
    assert isinstance(wrapped, InstantiationException) and user_message(wrapped) is None
    # in kdlab's own files, a raise statement is a check; a failing built-in operation is a bug
    where = str(Path(PACKAGE) / "checks_here.py")
    assert user_message(_raised(lambda: exec(compile("raise ValueError('set x >= 1')", where, "exec")))) == "set x >= 1"
    assert user_message(_raised(lambda: exec(compile("x, y = [1]", where, "exec")))) is None
    assert user_message(ValueError("never raised")) is None


def test_a_check_raised_in_a_tokenising_worker_is_still_a_user_error(tmp_path):
    """data.num_proc: datasets re-raises a worker's error in the parent, its traceback in the cause."""
    import json

    from examples.tiny_pair import tokenizer as family_tokenizer
    from kdlab.data.files import Encoding, Source, load_records
    from kdlab.errors import user_message

    chat = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for _ in range(4)))
    err = _raised(lambda: load_records([Source(path, None)], family_tokenizer("gpt2"), Encoding(max_length=64), "train", num_proc=2))
    assert "need a chat template" in str(err) and user_message(err) == str(err)


@pytest.mark.slow
def test_exit_status_2_for_a_user_error_and_1_with_the_traceback_for_an_error_raised_in_torch(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import TINY

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def train(*args):
        cmd = [sys.executable, "-m", "kdlab.train", *TINY, *args, f"hydra.run.dir={tmp_path / str(len(args))}"]
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        return result.returncode, result.stdout + result.stderr

    status, out = train("module.lr=-1")
    assert status == 2 and "module.lr=-1 must be a finite number > 0" in out and "Traceback" not in out, out[-2000:]
    status, out = train("model.tokenizer._target_=tests.test_bad_input.torch_fails", "seed=1")
    assert status == 1 and "Traceback" in out and "Expected input batch_size (2) to match target batch_size (3)" in out, out[-2000:]
