"""Checks that run before any model is built: settings a run cannot do what was asked with.

Each check raises ``ValueError`` naming the setting, the value, and the fix. ``kdlab.train``
calls :func:`check_run` first, so a bad value never costs a teacher training, and
:func:`check_trained` last, so a run that trained nothing or diverged never exports or caches a
model (a run must fail rather than hand back a wrong result with exit code 0).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdlab.errors import NotEnoughSpace


def check_optimisation(lr: float, weight_decay: float, betas, warmup_steps: int, min_lr_ratio: float, prefix: str = "module") -> None:
    """AdamW and the warmup + cosine schedule (``module.*``, or ``model.<role>_training.*``)."""
    problems = []
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        problems.append(f"{prefix}.lr={lr!r} must be a finite number > 0")
    elif lr > 1.0:
        problems.append(f"{prefix}.lr={lr!r} is above 1, where AdamW diverges to NaN; typical values are 1e-5 to 1e-2")
    if weight_decay is not None and not 0.0 <= weight_decay < 1.0:
        problems.append(f"{prefix}.weight_decay={weight_decay!r} must be in [0, 1)")
    if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        problems.append(f"{prefix}.betas={list(betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if warmup_steps is not None and warmup_steps < 0:
        problems.append(f"{prefix}.warmup_steps={warmup_steps!r} must be >= 0")
    if min_lr_ratio is not None and not 0.0 <= min_lr_ratio <= 1.0:
        problems.append(f"{prefix}.min_lr_ratio={min_lr_ratio!r} must be in [0, 1] (a negative learning rate trains by gradient ascent)")
    if problems:
        raise ValueError("; ".join(problems))


def check_trainer(trainer: DictConfig) -> None:
    max_steps = trainer.get("max_steps", -1)
    if max_steps == 0 or max_steps < -1 or (max_steps == -1 and not trainer.get("max_epochs")):
        raise ValueError(
            f"trainer.max_steps={max_steps} trains nothing; set trainer.max_steps to the number of optimiser steps (>= 1)"
        )
    interval = trainer.get("val_check_interval")
    if interval is not None and (interval <= 0 or (isinstance(interval, float) and interval > 1.0)):
        raise ValueError(
            f"trainer.val_check_interval={interval} is invalid: an int >= 1 (steps between validations) or a float in (0, 1]"
        )
    strategy = trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" in target.lower() and (trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()):
        raise ValueError("trainer=fsdp needs GPUs (Lightning's FSDP runs on CUDA only); on CPU use trainer=ddp")
    if trainer.get("accumulate_grad_batches", 1) < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} must be >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip >= 0):
        raise ValueError(f"trainer.gradient_clip_val={clip!r} must be a number >= 0 (0 or null: no clipping)")
    precision = str(trainer.get("precision", "32-true"))
    on_cpu = trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu and precision in ("16", "16-mixed", "16-true"):
        # Lightning would train in bf16-mixed instead, while the saved config and the cache keys say 16
        raise ValueError(
            f"trainer.precision={precision} is float16, which needs a GPU: on CPU Lightning would switch to bf16 "
            "while this run's config says 16. Set trainer.precision=bf16-mixed or 32-true"
        )


def check_schedule(cfg: DictConfig) -> None:
    """The learning rate reaches its set value, and validations (checkpoints, DDK's updates) happen."""
    max_steps = cfg.trainer.get("max_steps", -1)
    warmup = cfg.module.get("warmup_steps") or 0
    if max_steps > 0 and warmup > max_steps:
        raise ValueError(
            f"module.warmup_steps={warmup} is above trainer.max_steps={max_steps}: the learning rate would peak at "
            f"{max_steps / warmup:.0%} of module.lr={cfg.module.lr}. Set module.warmup_steps={max(1, max_steps // 10)} (or any value <= {max_steps})"
        )
    for role in ("teacher", "student"):
        t = cfg.model.get(f"{role}_training")
        if t and (t.get("warmup_steps") or 0) > t.max_steps:
            raise ValueError(
                f"model.{role}_training.warmup_steps={t.warmup_steps} is above its max_steps={t.max_steps}: the learning "
                f"rate would never reach model.{role}_training.lr; set warmup_steps <= {t.max_steps}"
            )
    interval = cfg.trainer.get("val_check_interval")
    ddk = "ddk" in (cfg.get("callbacks") or {}) and cfg.callbacks.ddk is not None
    if ddk and max_steps > 0 and isinstance(interval, int) and interval >= max_steps:
        raise ValueError(
            f"data/mixing=ddk reweights the domains at each validation, and trainer.val_check_interval={interval} is not "
            f"below trainer.max_steps={max_steps}: no update would happen before the end. Set trainer.val_check_interval "
            f"to a fraction of the run, e.g. {max(1, max_steps // 4)}"
        )


def _writable_folder(folder: Path, what: str, fix: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"the {what} {str(folder)!r} cannot be created ({err.strerror}); {fix}") from None
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"the {what} {str(folder)!r} is not writable; {fix}")
    return folder


def check_cache_dir(path) -> Path:
    """The cache folder of trained teachers and warm starts: set, a folder, and writable."""
    if path is None or not str(path).strip():
        raise ValueError(
            "the model cache path is empty (KDLAB_CACHE is set to an empty value?); unset KDLAB_CACHE for ~/.cache/kdlab "
            "or point it at a folder"
        )
    folder = Path(str(path)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the model cache path {str(folder)!r} (paths.cache_dir / KDLAB_CACHE) is a file; point it at a folder")
    return _writable_folder(folder, "model cache folder", "set KDLAB_CACHE to a writable folder")


def check_output_dir(path) -> Path:
    fix = "set hydra.run.dir (or hydra.sweep.dir) to a writable place"
    return _writable_folder(Path(str(path)).expanduser(), "run folder", fix)


def check_run(cfg: DictConfig) -> None:
    """Every setting of ``kdlab.train`` that can be checked without data or models."""
    check_output_dir(cfg.paths.output_dir)
    check_trainer(cfg.trainer)
    module = cfg.module
    check_optimisation(module.lr, module.get("weight_decay"), module.get("betas"), module.get("warmup_steps"), module.get("min_lr_ratio"))
    check_model_sources(cfg.model)
    trained = [role for role in ("teacher", "student") if cfg.model.get(f"{role}_training")]
    for role in trained:
        t = cfg.model[f"{role}_training"]
        check_optimisation(t.lr, None, None, t.get("warmup_steps"), t.get("min_lr_ratio"), prefix=f"model.{role}_training")
        if t.max_steps < 1:
            raise ValueError(f"model.{role}_training.max_steps={t.max_steps} trains nothing; set it >= 1 or model.{role}_training=null")
    check_schedule(cfg)
    if trained:
        check_cache_dir(cfg.paths.cache_dir)


def check_model_sources(model: DictConfig) -> None:
    """Each pretrained model's source (kdlab.models.check_source), before anything is built."""
    from kdlab.models import check_source  # transformers: imported only when a run is checked

    for role in ("teacher", "student"):
        node = model.get(role)
        if node is not None and "path" in node and "gguf_file" in node:  # not built from a config
            check_source(node.get("path"), node.get("gguf_file"), f"model.{role}")


def check_batches(datamodule, batch_size: int, accumulate: int = 1) -> None:
    """The training split yields at least one optimiser step's records (a partial last batch is dropped)."""
    n = len(datamodule.records["train"])
    if n < batch_size * accumulate:
        times = f" x trainer.accumulate_grad_batches={accumulate}" if accumulate > 1 else ""
        raise ValueError(
            f"data.batch_size={batch_size}{times} is larger than the training set ({n} records): no training batch can be "
            f"formed. Set data.batch_size={n // accumulate} or less, or add training data."
        )


def check_free_space(out_dir: Path, student, checkpoints: bool) -> None:
    """Room in the run folder for what the run will write: two checkpoints (best and last: the student
    with AdamW's two moments, 12 bytes per float32 parameter) and the exported student, before training
    starts (a checkpoint cut short by a full disk is a file no run can load)."""
    import shutil

    params = sum(p.numel() * p.element_size() for p in student.parameters())
    need = params * (2 * 3 if checkpoints else 0) + params
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise NotEnoughSpace(
            f"the run folder {out_dir} has {free / 2**20:,.0f} MiB free, and this run writes about {need / 2**20:,.0f} MiB "
            "(checkpoints with the optimiser state, and the exported student): free some space, or set hydra.run.dir "
            "on another disk"
        )


def non_finite_parameters(model, state: dict | None = None) -> list[str]:
    tensors = state.items() if state is not None else model.named_parameters()
    return [name for name, p in tensors if p.is_floating_point() and not torch.isfinite(p).all()]


def check_trained(trainer, model, metrics: dict[str, float] | None = None, what: str = "student", state: dict | None = None) -> None:
    """After training: the model took optimiser steps, and its weights (``state``: a gathered state
    dict, for sharded models) and final metrics are finite."""
    if trainer.global_step == 0:
        raise RuntimeError(
            f"the {what} took no optimiser step (no training batch: is data.batch_size larger than the training set?); "
            "nothing is exported or cached"
        )
    bad = non_finite_parameters(model, state)
    if bad:
        raise FloatingPointError(
            f"the {what}'s weights are not finite after training ({len(bad)} tensors, e.g. {bad[0]}): training diverged. "
            "Lower the learning rate (module.lr) or keep trainer.gradient_clip_val; nothing is exported or cached"
        )
    bad_metrics = sorted(k for k, v in (metrics or {}).items() if not math.isfinite(v))
    if bad_metrics:
        raise FloatingPointError(
            f"the {what}'s final metrics are not finite ({', '.join(bad_metrics[:5])}); training diverged. "
            "Lower module.lr; nothing is exported"
        )
