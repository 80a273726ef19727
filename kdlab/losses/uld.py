"""Universal Logit Distillation's distance, and a divergence over two vocabularies' shared tokens.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
Loss for LLMs", arXiv 2402.12030, §3). With p = softmax(z_T/τ_t) over the teacher's vocabulary and
q = softmax(z_S/τ_s) over the student's, the Wasserstein-1 distance under a uniform transport cost
between any two tokens has a closed form: sort both vectors in descending order, zero-pad the
shorter to the longer's size, and sum the absolute differences,

    ULD(p, q) = Σ_i |q_(i) − p_(i)|.

It needs no correspondence between the two vocabularies' tokens, only O(V log V) sorts. Properties
(tests/test_uld.py): invariant to any permutation of either vocabulary; 0 when the sorted vectors
are equal; on one vocabulary at most Σ|p − q| = 2·TVD (the sorted pairing minimises the L1
distance over all pairings of the entries). Zero-padding changes nothing in the first m = min(V_s, V_t)
terms and adds |0 − x| = x for each of the longer vector's entries beyond m: the padded part is
Σ_{i>m} of the longer's sorted entries, which is added as that sum instead of materialising the padding.

These are pure functions of logits, one value per row; kdlab/losses/across.py builds the objectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdlab.losses.dtypes import upcast
from kdlab.losses.sparse import SparseTeacher


def _probs(logits: Tensor, temperature: float, name: str) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")
    return torch.softmax(upcast(logits) / temperature, dim=-1)


def _sorted_descending(probs: Tensor) -> Tensor:
    """``probs`` sorted in descending order along the last dim, differentiably (a gather by the order).

    Probabilities are >= 0, and non-negative IEEE floats order exactly as their bit patterns read as
    integers, so the order is found by an integer sort of the same bits: the same result as a float
    sort, about 1.5x faster on CPU, which dominates ULD's cost at real vocabulary sizes."""
    keys = probs.detach().view(torch.int32 if probs.dtype == torch.float32 else torch.int64)
    order = keys.sort(dim=-1, descending=True).indices
    return probs.gather(-1, order)


def _check_rows(student: Tensor, teacher_rows: tuple[int, ...]) -> None:
    # both sides are compared row by row; a broadcast (one teacher row against G student rows) would be silent
    if tuple(student.shape[:-1]) != tuple(teacher_rows):
        raise ValueError(
            f"the student has rows {tuple(student.shape[:-1])}, the teacher {tuple(teacher_rows)}: they must match"
        )


def uld_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> Tensor:
    """ULD per row: (G, V_s) and (G, V_t) logits → (G,). Gradients reach the student's logits only.

    Computed in float32 at least (float64 stays float64). The first m = min(V_s, V_t) sorted entries
    are compared; the longer side's remaining sorted entries are summed, which equals the zero-padded
    L1 distance exactly. At ties in the sort the value is continuous and the gradient a subgradient.
    """
    _check_rows(student_logits, tuple(teacher_logits.shape[:-1]))
    q = _sorted_descending(_probs(student_logits, student_temperature, "student_temperature"))
    p = _sorted_descending(_probs(teacher_logits.detach(), teacher_temperature, "teacher_temperature"))
    dtype = torch.promote_types(q.dtype, p.dtype)
    q, p = q.to(dtype), p.to(dtype)
    m = min(q.shape[-1], p.shape[-1])
    head = (q[..., :m] - p[..., :m]).abs().sum(-1)
    # the zero-padded part: the longer vector's entries beyond m (at most one of the two slices is non-empty)
    return head + q[..., m:].sum(-1) + p[..., m:].sum(-1)


def uld_sparse_distance(student_logits: Tensor, teacher: SparseTeacher, *, student_temperature: float = 1.0) -> Tensor:
    """ULD per row against the teacher cache's view (kdlab.losses.sparse): (G, V_s) logits and a (G, k) view → (G,).

    With the teacher's top-k probabilities sorted, p_(1..k), at the view's own temperature, its tail
    mass r = 1 − Σ p_(1..k) (the view's ``log_tail``), and the student's sorted q_(1..V_s):

        Σ_{i≤k} |q_(i) − p_(i)| + |Σ_{i>k} q_(i) − r|,

    ULD between the two distributions coarsened to k + 1 outcomes (the sorted ranks beyond k as one
    outcome, as kdlab's sparse divergences treat the tail). Since the teacher's entries beyond rank k
    sum to r, the triangle inequality makes it a lower bound of the dense distance, exact when the
    teacher's tail is empty (k = V_t, or r = 0). A student vocabulary smaller than k is zero-padded
    (its tail is then 0). Only the student's top-k is selected (``topk``, no full sort).
    """
    _check_rows(student_logits, tuple(teacher.indices.shape[:-1]))
    k = teacher.k
    q = _probs(student_logits, student_temperature, "student_temperature")
    # the cache stores its top-k sorted already; sorting k entries again costs nothing and relies on nothing
    p_top = teacher.log_probs().detach().exp().sort(dim=-1, descending=True).values
    r = upcast(teacher.log_tail.detach()).exp()  # exp(−inf) = 0 when k covers the teacher's vocabulary
    dtype = torch.promote_types(q.dtype, p_top.dtype)
    q, p_top, r = q.to(dtype), p_top.to(dtype), r.to(dtype)
    top = q.topk(min(k, q.shape[-1]), dim=-1)
    # the student's tail as a sum over its other ids, not 1 − Σ top (which cancels to rounding noise when the
    # tail is small, and could flip the sign of |q_tail − r| and with it the gradient); 0 when V_s <= k
    q_tail = q.scatter(-1, top.indices, 0.0).sum(-1)
    q_top = top.values
    if q_top.shape[-1] < k:
        q_top = torch.cat([q_top, q_top.new_zeros(*q_top.shape[:-1], k - q_top.shape[-1])], dim=-1)
    return (q_top - p_top).abs().sum(-1) + (q_tail - r).abs()


def shared_vocab_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    divergence: Callable[..., Tensor],
    *,
    temperature: float = 1.0,
) -> Tensor:
    """A token-level ``divergence`` (kdlab.losses.divergences) on the tokens both vocabularies share, per row: (G,).

    ``student_ids[j]`` and ``teacher_ids[j]`` (each (S,)) are the same string in the two vocabularies.
    Gathering those S columns of each side is the whole restriction: the divergences take logits and
    normalise them with their own log_softmax, so the result is the divergence between p and q
    conditioned on the shared tokens (each renormalised over them), at ``temperature``. With
    ``labels=None`` the divergences return their per-row values unmasked, the (G,) returned here. With
    ``arange(V)`` on both sides (one tokenizer) it is the divergence of the full rows, exactly.
    """
    if student_ids.ndim != 1 or student_ids.shape != teacher_ids.shape:
        raise ValueError(
            f"student_ids {tuple(student_ids.shape)} and teacher_ids {tuple(teacher_ids.shape)}: "
            "expected two (S,) lists of ids"
        )
    if student_ids.numel() == 0:
        # the divergences would sum over an empty vocabulary and return 0 as if the distributions agreed
        raise ValueError("the vocabularies share no token: there is no distribution to compare")
    _check_rows(student_logits, tuple(teacher_logits.shape[:-1]))
    student = student_logits.index_select(-1, student_ids.long())
    teacher = teacher_logits.index_select(-1, teacher_ids.long())
    return divergence(student, teacher, None, temperature=temperature)
