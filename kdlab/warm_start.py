"""CE training before distillation (``model.<role>_training``), run the first time a run needs it and cached.

Two models use it: the built-in default teacher (trained on the suite) and, as in the papers'
protocol (MiniLLM, GKD and DistiLLM all distil into an SFT-initialised student), the student's
warm start. The
cache key is a hash of everything that determines the trained weights (architecture, tokenizer,
the tokenised training data itself, training settings, the recipe version), so changing any of
them trains a new model and never silently reuses a stale one. An entry is written atomically
with a manifest of checksums, verified on load: a corrupted entry is retrained, never loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from kdlab import cache
from kdlab.data.sampler import DomainMixtureSampler
from kdlab.losses.divergences import CrossEntropy
from kdlab.module import DistillModule
from kdlab.preflight import check_trained

log = logging.getLogger(__name__)


RECIPE_VERSION = 2  # bump when the CE training below changes: every cached model is then retrained
MANIFEST = cache.MANIFEST  # written last: the recipe version and a checksum of every weight file


WEIGHTS = ("*.safetensors", "*.bin")


def load_cached(path: Path, role: str):
    """The model cached at ``path``, or None (with a log line saying why) if the entry is incomplete,
    from another recipe version, or its weights do not match the checksums recorded at save time."""
    if cache.load(path, {"recipe_version": RECIPE_VERSION}, WEIGHTS, role) is None:
        return None
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def load_or_train(model, training: DictConfig, key: str, cache_dir: str, tokenizer, datamodule, role: str = "teacher"):
    """The cached ``role`` model for ``key``, or ``model`` trained with CE on ``datamodule`` and cached."""
    path = Path(cache_dir).expanduser() / f"{role}s" / key
    cached = load_cached(path, role)
    if cached is not None:
        return cached
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
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(sampler, batch_size=training.get("batch_size")))
    check_trained(trainer, model, what=role)  # a diverged or untrained model is never cached
    # Written atomically with its manifest (kdlab/cache.py): an interrupted run never leaves half a
    # model that later runs would load.
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    cache.write(path, fill, {"recipe_version": RECIPE_VERSION}, WEIGHTS)
    log.info("%s cached at %s", role.capitalize(), path)
    return model
