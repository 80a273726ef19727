"""Sharded training (``trainer=fsdp``): the strategy, built from config."""

from __future__ import annotations

import functools

from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy


def is_transformer_block(module) -> bool:
    """A decoder layer of any Hugging Face causal LM (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, GPT-2's ``GPT2Block``)."""
    return type(module).__name__.endswith(("DecoderLayer", "Block"))


def fsdp_strategy(**kwargs):
    """Lightning's FSDPStrategy with one FSDP unit per transformer block of both models.

    The teacher is sharded like the student (its memory is split across devices) but stays frozen:
    its parameters have ``requires_grad=False`` and it runs under ``no_grad``, so no gradient is
    ever kept for it; ``use_orig_params=True`` lets frozen and trainable parameters share units.
    The student is gathered to rank 0 for export (``state_dict_type=full``).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=is_transformer_block)
    return FSDPStrategy(auto_wrap_policy=policy, use_orig_params=True, state_dict_type="full", **kwargs)
