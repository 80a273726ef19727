"""Building teacher and student language models, and checking that they can be distilled."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def from_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A freshly initialised causal LM from a transformers config (the embedded default pair).

    The vocabulary size and the special-token ids are taken from the tokenizer, so a config
    file never repeats them and cannot disagree with the tokenizer.
    """
    if tokenizer is not None:
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return AutoModelForCausalLM.from_config(config)


def from_pretrained(path: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A causal LM from a local Hugging Face directory (no hub access: ``local_files_only``)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model directory {path!r} does not exist; point the model config at a local Hugging Face "
            "model folder (one written by save_pretrained)"
        )
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def distillation_vocab_size(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer) -> int:
    """The number of logits over which teacher and student are compared.

    Equal vocabularies are compared whole. Model families that pad the embedding matrix up to a
    round size (e.g. 32000 → 32064) differ only past the tokenizer's vocabulary, so both are then
    compared over the tokenizer's ``len(tokenizer)`` entries. Anything else cannot be distilled
    token by token and is an error.
    """
    v_teacher = teacher.get_output_embeddings().weight.shape[0]
    v_student = student.get_output_embeddings().weight.shape[0]
    if v_teacher == v_student:
        return v_teacher
    v_tokenizer = len(tokenizer)
    if min(v_teacher, v_student) >= v_tokenizer:
        log.info(
            "teacher vocabulary (%d) and student vocabulary (%d) differ only by padding; comparing them over "
            "the tokenizer's %d tokens",
            v_teacher,
            v_student,
            v_tokenizer,
        )
        return v_tokenizer
    raise ValueError(
        f"teacher vocabulary size {v_teacher} and student vocabulary size {v_student} do not match, and the "
        f"smaller one does not cover the tokenizer's {v_tokenizer} tokens: token-level distillation needs "
        "teacher and student to share a tokenizer. Pick a student from the teacher's model family (or build it "
        "from a config with the teacher's tokenizer)."
    )
