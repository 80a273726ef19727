"""Output heads: when a causal LM's logits are a plain linear head, and logits at chosen rows only.

A token-level objective reads the logits of the labelled positions alone (prompts and padding
carry no label). When a model's logits are exactly its output head applied to its base model's
last hidden state, the module applies the head to the labelled rows only
(:func:`labelled_logits`): no (B, T, V) logits are made for prompt or padding positions, in
either model, and the head's matmul shrinks with them. Models that transform the logits
(soft-capping, logit scales) or have no linear head get their own forward and a row selection,
the same values at the full cost. :mod:`kdlab.losses.fused` (``loss.fused_head``) goes further
and never materialises the labelled rows' logits either; it refuses such models.
"""

from __future__ import annotations

import weakref

import torch.nn.functional as F
from torch import Tensor, nn

# config fields by which transformers' causal LMs change h Wᵀ: caps (set = active) and scales
# (active unless 1). Gemma 2/3, nanochat: softcapping; Cohere: logit_scale; Granite, MiniCPM3,
# HyperCLOVA X: logits_scaling; others output_multiplier.
_LOGIT_CAPS = ("final_logit_softcapping",)
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier")
_HEAD_PROBLEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> head_problem(model)


def head_problem(model) -> str | None:
    """Why ``model``'s logits are not its output head applied to ``model.base_model``'s output, or None.

    Computed once per model (training steps ask at every step; a model's head and config do not change).
    """
    if model not in _HEAD_PROBLEMS:
        _HEAD_PROBLEMS[model] = _find_head_problem(model)
    return _HEAD_PROBLEMS[model]


def _find_head_problem(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
        return (
            f"its logits to be a linear head on a base model's last hidden state, but {type(model).__name__} has output "
            f"embeddings {type(head).__name__} and base model {type(getattr(model, 'base_model', model)).__name__}"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in _LOGIT_CAPS + _LOGIT_SCALES:
        value = getattr(config, field, None)
        if value is not None and (field in _LOGIT_CAPS or value != 1):
            return f"its logits as its head times its last hidden state, but {type(model).__name__} transforms them ({field}={value})"
    return None


def plain_head(model, role: str) -> nn.Linear:
    """``model``'s output head; a ValueError naming the cause when its logits are not that head (loss.fused_head)."""
    problem = head_problem(model)
    if problem is not None:
        raise ValueError(
            f"loss.fused_head=true needs the {role}'s {problem}; set loss.fused_head=false (the chunked path computes "
            "the model's own logits)"
        )
    return model.get_output_embeddings()


def last_hidden_rows(model, batch: dict, mask: Tensor) -> Tensor:
    """The base model's last hidden states at the positions of ``mask`` (B, T): (N, H), what the head would see."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden[mask]


def labelled_logits(model, batch: dict, mask: Tensor, vocab_size: int | None, through_head: bool = True) -> Tensor:
    """The logits at the positions of ``mask`` (B, T) as one row of N tokens, (1, N, V), the first ``vocab_size`` columns.

    With a plain head (and ``through_head``), the head runs on those N hidden states only; otherwise
    the model's own forward gives every position's logits and the rows are selected after.
    """
    if through_head and head_problem(model) is None:
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if vocab_size is not None:  # rows past the tokenizer (padded embeddings) are no outcome
            weight, bias = weight[:vocab_size], bias[:vocab_size] if bias is not None else None
        return F.linear(last_hidden_rows(model, batch, mask), weight, bias).unsqueeze(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits[mask].unsqueeze(0)
