"""Distil a teacher into a student: seed → build → fit → test → export.

    python -m kdlab.train                              # one run on the built-in suite
    python -m kdlab.train -m loss=ce,fkl,rkl,jsd       # a sweep; prints and saves summary.csv
    python -m kdlab.train loss=jsd loss.divergence.beta=0.9 trainer.max_steps=2000 logger=csv

Each run folder (outputs/runs/... or outputs/sweeps/.../<job>) holds ``metrics.json`` (final
val/test metrics), ``student/`` (the student and tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained``) and the logger's files (``wandb/`` or ``csv/``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from kdlab import resolvers, teacher_cache  # noqa: F401  (resolvers: registered on import)
from kdlab.build import build_model, build_tokenizers
from kdlab.callbacks.checkpoint import atomic_checkpoints
from kdlab.callbacks.throughput import Throughput
from kdlab.errors import USER_ERROR, missing_plugin, show_user_error
from kdlab.losses.base import needs_of
from kdlab.models import check_causal, distillation_vocab_size, parameter_count
from kdlab.module import DistillModule
from kdlab.preflight import check_batches, check_cache_dir, check_free_space, check_run, check_trained
from kdlab.resume import checkpoint_to_resume, last_checkpoint, logger_kwargs, save_config, save_logger_id
from kdlab.summary import FAILED

log = logging.getLogger(__name__)

def final_metrics(trainer, module, datamodule, train_only: bool) -> dict[str, float]:
    """The run's final metrics: val and test of the best student by val/loss (the exported one), the
    training throughput, and, for a training-only run, the last training loss instead of val/test."""
    metrics = {}
    for callback in trainer.callbacks:
        if isinstance(callback, Throughput):
            metrics.update(callback.summary())
    if train_only:
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and k not in metrics})
        return dict(sorted(metrics.items()))
    best = (trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "") or None
    for evaluate in (trainer.validate, trainer.test):
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))})
    return dict(sorted(metrics.items()))


def counted_in_optimiser_steps(trainer: DictConfig) -> dict:
    """``trainer.val_check_interval`` counts optimiser steps (its documented unit); Lightning counts
    batches, so under gradient accumulation over k micro-batches it is handed k times the value."""
    interval, k = trainer.get("val_check_interval"), trainer.get("accumulate_grad_batches", 1)
    if isinstance(interval, int) and k > 1:
        return {"val_check_interval": interval * k}
    return {}


def training_only(cfg: DictConfig) -> DictConfig:
    """``train_only=true``: no validation, test, generation or checkpoint; only training and its throughput."""
    if "ddk" in (cfg.get("callbacks") or {}):
        raise ValueError("train_only=true has no validation, and DDK reweights domains at each validation; drop data/mixing=ddk")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_checkpointing = False
        cfg.callbacks = {k: v for k, v in (cfg.get("callbacks") or {}).items() if k not in ("model_checkpoint",)}
    return cfg


def run(cfg: DictConfig) -> dict[str, float]:
    """One distillation run; returns its final metrics (also written to ``metrics.json``)."""
    # Everything a user can get wrong is checked before a model is built or trained.
    check_run(cfg)
    if cfg.get("train_only"):
        cfg = training_only(cfg)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = checkpoint_to_resume(cfg, out_dir)
    (out_dir / FAILED).unlink(missing_ok=True)  # a job continued in place is no longer the failed one
    L.seed_everything(cfg.seed, workers=True)
    loss = instantiate(cfg.loss)
    needs = needs_of(loss)
    teacher_tokenizer, tokenizer, vocabulary = build_tokenizers(cfg, needs)
    own_tokenizer = tokenizer is not teacher_tokenizer  # the student reads its own (another family's)
    cache_k = teacher_cache.check_request(cfg.get("teacher_cache"), loss, len(teacher_tokenizer))  # refusals before data or models
    if cache_k:
        check_cache_dir(cfg.paths.cache_dir)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, **({"across": vocabulary} if vocabulary is not None else {}))
    check_batches(datamodule, cfg.data.batch_size, cfg.trainer.get("accumulate_grad_batches", 1))
    eval_settings = instantiate(cfg.eval) if cfg.get("eval") else None
    if needs.rollouts is not None and not any(r.prompt_len for r in datamodule.records["train"]):
        raise ValueError(f"{type(loss).__name__} samples responses to the data's prompts, and the training data has none (plain text only)")
    # a teacher that reads other tokens and is not needed (loss=ce beside a sweep across tokenizers) is not built:
    # it would be no reference on the student's tokens
    teacher = build_model(cfg, "teacher", teacher_tokenizer, datamodule) if needs.teacher or not own_tokenizer else None
    student = build_model(cfg, "student", tokenizer, datamodule)
    for role, model in (("teacher", teacher), ("student", student)):
        if model is not None:
            check_causal(model, role, cfg.model[role].get("path", ""))
    rows = student.get_output_embeddings().weight.shape[0]
    vocab_size = min(len(tokenizer), rows) if own_tokenizer else distillation_vocab_size(teacher, student, tokenizer)
    log.info("teacher: %s, student: %.2fM parameters", f"{parameter_count(teacher) / 1e6:.2f}M parameters" if teacher is not None else "not used",
             parameter_count(student) / 1e6)
    check_free_space(out_dir, student, checkpoints=cfg.trainer.get("enable_checkpointing", True) is not False)
    logger = instantiate(cfg.logger, **logger_kwargs(cfg, out_dir, resuming=ckpt_path is not None)) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        save_logger_id(logger, out_dir)
    save_config(cfg, out_dir)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, **counted_in_optimiser_steps(cfg.trainer))
    atomic_checkpoints(trainer)  # a write cut short (a full disk) never replaces a good checkpoint by a truncated one
    if "SLURM_JOB_ID" not in os.environ:
        # pre-emption by SIGUSR1 (batch systems other than SLURM, whose requeue Lightning handles) as SIGTERM
        signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    # the teacher cache: one teacher pass over the training records (or the stored one), read by the training steps
    teacher_vocab = vocabulary.teacher_size if vocabulary is not None else vocab_size
    signals = teacher_cache.for_run(cfg, loss, teacher, teacher_tokenizer, datamodule, teacher_vocab, trainer) if cache_k else None
    module = DistillModule(
        student, teacher, loss, tokenizer, vocab_size=vocab_size, eval_settings=eval_settings, teacher_signals=signals,
        vocabulary=vocabulary, **cfg.module,
    )
    fit(trainer, module, datamodule, ckpt_path, out_dir)
    try:
        metrics = final_metrics(trainer, module, datamodule, train_only=cfg.get("train_only", False))
    except SIGTERMException:  # Lightning's SystemExit without a code: it would exit 0 with nothing exported
        raise RunInterrupted(
            f"interrupted by SIGTERM during the final evaluation (training finished at step {trainer.global_step}); "
            "nothing was exported (no metrics.json, no student/): continue with resume=auto (same hydra.run.dir), "
            "which resumes from the last checkpoint, then evaluates and exports",
            128 + signal.SIGTERM,
        ) from None
    export(trainer, student, tokenizer, datamodule.eos_token_id, metrics, out_dir)
    if logger and trainer.is_global_zero:
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "summary"):
            logger.experiment.summary.update(metrics)
        logger.finalize("success")
    return metrics


def export(trainer, student, tokenizer, eos_token_id: int, metrics: dict[str, float], out_dir: Path) -> None:
    """``student/`` (save_pretrained, with the tokenizer), then ``metrics.json``, written by rank 0,
    after checking that the student trained and is finite. ``metrics.json`` comes last and whole
    (written beside, then renamed): a run folder that has one holds a complete student (a full disk
    during the export fails the run, and a sweep's summary lists it as failed)."""
    # the student's full weights (gathered from every rank when sharded); a collective call on every rank
    full = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return  # under DDP and FSDP, rank 0 alone checks and writes the run's files
    state = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    check_trained(trainer, student, metrics, state=state)  # an untrained or diverged student is never exported
    if eos_token_id != tokenizer.eos_token_id:  # e.g. a chat template's end-of-turn token
        student.generation_config.eos_token_id = [eos_token_id, tokenizer.eos_token_id]
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.save_pretrained(out_dir / "student", state_dict=state)
    tokenizer.save_pretrained(out_dir / "student")
    partial = out_dir / "metrics.json.partial"
    partial.write_text(json.dumps(metrics, indent=2))
    partial.replace(out_dir / "metrics.json")
    log.info("metrics: %s; student exported to %s", out_dir / "metrics.json", out_dir / "student")


def fit(trainer, module, datamodule, ckpt_path: str | None, out_dir: Path) -> None:
    """``trainer.fit``; stopped by SIGTERM or SIGUSR1 (pre-emption) or by Ctrl-C, it saves where it
    stopped and raises :class:`RunInterrupted` (Lightning itself would exit 0, or 1 with no checkpoint)."""
    try:
        # our own checkpoint (it holds the sampler's and the rollout buffer's state): loaded in full
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        return
    except SIGTERMException:
        how, status = "SIGTERM", 128 + signal.SIGTERM
    except SystemExit as err:  # Lightning's answer to Ctrl-C: its own shutdown, then sys.exit(1)
        if not isinstance(err.__context__, KeyboardInterrupt):
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C from then on
        how, status = "Ctrl-C", 128 + signal.SIGINT
    last = last_checkpoint(out_dir)
    if stopped_mid_validation(trainer):
        # a checkpoint now would hold a half-done validation that a resumed run never completes (nor
        # weighs for the best checkpoint): the last one, from the previous validation, is kept
        kept = f"kept {last} from the previous validation" if last.is_file() else "no checkpoint yet"
        where = f"during the validation at step {trainer.global_step}; {kept}"
    else:
        trainer.save_checkpoint(last)
        where = f"at step {trainer.global_step} of {trainer.max_steps}; saved {last}"
    raise RunInterrupted(
        f"interrupted by {how} {where}: continue with resume=auto (same hydra.run.dir), which ends as the "
        "uninterrupted run would; nothing was exported (no metrics.json, no student/)",
        status,
    )


def stopped_mid_validation(trainer) -> bool:
    """Whether fit stopped inside a validation pass: Lightning raises SIGTERM's exception after any
    validation batch but the last, and resets the trainer's stage on the way out, not the loop's progress."""
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    return progress.current.ready > 0 and not progress.is_last_batch


class RunInterrupted(RuntimeError):
    """The run was stopped by a signal before it finished (pre-emption, ``kill``, ``scancel``, Ctrl-C);
    ``status`` is the exit status a shell reports for that signal (143, 130)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def finished_jobs(sweep_dir: Path) -> list[str]:
    return sorted((p.parent.name for p in sweep_dir.glob("*/metrics.json")), key=lambda n: (len(n), n))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except RunInterrupted as err:
        _finish_wandb(cfg)
        hydra_cfg = HydraConfig.get()
        message = str(err)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            done = finished_jobs(Path(hydra_cfg.sweep.dir))
            message += f". Sweep {hydra_cfg.sweep.dir}: job {hydra_cfg.job.num} interrupted, finished jobs: {done or 'none'}; later jobs did not run"
        log.error("%s", message)
        print(f"kdlab: {message}", file=sys.stderr, flush=True)
        sys.exit(err.status)  # non-zero, as a shell reports a process killed by that signal
    except Exception as err:
        message = show_user_error(err, log)  # a user error: kdlab's message alone (kdlab/errors.py)
        if message is None:  # a crash: its traceback, into the job's own log (train.log) and stderr
            log.exception("the run failed")
        _finish_wandb(cfg, exit_code=1)  # the next job of a sweep must not log into this W&B run
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            if message is None:
                raise
            sys.exit(USER_ERROR)
        # In a sweep the other jobs still run; this one is listed as failed, with its error, in
        # summary.csv and the printed table (kdlab.summary), and the sweep exits non-zero.
        with contextlib.suppress(OSError):  # the failure may be that the folder is not writable
            (Path(cfg.paths.output_dir) / FAILED).write_text(message or f"{type(err).__name__}: {err}")
        return float("nan") if cfg.get("optimized_metric") else None
    _finish_wandb(cfg)  # one W&B run per sweep job
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


def _finish_wandb(cfg: DictConfig, exit_code: int = 0) -> None:
    if cfg.get("logger") and "wandb" in cfg.logger._target_.lower():
        import wandb

        wandb.finish(exit_code=exit_code)


if __name__ == "__main__":
    if hint := missing_plugin(sys.argv[1:]):  # before Hydra, whose own message has no install hint
        print(f"kdlab: {hint}", file=sys.stderr)
        sys.exit(USER_ERROR)
    main()
