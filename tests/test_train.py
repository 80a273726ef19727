"""End-to-end runs of kdlab.train on tiny models, in process, and its user-facing errors."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException, MissingConfigException
from transformers import AutoModelForCausalLM, LlamaConfig

from kdlab.models import distillation_vocab_size, from_config
from kdlab.train import run
from tests.conftest import CONF_DIR


def test_run_writes_metrics_exports_student_and_keeps_teacher_out_of_checkpoints(tiny_cfg):
    cfg = tiny_cfg("loss=jsd")
    metrics = run(cfg)
    out = cfg.paths.output_dir
    saved = json.loads(open(f"{out}/metrics.json").read())
    assert saved == pytest.approx(metrics)
    for domain in cfg.data.splits.domains:
        for key in (f"val/{domain}/ppl", f"val/{domain}/exact_match", f"test/{domain}/ppl", f"test/{domain}/teacher_exact_match"):
            assert key in saved, key
        assert saved[f"test/{domain}/loss"] == pytest.approx(torch.tensor(saved[f"test/{domain}/ppl"]).log().item(), rel=1e-5)
        assert 0.0 <= saved[f"test/{domain}/exact_match"] <= 1.0
    for key in ("top1_agreement", "top5_consistency", "top20_overlap"):  # logged for every objective
        assert 0.0 <= saved[f"val/{key}"] <= 1.0 and 0.0 <= saved[f"test/{key}"] <= 1.0
    assert saved["test/exact_match"] == pytest.approx(sum(saved[f"test/{d}/exact_match"] for d in cfg.data.splits.domains) / 5)

    student = AutoModelForCausalLM.from_pretrained(f"{out}/student", local_files_only=True)
    generated = student.generate(torch.tensor([[1, 5, 6]]), min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)

    checkpoint = torch.load(f"{out}/checkpoints/best.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]


def test_teacher_is_cached_and_never_updated(tiny_cfg, caplog):
    from hydra.utils import instantiate

    from kdlab.build import build_model

    cfg = tiny_cfg()
    tok = instantiate(cfg.model.tokenizer)
    dm = instantiate(cfg.data, tokenizer=tok)
    first = build_model(cfg, "teacher", tok, dm)
    with caplog.at_level("INFO"):
        second = build_model(cfg, "teacher", tok, dm)
    assert "Loading the cached teacher" in caplog.text
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    # a changed teacher config is a different cache entry, never the stale one
    cfg.model.teacher_training.max_steps = 31
    from kdlab.cache import cache_key

    assert cache_key(cfg.model.teacher_training) != cache_key(tiny_cfg().model.teacher_training)


def test_rlkd_on_another_base_logs_its_parts(tiny_cfg):
    """`loss=rlkd loss.base=tvd` trains and logs L_rank and L_base (CSV logger columns)."""
    import csv

    cfg = tiny_cfg("loss=rlkd", "loss.base=tvd")
    run(cfg)
    with open(f"{cfg.paths.output_dir}/csv/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("train/L_rank")]
    assert logged and all(0.0 <= float(r["train/L_rank"]) <= 2.0 for r in logged)
    assert all(float(r["train/loss"]) == pytest.approx(2.0 * float(r["train/L_rank"]) + float(r["train/L_base"]), rel=1e-5) for r in logged)


def test_experiment_configs_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=rlkd"], return_hydra_config=True)
    assert cfg.loss._target_ == "kdlab.losses.rlkd.RankingKD" and cfg.loss.k == 5
    assert dict(cfg.hydra.sweeper.params) == {"loss.base": "fkl,tvd", "loss.rank_weight": "0,2"}


def test_unknown_option_lists_valid_ones():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose("train", overrides=["loss=nope"])
    message = str(err.value)
    assert "nope" in message and "fkl" in message and "rkl" in message


def test_every_loss_config_trains(tiny_cfg):
    """Every kdlab/conf/loss option runs a (tiny) distillation without error and gives finite metrics."""
    from kdlab.losses.base import needs_of
    from kdlab.losses.divergences import available_losses, load_loss

    for name in available_losses():
        if needs_of(load_loss(name)).aligned:
            continue  # across tokenizers: file data only (tests/test_across.py)
        cfg = tiny_cfg(f"loss={name}", "trainer.max_steps=2", "trainer.val_check_interval=2")
        cfg.paths.output_dir = f"{cfg.paths.output_dir}-{name}"
        metrics = run(cfg)
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), name


def test_vocabulary_checks(caplog):
    class Tok:
        def __len__(self):
            return 40

    def model(vocab):
        return from_config(LlamaConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))

    assert distillation_vocab_size(model(40), model(40), Tok()) == 40
    with caplog.at_level("INFO"):
        assert distillation_vocab_size(model(48), model(40), Tok()) == 40  # padded up: compare over the tokenizer
    assert "differ only by padding" in caplog.text
    with pytest.raises(ValueError, match=r"teacher vocabulary size 48 and student vocabulary size 32"):
        distillation_vocab_size(model(48), model(32), Tok())


def test_sequence_length_too_small_names_the_fix(tiny_cfg):
    cfg = tiny_cfg("data.max_length=8")
    # Hydra wraps errors raised while building an object; the message still names cause and fix
    with pytest.raises(InstantiationException, match=r"data.max_length=8 is too small.*Set data.max_length=17"):
        run(cfg)


def test_hf_model_folders_distil_on_the_suite(tiny_cfg, tmp_path, cache_dir):
    """`model=hf`: teacher and student from local Hugging Face folders (here: an exported student), on the suite."""
    from tests.conftest import TINY

    first = tiny_cfg("trainer.max_steps=2", "trainer.val_check_interval=2")
    run(first)
    exported = f"{first.paths.output_dir}/student"
    data_and_trainer = [o for o in TINY if not o.startswith("model.")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*data_and_trainer, "model=hf", f"model.teacher.path={exported}", f"model.student.path={exported}"])
    cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "local"), str(cache_dir)
    metrics = run(cfg)
    assert 0.0 <= metrics["test/exact_match"] <= 1.0
    assert AutoModelForCausalLM.from_pretrained(f"{tmp_path}/local/student", local_files_only=True) is not None
