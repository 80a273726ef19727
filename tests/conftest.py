"""Shared fixtures: the real Hydra config, shrunk to tiny models and data (lightning-hydra-template style)."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

# Tiny models run fastest single-threaded, and a 2-core machine stalls badly when torch
# processes (this one, and subprocess runs that inherit the variable) each spin two threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from kdlab import CONF_DIR  # noqa: E402,F401  (tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# tokenised data files are cached by `datasets`; the tests keep that cache out of the user's, and
# remove it at exit (every pytest process would otherwise leave one behind in the temp folder)
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="kdlab-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

# Tiny teacher/student, a few steps, a small suite: a whole run takes seconds.
TINY = [
    "model.teacher.config.hidden_size=32",
    "model.teacher.config.num_hidden_layers=1",
    "model.teacher.config.num_attention_heads=2",
    "model.teacher.config.num_key_value_heads=2",
    "model.teacher.config.intermediate_size=64",
    "model.teacher_training.max_steps=30",
    "model.teacher_training.warmup_steps=5",
    "model.teacher_training.n_train=40",
    "model.student_training.max_steps=10",
    "model.student_training.warmup_steps=2",
    "model.student.config.hidden_size=16",
    "model.student.config.num_hidden_layers=1",
    "model.student.config.num_attention_heads=2",
    "model.student.config.num_key_value_heads=2",
    "model.student.config.intermediate_size=32",
    "data.splits.n_train=40",
    "data.splits.n_val=4",
    "data.splits.n_test=4",
    "data.batch_size=16",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "module.warmup_steps=2",
    "logger=csv",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One teacher cache for the whole session: the tiny teacher is trained once."""
    path = tmp_path_factory.mktemp("kdlab-cache")
    os.environ["KDLAB_CACHE"] = str(path)
    return path


def compose_tiny(output_dir, cache_dir, overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path, cache_dir):
    return lambda *overrides: compose_tiny(tmp_path / "run", cache_dir, overrides)


@pytest.fixture(scope="session")
def qwen_pair(tmp_path_factory):
    """A tiny Qwen2-style teacher/student (152,064 and 151,936 output rows) with Qwen's real tokenizer."""
    from examples.tiny_pair import build

    return build("qwen2", tmp_path_factory.mktemp("qwen2-pair"))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from examples.tiny_pair import tokenizer

    return tokenizer("qwen2")
