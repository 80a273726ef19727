"""The bad-input table (docs/long-runs-and-failures.md): each user error stops before any model is built, naming cause and fix."""

import pytest
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
    with pytest.raises((InstantiationException, ValueError, MissingMandatoryValue), match=message):
        run(tiny_cfg(*overrides))


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
