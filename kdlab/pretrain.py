"""CE pre-training of the embedded default's models, trained the first time a run needs them and cached.

Two models use it: the teacher (trained on the suite) and, as in the papers' protocol (MiniLLM,
GKD and DistiLLM all distil into an SFT-initialised student), the student's warm start. The
cache key is a hash of everything that determines the trained weights (architecture, tokenizer,
data, training settings), so changing any of them trains a new model and never silently reuses
a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from kdlab.data.sampler import DomainMixtureSampler
from kdlab.losses.divergences import CrossEntropy
from kdlab.module import DistillModule

log = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    """A short stable hash of config nodes and plain values."""
    plain = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train(model, training: DictConfig, key: str, cache_dir: str, tokenizer, datamodule, role: str = "teacher"):
    """The cached ``role`` model for ``key``, or ``model`` trained with CE on ``datamodule`` and cached."""
    path = Path(cache_dir).expanduser() / f"{role}s" / key
    if (path / "config.json").is_file():
        log.info("Loading the cached %s from %s", role, path)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    log.info(
        "Training the %s (first use of this config: %d CE steps); it will be cached at %s",
        role,
        training.max_steps,
        path,
    )
    module = DistillModule(
        student=model,
        teacher=None,
        loss=CrossEntropy(),
        tokenizer=tokenizer,
        lr=training.lr,
        warmup_steps=training.warmup_steps,
        min_lr_ratio=training.min_lr_ratio,
    )
    trainer = L.Trainer(
        max_steps=training.max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        accelerator=training.get("accelerator", "auto"),
        devices=1,
    )
    L.seed_everything(training.seed)
    # A sampler of its own (uniform, own seed): the distillation's data stream must not depend
    # on whether this model came from the cache.
    sampler = DomainMixtureSampler(datamodule.domain_indices, seed=training.seed)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(sampler))
    # Write to a temporary folder and rename, so an interrupted run never leaves half a model
    # that later runs would load.
    tmp = path.with_name(f"{key}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(tmp)  # another process cached it meanwhile; keep theirs
    else:
        tmp.rename(path)
    log.info("%s cached at %s", role.capitalize(), path)
    return model
