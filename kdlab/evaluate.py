"""Score an exported student (and the teacher) on a data config, without training.

    python -m kdlab.evaluate student=outputs/runs/<date>/<time>/student
    python -m kdlab.evaluate student=<run>/student model=hf model.teacher.path=/models/big data=files data.train=chat.jsonl
    python -m kdlab.evaluate -m student=runA/student,runB/student eval.num_samples=10

The student is any local Hugging Face causal-LM folder that shares the teacher's tokenizer.
It is scored by DistillModule's own validation and test passes (``trainer.validate`` /
``trainer.test``), so every metric is computed exactly as during training: for a student
exported by ``kdlab.train``, the same data and eval settings give the same test metrics as that
run's ``metrics.json``. The run folder (``outputs/evaluate/<date>/<time>``) gets
``metrics.json`` and ``samples.jsonl``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import kdlab.resolvers  # noqa: F401  (the configs' resolvers: run folders, model=smollm2's file)
from kdlab.build import build_model
from kdlab.errors import stop_for_user_error
from kdlab.models import check_causal, check_tokenizers, distillation_vocab_size, from_pretrained
from kdlab.module import DistillModule

log = logging.getLogger(__name__)


def warn_if_settings_differ(cfg: DictConfig) -> None:
    """Warn when the student's own run (``<run>/.hydra/config.yaml``) used other data or eval settings:
    its metrics.json is then not comparable with this evaluation."""
    saved = Path(cfg.student).parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        return
    run_cfg = OmegaConf.load(saved)
    for key in ("data", "eval"):
        if key in run_cfg and OmegaConf.to_container(run_cfg[key], resolve=True) != OmegaConf.to_container(
            cfg[key], resolve=True
        ):
            log.warning(
                "the student's run used other %s settings (%s) than this evaluation; its metrics.json will differ. "
                "Pass the run's %s overrides (listed in %s) to reproduce it.",
                key,
                saved,
                key,
                saved.parent / "overrides.yaml",
            )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Val/test metrics of ``cfg.student`` (and the teacher); also written to ``<output_dir>/metrics.json``."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(cfg.splits) - {"val", "test"})
    if unknown:
        raise ValueError(f"splits {unknown} are unknown; choose from [val, test]")
    warn_if_settings_differ(cfg)
    L.seed_everything(cfg.seed, workers=True)
    teacher_tokenizer = instantiate(cfg.model.tokenizer)
    # a student distilled across tokenizers reads its own: it is then scored alone, since the
    # teacher's per-token metrics would be over other tokens
    tokenizer = check_tokenizers(teacher_tokenizer, cfg.student, across=True)
    use_teacher = cfg.use_teacher and tokenizer is teacher_tokenizer
    if cfg.use_teacher and not use_teacher:
        log.info("the student has its own tokenizer (another family's than the teacher's): it is evaluated without the teacher")
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    student = from_pretrained(cfg.student, role="student")
    check_causal(student, "student", cfg.student)
    teacher = build_model(cfg, "teacher", tokenizer, datamodule) if use_teacher else None
    vocab_size = distillation_vocab_size(teacher, student, tokenizer) if teacher is not None else None
    module = DistillModule(
        student, teacher, loss=None, tokenizer=tokenizer, vocab_size=vocab_size, eval_settings=instantiate(cfg.eval)
    )

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=[], enable_checkpointing=False)
    metrics = {}
    for split in cfg.splits:
        (trainer.validate if split == "val" else trainer.test)(module, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")})
    metrics = dict(sorted(metrics.items()))
    if not trainer.is_global_zero:
        return metrics  # under DDP, rank 0 alone writes the files
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if logger:
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "summary"):
            logger.experiment.summary.update(metrics)
        logger.finalize("success")
    log.info("metrics of %s: %s", cfg.student, out_dir / "metrics.json")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except Exception as err:
        stop_for_user_error(err, log)  # a mistake of the user's: the message alone, exit status 2
        raise
    if cfg.get("logger") and "wandb" in cfg.logger._target_.lower():
        import wandb

        wandb.finish()  # one W&B run per job of a multirun


if __name__ == "__main__":
    main()
