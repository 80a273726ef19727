"""Universal Logit Distillation's distance, and a divergence over two vocabularies' shared tokens.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
Loss for LLMs", arXiv 2402.12030, §3). The Wasserstein-1 distance between two distributions over
different vocabularies, with a uniform transport cost between any two tokens, has a closed form
(their Eq. 6): sort both probability vectors in descending order, zero-pad the shorter to the
longer's size, and sum the absolute differences,

    ULD(p, q) = Σ_i |q_(i) − p_(i)|.

It needs no correspondence between the tokens of the two vocabularies. Properties (tests/test_uld.py):
invariant to any permutation of either vocabulary; 0 when the sorted vectors are equal; on one
vocabulary at most Σ|p − q| = 2·TVD (the sorted pairing minimises the L1 distance over pairings).
Zero-padding adds the longer vector's tail beyond the shorter's size (Σ_{i>m} of its sorted
entries), which is computed as that sum instead of materialising the padding.

These are pure functions of logits, per row; kdlab/losses/across.py builds the objectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdlab.losses.sparse import SparseTeacher


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _sorted_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.softmax(_upcast(logits) / temperature, dim=-1).sort(dim=-1, descending=True).values


def uld_distance(student_logits: Tensor, teacher_logits: Tensor, *, student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> Tensor:
    """ULD per row: (G, V_s) and (G, V_t) logits → (G,). Gradients reach the student's logits only."""
    q = _sorted_probs(student_logits, student_temperature)
    p = _sorted_probs(teacher_logits.detach(), teacher_temperature)
    m = min(q.shape[-1], p.shape[-1])
    head = (q[..., :m] - p[..., :m]).abs().sum(-1)
    # the zero-padded part: the longer vector's entries beyond m (only one of the two is non-empty)
    return head + q[..., m:].sum(-1) + p[..., m:].sum(-1)


def uld_sparse_distance(student_logits: Tensor, teacher: SparseTeacher, *, student_temperature: float = 1.0) -> Tensor:
    """ULD per row against the teacher cache's view (its top-k probabilities and one tail outcome).

    With the teacher's top-k sorted p_(1..k), its tail mass r = 1 − Σ p_(1..k), and the student's
    sorted q: Σ_{i≤k} |q_(i) − p_(i)| + |Σ_{i>k} q_(i) − r|, the distance between the two
    distributions coarsened to k + 1 outcomes (the tail as one, as kdlab's sparse divergences
    treat it). By the triangle inequality it is at most the dense distance, and equal to it when the
    teacher's tail is empty. Only the student's top-k is needed (no full sort). A student
    vocabulary smaller than k is zero-padded.
    """
    top = teacher.log_probs().exp().detach().sort(dim=-1, descending=True).values  # (G, k)
    tail = _upcast(teacher.log_tail).exp().detach()  # exp(−inf) = 0 when k covers the vocabulary
    k = top.shape[-1]
    probs = torch.softmax(_upcast(student_logits) / student_temperature, dim=-1)
    q_top = probs.topk(min(k, probs.shape[-1]), dim=-1).values
    if q_top.shape[-1] < k:
        q_top = torch.cat([q_top, q_top.new_zeros(*q_top.shape[:-1], k - q_top.shape[-1])], dim=-1)
    q_tail = (1.0 - q_top.sum(-1)).clamp_min(0.0)
    return (q_top - top.to(q_top.dtype)).abs().sum(-1) + (q_tail - tail.to(q_top.dtype)).abs()


def shared_vocab_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    divergence: Callable[..., Tensor],
    *,
    temperature: float = 1.0,
) -> Tensor:
    """A token-level ``divergence`` (kdlab.losses.divergences) between the two distributions restricted to
    the tokens both vocabularies share (``student_ids[j]`` and ``teacher_ids[j]`` stand for the same
    string) and renormalised there, per row: (G,). The divergence takes logits and normalises them
    itself, so gathering the shared columns is the whole restriction; with ``arange(V)`` on both
    sides it is the divergence of the full rows."""
    student = student_logits.index_select(-1, student_ids)
    teacher = teacher_logits.index_select(-1, teacher_ids)
    return divergence(student, teacher, None, temperature=temperature)
