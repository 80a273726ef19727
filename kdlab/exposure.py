"""Exposure bias as MiniLLM measures it: the excess accumulated error of free-running generation.

MiniLLM (Gu et al., ICLR 2024, §3.3 "Exposure bias", after Arora et al. 2022; docs/methods.md §3)
compares the error a student accumulates on its OWN prefixes with the error it makes on the
teacher's prefixes, taking the teacher p as the oracle:

    R(l) = Σ_{t≤l} E_{y<t ~ q}  KL(p(·|y<t, x) ‖ q(·|y<t, x))      (student-generated prefixes)
    ε(l) = Σ_{t≤l} E_{y<t ~ p}  KL(p(·|y<t, x) ‖ q(·|y<t, x))      (teacher-generated prefixes)
    ExAccErr(l) = (R(l) − ε(l)) / ε(l)

ExAccErr(l) = 0 means generating from its own prefixes costs the student nothing beyond its
error on the oracle's; the paper reports that it grows with l for SFT and KD students and stays
lower for MiniLLM. Each per-step KL is exact over the vocabulary; only the prefixes are sampled
(temperature 1, no filtering). A sequence that has emitted <eos> adds no further error (the
sum stops at its end), so R and ε are expectations over complete generations truncated at l.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.rollout import sample


@torch.no_grad()
def accumulated_error(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, *, sampler, **sample_kwargs) -> Tensor:
    """Σ_{t≤l} KL(p‖q) per prompt for l = 1..max_new_tokens, on prefixes sampled from ``sampler``.

    Returns (B, max_new_tokens): column l−1 is the error accumulated over the first l steps.
    ``sampler`` is the student (R) or the teacher (ε); ``sample_kwargs`` go to kdlab.rollout.sample.
    """
    max_new = sample_kwargs["max_new_tokens"]
    vocab = sample_kwargs.get("vocab_size")
    rollout = sample(sampler, None, prompt_ids, prompt_mask, **sample_kwargs)
    inputs = {"input_ids": rollout.sequences, "attention_mask": rollout.attention_mask}
    log_q = student(**inputs).logits[..., :vocab].float().log_softmax(-1)
    log_p = teacher(**inputs).logits[..., :vocab].float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T): the error at every position
    per_step = torch.zeros(prompt_ids.shape[0], max_new, device=kl.device)
    step = rollout.response_mask.long().cumsum(-1) - 1  # 0-based index of the generated token
    rows, cols = rollout.response_mask.nonzero(as_tuple=True)
    per_step[rows, step[rows, cols]] = kl[rows, cols]
    return per_step.cumsum(-1)


def excess_accumulated_error(student_prefix_error: Tensor, teacher_prefix_error: Tensor) -> Tensor:
    """ExAccErr(l) for every l from (N, L) accumulated errors of :func:`accumulated_error` (means over N)."""
    return student_prefix_error.mean(0) / teacher_prefix_error.mean(0) - 1.0
