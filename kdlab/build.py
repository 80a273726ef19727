"""Config → models: the tokenizers, the teacher and the student of a run, CE-trained first (and cached) where asked."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdlab.cache import cache_key, data_fingerprint
from kdlab.data.alignment import VocabularyMap
from kdlab.data.files import tokenizer_fingerprint
from kdlab.losses.base import Needs
from kdlab.models import check_positions, check_tokenizers
from kdlab.warm_start import load_or_train

log = logging.getLogger(__name__)


def build_tokenizers(cfg: DictConfig, needs: Needs):
    """``(teacher tokenizer, student tokenizer, VocabularyMap or None)``.

    The student reads the teacher's tokenizer unless its folder has its own that differs; that is
    refused (kdlab.models.check_tokenizers) unless the objective works across tokenizers
    (``Needs.aligned``) or reads no teacher (``loss=ce``); on-policy objectives are refused with their
    own reason. An aligned objective gets the two vocabularies' shared tokens, and the data is then
    encoded by both tokenizers. Across tokenizers the teacher is not CE-trained first
    (``model.teacher_training``): the run's data is the student's token ids.
    """
    teacher_tokenizer = instantiate(cfg.model.tokenizer)
    tokenizer = check_tokenizers(teacher_tokenizer, cfg.model.student.get("path"), across=needs.aligned or not needs.teacher,
                                 on_policy=needs.rollouts is not None)
    own = tokenizer is not teacher_tokenizer
    if own and "ddk" in (cfg.get("callbacks") or {}):
        raise ValueError(
            "data/mixing=ddk weights domains by the student/teacher perplexity ratio, and with two tokenizers the "
            "teacher's perplexity is over other tokens (not comparable): use data/mixing=uniform or static"
        )
    if own and needs.teacher and cfg.model.get("teacher_training"):
        raise ValueError(
            "model.teacher_training CE-trains the teacher on the run's data, and across tokenizers the data is the "
            "student's token ids (another vocabulary than the teacher's): give a trained teacher and set model.teacher_training=null"
        )
    if not needs.aligned:
        return teacher_tokenizer, tokenizer, None
    if not str(cfg.data.get("_target_", "")).startswith(("kdlab.data.files.", "kdlab.data.corpus.")):
        raise ValueError(
            f"this objective distils across tokenizers, which needs text both tokenizers encode: data=files or "
            f"data=python_corpus (not {cfg.data.get('_target_')}); for the built-in suite use a token-level loss such as loss=fkl"
        )
    vocabulary = VocabularyMap(teacher_tokenizer, tokenizer)
    log.info("across tokenizers: %d teacher tokens, %d student tokens, %d shared", vocabulary.teacher_size, len(tokenizer), len(vocabulary))
    return teacher_tokenizer, tokenizer, vocabulary


def build_model(cfg: DictConfig, role: str, tokenizer, datamodule):
    """The teacher or the student; CE-trained first (and cached) where ``model.<role>_training`` is set."""
    model = instantiate(cfg.model[role], tokenizer=tokenizer)
    check_positions(model, role, *datamodule.longest_sequence())  # before any training on the data
    training = cfg.model.get(f"{role}_training")
    if not training:
        return model  # used as it is: a pretrained model, or a student distilled from scratch
    if training.get("n_train"):
        if "splits" not in cfg.data:
            raise ValueError(f"model.{role}_training.n_train applies to the built-in suite (data=suite) only; remove it")
        # Trained on more examples than the distillation's transfer set (as a real teacher has
        # seen a larger corpus); build_suite draws val/test first, so they stay identical.
        splits = OmegaConf.merge(cfg.data.splits, {"n_train": training.n_train})
        datamodule = instantiate(cfg.data, tokenizer=tokenizer, splits=splits)
    # The key holds only what the trained weights depend on: the model, the tokenizer, the training
    # settings, the batch size and the tokenised training records themselves (data_fingerprint: each
    # record in order, with its domain). Not the data config: the CE training reads no held-out
    # record (limit_val_batches=0), so data.val/test, the evaluation settings and the held-out sizes
    # (data.splits.n_val/n_test) do not enter; a data setting changes the key exactly when it changes
    # the training records (the suite's n_train, seed or domains, data.max_length, the files, the
    # hold-out; n_val/n_test too where the suite skips a training draw equal to a held-out prompt).
    settings = {k: v for k, v in training.items() if k != "n_train"}  # n_train: in the training records
    batch_size = training.get("batch_size") or cfg.data.batch_size  # its own, or the distillation's
    # the tokenizer itself, not only its config node: a changed vocabulary resizes the model's embeddings
    tokens = tokenizer_fingerprint(tokenizer)
    key = cache_key(cfg.model[role], cfg.model.tokenizer, tokens, settings, batch_size, data_fingerprint(datamodule))
    return load_or_train(model, training, key, cfg.paths.cache_dir, tokenizer, datamodule, role)
