"""Config → models: the teacher and the student of a run, CE-trained first (and cached) where asked."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdlab.cache import cache_key, data_fingerprint
from kdlab.data.files import tokenizer_fingerprint
from kdlab.models import check_positions
from kdlab.warm_start import load_or_train


def build_model(cfg: DictConfig, role: str, tokenizer, datamodule):
    """The teacher or the student; CE-trained first (and cached) where ``model.<role>_training`` is set."""
    model = instantiate(cfg.model[role], tokenizer=tokenizer)
    check_positions(model, role, *datamodule.longest_sequence())  # before any training on the data
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
    batch_size = training.get("batch_size") or cfg.data.batch_size  # its own, or the distillation's
    # the tokenizer itself, not only its config node: a changed vocabulary resizes the model's embeddings
    tokens = tokenizer_fingerprint(tokenizer)
    key = cache_key(cfg.model[role], cfg.model.tokenizer, tokens, settings, splits, batch_size, data_fingerprint(datamodule))
    return load_or_train(model, training, key, cfg.paths.cache_dir, tokenizer, datamodule, role)
