"""Distil a teacher into a student: seed → build → fit → test → export.

    python -m kdlab.train                              # one run on the built-in suite
    python -m kdlab.train -m loss=ce,fkl,rkl,jsd       # a sweep; prints and saves summary.csv
    python -m kdlab.train loss=jsd loss.divergence.beta=0.9 trainer.max_steps=2000 logger=csv

Each run folder (outputs/runs/... or outputs/sweeps/.../<job>) holds ``metrics.json`` (final
val/test metrics), ``student/`` (the student and tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained``) and the logger's files (``wandb/`` or ``csv/``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdlab.models import check_causal, check_tokenizers, distillation_vocab_size, parameter_count
from kdlab.module import DistillModule
from kdlab.pretrain import cache_key, load_or_train

log = logging.getLogger(__name__)

# W&B stays offline (no login, no network) unless the user opts in with WANDB_MODE=online.
OmegaConf.register_new_resolver("kdlab.wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online", replace=True)


def build_model(cfg: DictConfig, role: str, tokenizer, datamodule):
    """The teacher or the student; CE-trained first (and cached) where ``model.<role>_training`` is set."""
    model = instantiate(cfg.model[role], tokenizer=tokenizer)
    training = cfg.model.get(f"{role}_training")
    if not training:
        return model  # used as it is: a pretrained model, or a student distilled from scratch
    splits = cfg.data.get("splits", cfg.data)  # the suite's generator settings, or the whole file-data config
    if training.get("n_train"):
        if "splits" not in cfg.data:
            raise ValueError(f"model.{role}_training.n_train applies to the built-in suite (data=suite) only; remove it")
        # Trained on more examples than the distillation's transfer set (as a real teacher has
        # seen a larger corpus); build_suite draws val/test first, so they stay identical.
        splits = OmegaConf.merge(splits, {"n_train": training.n_train})
        datamodule = instantiate(cfg.data, tokenizer=tokenizer, splits=splits)
    settings = {k: v for k, v in training.items() if k != "n_train"}  # n_train is in splits
    key = cache_key(cfg.model[role], cfg.model.tokenizer, settings, splits, cfg.data.batch_size)
    return load_or_train(model, training, key, cfg.paths.cache_dir, tokenizer, datamodule, role)


def run(cfg: DictConfig) -> dict[str, float]:
    """One distillation run; returns its final metrics (also written to ``metrics.json``)."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    # Everything a user can get wrong is checked before a model is built or trained.
    tokenizer = instantiate(cfg.model.tokenizer)
    check_tokenizers(tokenizer, cfg.model.student.get("path"))
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    loss = instantiate(cfg.loss)
    if getattr(loss, "needs_rollouts", False) and not any(r.prompt_len for r in datamodule.records["train"]):
        raise ValueError(f"{type(loss).__name__} samples responses to the data's prompts, and the training data has none (plain text only)")
    teacher = build_model(cfg, "teacher", tokenizer, datamodule)
    student = build_model(cfg, "student", tokenizer, datamodule)
    for role, model in (("teacher", teacher), ("student", student)):
        check_causal(model, role, cfg.model[role].get("path", ""))
    vocab_size = distillation_vocab_size(teacher, student, tokenizer)
    log.info("teacher: %.2fM parameters, student: %.2fM parameters", parameter_count(teacher) / 1e6, parameter_count(student) / 1e6)
    eval_settings = instantiate(cfg.eval) if cfg.get("eval") else None
    module = DistillModule(student, teacher, loss, tokenizer, vocab_size=vocab_size, eval_settings=eval_settings, **cfg.module)

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    # The exported student is the best one by val/loss; its val and test metrics are the final ones.
    best = (trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "") or None
    metrics = {}
    for evaluate in (trainer.validate, trainer.test):
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))})
    metrics = dict(sorted(metrics.items()))
    if not trainer.is_global_zero:
        return metrics  # under DDP, rank 0 alone writes the run's files
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if datamodule.eos_token_id != tokenizer.eos_token_id:  # e.g. a chat template's end-of-turn token
        student.generation_config.eos_token_id = [datamodule.eos_token_id, tokenizer.eos_token_id]
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.save_pretrained(out_dir / "student")
    tokenizer.save_pretrained(out_dir / "student")
    if logger and hasattr(logger, "experiment") and hasattr(logger.experiment, "summary"):
        logger.experiment.summary.update(metrics)
    if logger:
        logger.finalize("success")
    log.info("metrics: %s; student exported to %s", out_dir / "metrics.json", out_dir / "student")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    if cfg.get("logger") and "wandb" in cfg.logger._target_.lower():
        import wandb

        wandb.finish()  # one W&B run per sweep job
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
